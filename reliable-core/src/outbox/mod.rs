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
//! A message leaves the outbox only when it is confirmed or when its caller has actually
//! received it back (invariant 10): a [`SendHandle`](crate::producer::SendHandle) that yields
//! a [`SendError`](crate::producer::SendError) carrying the message removes the entry as it
//! hands the message over. A handle dropped before that (before the hand-back, or after it
//! without being awaited) does not count as received: the entry stays, and the next
//! [`replay_outbox`](crate::producer::Producer::replay_outbox) of this process, or of the next
//! one, sends the message again. So await the handles `replay_outbox` returns: a message refused
//! for good (e.g. unroutable) whose handle is dropped is tried again at every replay.
//!
//! Within a process, each entry is *claimed* by the task delivering it (or by the handle holding
//! it handed back), and `replay_outbox` sends only unclaimed entries: a message in flight here
//! is never sent a second time by a replay. A claim ends when its removal is committed, or, for
//! an entry that stays, when its delivery ends without a receiver.
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

mod codec;

use crate::message::{Message, MessageId};
use codec::{decode, encode};

/// Message id (UUIDv7 bytes, so key order is send order) → encoded message.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reliable_outbox_v1");
/// Entries `pending` could not decode, moved aside with the reason: key -> reason length (u32
/// LE), reason, raw entry.
const QUARANTINE: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("reliable_outbox_quarantine_v1");

/// An outbox entry that could not be decoded (written by an incompatible version of the SDK,
/// or damaged), kept apart by [`Outbox::pending`] so the other entries can be replayed. Nothing
/// is deleted: inspect it, and remove the file only once you know what it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The entry's key in the outbox.
    pub key: Vec<u8>,
    /// The entry as stored.
    pub raw: Vec<u8>,
    /// Why it could not be decoded.
    pub reason: String,
}

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
    /// Entries that cannot be decoded (written by an incompatible version, or damaged) could not
    /// be moved to the quarantine ([`Outbox::quarantined`]); nothing was discarded.
    #[error(
        "outbox {path}: an undecodable entry could not be quarantined ({reason}); check the disk, \
         the other entries are intact"
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
    Remove(MessageId),
}

/// A crash-safe spool of unconfirmed messages. Cheap to clone; clones share the file and the
/// claims.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    db: Arc<Database>,
    path: PathBuf,
    ops: std_mpsc::Sender<Op>,
    claims: Arc<Claims>,
}

/// The entries this process holds (in flight, or handed back and not yet received), counted
/// per id: the same id may be sent again while the removal of its previous entry is pending.
#[derive(Debug, Default)]
struct Claims(Mutex<HashMap<MessageId, u32>>);

impl Claims {
    fn lock(&self) -> MutexGuard<'_, HashMap<MessageId, u32>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removals), so a poisoned lock is still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, id: MessageId) {
        *self.lock().entry(id).or_default() += 1;
    }

    /// Claims `id` only if nobody in this process holds it.
    fn add_if_free(&self, id: MessageId) -> bool {
        let mut claims = self.lock();
        if claims.contains_key(&id) {
            return false;
        }
        claims.insert(id, 1);
        true
    }

    fn end(&self, id: MessageId) {
        let mut claims = self.lock();
        if let Some(n) = claims.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                claims.remove(&id);
            }
        }
    }
}

/// This process's hold on one outbox entry, owned by the task delivering the message and then
/// by whoever holds its outcome. [`remove`](Self::remove) deletes the entry (confirmed, or
/// received by the caller); dropping the claim keeps the entry for the next replay.
#[derive(Debug)]
#[must_use = "dropping a claim keeps the entry for replay; call remove once it is settled"]
pub(crate) struct Claim {
    outbox: Outbox,
    id: MessageId,
    removed: bool,
}

impl Claim {
    fn new(outbox: &Outbox, id: MessageId) -> Self {
        Self {
            outbox: outbox.clone(),
            id,
            removed: false,
        }
    }

    /// Schedules the entry's removal; the claim ends once the removal is committed, so a
    /// replay in between cannot pick the entry up again.
    pub(crate) fn remove(mut self) {
        self.removed = true;
        if self.outbox.inner.ops.send(Op::Remove(self.id)).is_err() {
            tracing::warn!(message_id = %self.id, "outbox writer stopped; the entry stays and is replayed after a restart");
            self.outbox.inner.claims.end(self.id);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.removed {
            // Nobody received the message: the entry stays, free for the next replay.
            self.outbox.inner.claims.end(self.id);
        }
    }
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
        let claims = Arc::new(Claims::default());
        let (ops, rx) = std_mpsc::channel();
        let writer_db = db.clone();
        let writer_path = path.clone();
        let writer_claims = claims.clone();
        std::thread::Builder::new()
            .name("reliable-outbox".into())
            .spawn(move || writer(&writer_db, &writer_path, &writer_claims, &rx))
            .map_err(|e| storage(&e))?;
        Ok(Self {
            inner: Arc::new(Shared {
                db,
                path,
                ops,
                claims,
            }),
        })
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn storage_error(&self, e: &dyn std::fmt::Display) -> OutboxError {
        OutboxError::Storage {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Messages in the outbox, oldest first: unconfirmed ones, including those this process is
    /// delivering right now, and handed-back ones nobody received.
    ///
    /// An entry that cannot be decoded does not stop the others: it is moved to the quarantine
    /// ([`quarantined`](Self::quarantined)) with the reason, and logged at `error` level.
    pub fn pending(&self) -> Result<Vec<Message>, OutboxError> {
        let storage = |e: &dyn std::fmt::Display| self.storage_error(e);
        let txn = self.inner.db.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(TABLE).map_err(|e| storage(&e))?;
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for entry in table.iter().map_err(|e| storage(&e))? {
            let (key, value) = entry.map_err(|e| storage(&e))?;
            match decode(value.value()) {
                Ok(msg) => out.push(msg),
                Err(reason) => bad.push(Quarantined {
                    key: key.value().to_vec(),
                    raw: value.value().to_vec(),
                    reason,
                }),
            }
        }
        drop(table);
        drop(txn);
        if !bad.is_empty() {
            self.quarantine(&bad)?;
        }
        Ok(out)
    }

    /// The entries [`pending`](Self::pending) could not decode and moved aside, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, OutboxError> {
        let storage = |e: &dyn std::fmt::Display| self.storage_error(e);
        let txn = self.inner.db.begin_read().map_err(|e| storage(&e))?;
        let table = match txn.open_table(QUARANTINE) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(&e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| storage(&e))? {
            let (key, value) = entry.map_err(|e| storage(&e))?;
            let value = value.value();
            let (len, rest) = value.split_at(value.len().min(4));
            let len = u32::from_le_bytes(len.try_into().unwrap_or([0; 4])) as usize;
            let (reason, raw) = rest.split_at(len.min(rest.len()));
            out.push(Quarantined {
                key: key.value().to_vec(),
                raw: raw.to_vec(),
                reason: String::from_utf8_lossy(reason).into_owned(),
            });
        }
        Ok(out)
    }

    /// Moves `bad` entries from the outbox to the quarantine, in one commit.
    fn quarantine(&self, bad: &[Quarantined]) -> Result<(), OutboxError> {
        let corrupt = |e: &dyn std::fmt::Display| OutboxError::Corrupt {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        };
        let txn = self.inner.db.begin_write().map_err(|e| corrupt(&e))?;
        {
            let mut pending = txn.open_table(TABLE).map_err(|e| corrupt(&e))?;
            let mut quarantine = txn.open_table(QUARANTINE).map_err(|e| corrupt(&e))?;
            for entry in bad {
                let mut value = Vec::with_capacity(4 + entry.reason.len() + entry.raw.len());
                value.extend_from_slice(&(entry.reason.len() as u32).to_le_bytes());
                value.extend_from_slice(entry.reason.as_bytes());
                value.extend_from_slice(&entry.raw);
                quarantine
                    .insert(entry.key.as_slice(), value.as_slice())
                    .map_err(|e| corrupt(&e))?;
                pending
                    .remove(entry.key.as_slice())
                    .map_err(|e| corrupt(&e))?;
            }
        }
        txn.commit().map_err(|e| corrupt(&e))?;
        for entry in bad {
            tracing::error!(
                outbox = %self.inner.path.display(),
                reason = %entry.reason,
                bytes = entry.raw.len(),
                "an outbox entry cannot be decoded: moved to the quarantine (Outbox::quarantined), the others are replayed"
            );
        }
        Ok(())
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

    /// Commits `msgs` durably and claims them for the caller (one claim per message, in
    /// order); returns once the commit holding them is on disk. Messages put at the same time
    /// by other tasks share the commit.
    pub(crate) async fn put(&self, msgs: &[Message]) -> Result<Vec<Claim>, OutboxError> {
        // Claimed before the commit, so a concurrent replay never sees them unclaimed. On
        // failure the claims drop and end.
        let claims: Vec<Claim> = msgs
            .iter()
            .map(|m| {
                self.inner.claims.add(m.id());
                Claim::new(self, m.id())
            })
            .collect();
        let entries = msgs.iter().map(|m| (key(m.id()), encode(m))).collect();
        let (tx, rx) = oneshot::channel();
        self.inner
            .ops
            .send(Op::Put(entries, tx))
            .map_err(|_| OutboxError::Stopped)?;
        rx.await.map_err(|_| OutboxError::Stopped)??;
        Ok(claims)
    }

    /// The entries no one in this process holds, oldest first, each claimed for the caller.
    pub(crate) fn claim_unclaimed(&self) -> Result<Vec<(Message, Claim)>, OutboxError> {
        let claimed: Vec<(Message, Claim)> = self
            .pending()?
            .into_iter()
            .filter(|m| self.inner.claims.add_if_free(m.id()))
            .map(|m| {
                let claim = Claim::new(self, m.id());
                (m, claim)
            })
            .collect();
        // An entry removed (and unclaimed) between the read above and its claim is confirmed or
        // received already: look again and let those go.
        let storage = |e: &dyn std::fmt::Display| self.storage_error(e);
        let txn = self.inner.db.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(TABLE).map_err(|e| storage(&e))?;
        let mut out = Vec::with_capacity(claimed.len());
        for (msg, claim) in claimed {
            if table
                .get(key(msg.id()).as_slice())
                .map_err(|e| storage(&e))?
                .is_some()
            {
                out.push((msg, claim));
            }
        }
        Ok(out)
    }
}

/// An entry's key: the id's UUIDv7 bytes, so key order is send order.
fn key(id: MessageId) -> Vec<u8> {
    id.as_uuid().as_bytes().to_vec()
}

/// The writer thread: takes every queued operation, applies them in one transaction, commits
/// once, then answers the puts of that batch and ends the claims of its removals.
fn writer(db: &Database, path: &Path, claims: &Claims, rx: &std_mpsc::Receiver<Op>) {
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
            match op {
                Op::Put(_, done) => {
                    let _ = done.send(result.clone());
                }
                // Ended even when the commit failed: the entry then stays and is replayed, a
                // duplicate the consumers drop.
                Op::Remove(id) => claims.end(id),
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
                Op::Remove(id) => {
                    table
                        .remove(key(*id).as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}
