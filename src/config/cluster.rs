//! `[cluster]`: the NATS JetStream server a hot folder is spread over, the name its
//! streams and buckets share, and their limits. `hotpipe cluster init|status` read it to
//! set up and report the server's side, and `hotpipe run` reads `role` to run as the
//! hot folder's ingest/collect node or as a worker (`--role` overrides it).

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    url: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    ack_wait_s: Option<Spanned<i64>>,
    max_queue: Option<Spanned<i64>>,
    max_in_flight: Option<Spanned<i64>>,
    max_age_s: Option<Spanned<i64>>,
    replicas: Option<Spanned<i64>>,
    sweep_s: Option<Spanned<i64>>,
}

/// What `hotpipe run` is in cluster mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host that owns the hot folder: claims, journals and queues its files, and
    /// publishes the outcomes into `outbox/`, `done/` and `failed/`.
    Collect,
    /// A model host: takes queued items, runs the pipeline on them, records outcomes. No
    /// folder of its own.
    Worker,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "collect" => Ok(Role::Collect),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("is \"{s}\"; use \"collect\" or \"worker\"")),
        }
    }
}

/// The validated `[cluster]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The server: one URL (a NATS cluster advertises its other servers to the client).
    pub url: String,
    /// What `hotpipe run` is: `"collect"` (the default: the host with the hot folder)
    /// or `"worker"`.
    pub role: Role,
    /// Prefix of every stream, consumer and bucket: several hot folders can share a
    /// server under different names.
    pub name: String,
    /// Deliveries of one item (each one a worker that died or gave up on it) before it
    /// is failed.
    pub max_attempts: u32,
    /// How long a delivered item stays a worker's without a sign of progress before the
    /// server hands it to another.
    pub ack_wait_s: u64,
    /// Items the work stream holds at most; ingest waits (it never drops) when full.
    pub max_queue: u64,
    /// Items delivered and not yet acknowledged, over all workers.
    pub max_in_flight: u64,
    /// Age limit of the object and outcome buckets' entries (a sweep for anything a dead
    /// host left behind).
    pub max_age_s: u64,
    /// Copies of each stream on a NATS cluster (1 on a single server; 3 on three).
    pub replicas: usize,
    /// How often the collect node removes what finished items left on the server (a
    /// worker that died between storing outputs and recording them).
    pub sweep_s: u64,
}

pub(super) fn validate(cx: &Ctx, c: &RawCluster) -> Result<ClusterConfig, ConfigError> {
    let url = match &c.url {
        Some(u) if u.get_ref().trim().is_empty() => {
            return cx.err(u.span(), "cluster.url", "is empty; give nats://HOST:PORT");
        }
        Some(u) => u.get_ref().trim().to_string(),
        None => "nats://127.0.0.1:4222".to_string(),
    };
    let role = match &c.role {
        Some(r) => match r.get_ref().parse() {
            Ok(role) => role,
            Err(m) => return cx.err(r.span(), "cluster.role", m),
        },
        None => Role::Collect,
    };
    let name = match &c.name {
        // NATS names may not hold '.', '*', '>', path separators or white space; keep to
        // what is safe in a subject token and a file name alike.
        Some(n)
            if n.get_ref().is_empty()
                || !(n.get_ref().chars())
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch)) =>
        {
            return cx.err(
                n.span(),
                "cluster.name",
                format!(
                    "is \"{}\"; use letters, digits, '-' and '_' only",
                    n.get_ref()
                ),
            );
        }
        Some(n) => n.get_ref().clone(),
        None => "hotpipe".to_string(),
    };
    Ok(ClusterConfig {
        url,
        role,
        name,
        max_attempts: cx.int_in(&c.max_attempts, "cluster.max_attempts", 1, 100, 3u32)?,
        ack_wait_s: cx.int_in(&c.ack_wait_s, "cluster.ack_wait_s", 1, 86_400, 60u64)?,
        max_queue: cx.int_in(&c.max_queue, "cluster.max_queue", 1, 10_000_000, 10_000u64)?,
        max_in_flight: cx.int_in(
            &c.max_in_flight,
            "cluster.max_in_flight",
            1,
            1_000_000,
            1000u64,
        )?,
        max_age_s: cx.int_in(
            &c.max_age_s,
            "cluster.max_age_s",
            60,
            365 * 86_400,
            7 * 86_400u64,
        )?,
        replicas: cx.int_in(&c.replicas, "cluster.replicas", 1, 5, 1usize)?,
        sweep_s: cx.int_in(&c.sweep_s, "cluster.sweep_s", 1, 86_400, 300u64)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn cluster_defaults_and_errors() {
        let c = parse("[cluster]\n").unwrap().cluster.unwrap();
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert_eq!(c.name, "hotpipe");
        assert_eq!(c.role, super::Role::Collect);
        let w = parse("[cluster]\nrole = \"worker\"\n")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(w.role, super::Role::Worker);
        let e = parse("[cluster]\nrole = \"boss\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster.role") && e.contains("\"worker\""),
            "{e}"
        );
        assert_eq!((c.max_attempts, c.ack_wait_s, c.max_queue), (3, 60, 10_000));
        assert_eq!(
            (c.max_in_flight, c.max_age_s, c.replicas),
            (1000, 604_800, 1)
        );
        let e = parse("[cluster]\nname = \"a.b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("cluster.name"), "{e}");
        let e = parse("[cluster]\nreplicas = 7\n").unwrap_err().to_string();
        assert!(e.contains("cluster.replicas"), "{e}");
        let e = parse("[cluster]\nurl = \" \"\n").unwrap_err().to_string();
        assert!(e.contains("cluster.url"), "{e}");
        let e = parse("[cluster]\nservers = 1\n").unwrap_err().to_string();
        assert!(e.contains("servers"), "{e}");
        assert!(parse("").unwrap().cluster.is_none());
    }
}
