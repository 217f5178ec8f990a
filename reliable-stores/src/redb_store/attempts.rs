//! [`AttemptCounter`] for [`RedbStore`]: delivery counts in the store's file, each with an
//! expiry so the counts of messages that are never settled go with the store's purge.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use reliable_core::attempts::AttemptCounter;
use reliable_core::idempotency::StoreError;
use reliable_core::message::IdempotencyKey;

use super::{unavailable, RedbStore, PURGE_EVERY, PURGE_LIMIT};
use crate::util::{millis, now_ms};

/// key → (deliveries recorded since the key was last settled, expires at in ms since the
/// epoch: the store's TTL after the last delivery).
const ATTEMPTS: TableDefinition<&str, (u32, u64)> = TableDefinition::new("reliable_attempts_v2");
/// (expires at, key) → (): counts by expiry, so purging reads only what expired.
const ATTEMPTS_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("reliable_attempts_expiry_v1");
/// The counts of earlier versions, without expiry: moved to [`ATTEMPTS`] with a fresh TTL
/// when the file is opened, then deleted.
const ATTEMPTS_V1: TableDefinition<&str, u32> = TableDefinition::new("reliable_attempts_v1");

/// Readies the counts of a file just opened: creates the tables and moves an earlier
/// version's counts over, each expiring `ttl_ms` from now (they had no expiry).
pub(super) fn prepare(db: &Database, ttl_ms: u64) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let txn = db.begin_write().map_err(|e| err(&e))?;
    {
        let mut counts = txn.open_table(ATTEMPTS).map_err(|e| err(&e))?;
        let mut expiry = txn.open_table(ATTEMPTS_EXPIRY).map_err(|e| err(&e))?;
        let legacy = txn
            .list_tables()
            .map_err(|e| err(&e))?
            .any(|t| t.name() == ATTEMPTS_V1.name());
        if legacy {
            let until = now_ms().saturating_add(ttl_ms);
            let old = txn.open_table(ATTEMPTS_V1).map_err(|e| err(&e))?;
            for entry in old.iter().map_err(|e| err(&e))? {
                let (key, n) = entry.map_err(|e| err(&e))?;
                counts
                    .insert(key.value(), (n.value(), until))
                    .map_err(|e| err(&e))?;
                expiry
                    .insert((until, key.value()), ())
                    .map_err(|e| err(&e))?;
            }
            drop(old);
            txn.delete_table(ATTEMPTS_V1).map_err(|e| err(&e))?;
        }
    }
    txn.commit().map_err(|e| err(&e))
}

/// Removes up to `limit` counts that expired before `now`; returns how many.
pub(super) fn purge(txn: &WriteTransaction, now: u64, limit: usize) -> Result<usize, StoreError> {
    let mut expiry = txn.open_table(ATTEMPTS_EXPIRY).map_err(unavailable)?;
    let mut counts = txn.open_table(ATTEMPTS).map_err(unavailable)?;
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
        // A later delivery moved the expiry on: only the current one counts.
        let current = counts
            .get(key.as_str())
            .map_err(unavailable)?
            .map(|v| v.value());
        if matches!(current, Some((_, until)) if until == *at) {
            counts.remove(key.as_str()).map_err(unavailable)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes `key`'s count and its expiry entry; returns the count's row, if there was one.
fn remove(txn: &WriteTransaction, key: &str) -> Result<Option<(u32, u64)>, StoreError> {
    let row = txn
        .open_table(ATTEMPTS)
        .map_err(unavailable)?
        .remove(key)
        .map_err(unavailable)?
        .map(|v| v.value());
    if let Some((_, until)) = row {
        txn.open_table(ATTEMPTS_EXPIRY)
            .map_err(unavailable)?
            .remove((until, key))
            .map_err(unavailable)?;
    }
    Ok(row)
}

/// Counts deliveries in the same file, so a consumer that aborts under a poison message finds
/// its count again after the restart. Each record is an fsync'd commit (the abort may come
/// right after it). A count lives [`ttl`](super::RedbStoreConfig::ttl) after its last
/// delivery: past that a record starts over at 1, and [`RedbStore::purge_expired`] (also run
/// now and then as keys complete and deliveries are recorded) deletes it.
#[async_trait]
impl AttemptCounter for RedbStore {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError> {
        let key = key.clone();
        self.blocking("record_attempt", move |inner| {
            let now = now_ms();
            let until = now.saturating_add(millis(inner.config.ttl));
            let txn = inner.write(Durability::Immediate)?;
            let n = match remove(&txn, key.as_str())? {
                Some((n, was_until)) if was_until > now => n.saturating_add(1),
                _ => 1,
            };
            txn.open_table(ATTEMPTS)
                .map_err(unavailable)?
                .insert(key.as_str(), (n, until))
                .map_err(unavailable)?;
            txn.open_table(ATTEMPTS_EXPIRY)
                .map_err(unavailable)?
                .insert((until, key.as_str()), ())
                .map_err(unavailable)?;
            if inner.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
                purge(&txn, now, PURGE_LIMIT)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let key = key.clone();
        self.blocking("clear_attempts", move |inner| {
            // A count lost to a crash only lets the message run once more: no fsync needed.
            let txn = inner.write(Durability::None)?;
            remove(&txn, key.as_str())?;
            txn.commit().map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedbStoreConfig;

    #[tokio::test]
    async fn attempt_counts_survive_reopening_the_file_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let key = IdempotencyKey::new("poison").unwrap();
        {
            let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
            assert_eq!(store.record_attempt(&key).await.unwrap(), 1);
            assert_eq!(store.record_attempt(&key).await.unwrap(), 2);
        }
        let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
        assert_eq!(store.record_attempt(&key).await.unwrap(), 3);
        store.clear(&key).await.unwrap();
        assert_eq!(store.record_attempt(&key).await.unwrap(), 1);
    }

    /// Counts written by a version without expiry keep counting, and now expire.
    #[tokio::test]
    async fn counts_of_the_version_without_expiry_carry_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ATTEMPTS_V1)
                .unwrap()
                .insert("poison", 2)
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
        let key = IdempotencyKey::new("poison").unwrap();
        assert_eq!(store.record_attempt(&key).await.unwrap(), 3);
        let txn = store.inner.db.begin_write().unwrap();
        assert!(!txn
            .list_tables()
            .unwrap()
            .any(|t| t.name() == ATTEMPTS_V1.name()));
        assert_eq!(purge(&txn, u64::MAX, usize::MAX).unwrap(), 1, "it expires");
    }
}
