//! The queue's primitives, on which the collect node (`pipeline::remote`) and the worker
//! (`service::worker`) are built: an item enqueued with its bytes, leased by a worker,
//! its lease extended, its outcome committed once, acknowledged, collected, forgotten;
//! the attempt count of suspects; the sweep of what no live item owns.
//!
//! Exactly one outcome per item rests on three server guarantees: a publish carrying
//! `Nats-Msg-Id` twice within the duplicate window is stored once (ingest re-enqueues
//! after a crash without a second item); a delivered item that is not acknowledged
//! within `ack_wait_s` is delivered again (a dead worker loses nothing); and a key-value
//! create succeeds for one writer only (of two workers that both finished an item, one
//! commits and the other learns it lost). The ack comes last and waits for the server's
//! confirmation (`double_ack`), so an item is never gone before its outcome is stored.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{Cluster, ClusterError};

/// The longest a sweep's listing of the buckets may take.
const SWEEP_LIST_LIMIT: Duration = Duration::from_secs(60);

/// What a work message says of its item; its bytes are `input/<id>` in the object bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// Unique, and durable in the item's journal before anything leaves the host.
    pub id: String,
    pub name: String,
    pub size: u64,
    /// The object bucket's digest of the bytes (`SHA-256=<base64url>`).
    pub sha256: String,
    /// The item's parameters (`[params]`), as the collect node resolved them; the worker
    /// checks them against its own schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

/// What a worker recorded for an item: the one outcome that counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The worker that made it (its heartbeat key).
    pub worker: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Verdict {
    /// The outputs, in order, as objects in the bucket (the worker's own names), with
    /// the extension their encoder chose and the item's sidecar data (the face box).
    Done {
        ext: String,
        outputs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sidecar: Option<serde_json::Value>,
    },
    /// The item cannot be processed: it goes to `failed/` with this reason.
    Failed { stage: String, reason: String },
}

/// How an enqueue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new item in the queue.
    Queued,
    /// The server had it already (the same id within the duplicate window): one item.
    Duplicate,
}

/// An outcome message for the collect node: the item `id`, what was recorded (`None`
/// for a marker or an unreadable value).
pub struct Taken {
    msg: jetstream::Message,
    pub id: String,
    pub recorded: Option<Recorded>,
}

/// One delivered item, the worker's until acknowledged or `ack_wait_s` passes silently.
pub struct Lease {
    msg: jetstream::Message,
    pub item: WorkItem,
    /// Which delivery this is (1 on the first).
    pub delivered: i64,
}

fn input_object(id: &str) -> String {
    format!("input/{id}")
}

/// An output of item `id` as `worker` made it (`leaf`: `<k>.<ext>`): a name of its own,
/// so a losing worker deletes exactly its outputs and never the winner's.
fn output_object(id: &str, worker: &str, leaf: &str) -> String {
    format!("output/{id}/{worker}/{leaf}")
}

/// The item id an object belongs to (`input/<id>`, `output/<id>/...`).
fn object_item(name: &str) -> Option<&str> {
    let rest = name
        .strip_prefix("input/")
        .or_else(|| name.strip_prefix("output/"))?;
    rest.split('/').next()
}

impl Cluster {
    /// Store `bytes` and queue the item, once: enqueueing the same id again stores it
    /// again and publishes a duplicate the server drops. [`ClusterError::Full`] when the
    /// work stream holds `max_queue` items (the caller waits and tries again: nothing is
    /// dropped).
    pub fn enqueue(
        &self,
        id: &str,
        name: &str,
        bytes: &[u8],
        params: Option<serde_json::Value>,
    ) -> Result<Enqueued, ClusterError> {
        let n = &self.names;
        let info = self
            .rt
            .block_on(async {
                let store = self.js.get_object_store(&n.objects).await?;
                let mut data = bytes;
                Ok::<_, async_nats::Error>(store.put(input_object(id).as_str(), &mut data).await?)
            })
            .map_err(|e| self.server_err(format!("cannot store the bytes of {name}"), e))?;
        let item = WorkItem {
            id: id.to_string(),
            name: name.to_string(),
            size: info.size as u64,
            sha256: info.digest.unwrap_or_default(),
            params,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let body = serde_json::to_vec(&item).expect("a work item serialises");
        let ack = self.rt.block_on(async {
            let sent = self
                .js
                .publish_with_headers(n.work_subject.clone(), headers, body.into())
                .await?;
            Ok::<_, async_nats::Error>(sent.await?)
        });
        match ack {
            Ok(a) if a.duplicate => Ok(Enqueued::Duplicate),
            Ok(_) => Ok(Enqueued::Queued),
            // `discard = new`: the server refuses a message past the stream's bound.
            Err(e) if e.to_string().contains("maximum messages") => Err(ClusterError::Full {
                url: self.cfg.url.clone(),
                max_queue: self.cfg.max_queue,
            }),
            Err(e) => Err(self.server_err(format!("cannot queue {name}"), e)),
        }
    }

    /// Up to `max` items, waiting at most `wait` for the first: a worker asks for no more
    /// than it has free slots, so no delivered item waits unseen until it times out.
    pub fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, ClusterError> {
        let n = &self.names;
        let msgs = self
            .fetch(&n.work_stream, &n.consumer, max, wait)
            .map_err(|e| self.server_err("cannot fetch work", e))?;
        msgs.into_iter()
            .map(|msg| {
                let item: WorkItem = serde_json::from_slice(&msg.payload)
                    .map_err(|e| self.server_err("a work message is not a work item", e))?;
                let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
                Ok(Lease {
                    msg,
                    item,
                    delivered,
                })
            })
            .collect()
    }

    /// Up to `max` messages from the durable pull consumer `consumer` on `stream`,
    /// waiting at most `wait` for the first.
    fn fetch(
        &self,
        stream: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<jetstream::Message>, async_nats::Error> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await?;
            let consumer: jetstream::consumer::PullConsumer = stream.get_consumer(consumer).await?;
            let batch = consumer
                .fetch()
                .max_messages(max)
                .expires(wait)
                .messages()
                .await?;
            batch.try_collect().await
        })
    }

    /// The item's bytes, checked against the size it was queued with; `None` when they
    /// are gone (the collect node finished the item: its message is a late duplicate).
    pub fn input(&self, item: &WorkItem) -> Result<Option<Vec<u8>>, ClusterError> {
        let Some(bytes) = self.object(&input_object(&item.id), item.size as usize)? else {
            return Ok(None);
        };
        if bytes.len() as u64 != item.size {
            return Err(self.server_err(
                format!("the bytes of {}", item.name),
                format!("{} bytes stored, {} queued", bytes.len(), item.size),
            ));
        }
        Ok(Some(bytes))
    }

    /// An object's bytes (`None`: no such object).
    pub fn object(&self, name: &str, size_hint: usize) -> Result<Option<Vec<u8>>, ClusterError> {
        let store_name = &self.names.objects;
        self.rt
            .block_on(async {
                let store = self.js.get_object_store(store_name).await?;
                let mut obj = match store.get(name).await {
                    Ok(o) => o,
                    Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let mut v = Vec::with_capacity(size_hint);
                obj.read_to_end(&mut v).await?;
                Ok::<_, async_nats::Error>(Some(v))
            })
            .map_err(|e| self.server_err(format!("cannot read object {name}"), e))
    }

    /// Store an output of item `id` under `worker`'s own name; returns the name.
    pub fn put_output(
        &self,
        id: &str,
        worker: &str,
        leaf: &str,
        bytes: &[u8],
    ) -> Result<String, ClusterError> {
        let name = output_object(id, worker, leaf);
        self.rt
            .block_on(async {
                let store = self.js.get_object_store(&self.names.objects).await?;
                let mut data = bytes;
                store.put(name.as_str(), &mut data).await?;
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err(format!("cannot store output {name}"), e))?;
        Ok(name)
    }

    /// Remove objects whole: their chunks and their metadata entry (a plain delete
    /// leaves the entry as a tombstone, which would never leave the bucket). An object
    /// that is not there is no error.
    pub fn purge_objects(&self, names: &[String]) -> Result<(), ClusterError> {
        let bucket = &self.names.objects;
        self.rt
            .block_on(async {
                let store = self.js.get_object_store(bucket).await?;
                let stream = self.js.get_stream(format!("OBJ_{bucket}")).await?;
                for name in names {
                    match store.info(name).await {
                        Ok(info) => {
                            let chunks = format!("$O.{bucket}.C.{}", info.nuid);
                            stream.purge().filter(chunks).await?;
                        }
                        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                    let meta = format!("$O.{bucket}.M.{}", URL_SAFE.encode(name));
                    stream.purge().filter(meta).await?;
                }
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err("cannot remove objects", e))
    }

    /// Count one more worker that took item `id` alone and may have died on it; returns
    /// the count before this one.
    pub fn blame(&self, id: &str) -> Result<u32, ClusterError> {
        self.rt
            .block_on(async {
                let store = self.js.get_key_value(&self.names.attempts).await?;
                let before = match store.get(id).await? {
                    Some(b) => std::str::from_utf8(&b)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    None => 0u32,
                };
                store.put(id, (before + 1).to_string().into()).await?;
                Ok::<_, async_nats::Error>(before)
            })
            .map_err(|e| self.server_err(format!("cannot count an attempt at {id}"), e))
    }

    /// Everything the server holds for a finished item: its outcome and attempt count
    /// (purged, leaving no marker), its input and `outputs` objects.
    pub fn forget(&self, id: &str, outputs: &[String]) -> Result<(), ClusterError> {
        let mut objects = vec![input_object(id)];
        objects.extend(outputs.iter().cloned());
        self.purge_objects(&objects)?;
        self.purge_keys(&self.names.outcomes, &[id.to_string()])?;
        self.purge_keys(&self.names.attempts, &[id.to_string()])
    }

    fn purge_keys(&self, bucket: &str, keys: &[String]) -> Result<(), ClusterError> {
        let subjects: Vec<String> = keys.iter().map(|k| format!("$KV.{bucket}.{k}")).collect();
        self.purge_subjects(&format!("KV_{bucket}"), &subjects)
    }

    /// Remove every message on each of `subjects` from `stream`, leaving no marker.
    fn purge_subjects(&self, stream: &str, subjects: &[String]) -> Result<(), ClusterError> {
        if subjects.is_empty() {
            return Ok(());
        }
        self.rt
            .block_on(async {
                let s = self.js.get_stream(stream).await?;
                for subject in subjects {
                    s.purge().filter(subject).await?;
                }
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err(format!("cannot purge stream {stream}"), e))
    }

    /// Remove what no live item owns: objects, outcomes and attempt counts of items that
    /// `live()` (called after the listing, so an item queued meanwhile is in it) does not
    /// name. What a worker that died between storing its outputs and committing left, or a
    /// collect node that died between publishing and [`Cluster::forget`]. Also the chunks
    /// of an object whose upload died before its metadata entry was written (the server
    /// was killed mid-upload): those no entry names, and that were unnamed at the last
    /// sweep too (`orphans`, kept by the caller between sweeps), so an upload in progress
    /// is never touched. Returns how many entries went; none when `live()` cannot say
    /// (`None`: `work/` unreadable).
    pub fn sweep(
        &self,
        live: impl FnOnce() -> Option<HashSet<String>>,
        orphans: &mut HashSet<String>,
    ) -> Result<usize, ClusterError> {
        let n = &self.names;
        let (objects, chunks, outcomes, attempts) = self.list_for_sweep()?;
        let named: HashSet<&str> = objects.iter().map(|(_, nuid)| nuid.as_str()).collect();
        let unnamed: HashSet<String> = (chunks.into_iter())
            .filter(|c| {
                !c.rsplit('.')
                    .next()
                    .is_some_and(|nuid| named.contains(nuid))
            })
            .collect();
        let stale: Vec<String> = unnamed.intersection(orphans).cloned().collect();
        *orphans = unnamed
            .difference(&stale.iter().cloned().collect())
            .cloned()
            .collect();
        let Some(live) = live() else {
            return Ok(0);
        };
        let dead = |id: &str| !live.contains(id);
        let objects: Vec<String> = (objects.into_iter())
            .map(|(name, _)| name)
            .filter(|o| object_item(o).is_some_and(dead))
            .collect();
        let outcomes: Vec<String> = outcomes.into_iter().filter(|k| dead(k)).collect();
        let attempts: Vec<String> = attempts.into_iter().filter(|k| dead(k)).collect();
        self.purge_objects(&objects)?;
        self.purge_subjects(&format!("OBJ_{}", n.objects), &stale)?;
        self.purge_keys(&n.outcomes, &outcomes)?;
        self.purge_keys(&n.attempts, &attempts)?;
        Ok(objects.len() + stale.len() + outcomes.len() + attempts.len())
    }

    /// What the sweep looks at: the objects (name, nuid), the chunk subjects, the outcome
    /// and attempt keys.
    #[allow(clippy::type_complexity)]
    fn list_for_sweep(
        &self,
    ) -> Result<(Vec<(String, String)>, Vec<String>, Vec<String>, Vec<String>), ClusterError> {
        let n = &self.names;
        let listing = async {
            // A listing of an empty bucket would wait for a first entry forever.
            let obj_stream = self.js.get_stream(format!("OBJ_{}", n.objects)).await?;
            let (mut objects, mut chunks) = (Vec::new(), Vec::new());
            if obj_stream.get_info().await?.state.messages > 0 {
                let store = self.js.get_object_store(&n.objects).await?;
                objects = (store.list().await?)
                    .map_ok(|o| (o.name, o.nuid))
                    .try_collect()
                    .await?;
                chunks = (obj_stream
                    .info_with_subjects(format!("$O.{}.C.>", n.objects))
                    .await?)
                    .map_ok(|(subject, _)| subject)
                    .try_collect()
                    .await?;
            }
            let mut keys = Vec::new();
            for bucket in [&n.outcomes, &n.attempts] {
                let mut these = Vec::new();
                if self
                    .js
                    .get_stream(format!("KV_{bucket}"))
                    .await?
                    .get_info()
                    .await?
                    .state
                    .messages
                    > 0
                {
                    let kv = self.js.get_key_value(bucket).await?;
                    these = kv.keys().await?.try_collect::<Vec<String>>().await?;
                }
                keys.push(these);
            }
            let attempts = keys.pop().unwrap_or_default();
            let outcomes = keys.pop().unwrap_or_default();
            Ok::<_, async_nats::Error>((objects, chunks, outcomes, attempts))
        };
        self.rt
            .block_on(async { tokio::time::timeout(SWEEP_LIST_LIMIT, listing).await? })
            .map_err(|e| self.server_err("cannot list the buckets for the sweep", e))
    }

    /// Up to `max` recorded outcomes not yet taken by the collect node, waiting at most
    /// `wait`: the collect node's durable consumer on the outcome bucket, so an outcome
    /// recorded while it was down (or the server was) is delivered when it is back.
    pub fn recorded(&self, max: usize, wait: Duration) -> Result<Vec<Taken>, ClusterError> {
        let n = &self.names;
        let msgs = self
            .fetch(&format!("KV_{}", n.outcomes), &n.collector, max, wait)
            .map_err(|e| self.server_err("cannot fetch outcomes", e))?;
        let prefix = format!("$KV.{}.", n.outcomes);
        Ok(msgs
            .into_iter()
            .map(|msg| {
                let id = msg
                    .subject
                    .strip_prefix(&prefix)
                    .unwrap_or_default()
                    .to_string();
                // A purge or delete marker, or a value that is not an outcome, carries none.
                let recorded = serde_json::from_slice(&msg.payload).ok();
                Taken { msg, id, recorded }
            })
            .collect())
    }

    /// Done with an outcome message (after its item is finished, or found not ours).
    pub fn taken(&self, t: Taken) -> Result<(), ClusterError> {
        self.rt
            .block_on(t.msg.double_ack())
            .map_err(|e| self.server_err(format!("cannot acknowledge the outcome of {}", t.id), e))
    }

    /// Tell the server the worker is still on it (the lease starts again).
    pub fn progress(&self, lease: &Lease) -> Result<(), ClusterError> {
        self.rt
            .block_on(lease.msg.ack_with(jetstream::AckKind::Progress))
            .map_err(|e| self.server_err("cannot extend a lease", e))
    }

    /// Record the item's outcome if none is recorded yet: `true` when this one is it,
    /// `false` when another worker's came first (this worker's outputs are to go).
    pub fn commit(&self, id: &str, outcome: &Recorded) -> Result<bool, ClusterError> {
        let value = serde_json::to_vec(outcome).expect("an outcome serialises");
        let r = self.rt.block_on(async {
            let store = self.js.get_key_value(&self.names.outcomes).await?;
            match store.create(id, value.into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(async_nats::Error::from(e)),
            }
        });
        r.map_err(|e| self.server_err(format!("cannot record the outcome of {id}"), e))
    }

    /// Whether the collect node has finished item `id` (and forgotten its input): an
    /// attempt that ends after that is late, however its commit would go.
    pub fn collected(&self, id: &str) -> Result<bool, ClusterError> {
        self.rt
            .block_on(async {
                let store = self.js.get_object_store(&self.names.objects).await?;
                match store.info(input_object(id)).await {
                    Ok(_) => Ok(false),
                    Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(true),
                    Err(e) => Err(async_nats::Error::from(e)),
                }
            })
            .map_err(|e| self.server_err(format!("cannot look up the input of {id}"), e))
    }

    /// The outcome recorded for `id`, if any.
    pub fn outcome(&self, id: &str) -> Result<Option<Recorded>, ClusterError> {
        let got = self
            .rt
            .block_on(async {
                let store = self.js.get_key_value(&self.names.outcomes).await?;
                Ok::<_, async_nats::Error>(store.get(id).await?)
            })
            .map_err(|e| self.server_err(format!("cannot read the outcome of {id}"), e))?;
        got.map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| self.server_err(format!("the outcome of {id}"), e))
    }

    /// Say worker `id` is alive, with what it reports of itself; the entry expires 30 s
    /// after the last one (`status` lists the workers whose entry has not).
    pub fn heartbeat(&self, id: &str, report: &serde_json::Value) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(report).expect("a report serialises");
        self.rt
            .block_on(async {
                let store = self.js.get_key_value(&self.names.heartbeats).await?;
                store.put(id, value.into()).await?;
                Ok::<_, async_nats::Error>(())
            })
            .map_err(|e| self.server_err(format!("cannot record the heartbeat of {id}"), e))
    }

    /// Hand the item back at once (delivered again to whoever asks next).
    pub fn nak(&self, lease: &Lease) -> Result<(), ClusterError> {
        self.rt
            .block_on(lease.msg.ack_with(jetstream::AckKind::Nak(None)))
            .map_err(|e| self.server_err(format!("cannot hand back {}", lease.item.name), e))
    }

    /// Done with the item: gone from the queue once the server confirms.
    pub fn ack(&self, lease: Lease) -> Result<(), ClusterError> {
        self.rt
            .block_on(lease.msg.double_ack())
            .map_err(|e| self.server_err(format!("cannot acknowledge {}", lease.item.name), e))
    }
}
