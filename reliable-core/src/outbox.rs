//! A crash-safe outbox in front of the producer's confirm tracking (feature `outbox`).
//!
//! The producer keeps unconfirmed messages in memory; if the process dies, they are gone. With
//! an [`Outbox`], [`Producer::send`](crate::producer::Producer::send) first commits the message
//! to a local [redb](https://docs.rs/redb) database (an fsync'd, crash-safe commit) and only then
//! sends it; the confirm removes it. After a restart,
//! [`Producer::replay_outbox`](crate::producer::Producer::replay_outbox) sends every entry still
//! there again, with its original id and idempotency key, so consumers' dedupe recognises the
//! ones that had reached the broker after all.
//!
//! Commits are batched: all messages that arrive while one commit is being written share the
//! next commit (group commit), so concurrent senders pay one fsync per batch, not per message.
//! A single task sending one message at a time waits for one commit per message; send in
//! batches ([`Producer::send_batch`](crate::producer::Producer::send_batch)) or from several
//! tasks to share commits.
//! Removals are batched the same way and are not waited for: a crash before a removal is
//! written only replays a confirmed message (a duplicate the consumers drop), never loses one.
//!
//! A message handed back with an error ([`SendError`](crate::producer::SendError)) is removed
//! too: the caller holds it now.
//!
//! One process owns an outbox file at a time (redb locks it).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use reliable_core::memory::InMemoryBroker;
//! use reliable_core::outbox::Outbox;
//! use reliable_core::producer::{Producer, ProducerConfig};
//! use reliable_core::Message;
//!
//! let dir = std::env::temp_dir().join(format!("outbox-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let broker = InMemoryBroker::new();
//! broker.declare_queue("orders");
//! let outbox = Outbox::open(dir.join("producer.outbox"))?;
//! let producer = Producer::with_outbox(broker.transport(), ProducerConfig::default(), outbox);
//! // After a crash, whatever was not confirmed goes out again first:
//! for handle in producer.replay_outbox().await? {
//!     handle.await?;
//! }
//! producer.send_confirmed(Message::new("order 42").with_destination("orders")).await?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use crate::message::{Message, MessageFormatError, MessageId};

/// Message id (UUIDv7 bytes, so key order is send order) → encoded message.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reliable_outbox_v1");

/// The most operations one commit takes.
const MAX_BATCH: usize = 4096;

/// Why the outbox failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database could not be opened, read or written (disk full, permissions, another
    /// process holding the file). The message was not accepted; nothing was sent.
    #[error(
        "outbox {path}: {reason}; check the disk and that no other process uses this outbox file"
    )]
    Storage {
        /// The outbox file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An entry could not be decoded (written by an incompatible version, or corrupted).
    #[error(
        "outbox {path}: an entry cannot be decoded ({reason}); move the file aside to start empty"
    )]
    Corrupt {
        /// The outbox file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The outbox's writer thread stopped (the outbox was dropped, or a previous failure).
    #[error("outbox writer stopped")]
    Stopped,
}

type Entry = (Vec<u8>, Vec<u8>);

enum Op {
    Put(Vec<Entry>, oneshot::Sender<Result<(), OutboxError>>),
    Remove(Vec<u8>),
}

/// A crash-safe spool of unconfirmed messages. Cheap to clone; clones share the file.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    db: Arc<Database>,
    path: PathBuf,
    ops: std_mpsc::Sender<Op>,
}

impl Outbox {
    /// Opens (or creates) the outbox file at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OutboxError> {
        let path = path.as_ref().to_owned();
        let storage = |e: &dyn std::fmt::Display| OutboxError::Storage {
            path: path.clone(),
            reason: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| storage(&e))?;
        let txn = db.begin_write().map_err(|e| storage(&e))?;
        txn.open_table(TABLE).map_err(|e| storage(&e))?;
        txn.commit().map_err(|e| storage(&e))?;
        let db = Arc::new(db);
        let (ops, rx) = std_mpsc::channel();
        let writer_db = db.clone();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("reliable-outbox".into())
            .spawn(move || writer(&writer_db, &writer_path, &rx))
            .map_err(|e| storage(&e))?;
        Ok(Self {
            inner: Arc::new(Shared { db, path, ops }),
        })
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Messages in the outbox, oldest first.
    pub fn pending(&self) -> Result<Vec<Message>, OutboxError> {
        let storage = |e: &dyn std::fmt::Display| OutboxError::Storage {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        };
        let txn = self.inner.db.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(TABLE).map_err(|e| storage(&e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| storage(&e))? {
            let (_, value) = entry.map_err(|e| storage(&e))?;
            out.push(
                decode(value.value()).map_err(|reason| OutboxError::Corrupt {
                    path: self.inner.path.clone(),
                    reason,
                })?,
            );
        }
        Ok(out)
    }

    /// How many messages the outbox holds.
    pub fn len(&self) -> Result<u64, OutboxError> {
        let storage = |e: &dyn std::fmt::Display| OutboxError::Storage {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        };
        let txn = self.inner.db.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(TABLE).map_err(|e| storage(&e))?;
        table.len().map_err(|e| storage(&e))
    }

    /// Whether the outbox is empty.
    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }

    /// Commits `msgs` durably; returns once the commit holding them is on disk. Messages put
    /// at the same time by other tasks share the commit.
    pub(crate) async fn put(&self, msgs: &[Message]) -> Result<(), OutboxError> {
        let entries = msgs
            .iter()
            .map(|m| (m.id().as_uuid().as_bytes().to_vec(), encode(m)))
            .collect();
        let (tx, rx) = oneshot::channel();
        self.inner
            .ops
            .send(Op::Put(entries, tx))
            .map_err(|_| OutboxError::Stopped)?;
        rx.await.map_err(|_| OutboxError::Stopped)?
    }

    /// Schedules the removal of `id` (batched, not waited for).
    pub(crate) fn remove(&self, id: MessageId) {
        let key = id.as_uuid().as_bytes().to_vec();
        if self.inner.ops.send(Op::Remove(key)).is_err() {
            tracing::warn!(message_id = %id, "outbox writer stopped; the entry stays and is replayed after a restart");
        }
    }
}

/// The writer thread: takes every queued operation, applies them in one transaction, commits
/// once, then answers the puts of that batch.
fn writer(db: &Database, path: &Path, rx: &std_mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = apply(db, &batch).map_err(|reason| OutboxError::Storage {
            path: path.to_owned(),
            reason,
        });
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = batch.len(), "outbox commit failed");
        }
        for op in batch {
            if let Op::Put(_, done) = op {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn apply(db: &Database, batch: &[Op]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for op in batch {
            match op {
                Op::Put(entries, _) => {
                    for (key, value) in entries {
                        table
                            .insert(key.as_slice(), value.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                }
                Op::Remove(key) => {
                    table.remove(key.as_slice()).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Format version of an encoded entry.
const VERSION: u8 = 1;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
        None => out.push(0),
    }
}

/// Encodes a message: version, wire headers (identity first), destination, routing key,
/// payload; lengths as little-endian u64.
fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.payload().len() + 128);
    out.push(VERSION);
    let headers: Vec<_> = msg.wire_headers().collect();
    out.extend_from_slice(&(headers.len() as u64).to_le_bytes());
    for (k, v) in headers {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    put_opt(&mut out, msg.destination());
    put_opt(&mut out, msg.routing_key());
    put_bytes(&mut out, msg.payload());
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated entry".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn len(&mut self) -> Result<usize, String> {
        let raw: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| "truncated length".to_owned())?;
        usize::try_from(u64::from_le_bytes(raw)).map_err(|_| "length overflow".to_owned())
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }
    fn text(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| e.to_string())
    }
    fn opt(&mut self) -> Result<Option<&'a str>, String> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.text().map(Some),
            t => Err(format!("bad option tag {t}")),
        }
    }
}

fn decode(raw: &[u8]) -> Result<Message, String> {
    let mut r = Reader(raw);
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(format!("unknown entry version {version}"));
    }
    let n = r.len()?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        headers.push((r.text()?, r.text()?));
    }
    let destination = r.opt()?;
    let routing_key = r.opt()?;
    let payload = r.bytes()?.to_vec();
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    let mut msg =
        Message::from_wire(payload, headers).map_err(|e: MessageFormatError| e.to_string())?;
    if let Some(d) = destination {
        msg = msg.with_destination(d);
    }
    if let Some(k) = routing_key {
        msg = msg.with_routing_key(k);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_every_field() {
        let msg = Message::new(&b"\x00payload\xff"[..])
            .with_idempotency_key("order-42")
            .unwrap()
            .with_header("trace", "abc")
            .with_destination("orders")
            .with_routing_key("eu");
        assert_eq!(decode(&encode(&msg)).unwrap(), msg);
        let bare = Message::new("x");
        assert_eq!(decode(&encode(&bare)).unwrap(), bare);
    }

    #[test]
    fn damaged_entries_are_refused_not_misread() {
        let raw = encode(&Message::new("hello").with_destination("q"));
        for cut in [0, 1, 5, raw.len() - 1] {
            assert!(decode(&raw[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = raw.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        let mut other_version = raw;
        other_version[0] = 9;
        assert!(decode(&other_version).is_err());
    }
}
