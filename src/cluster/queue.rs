//! The queue's primitives, on which the ingest/collect and worker roles are to be built
//! (issue 15): an item enqueued with its bytes, leased by a worker, its lease extended,
//! its outcome committed once, acknowledged.
//!
//! Exactly one outcome per item rests on three server guarantees: a publish carrying
//! `Nats-Msg-Id` twice within the duplicate window is stored once (ingest re-enqueues
//! after a crash without a second item); a delivered item that is not acknowledged
//! within `ack_wait_s` is delivered again (a dead worker loses nothing); and a key-value
//! create succeeds for one writer only (of two workers that both finished an item, one
//! commits and the other learns it lost). The ack comes last and waits for the server's
//! confirmation (`double_ack`), so an item is never gone before its outcome is stored.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{Cluster, ClusterError};

/// What a work message says of its item; its bytes are `input/<id>` in the object bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// Unique, and durable in the item's journal before anything leaves the host.
    pub id: String,
    pub name: String,
    pub size: u64,
    /// The object bucket's digest of the bytes (`SHA-256=<base64url>`).
    pub sha256: String,
}

/// How an enqueue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new item in the queue.
    Queued,
    /// The server had it already (the same id within the duplicate window): one item.
    Duplicate,
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

impl Cluster {
    /// Store `bytes` and queue the item, once: enqueueing the same id again stores it
    /// again and publishes a duplicate the server drops. [`ClusterError::Full`] when the
    /// work stream holds `max_queue` items (the caller waits and tries again: nothing is
    /// dropped).
    pub fn enqueue(&self, id: &str, name: &str, bytes: &[u8]) -> Result<Enqueued, ClusterError> {
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
            .rt
            .block_on(async {
                let stream = self.js.get_stream(&n.work_stream).await?;
                let consumer: jetstream::consumer::PullConsumer =
                    stream.get_consumer(&n.consumer).await?;
                let batch = consumer
                    .fetch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await?;
                let msgs: Vec<jetstream::Message> = batch.try_collect().await?;
                Ok::<_, async_nats::Error>(msgs)
            })
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

    /// The item's bytes, checked against the size it was queued with.
    pub fn input(&self, item: &WorkItem) -> Result<Vec<u8>, ClusterError> {
        let store_name = &self.names.objects;
        let bytes = self
            .rt
            .block_on(async {
                let store = self.js.get_object_store(store_name).await?;
                let mut obj = store.get(input_object(&item.id)).await?;
                let mut v = Vec::with_capacity(item.size as usize);
                obj.read_to_end(&mut v).await?;
                Ok::<_, async_nats::Error>(v)
            })
            .map_err(|e| self.server_err(format!("cannot read the bytes of {}", item.name), e))?;
        if bytes.len() as u64 != item.size {
            return Err(self.server_err(
                format!("the bytes of {}", item.name),
                format!("{} bytes stored, {} queued", bytes.len(), item.size),
            ));
        }
        Ok(bytes)
    }

    /// Tell the server the worker is still on it (the lease starts again).
    pub fn progress(&self, lease: &Lease) -> Result<(), ClusterError> {
        self.rt
            .block_on(lease.msg.ack_with(jetstream::AckKind::Progress))
            .map_err(|e| self.server_err("cannot extend a lease", e))
    }

    /// Record the item's outcome if none is recorded yet: `true` when this one is it,
    /// `false` when another worker's came first (this worker's outputs are to go).
    pub fn commit(&self, id: &str, outcome: &serde_json::Value) -> Result<bool, ClusterError> {
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

    /// The outcome recorded for `id`, if any.
    pub fn outcome(&self, id: &str) -> Result<Option<serde_json::Value>, ClusterError> {
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

    /// Done with the item: gone from the queue once the server confirms.
    pub fn ack(&self, lease: Lease) -> Result<(), ClusterError> {
        self.rt
            .block_on(lease.msg.double_ack())
            .map_err(|e| self.server_err(format!("cannot acknowledge {}", lease.item.name), e))
    }
}
