//! [`RedbStore`]: an embedded idempotency store in one redb file, for one consumer process that
//! must recognise duplicates across its own restarts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, WriteTransaction,
};
use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError, DEFAULT_LEASE,
    DEFAULT_TTL,
};
use reliable_core::message::IdempotencyKey;

use crate::error::StoresError;
use crate::util::{millis, now_ms, positive};

mod attempts;

/// key → (state, expires at in ms since the epoch, token of the reservation that reserved or
/// completed it; 0 for keys carried over from [`KEYS_V1`]).
const KEYS: TableDefinition<&str, (u8, u64, u128)> =
    TableDefinition::new("reliable_idempotency_v2");
/// The table of earlier versions, without tokens: its completed keys move to [`KEYS`] when the
/// file is opened, then it is deleted.
const KEYS_V1: TableDefinition<&str, (u8, u64)> = TableDefinition::new("reliable_idempotency_v1");
/// (expires at, key) → (): completed keys by expiry, so purging reads only what expired.
const EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("reliable_idempotency_expiry_v1");

const RESERVED: u8 = 0;
const DONE: u8 = 1;

/// A row of [`KEYS`].
type Row = (u8, u64, u128);
/// Expired keys and attempt counts are purged on every this many writes (completions and
/// recorded attempts), at most [`PURGE_LIMIT`] of each at a time.
const PURGE_EVERY: u64 = 256;
const PURGE_LIMIT: usize = 4096;

/// Settings of a [`RedbStore`].
///
/// ```
/// use std::time::Duration;
/// use reliable_stores::RedbStoreConfig;
///
/// let config = RedbStoreConfig { ttl: Duration::from_secs(7 * 24 * 3600), ..Default::default() };
/// assert_eq!(config.lease, Duration::from_secs(300));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedbStoreConfig {
    /// How long a completed key is remembered: the deduplication window. Must exceed the longest
    /// time a duplicate can arrive after the original. Default 24 h.
    pub ttl: Duration,
    /// How long a reservation lasts unless renewed, completed or released. The pipeline's
    /// `DedupeLayer` renews it every third of this while the handler runs, so it must exceed a
    /// few renewals, not the handler's run. Default 5 min.
    pub lease: Duration,
}

impl Default for RedbStoreConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
        }
    }
}

/// An [`IdempotencyStore`] in a local redb file. Completed keys are committed with an fsync
/// before [`complete`](IdempotencyStore::complete) returns, so they survive a crash of the
/// process or the machine; reservations are cheap, unsynced commits (a lost reservation only
/// frees the key, which is what a crash means anyway).
///
/// redb lets one process open a file at a time: a second open fails with
/// [`StoresError::AlreadyOpen`]. That exclusivity is also why opening the file drops every
/// reservation in it: they belonged to a process that is gone, so their messages may run again
/// at once rather than after the lease. Share one store through an `Arc` within the process;
/// use [`RedisStore`](crate::RedisStore) or [`PostgresStore`](crate::PostgresStore) to share
/// keys between processes.
///
/// Each call runs on Tokio's blocking pool, so the store must be used inside a Tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), reliable_stores::StoresError> {
/// use std::sync::Arc;
/// use reliable_core::pipeline::DedupeLayer;
/// use reliable_stores::{RedbStore, RedbStoreConfig};
///
/// let store = Arc::new(RedbStore::open("/var/lib/orders/dedupe.redb", RedbStoreConfig::default())?);
/// let dedupe = DedupeLayer::new(store);
/// # let _ = dedupe;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
    config: RedbStoreConfig,
    /// Completions and recorded attempts so far: every [`PURGE_EVERY`]th purges a little.
    writes: AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the store's file at `path`.
    ///
    /// Fails with [`StoresError::InvalidConfig`] for a zero TTL or lease,
    /// [`StoresError::AlreadyOpen`] when the file is open elsewhere, and
    /// [`StoresError::Storage`] when it cannot be created or is not a redb database.
    pub fn open(path: impl AsRef<Path>, config: RedbStoreConfig) -> Result<Self, StoresError> {
        positive("ttl", config.ttl)?;
        positive("lease", config.lease)?;
        let path = path.as_ref().to_owned();
        let shown = path.display().to_string();
        let storage = |e: &dyn std::fmt::Display| StoresError::Storage {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoresError::AlreadyOpen { path: shown });
            }
            Err(e) => return Err(storage(&e)),
        };
        let dropped = prepare(&db).map_err(|e| storage(&e))?;
        attempts::prepare(&db, millis(config.ttl)).map_err(|e| storage(&e))?;
        if dropped > 0 {
            tracing::info!(
                path = %path.display(),
                dropped,
                "dropped reservations left by an earlier process"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                config,
                writes: AtomicU64::new(0),
            }),
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Removes every completed key whose TTL has passed, and every attempt count whose TTL has
    /// passed since its last delivery; returns how many went. The store also does this by
    /// itself, a little at a time, as keys complete and deliveries are recorded.
    pub async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.blocking("purge", |inner| {
            let now = now_ms();
            let txn = inner.write(Durability::Immediate)?;
            let removed = purge(&txn, now, usize::MAX)? + attempts::purge(&txn, now, usize::MAX)?;
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        })
        .await
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable {
                reason: format!("redb {what} did not finish: {e}"),
            })?
    }
}

impl Inner {
    /// Counts `writes` more completions, and purges a little inside `txn` when that count
    /// passes a multiple of [`PURGE_EVERY`].
    fn purge_now_and_then(
        &self,
        txn: &WriteTransaction,
        now: u64,
        writes: u64,
    ) -> Result<(), StoreError> {
        let before = self.writes.fetch_add(writes, Ordering::Relaxed);
        if before / PURGE_EVERY != (before + writes) / PURGE_EVERY {
            purge(txn, now, PURGE_LIMIT)?;
            attempts::purge(txn, now, PURGE_LIMIT)?;
        }
        Ok(())
    }

    fn write(&self, durability: Durability) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(unavailable)?;
        txn.set_durability(durability).map_err(unavailable)?;
        Ok(txn)
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        reason: format!("redb: {e}"),
    }
}

/// Readies a file just opened: moves the completed keys of an earlier version's table over,
/// and removes every reservation (no other process can hold one). Returns how many
/// reservations went.
fn prepare(db: &Database) -> Result<usize, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let txn = db.begin_write().map_err(|e| err(&e))?;
    let dropped;
    {
        txn.open_table(EXPIRY).map_err(|e| err(&e))?;
        let mut keys = txn.open_table(KEYS).map_err(|e| err(&e))?;
        let legacy = txn
            .list_tables()
            .map_err(|e| err(&e))?
            .any(|t| t.name() == KEYS_V1.name());
        if legacy {
            let old = txn.open_table(KEYS_V1).map_err(|e| err(&e))?;
            for entry in old.iter().map_err(|e| err(&e))? {
                let (key, value) = entry.map_err(|e| err(&e))?;
                let (state, until) = value.value();
                if state == DONE {
                    keys.insert(key.value(), (DONE, until, 0))
                        .map_err(|e| err(&e))?;
                }
            }
            drop(old);
            txn.delete_table(KEYS_V1).map_err(|e| err(&e))?;
        }
        let before = keys.len().map_err(|e| err(&e))?;
        keys.retain(|_, (state, _, _)| state != RESERVED)
            .map_err(|e| err(&e))?;
        dropped = before - keys.len().map_err(|e| err(&e))?;
    }
    txn.commit().map_err(|e| err(&e))?;
    usize::try_from(dropped).map_err(|e| err(&e))
}

/// Removes up to `limit` completed keys that expired before `now`; returns how many.
fn purge(txn: &WriteTransaction, now: u64, limit: usize) -> Result<usize, StoreError> {
    let mut expiry = txn.open_table(EXPIRY).map_err(unavailable)?;
    let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
    let due: Vec<(u64, String)> = expiry
        .range::<(u64, &str)>(..(now, ""))
        .map_err(unavailable)?
        .take(limit)
        .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
        .collect::<Result<_, _>>()
        .map_err(unavailable)?;
    let mut removed = 0;
    for (at, key) in &due {
        expiry.remove((*at, key.as_str())).map_err(unavailable)?;
        // The key may have been reclaimed and completed again since: only its current
        // expiry counts.
        let current = keys
            .get(key.as_str())
            .map_err(unavailable)?
            .map(|v| v.value());
        if matches!(current, Some((DONE, until, _)) if until == *at) {
            keys.remove(key.as_str()).map_err(unavailable)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The row of `key` in `keys`, if any.
fn row(
    keys: &redb::Table<'_, &'static str, Row>,
    key: &IdempotencyKey,
) -> Result<Option<Row>, StoreError> {
    Ok(keys
        .get(key.as_str())
        .map_err(unavailable)?
        .map(|v| v.value()))
}

#[async_trait]
impl IdempotencyStore for RedbStore {
    fn lease_duration(&self) -> Option<Duration> {
        Some(self.inner.config.lease)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let key = key.clone();
        self.blocking("reserve", move |inner| {
            let now = now_ms();
            // A lost reservation only frees the key again: no fsync needed.
            let txn = inner.write(Durability::None)?;
            let answer = {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                reserve_in(&mut keys, &key, now, millis(inner.config.lease))?
            };
            txn.commit().map_err(unavailable)?;
            Ok(answer)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        let key = key.clone();
        let token = token.as_u128();
        self.blocking("renew", move |inner| {
            let now = now_ms();
            let txn = inner.write(Durability::None)?;
            let answer = {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                let take = match row(&keys, &key)? {
                    Some((DONE, until, t)) if until > now => {
                        return Ok(if t == token {
                            Renewal::Renewed
                        } else {
                            Renewal::Lost
                        });
                    }
                    // Its own reservation (running or run out unclaimed), or a free key.
                    Some((RESERVED, _, t)) if t == token => true,
                    Some((_, until, _)) => until <= now,
                    None => true,
                };
                if take {
                    let until = now.saturating_add(millis(inner.config.lease));
                    keys.insert(key.as_str(), (RESERVED, until, token))
                        .map_err(unavailable)?;
                    Renewal::Renewed
                } else {
                    Renewal::Lost
                }
            };
            txn.commit().map_err(unavailable)?;
            Ok(answer)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        let key = key.clone();
        self.blocking("complete", move |inner| {
            let now = now_ms();
            let ttl = millis(inner.config.ttl);
            let txn = inner.write(Durability::Immediate)?;
            let (answer, wrote) = {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                let mut expiry = txn.open_table(EXPIRY).map_err(unavailable)?;
                complete_in(&mut keys, &mut expiry, &key, token, now, ttl)?
            };
            if !wrote {
                // Nothing written: no commit, no fsync.
                return Ok(answer);
            }
            inner.purge_now_and_then(&txn, now, 1)?;
            txn.commit().map_err(unavailable)?;
            Ok(answer)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        let key = key.clone();
        let token = token.as_u128();
        self.blocking("release", move |inner| {
            let txn = inner.write(Durability::None)?;
            {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                // Only this reservation's; a completed key stays completed.
                if matches!(row(&keys, &key)?, Some((RESERVED, _, t)) if t == token) {
                    keys.remove(key.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    /// All keys in one unsynced write transaction, one after the other as
    /// [`reserve`](IdempotencyStore::reserve) would. A failure drops the transaction, so a
    /// failed batch reserves nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let batch = keys.to_vec();
        self.blocking("reserve_many", move |inner| {
            let now = now_ms();
            let lease = millis(inner.config.lease);
            let txn = inner.write(Durability::None)?;
            let answers = {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                batch
                    .iter()
                    .map(|key| reserve_in(&mut keys, key, now, lease))
                    .collect::<Result<Vec<_>, _>>()?
            };
            txn.commit().map_err(unavailable)?;
            Ok(answers)
        })
        .await
    }

    /// All pairs in one write transaction, committed with one fsync, one after the other as
    /// [`complete`](IdempotencyStore::complete) would.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = completions.len()))]
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let batch = completions.to_vec();
        self.blocking("complete_many", move |inner| {
            let now = now_ms();
            let ttl = millis(inner.config.ttl);
            let txn = inner.write(Durability::Immediate)?;
            let mut written = 0;
            let answers = {
                let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
                let mut expiry = txn.open_table(EXPIRY).map_err(unavailable)?;
                let mut answers = Vec::with_capacity(batch.len());
                for (key, token) in &batch {
                    let (answer, wrote) =
                        complete_in(&mut keys, &mut expiry, key, *token, now, ttl)?;
                    written += u64::from(wrote);
                    answers.push(answer);
                }
                answers
            };
            if written == 0 {
                return Ok(answers);
            }
            inner.purge_now_and_then(&txn, now, written)?;
            txn.commit().map_err(unavailable)?;
            Ok(answers)
        })
        .await
    }
}

/// [`reserve`](IdempotencyStore::reserve) of `key` in `keys`, inside the caller's write
/// transaction; `lease` in ms.
fn reserve_in(
    keys: &mut redb::Table<'_, &'static str, Row>,
    key: &IdempotencyKey,
    now: u64,
    lease: u64,
) -> Result<Reservation, StoreError> {
    Ok(match row(keys, key)? {
        Some((DONE, until, _)) if until > now => Reservation::Duplicate,
        Some((_, until, _)) if until > now => Reservation::InProgress,
        _ => {
            let token = LeaseToken::generate();
            keys.insert(
                key.as_str(),
                (RESERVED, now.saturating_add(lease), token.as_u128()),
            )
            .map_err(unavailable)?;
            Reservation::New(token)
        }
    })
}

/// [`complete`](IdempotencyStore::complete) of `key` under `token`, inside the caller's write
/// transaction; `ttl` in ms. Also answers whether it wrote (a key found completed already is
/// left as it is).
fn complete_in(
    keys: &mut redb::Table<'_, &'static str, Row>,
    expiry: &mut redb::Table<'_, (u64, &'static str), ()>,
    key: &IdempotencyKey,
    token: LeaseToken,
    now: u64,
    ttl: u64,
) -> Result<(Completion, bool), StoreError> {
    let token = token.as_u128();
    let answer = match row(keys, key)? {
        // Recorded already: by this reservation (a retry) or another one.
        Some((DONE, done_until, t)) if done_until > now => {
            let answer = if t == token {
                Completion::Recorded
            } else {
                Completion::Superseded
            };
            return Ok((answer, false));
        }
        Some((RESERVED, held_until, t)) if held_until > now && t != token => Completion::Superseded,
        _ => Completion::Recorded,
    };
    let until = now.saturating_add(ttl);
    keys.insert(key.as_str(), (DONE, until, token))
        .map_err(unavailable)?;
    expiry
        .insert((until, key.as_str()), ())
        .map_err(unavailable)?;
    Ok((answer, true))
}

#[cfg(test)]
mod tests {
    use redb::ReadableDatabase;

    use super::*;

    /// A file written by a version without tokens keeps its completed keys, loses its
    /// reservations (as on every open), and drops the old table.
    #[tokio::test]
    async fn a_file_of_the_tokenless_version_keeps_its_completed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let far = now_ms() + 3_600_000;
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(KEYS_V1).unwrap();
                old.insert("done", (DONE, far)).unwrap();
                old.insert("held", (RESERVED, far)).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
        let key = |s: &str| IdempotencyKey::new(s).unwrap();
        assert_eq!(
            store.reserve(&key("done")).await.unwrap(),
            Reservation::Duplicate
        );
        assert!(store.reserve(&key("held")).await.unwrap().is_new());
        let txn = store.inner.db.begin_read().unwrap();
        let tables: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(!tables.contains(&KEYS_V1.name().to_owned()), "{tables:?}");
    }
}
