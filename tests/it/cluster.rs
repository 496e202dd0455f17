//! `hotpipe cluster init|status` against a real `nats-server` with JetStream (the pinned
//! 2.15.1 from scripts/setup.sh), started by each test on a free loopback port.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;

fn cluster_config(dir: &Path, url: &str, extra: &str) -> PathBuf {
    write(
        &dir.join("cluster.toml"),
        &format!("[cluster]\nurl = \"{url}\"\nname = \"hf1\"\n{extra}"),
    )
}

/// `hotpipe cluster VERB --json -c CFG`'s JSON; panics with its stderr when it fails.
fn cluster_json(verb: &str, cfg: &Path) -> Value {
    let r: Cli = hotpipe()
        .args(["cluster", verb, "--json", "-c"])
        .arg(cfg)
        .output()
        .unwrap()
        .into();
    assert_eq!(
        r.code,
        Some(0),
        "cluster {verb}: {}\n{}",
        r.stdout,
        r.stderr
    );
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// Init creates the seven, a second init finds them and applies a changed limit, three
/// inits at once all succeed, and status reads the empty queue back from the server.
#[test]
fn init_is_idempotent_and_status_reads_the_server() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), "max_queue = 500\n");
    let actions = |v: &Value| -> Vec<(String, String)> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i[1].as_str().unwrap().to_string(),
                    i[2].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let first = cluster_json("init", &cfg);
    assert_eq!(first["server_version"], "2.15.1", "the pinned server");
    let names = [
        "hf1_work",
        "hf1_workers",
        "hf1_outcomes",
        "hf1_attempts",
        "hf1_heartbeats",
        "hf1_collect",
        "hf1_objects",
    ];
    let want = |action: &str| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), action.to_string()))
            .collect()
    };
    assert_eq!(actions(&first), want("created"), "{first}");
    let status = cluster_json("status", &cfg);
    assert_eq!(status["max_queue"], 500);
    for k in [
        "queue_depth",
        "pending",
        "in_flight",
        "redelivered",
        "outcomes",
        "attempts",
        "object_messages",
        "object_bytes",
    ] {
        assert_eq!(status[k], 0, "{k}: {status}");
    }
    assert_eq!(status["workers"], serde_json::json!([]));

    // Again, with another bound: found, and the bound applied on the server.
    let cfg = cluster_config(d.path(), &nats.url(), "max_queue = 800\n");
    assert_eq!(actions(&cluster_json("init", &cfg)), want("kept"));
    assert_eq!(cluster_json("status", &cfg)["max_queue"], 800);

    // Three hosts setting up another hot folder at the same moment.
    let other = write(
        &d.path().join("other.toml"),
        &format!("[cluster]\nurl = \"{}\"\nname = \"hf2\"\n", nats.url()),
    );
    let runs: Vec<_> = (0..3)
        .map(|_| {
            hotpipe()
                .args(["cluster", "init", "--json", "-c"])
                .arg(&other)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in runs {
        let out = r.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        cluster_json("status", &other)["names"]["work_stream"],
        "hf2_work"
    );
}

/// No server at the URL, a server without the streams, a config without [cluster]:
/// each a clear error naming what to do, with the right exit status.
#[test]
fn cluster_errors_say_what_to_do() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = cluster_config(d.path(), &format!("nats://127.0.0.1:{closed}"), "");
    let r = cli([
        "cluster".as_ref(),
        "status".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("cannot reach NATS at nats://127.0.0.1:{closed}"))
            && r.stderr.contains("nats-server -js"),
        "{}",
        r.stderr
    );
    let cfg = cluster_config(d.path(), &nats.url(), "");
    let r = cli([
        "cluster".as_ref(),
        "status".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("has no stream hf1_work: run `hotpipe cluster init` first"),
        "{}",
        r.stderr
    );
    let plain = write(&d.path().join("plain.toml"), "[preprocess]\nsize = 64\n");
    let r = cli([
        "cluster".as_ref(),
        "init".as_ref(),
        "-c".as_ref(),
        plain.as_os_str(),
    ]);
    assert_eq!(r.code, Some(78), "{}", r.stderr);
    assert!(r.stderr.contains("has no [cluster] table"), "{}", r.stderr);
}

/// The queue's primitives against the server: an item enqueued twice is one item; past
/// `max_queue` the queue refuses (nothing dropped); an input of 3 MB (three times the
/// server's message limit) comes back whole; a lease kept alive with progress stays the
/// worker's while a silent one is delivered again (its delivery count 2); of two commits
/// of one outcome the first wins; acks empty the queue; heartbeats list the workers.
#[test]
fn the_queue_redelivers_until_acknowledged_and_keeps_one_outcome() {
    use hotpipe::cluster::queue::{Enqueued, Recorded, Verdict};
    use hotpipe::cluster::{Cluster, ClusterError};
    use std::time::Duration;
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = cluster_config(d.path(), &nats.url(), "max_queue = 3\nack_wait_s = 2\n");
    let cfg = hotpipe::config::Config::load(&cfg).unwrap();
    let c = Cluster::connect(cfg.cluster.as_ref().unwrap()).unwrap();
    c.init().unwrap();
    let bytes = |seed: u8, n: usize| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    let (a, b, cc) = (bytes(1, 1000), bytes(2, 3 << 20), bytes(3, 10));
    assert_eq!(
        c.enqueue("id-a", "a.png", &a, None).unwrap(),
        Enqueued::Queued
    );
    assert_eq!(
        c.enqueue("id-a", "a.png", &a, None).unwrap(),
        Enqueued::Duplicate
    );
    assert_eq!(
        c.enqueue("id-b", "b.png", &b, None).unwrap(),
        Enqueued::Queued
    );
    assert_eq!(
        c.enqueue("id-c", "c.png", &cc, None).unwrap(),
        Enqueued::Queued
    );
    match c.enqueue("id-d", "d.png", &cc, None) {
        Err(ClusterError::Full { max_queue: 3, .. }) => {}
        other => panic!("a fourth item in a queue of 3: {other:?}"),
    }
    assert_eq!(c.status().unwrap().queue_depth, 3);

    let first = c.lease(2, Duration::from_secs(5)).unwrap();
    let names: Vec<&str> = first.iter().map(|l| l.item.name.as_str()).collect();
    assert_eq!(names, ["a.png", "b.png"]);
    assert!(first.iter().all(|l| l.delivered == 1));
    assert_eq!(c.input(&first[0].item).unwrap(), Some(a.clone()));
    assert_eq!(
        c.input(&first[1].item).unwrap(),
        Some(b),
        "3 MB through 1 MB messages"
    );
    assert!(
        first[1].item.sha256.starts_with("SHA-256="),
        "{:?}",
        first[1].item
    );
    // a is kept alive; b is left silent past ack_wait_s.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        c.progress(&first[0]).unwrap();
    }
    let second = c.lease(3, Duration::from_secs(5)).unwrap();
    let seen: Vec<(&str, i64)> = second
        .iter()
        .map(|l| (l.item.name.as_str(), l.delivered))
        .collect();
    assert_eq!(
        seen,
        [("b.png", 2), ("c.png", 1)],
        "a stays the first lease's"
    );

    let rec = |worker: &str| Recorded {
        worker: worker.into(),
        verdict: Verdict::Failed {
            stage: "decode".into(),
            reason: "not an image".into(),
        },
    };
    assert!(c.commit("id-a", &rec("w1")).unwrap());
    assert!(!c.commit("id-a", &rec("w2")).unwrap());
    assert_eq!(c.outcome("id-a").unwrap(), Some(rec("w1")));
    assert_eq!(c.outcome("id-b").unwrap(), None);
    let s = c.status().unwrap();
    assert_eq!(
        (s.in_flight, s.redelivered),
        (3, 1),
        "a, b again and c: {s:?}"
    );
    for l in first.into_iter().take(1).chain(second) {
        c.ack(l).unwrap();
    }
    let s = c.status().unwrap();
    assert_eq!((s.queue_depth, s.in_flight), (0, 0), "{s:?}");
    assert_eq!(s.outcomes, 1);
    assert!(s.object_bytes > 3 << 20, "{s:?}");
    assert_eq!(
        c.enqueue("id-d", "d.png", &cc, None).unwrap(),
        Enqueued::Queued
    );

    // Two workers' heartbeats: both listed (by `status --json` too).
    for w in ["gpu-2", "gpu-1"] {
        c.heartbeat(w, &serde_json::json!({"slots": 4})).unwrap();
    }
    assert_eq!(c.status().unwrap().workers, ["gpu-1", "gpu-2"]);
    let path = d.path().join("cluster.toml");
    assert_eq!(
        cluster_json("status", &path)["workers"],
        serde_json::json!(["gpu-1", "gpu-2"])
    );

    // Forgetting an item removes its outcome, attempt count and objects whole; the
    // sweep removes what no live item owns and keeps what one does.
    assert_eq!(c.blame("id-a").unwrap(), 0);
    assert_eq!(c.blame("id-a").unwrap(), 1);
    let out = c.put_output("id-a", "w1", "0.png", &a[..10]).unwrap();
    assert_eq!(c.object(&out, 0).unwrap().as_deref(), Some(&a[..10]));
    c.forget("id-a", std::slice::from_ref(&out)).unwrap();
    assert_eq!(c.outcome("id-a").unwrap(), None);
    assert_eq!(c.object(&out, 0).unwrap(), None);
    let s = c.status().unwrap();
    assert_eq!((s.outcomes, s.attempts), (0, 0), "no markers left: {s:?}");
    c.put_output("id-b", "w9", "0.png", b"orphan").unwrap();
    let live = || Some(std::collections::HashSet::from(["id-d".to_string()]));
    // b's and c's input and b's output: d's input stays.
    assert_eq!(c.sweep(live, &mut Default::default()).unwrap(), 3);
    let s = c.status().unwrap();
    assert_eq!(
        s.object_messages, 2,
        "d's input: its entry and one chunk: {s:?}"
    );
    assert_eq!(
        c.sweep(|| None, &mut Default::default()).unwrap(),
        0,
        "an unreadable work/ removes nothing"
    );
}

/// The server config `deploy/` ships is one the pinned nats-server accepts, with the
/// fsync policy the README asks for.
#[test]
fn the_deployed_nats_config_is_valid() {
    let Some(bin) = which("nats-server") else {
        skip("cluster: no nats-server (scripts/setup.sh installs it into the venv)");
        return;
    };
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats/nats-server.conf");
    let out = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("is valid"), "{said}");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("sync_interval: always"), "{text}");
}
