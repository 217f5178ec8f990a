//! Idempotency stores: how consumers recognise a message whose effect already happened
//! (loss-matrix row L8).
//!
//! Resends and redeliveries make duplicates; the pipeline's
//! [`DedupeLayer`](crate::pipeline::DedupeLayer) asks the store before the handler runs:
//!
//! 1. [`reserve`](IdempotencyStore::reserve) the message's key: [`Reservation::New`] means run
//!    the handler; [`Reservation::Duplicate`] means the effect already happened (skip and ack);
//!    [`Reservation::InProgress`] means another worker holds the key right now (retry later).
//! 2. On success, [`complete`](IdempotencyStore::complete) the key; on failure,
//!    [`release`](IdempotencyStore::release) it so a redelivery can try again.
//!
//! A reservation is a lease: if the worker dies without completing or releasing, the key becomes
//! free again after the lease (so a crashed consumer cannot block a message for ever).
//!
//! # Durable stores
//!
//! The trait is shaped for a database store that records the key **in the same transaction as
//! the business effect** (e.g. PostgreSQL): `reserve` inserts the key with a lease
//! (`INSERT .. ON CONFLICT` deciding New / Duplicate / InProgress), the handler writes the key's
//! `done` mark inside its own transaction, and `complete` is then a no-op (or a check). That makes
//! "effect applied" and "key recorded" atomic, so even a crash between handler and `complete`
//! cannot apply the effect twice. [`InMemoryIdempotencyStore`] gives the same answers within one
//! process.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::message::IdempotencyKey;

/// The answer to [`IdempotencyStore::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// First time this key is seen (or its earlier attempt was released or its lease expired):
    /// the caller now holds the key and must `complete` or `release` it.
    New,
    /// The key's effect already happened: skip the message and acknowledge it.
    Duplicate,
    /// Another worker holds the key right now: try again later.
    InProgress,
}

/// A store failure. Retryable: the pipeline treats it as a transient handler error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is at its size bound and every entry is an active reservation; raise the bound
    /// or lower the consumer's concurrency.
    #[error("idempotency store is full ({capacity} active reservations); raise its capacity or lower concurrency")]
    Full {
        /// The store's capacity.
        capacity: usize,
    },
    /// The backing store is unreachable or failed; the message will be retried.
    #[error("idempotency store unavailable: {reason}; the message will be retried")]
    Unavailable {
        /// What went wrong. Must never contain credentials (invariant 8).
        reason: String,
    },
}

/// Records which idempotency keys have had their effect. See the module docs for the protocol.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` for processing.
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError>;
    /// Marks `key`'s effect as done; later reservations answer [`Reservation::Duplicate`].
    async fn complete(&self, key: &IdempotencyKey) -> Result<(), StoreError>;
    /// Gives up a reservation after a failure; the next reservation answers [`Reservation::New`].
    async fn release(&self, key: &IdempotencyKey) -> Result<(), StoreError>;
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for std::sync::Arc<S> {
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        (**self).reserve(key).await
    }
    async fn complete(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        (**self).complete(key).await
    }
    async fn release(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        (**self).release(key).await
    }
}

/// The default deduplication window of every store: how long a completed key is remembered.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The default lease of every store: how long a reservation lasts without `complete` or
/// `release`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

/// Limits of an [`InMemoryIdempotencyStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InMemoryStoreConfig {
    /// How long a completed key is remembered: the deduplication window. Must exceed the longest
    /// time a duplicate can arrive after the original (resend deadline plus redelivery delay).
    /// Default 24 h.
    pub ttl: Duration,
    /// How long a reservation lasts without `complete` or `release` before the key is free
    /// again. Must exceed the longest handler run. Default 5 min.
    pub lease: Duration,
    /// The most keys held. When full, expired entries go first, then the oldest completed keys
    /// (shrinking the deduplication window; the `tracing` warning says so). Default 1 000 000.
    pub capacity: usize,
}

impl Default for InMemoryStoreConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            capacity: 1_000_000,
        }
    }
}

/// An [`IdempotencyStore`] in process memory, with a TTL and a size bound. Deduplicates within
/// one process; use a shared or durable store when consumers run on several machines or must
/// deduplicate across restarts.
#[derive(Debug, Default)]
pub struct InMemoryIdempotencyStore {
    config: InMemoryStoreConfig,
    entries: Mutex<HashMap<IdempotencyKey, Entry>>,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Reserved { until: Instant },
    Done { at: Instant },
}

impl InMemoryIdempotencyStore {
    /// A store with the given limits.
    pub fn new(config: InMemoryStoreConfig) -> Self {
        Self {
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Keys currently held (reserved or completed, expired ones possibly included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IdempotencyKey, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live(&self, e: Entry, now: Instant) -> bool {
        match e {
            Entry::Reserved { until } => now < until,
            Entry::Done { at } => now.saturating_duration_since(at) < self.config.ttl,
        }
    }

    /// Makes room for one entry: drops expired entries, then the oldest completed ones.
    fn make_room(
        &self,
        map: &mut HashMap<IdempotencyKey, Entry>,
        now: Instant,
    ) -> Result<(), StoreError> {
        let capacity = self.config.capacity.max(1);
        if map.len() < capacity {
            return Ok(());
        }
        map.retain(|_, e| self.live(*e, now));
        if map.len() < capacity {
            return Ok(());
        }
        let mut done: Vec<(Instant, IdempotencyKey)> = map
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Done { at } => Some((*at, k.clone())),
                Entry::Reserved { .. } => None,
            })
            .collect();
        if done.is_empty() {
            return Err(StoreError::Full { capacity });
        }
        // Evict a tenth at a time so the scan is amortised over many inserts.
        let evict = (capacity / 10).clamp(1, done.len());
        done.select_nth_unstable_by_key(evict - 1, |(at, _)| *at);
        tracing::warn!(
            evicted = evict,
            capacity,
            "idempotency store full: forgetting the oldest completed keys before their TTL"
        );
        for (_, k) in done.into_iter().take(evict) {
            map.remove(&k);
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryIdempotencyStore {
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(key).copied() {
            Some(e @ Entry::Done { .. }) if self.live(e, now) => return Ok(Reservation::Duplicate),
            Some(e @ Entry::Reserved { .. }) if self.live(e, now) => {
                return Ok(Reservation::InProgress)
            }
            Some(_) => {}
            None => self.make_room(&mut map, now)?,
        }
        map.insert(
            key.clone(),
            Entry::Reserved {
                until: now + self.config.lease,
            },
        );
        Ok(Reservation::New)
    }

    async fn complete(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        if !map.contains_key(key) {
            self.make_room(&mut map, now)?;
        }
        map.insert(key.clone(), Entry::Done { at: now });
        Ok(())
    }

    async fn release(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let mut map = self.lock();
        if let Some(Entry::Reserved { .. }) = map.get(key) {
            map.remove(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::new(s).unwrap_or_else(|_| IdempotencyKey::from(crate::MessageId::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_complete_release_and_ttl() -> Result<(), StoreError> {
        let s = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
            ttl: Duration::from_secs(10),
            lease: Duration::from_secs(2),
            capacity: 100,
        });
        let k = key("a");
        assert_eq!(s.reserve(&k).await?, Reservation::New);
        assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
        s.release(&k).await?;
        assert_eq!(s.reserve(&k).await?, Reservation::New);
        s.complete(&k).await?;
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
        s.release(&k).await?; // releasing a completed key changes nothing
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.reserve(&k).await?, Reservation::New);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_frees_the_key() -> Result<(), StoreError> {
        let s = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
            lease: Duration::from_secs(2),
            ..InMemoryStoreConfig::default()
        });
        let k = key("a");
        assert_eq!(s.reserve(&k).await?, Reservation::New);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(s.reserve(&k).await?, Reservation::New);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn size_bound_evicts_oldest_done_and_refuses_when_all_reserved() -> Result<(), StoreError>
    {
        let s = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
            capacity: 2,
            ..InMemoryStoreConfig::default()
        });
        let (a, b, c) = (key("a"), key("b"), key("c"));
        s.reserve(&a).await?;
        s.complete(&a).await?;
        tokio::time::advance(Duration::from_millis(1)).await;
        s.reserve(&b).await?;
        s.complete(&b).await?;
        assert_eq!(s.reserve(&c).await?, Reservation::New);
        assert_eq!(s.len(), 2);
        assert_eq!(s.reserve(&b).await?, Reservation::Duplicate);
        assert_eq!(
            s.reserve(&a).await?,
            Reservation::New,
            "oldest done key evicted"
        );
        assert_eq!(
            s.reserve(&key("d")).await,
            Err(StoreError::Full { capacity: 2 })
        );
        Ok(())
    }
}
