//! Cluster mode end to end: one collect node (`hotpipe run` on the hot folder) and
//! workers (`hotpipe run --role worker`, no folder), real processes on a real
//! `nats-server`, killed and stopped with real signals. Each test checks exactly one
//! visible outcome per input (outputs in `outbox/`, or the input in `failed/` with its
//! reason) and an empty server at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A hot folder on a cluster: `m.pt` (the restore model, or the slow one) on the CPU, fed
/// at `size` px.
fn cluster_config(dir: &Path, url: &str, slow: bool, size: u32, cluster: &str) -> PathBuf {
    if slow {
        slow_model(&dir.join("m.pt"));
    } else {
        restore_model(&dir.join("m.pt"));
    }
    write(
        &dir.join("pipeline.toml"),
        &format!(
            "[model]\npath = \"m.pt\"\ndevice = \"cpu\"\nmax_batch = 4\n[preprocess]\nsize = {size}\n[encode]\nformat = \"jpeg\"\n[pipeline]\ndecode_threads = 1\nfit_threads = 1\nencode_threads = 1\nchannel_capacity = 4\nbatch_slots = 2\n[hotfolder]\nroot = \"hf\"\nsettle_ms = 0\nretry_s = 1\n[metrics]\nlisten = \"off\"\n[cluster]\nurl = \"{url}\"\nname = \"t\"\nack_wait_s = 2\nsweep_s = 2\n{cluster}"
        ),
    )
}

/// `hotpipe cluster init` (or `status`) with --json.
fn cluster_cmd(verb: &str, cfg: &Path) -> Value {
    let r: Cli = hotpipe()
        .args(["cluster", verb, "--json", "-c"])
        .arg(cfg)
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "cluster {verb}: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// The collect node and the workers, restarted like systemd would.
struct Nodes {
    cfg: PathBuf,
    env: Vec<(String, String)>,
    collect: Option<Daemon>,
    workers: Vec<Daemon>,
    /// The logs of workers that were killed, kept for the counts.
    dead_logs: Vec<String>,
}

impl Nodes {
    fn start(cfg: &Path, workers: usize, env: &[(&str, &str)]) -> Nodes {
        let mut n = Nodes {
            cfg: cfg.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            collect: None,
            workers: Vec::new(),
            dead_logs: Vec::new(),
        };
        n.start_collect();
        for _ in 0..workers {
            n.start_worker();
        }
        n
    }

    fn env(&self, role: &'static str) -> Vec<(&str, &str)> {
        let mut e: Vec<(&str, &str)> = vec![("HOTPIPE_ROLE", role)];
        e.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        e
    }

    fn start_collect(&mut self) {
        let d = Daemon::start(&self.cfg, &self.env("collect"));
        d.expect_log("hot folder ready", Duration::from_secs(60));
        self.collect = Some(d);
    }

    fn start_worker(&mut self) {
        let d = Daemon::start(&self.cfg, &self.env("worker"));
        self.workers.push(d);
    }

    /// Workers that died (or were killed) replaced by fresh ones; how many.
    fn restart_dead(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.workers.len() {
            if !self.workers[i].alive() {
                let fresh = Daemon::start(&self.cfg, &self.env("worker"));
                let dead = std::mem::replace(&mut self.workers[i], fresh);
                self.dead_logs.push(dead.log());
                n += 1;
            }
        }
        n
    }

    fn kill_worker(&mut self, i: usize) {
        self.workers[i].signal(libc::SIGKILL);
        wait_until(Duration::from_secs(10), || !self.workers[i].alive());
    }

    fn kill_collect(&mut self) {
        if let Some(c) = self.collect.take() {
            c.kill();
        }
    }

    /// Every worker log, the dead ones' too.
    fn worker_logs(&self) -> Vec<String> {
        let mut v = self.dead_logs.clone();
        v.extend(self.workers.iter().map(Daemon::log));
        v
    }

    /// Items recorded done, per worker log (live and dead).
    fn done_per_worker(&self) -> Vec<usize> {
        self.worker_logs()
            .iter()
            .map(|l| l.matches(" done ").count() + l.matches(" done\n").count())
            .collect()
    }
}

/// Producer: `n` JPEGs (the ones in `corrupt` garbage) delivered into the inbox, one
/// every `every`; returns the names.
fn deliver_all(hf: &Path, n: usize, corrupt: &[usize], every: Duration) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("img{i:03}.jpg");
        let bytes = if corrupt.contains(&i) {
            b"this is not a jpeg at all".to_vec()
        } else {
            jpeg_bytes(i as u32)
        };
        deliver(hf, &name, &bytes);
        names.push(name);
        std::thread::sleep(every);
    }
    names
}

fn stems(dir: &Path, skip_json: bool) -> Vec<String> {
    names(dir)
        .into_iter()
        // Hidden names are writes in progress (a sidecar's temporary file).
        .filter(|n| !(n.starts_with('.') || skip_json && n.ends_with(".json")))
        .collect()
}

/// Wait until `done/` and `failed/` hold `done` and `failed` inputs (or time runs out).
fn wait_finished(hf: &Path, done: usize, failed: usize, limit: Duration) -> bool {
    wait_until(limit, || {
        stems(&hf.join("done"), false).len() >= done
            && stems(&hf.join("failed"), true).len() >= failed
    })
}

/// Exactly one output per input that is done, none for the others, and the server
/// empty: no queued or in-flight item, no outcome, attempt count or object left.
fn assert_exactly_once(hf: &Path, cfg: &Path, inputs: &[String], failed: &[String]) {
    let outbox = names(&hf.join("outbox"));
    let mut per_stem: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outbox {
        let stem = o.trim_end_matches(".jpg").to_string();
        *per_stem.entry(stem).or_default() += 1;
    }
    let expect_done: Vec<&String> = inputs.iter().filter(|n| !failed.contains(n)).collect();
    assert_eq!(
        outbox.len(),
        expect_done.len(),
        "one output per input: {per_stem:?}"
    );
    for n in &expect_done {
        let stem = n.trim_end_matches(".jpg");
        assert_eq!(per_stem.get(stem), Some(&1), "{n}: {outbox:?}");
    }
    let mut done = stems(&hf.join("done"), false);
    done.sort();
    let mut want: Vec<String> = expect_done.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(done, want);
    let mut f = stems(&hf.join("failed"), true);
    f.sort();
    assert_eq!(f, failed, "failed/");
    assert!(names(&hf.join("inbox")).is_empty());
    assert_eq!(
        hf.join("work")
            .read_dir()
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count(),
        0
    );
    let empty = wait_until(Duration::from_secs(20), || {
        let s = cluster_cmd("status", cfg);
        [
            "queue_depth",
            "in_flight",
            "outcomes",
            "attempts",
            "object_messages",
        ]
        .iter()
        .all(|k| s[k] == 0)
    });
    assert!(
        empty,
        "the server still holds: {}",
        cluster_cmd("status", cfg)
    );
}

/// 300 inputs of which 3 are corrupt, 3 workers: 297 outputs exactly once (each the
/// bytes a single-host `process` makes of it), 3 in `failed/` with the decoder's reason,
/// every worker took a share, and the server is empty at the end.
#[test]
fn three_workers_make_every_output_once_and_leave_the_server_empty() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), false, 64, "");
    cluster_cmd("init", &cfg);
    let hf = d.path().join("hf");
    let mut nodes = Nodes::start(&cfg, 3, &[]);
    let corrupt = [17, 150, 299];
    let inputs = deliver_all(&hf, 300, &corrupt, Duration::ZERO);
    assert!(
        wait_finished(&hf, 297, 3, Duration::from_secs(240)),
        "done {} failed {}; collect:\n{}",
        stems(&hf.join("done"), false).len(),
        stems(&hf.join("failed"), true).len(),
        nodes.collect.as_ref().unwrap().log()
    );
    let failed: Vec<String> = corrupt.iter().map(|i| inputs[*i].clone()).collect();
    assert_exactly_once(&hf, &cfg, &inputs, &failed);
    for f in &failed {
        let side =
            std::fs::read_to_string(hf.join("failed").join(format!("{f}.error.json"))).unwrap();
        let v: Value = serde_json::from_str(&side).unwrap();
        assert_eq!(v["stage"], "decode", "{side}");
    }
    let per = nodes.done_per_worker();
    assert_eq!(
        per.iter().sum::<usize>(),
        297,
        "each recorded once: {per:?}"
    );
    assert!(
        per.iter().all(|&n| n > 0),
        "every worker took a share: {per:?}"
    );
    // The cluster's bytes are the single host's.
    let single = d.path().join("single");
    let sample: Vec<PathBuf> = [0, 99, 298]
        .iter()
        .map(|i| hf.join("done").join(&inputs[*i]))
        .collect();
    let r = process(&cfg, &single, &sample);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for i in [0, 99, 298] {
        let name = format!("img{i:03}.jpg");
        assert_eq!(
            std::fs::read(single.join(&name)).unwrap(),
            std::fs::read(hf.join("outbox").join(&name)).unwrap(),
            "{name}"
        );
    }
    let s = cluster_cmd("status", &cfg);
    assert_eq!(s["workers"].as_array().unwrap().len(), 3, "{s}");
    nodes.restart_dead();
}

/// A worker SIGKILLed every 1-3 s, 20 times, and started again: every input exactly
/// once, some items delivered again (the kills hit items in flight), none failed.
/// `max_attempts = 6`: a random kill may land on a suspect while it runs alone, and
/// that counts as a worker dying on it, whoever did the killing.
#[test]
fn killing_workers_at_random_loses_and_doubles_nothing() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), true, 160, "max_attempts = 6\n");
    cluster_cmd("init", &cfg);
    let hf = d.path().join("hf");
    let mut nodes = Nodes::start(&cfg, 3, &[]);
    let producer = {
        let hf = hf.clone();
        std::thread::spawn(move || deliver_all(&hf, 300, &[], Duration::from_millis(100)))
    };
    let mut rng = 12345u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    let mut redelivered = 0u64;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1000 + (next() % 2000) as u64));
        // A worker still loading its model holds nothing: kill one that is taking work
        // (the model is slow enough at 160 px that a ready worker always holds items).
        let i = next() % 3;
        nodes.workers[i].expect_log("cluster worker ready", Duration::from_secs(30));
        nodes.kill_worker(i);
        let s = cluster_cmd("status", &cfg);
        redelivered = redelivered.max(s["redelivered"].as_u64().unwrap());
        nodes.restart_dead();
    }
    let inputs = producer.join().unwrap();
    let finished = wait_finished(&hf, 300, 0, Duration::from_secs(300));
    let kills = nodes.dead_logs.len();
    assert!(finished, "done {}", stems(&hf.join("done"), false).len());
    assert_eq!(kills, 20);
    assert_exactly_once(&hf, &cfg, &inputs, &[]);
    let alone: usize = nodes
        .worker_logs()
        .iter()
        .map(|l| l.matches("running it alone").count())
        .sum();
    assert!(
        redelivered > 0 || alone > 0,
        "the kills hit items in flight (redelivered {redelivered}, alone {alone})"
    );
    assert!(alone > 0, "items delivered again ran alone");
}

/// A busy worker stopped (SIGSTOP) past the ack wait and let go on (SIGCONT): its items
/// go to the others meanwhile, its late commits lose and its outputs are removed; no
/// duplicates.
#[test]
fn a_stopped_worker_loses_its_late_commits() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), true, 96, "");
    cluster_cmd("init", &cfg);
    let hf = d.path().join("hf");
    let mut nodes = Nodes::start(&cfg, 2, &[]);
    let inputs = deliver_all(&hf, 60, &[], Duration::ZERO);
    // Stop a worker once it holds items (it has recorded one).
    assert!(wait_until(Duration::from_secs(60), || nodes.workers[0]
        .log()
        .contains(" done")));
    nodes.workers[0].signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    nodes.workers[0].signal(libc::SIGCONT);
    assert!(wait_finished(&hf, 60, 0, Duration::from_secs(180)));
    assert_exactly_once(&hf, &cfg, &inputs, &[]);
    let lost: usize = nodes
        .worker_logs()
        .iter()
        .map(|l| l.matches("another worker recorded it first").count())
        .sum();
    assert!(lost > 0, "a late commit lost:\n{}", nodes.workers[0].log());
    nodes.restart_dead();
}

/// The NATS server SIGKILLed 3 times and the collect node 10 times during a run (each
/// started again): every input exactly once.
#[test]
fn killing_the_server_and_the_collect_node_loses_and_doubles_nothing() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), true, 96, "");
    cluster_cmd("init", &cfg);
    let hf = d.path().join("hf");
    let mut nodes = Nodes::start(&cfg, 2, &[]);
    let producer = {
        let hf = hf.clone();
        std::thread::spawn(move || deliver_all(&hf, 200, &[], Duration::from_millis(100)))
    };
    for round in 0..13 {
        std::thread::sleep(Duration::from_millis(1200));
        if round % 4 == 1 {
            nats.kill_and_restart(Duration::from_millis(500));
        } else {
            nodes.kill_collect();
            nodes.start_collect();
        }
        nodes.restart_dead();
    }
    let inputs = producer.join().unwrap();
    let finished = wait_finished(&hf, 200, 0, Duration::from_secs(300));
    assert!(
        finished,
        "done {}; collect:\n{}",
        stems(&hf.join("done"), false).len(),
        nodes.collect.as_ref().unwrap().log()
    );
    assert_eq!(nodes.dead_logs.len(), 0, "no worker died");
    assert_exactly_once(&hf, &cfg, &inputs, &[]);
}

/// An input that kills every worker that takes it (an injected abort in decode): in
/// `failed/` after `max_attempts` with "workers died on it 3 times"; every other input
/// done, none of them blamed.
#[test]
fn a_poison_input_is_failed_after_max_attempts_and_blames_nobody_else() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), false, 64, "");
    cluster_cmd("init", &cfg);
    let hf = d.path().join("hf");
    let mut nodes = Nodes::start(&cfg, 2, &[("HOTPIPE_FAULTS", "decode:abort::poison")]);
    let mut inputs = deliver_all(&hf, 20, &[], Duration::ZERO);
    deliver(&hf, "poison.jpg", &jpeg_bytes(999));
    inputs.push("poison.jpg".into());
    let t0 = Instant::now();
    let mut restarts = 0;
    while t0.elapsed() < Duration::from_secs(120) && !wait_finished(&hf, 20, 1, Duration::ZERO) {
        restarts += nodes.restart_dead();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        wait_finished(&hf, 20, 1, Duration::ZERO),
        "collect:\n{}",
        nodes.collect.as_ref().unwrap().log()
    );
    assert_exactly_once(&hf, &cfg, &inputs, &["poison.jpg".to_string()]);
    let side = std::fs::read_to_string(hf.join("failed/poison.jpg.error.json")).unwrap();
    assert!(side.contains("workers died on it 3 times"), "{side}");
    assert_eq!(restarts, 3, "three workers died on it, no more");
}
