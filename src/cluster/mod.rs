//! Cluster mode's server side, on NATS JetStream (issue 15): what a hot folder spread
//! over many hosts keeps on the server, created idempotently (`hotpipe cluster init`)
//! and reported (`hotpipe cluster status`).
//!
//! What exists on the server, all named after `[cluster] name` (see [`Names`]):
//! - the work stream (`<name>_work`, subject `<name>.work`): one message per item, a
//!   work queue (a message is gone once acknowledged), bounded by `max_queue` with
//!   `discard = new`, so a full queue refuses ingest's publish (ingest waits and tries
//!   again: it never drops) instead of dropping the oldest item; a 10-minute duplicate
//!   window, so an item re-enqueued under its `Nats-Msg-Id` after a crash is one item;
//! - the workers' durable pull consumer (`<name>_workers`): explicit acks, `ack_wait_s`,
//!   at most `max_in_flight` unacknowledged; unlimited deliveries at the server (a
//!   worker counts them and fails an item after `max_attempts`, with its reason, which a
//!   server-side `max_deliver` would drop silently);
//! - the outcome bucket (`<name>_outcomes`, key-value, history 1): one create-if-absent
//!   entry per item id, so exactly one outcome wins;
//! - the object bucket (`<name>_objects`): the inputs' and outputs' bytes, chunked (no
//!   shared filesystem, a stock server's 1 MB message limit is enough);
//! - the heartbeat bucket (`<name>_heartbeats`, key-value, entries expire after 30 s):
//!   each worker's heartbeat, so `status` can say who is alive.
//!
//! The object and outcome buckets have the `max_age_s` age limit: nothing a dead host
//! leaves behind outlives it.
//!
//! async-nats needs tokio: one runtime with a single thread of its own lives inside
//! [`Cluster`], and every call blocks the calling thread on it; no crossbeam send or
//! other blocking call runs on a tokio thread.

pub mod queue;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures_util::TryStreamExt;
use serde::Serialize;

use crate::config::ClusterConfig;

/// How long a connection attempt may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Window in which a second publish with the same `Nats-Msg-Id` is the same message.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// A worker's heartbeat entry expires after this long.
const HEARTBEAT_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {url}: {reason} (is nats-server running there with JetStream, `nats-server -js`? [cluster] url names it)"
    )]
    Connect { url: String, reason: String },
    #[error("NATS server at {url}: {what}: {reason}")]
    Server {
        url: String,
        what: String,
        reason: String,
    },
    #[error("the work stream at {url} is full ({max_queue} items, [cluster] max_queue)")]
    Full { url: String, max_queue: u64 },
    #[error("NATS server at {url} has no {what}: run `hotpipe cluster init` first")]
    NotSetUp { url: String, what: String },
    #[error("cannot start the NATS client's runtime: {0}")]
    Runtime(std::io::Error),
}

/// The names of everything cluster mode keeps on the server.
#[derive(Debug, Clone, Serialize)]
pub struct Names {
    pub work_stream: String,
    pub work_subject: String,
    pub consumer: String,
    pub outcomes: String,
    /// The collect node's durable consumer on the outcome bucket's stream.
    pub collector: String,
    /// Workers that took an item alone, per item (a poison input's count).
    pub attempts: String,
    pub objects: String,
    pub heartbeats: String,
}

impl Names {
    pub fn new(name: &str) -> Names {
        Names {
            work_stream: format!("{name}_work"),
            work_subject: format!("{name}.work"),
            consumer: format!("{name}_workers"),
            outcomes: format!("{name}_outcomes"),
            collector: format!("{name}_collect"),
            attempts: format!("{name}_attempts"),
            objects: format!("{name}_objects"),
            heartbeats: format!("{name}_heartbeats"),
        }
    }
}

/// What `init` did to one thing on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    /// It was there; its configuration is now the config's (unchanged when it was).
    Kept,
}

#[derive(Debug, Serialize)]
pub struct InitReport {
    pub url: String,
    pub server_version: String,
    /// `(what, name, action)` for each thing set up.
    pub items: Vec<(String, String, Action)>,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "NATS server {} at {}: cluster mode set up",
            self.server_version, self.url
        )?;
        for (what, name, action) in &self.items {
            let done = match action {
                Action::Created => "created",
                Action::Kept => "exists (configuration applied)",
            };
            writeln!(f, "  {what:<16} {name:<24} {done}")?;
        }
        Ok(())
    }
}

/// The queue and the workers, as the server sees them.
#[derive(Debug, Serialize)]
pub struct Status {
    pub url: String,
    pub server_version: String,
    pub names: Names,
    /// Items waiting in the work stream (delivered or not, until acknowledged).
    pub queue_depth: u64,
    /// The work stream's bound (`max_queue`).
    pub max_queue: i64,
    /// Items not yet delivered to any worker.
    pub pending: u64,
    /// Items delivered and not yet acknowledged.
    pub in_flight: usize,
    /// Of those in flight, the ones on a second or later delivery (a worker died on
    /// them or went silent past `ack_wait_s`).
    pub redelivered: usize,
    /// Outcomes recorded and not yet collected.
    pub outcomes: u64,
    /// Items some worker took alone after a worker died on them (poison suspects).
    pub attempts: u64,
    /// Messages in the object bucket (each object is a metadata entry and its chunks),
    /// and their bytes: both 0 once every item is collected.
    pub object_messages: u64,
    pub object_bytes: u64,
    /// Workers whose heartbeat has not expired.
    pub workers: Vec<String>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "NATS server {} at {}", self.server_version, self.url)?;
        writeln!(
            f,
            "  queue        {} of at most {} ({} not yet delivered)",
            self.queue_depth, self.max_queue, self.pending
        )?;
        writeln!(
            f,
            "  in flight    {} ({} of them delivered again)",
            self.in_flight, self.redelivered
        )?;
        writeln!(f, "  outcomes     {} not yet collected", self.outcomes)?;
        writeln!(
            f,
            "  suspects     {} (taken alone after a worker died on them)",
            self.attempts
        )?;
        writeln!(
            f,
            "  objects      {} messages, {} bytes",
            self.object_messages, self.object_bytes
        )?;
        let seen = if self.workers.is_empty() {
            "none".to_string()
        } else {
            self.workers.join(", ")
        };
        writeln!(f, "  workers      {} seen: {seen}", self.workers.len())
    }
}

/// A connection to the cluster's server, with the runtime its client runs on.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: ClusterConfig,
    names: Names,
}

impl Cluster {
    pub fn connect(cfg: &ClusterConfig) -> Result<Cluster, ClusterError> {
        // One runtime thread of its own: the client's connection task (flushing acks,
        // answering pings) must run between calls too, which a current-thread runtime
        // would do only while a caller blocks on it (progress acks sat unsent).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hp-nats")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let client = rt
            .block_on(
                async_nats::ConnectOptions::new()
                    .connection_timeout(CONNECT_TIMEOUT)
                    .connect(cfg.url.as_str()),
            )
            .map_err(|e| ClusterError::Connect {
                url: cfg.url.clone(),
                reason: e.to_string(),
            })?;
        // The context spawns its acknowledgement task on the runtime it is made in.
        let js = {
            let _in = rt.enter();
            jetstream::new(client.clone())
        };
        Ok(Cluster {
            rt,
            client,
            js,
            cfg: cfg.clone(),
            names: Names::new(&cfg.name),
        })
    }

    fn server_err(&self, what: impl Into<String>, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Server {
            url: self.cfg.url.clone(),
            what: what.into(),
            reason: e.to_string(),
        }
    }

    /// Create what is missing and apply the config to what exists. Safe to run again, and
    /// from several hosts at once.
    pub fn init(&self) -> Result<InitReport, ClusterError> {
        let (c, n) = (&self.cfg, &self.names);
        let max_age = Duration::from_secs(c.max_age_s);
        let work = stream::Config {
            name: n.work_stream.clone(),
            subjects: vec![n.work_subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: c.max_queue as i64,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            ..Default::default()
        };
        let existed = self.stream_exists(&n.work_stream);
        self.rt
            .block_on(self.js.create_or_update_stream(work))
            .map_err(|e| self.server_err(format!("cannot set up stream {}", n.work_stream), e))?;
        let mut items = vec![("work stream", n.work_stream.clone(), existed)];
        let workers = consumer::pull::Config {
            durable_name: Some(n.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(c.ack_wait_s),
            max_deliver: -1,
            max_ack_pending: c.max_in_flight as i64,
            ..Default::default()
        };
        items.push((
            "worker consumer",
            n.consumer.clone(),
            self.init_consumer(&n.work_stream, workers)?,
        ));
        for (what, bucket, age) in [
            ("outcome bucket", &n.outcomes, max_age),
            ("attempt bucket", &n.attempts, max_age),
            ("heartbeat bucket", &n.heartbeats, HEARTBEAT_TTL),
        ] {
            items.push((what, bucket.clone(), self.init_kv(bucket, age)?));
        }
        // The collect node's cursor over the outcomes: every one, once acknowledged.
        let collector = consumer::pull::Config {
            durable_name: Some(n.collector.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(c.ack_wait_s),
            max_deliver: -1,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let kv_stream = format!("KV_{}", n.outcomes);
        items.push((
            "collect consumer",
            n.collector.clone(),
            self.init_consumer(&kv_stream, collector)?,
        ));
        items.push((
            "object bucket",
            n.objects.clone(),
            self.init_objects(max_age)?,
        ));
        Ok(InitReport {
            url: c.url.clone(),
            server_version: self.client.server_info().version,
            items: items
                .into_iter()
                .map(|(what, name, existed)| {
                    let action = if existed {
                        Action::Kept
                    } else {
                        Action::Created
                    };
                    (what.to_string(), name, action)
                })
                .collect(),
        })
    }

    /// Create or update a durable pull consumer on `stream`; true when it existed.
    fn init_consumer(
        &self,
        stream: &str,
        cfg: consumer::pull::Config,
    ) -> Result<bool, ClusterError> {
        let name = cfg.durable_name.clone().unwrap_or_default();
        let existed = self.consumer_info_of(stream, &name).is_ok();
        self.rt
            .block_on(async {
                let s = self.js.get_stream(stream).await?;
                s.create_consumer(cfg).await?;
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err(format!("cannot set up consumer {name}"), e))?;
        Ok(existed)
    }

    /// Create or update a key-value bucket (history 1); true when it existed.
    fn init_kv(&self, bucket: &str, max_age: Duration) -> Result<bool, ClusterError> {
        let existed = self.stream_exists(&format!("KV_{bucket}"));
        let kv = kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: self.cfg.replicas,
            ..Default::default()
        };
        self.rt
            .block_on(self.js.create_or_update_key_value(kv))
            .map_err(|e| self.server_err(format!("cannot set up bucket {bucket}"), e))?;
        Ok(existed)
    }

    /// Create the object bucket, or apply the age limit to it; true when it existed.
    fn init_objects(&self, max_age: Duration) -> Result<bool, ClusterError> {
        let bucket = &self.names.objects;
        let existed = self.stream_exists(&format!("OBJ_{bucket}"));
        if existed {
            // The object bucket is a stream underneath: its age limit is that stream's.
            self.update_stream_age(&format!("OBJ_{bucket}"), max_age)?;
            return Ok(true);
        }
        let obj = object_store::Config {
            bucket: bucket.clone(),
            max_age,
            storage: stream::StorageType::File,
            num_replicas: self.cfg.replicas,
            ..Default::default()
        };
        self.rt
            .block_on(self.js.create_object_store(obj))
            .map_err(|e| self.server_err(format!("cannot set up bucket {bucket}"), e))?;
        Ok(false)
    }

    /// The queue, the in-flight items and the workers alive; fails (saying to run
    /// `hotpipe cluster init`) when the streams are not there.
    pub fn status(&self) -> Result<Status, ClusterError> {
        let n = &self.names;
        let missing = |what: String| ClusterError::NotSetUp {
            url: self.cfg.url.clone(),
            what,
        };
        let work = self
            .stream_info(&n.work_stream)
            .map_err(|_| missing(format!("stream {}", n.work_stream)))?;
        let consumer = self
            .consumer_info()
            .map_err(|_| missing(format!("consumer {}", n.consumer)))?;
        let outcomes = self
            .stream_info(&format!("KV_{}", n.outcomes))
            .map_err(|_| missing(format!("bucket {}", n.outcomes)))?;
        let objects = self
            .stream_info(&format!("OBJ_{}", n.objects))
            .map_err(|_| missing(format!("bucket {}", n.objects)))?;
        let attempts = self
            .stream_info(&format!("KV_{}", n.attempts))
            .map_err(|_| missing(format!("bucket {}", n.attempts)))?;
        self.consumer_info_of(&format!("KV_{}", n.outcomes), &n.collector)
            .map_err(|_| missing(format!("consumer {}", n.collector)))?;
        let mut workers: Vec<String> = self
            .rt
            .block_on(async {
                let kv = self.js.get_key_value(&n.heartbeats).await?;
                let keys = kv.keys().await?;
                Ok::<_, async_nats::Error>(keys.try_collect::<Vec<String>>().await?)
            })
            .map_err(|e| self.server_err(format!("cannot read bucket {}", n.heartbeats), e))?;
        workers.sort();
        Ok(Status {
            url: self.cfg.url.clone(),
            server_version: self.client.server_info().version,
            names: n.clone(),
            queue_depth: work.state.messages,
            max_queue: work.config.max_messages,
            pending: consumer.num_pending,
            in_flight: consumer.num_ack_pending,
            redelivered: consumer.num_redelivered,
            outcomes: outcomes.state.messages,
            attempts: attempts.state.messages,
            object_messages: objects.state.messages,
            object_bytes: objects.state.bytes,
            workers,
        })
    }

    fn stream_info(&self, name: &str) -> Result<stream::Info, async_nats::Error> {
        self.rt.block_on(async {
            let s = self.js.get_stream(name).await?;
            Ok(s.get_info().await?)
        })
    }

    fn stream_exists(&self, name: &str) -> bool {
        self.stream_info(name).is_ok()
    }

    fn consumer_info(&self) -> Result<consumer::Info, async_nats::Error> {
        self.consumer_info_of(&self.names.work_stream, &self.names.consumer)
    }

    fn consumer_info_of(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<consumer::Info, async_nats::Error> {
        self.rt.block_on(async {
            let s = self.js.get_stream(stream).await?;
            let c: consumer::Consumer<consumer::pull::Config> = s.get_consumer(name).await?;
            Ok(c.get_info().await?)
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    fn update_stream_age(&self, name: &str, max_age: Duration) -> Result<(), ClusterError> {
        self.rt
            .block_on(async {
                let info = self.js.get_stream(name).await?.get_info().await?;
                let cfg = stream::Config {
                    max_age,
                    ..info.config
                };
                self.js.update_stream(cfg).await?;
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err(format!("cannot update stream {name}"), e))
    }
}
