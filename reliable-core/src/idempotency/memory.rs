//! [`InMemoryIdempotencyStore`]: the idempotency store in process memory, with a TTL, leases
//! and a size bound.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError, DEFAULT_LEASE,
    DEFAULT_TTL,
};
use crate::message::IdempotencyKey;

/// Limits of an [`InMemoryIdempotencyStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InMemoryStoreConfig {
    /// How long a completed key is remembered: the deduplication window. Must exceed the longest
    /// time a duplicate can arrive after the original (resend deadline plus redelivery delay).
    /// Default 24 h.
    pub ttl: Duration,
    /// How long a reservation lasts unless renewed, completed or released. The
    /// [`DedupeLayer`](crate::pipeline::DedupeLayer) renews it every third of this while the
    /// handler runs; it is also the longest a crashed consumer blocks its key. Default 5 min.
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
    /// Held by the reservation `token` until `until`.
    Reserved { until: Instant, token: LeaseToken },
    /// Completed at `at` under the reservation `token`.
    Done { at: Instant, token: LeaseToken },
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
            Entry::Reserved { until, .. } => now < until,
            Entry::Done { at, .. } => now.saturating_duration_since(at) < self.config.ttl,
        }
    }

    /// The entry of `key` if it has not expired.
    fn live_entry(
        &self,
        map: &HashMap<IdempotencyKey, Entry>,
        key: &IdempotencyKey,
        now: Instant,
    ) -> Option<Entry> {
        map.get(key).copied().filter(|e| self.live(*e, now))
    }

    /// [`reserve`](IdempotencyStore::reserve) on the locked map.
    fn reserve_in(
        &self,
        map: &mut HashMap<IdempotencyKey, Entry>,
        key: &IdempotencyKey,
        now: Instant,
    ) -> Result<Reservation, StoreError> {
        match self.live_entry(map, key, now) {
            Some(Entry::Done { .. }) => return Ok(Reservation::Duplicate),
            Some(Entry::Reserved { .. }) => return Ok(Reservation::InProgress),
            None => {}
        }
        let token = LeaseToken::generate();
        let until = now + self.config.lease;
        self.put(map, key, Entry::Reserved { until, token }, now)?;
        Ok(Reservation::New(token))
    }

    /// [`complete`](IdempotencyStore::complete) on the locked map.
    fn complete_in(
        &self,
        map: &mut HashMap<IdempotencyKey, Entry>,
        key: &IdempotencyKey,
        token: LeaseToken,
        now: Instant,
    ) -> Result<Completion, StoreError> {
        let answer = match self.live_entry(map, key, now) {
            Some(Entry::Done { token: t, .. }) => {
                // Recorded already: by this lease (a retry) or by another one.
                return Ok(if t == token {
                    Completion::Recorded
                } else {
                    Completion::Superseded
                });
            }
            Some(Entry::Reserved { token: t, .. }) if t != token => Completion::Superseded,
            Some(Entry::Reserved { .. }) | None => Completion::Recorded,
        };
        self.put(map, key, Entry::Done { at: now, token }, now)?;
        Ok(answer)
    }

    /// Stores `entry` under `key`, making room first when `key` is new.
    fn put(
        &self,
        map: &mut HashMap<IdempotencyKey, Entry>,
        key: &IdempotencyKey,
        entry: Entry,
        now: Instant,
    ) -> Result<(), StoreError> {
        if !map.contains_key(key) {
            self.make_room(map, now)?;
        }
        map.insert(key.clone(), entry);
        Ok(())
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
                Entry::Done { at, .. } => Some((*at, k.clone())),
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
    fn lease_duration(&self) -> Option<Duration> {
        Some(self.config.lease)
    }

    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let now = Instant::now();
        self.reserve_in(&mut self.lock(), key, now)
    }

    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        let ours = match map.get(key).copied() {
            // Its own lease, running or run out with nobody taking the key since.
            Some(Entry::Reserved { token: t, .. }) => t == token,
            Some(e @ Entry::Done { token: t, .. }) if self.live(e, now) => {
                return Ok(if t == token {
                    Renewal::Renewed
                } else {
                    Renewal::Lost
                });
            }
            Some(Entry::Done { .. }) | None => true,
        };
        if !ours && self.live_entry(&map, key, now).is_some() {
            return Ok(Renewal::Lost);
        }
        let until = now + self.config.lease;
        self.put(&mut map, key, Entry::Reserved { until, token }, now)?;
        Ok(Renewal::Renewed)
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        let now = Instant::now();
        self.complete_in(&mut self.lock(), key, token, now)
    }

    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        let mut map = self.lock();
        if let Some(Entry::Reserved { token: t, .. }) = map.get(key) {
            if *t == token {
                map.remove(key);
            }
        }
        Ok(())
    }

    /// All keys under one lock, one after the other as [`reserve`](Self::reserve) would; when
    /// the store turns out full part-way, the keys this batch reserved are freed again before
    /// the lock is let go, so the failed batch holds nothing.
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            match self.reserve_in(&mut map, key, now) {
                Ok(answer) => answers.push(answer),
                Err(error) => {
                    for (key, answer) in keys.iter().zip(&answers) {
                        if answer.is_new() {
                            map.remove(key);
                        }
                    }
                    return Err(error);
                }
            }
        }
        Ok(answers)
    }

    /// All pairs under one lock, one after the other as [`complete`](Self::complete) would.
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        completions
            .iter()
            .map(|(key, token)| self.complete_in(&mut map, key, *token, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::new(s).unwrap_or_else(|_| IdempotencyKey::from(crate::MessageId::new()))
    }

    fn store(lease: Duration) -> InMemoryIdempotencyStore {
        InMemoryIdempotencyStore::new(InMemoryStoreConfig {
            ttl: Duration::from_secs(10),
            lease,
            capacity: 100,
        })
    }

    async fn new(s: &InMemoryIdempotencyStore, k: &IdempotencyKey) -> LeaseToken {
        match s.reserve(k).await {
            Ok(Reservation::New(token)) => token,
            other => panic!("expected a new reservation, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_complete_release_and_ttl() -> Result<(), StoreError> {
        let s = store(Duration::from_secs(2));
        let k = key("a");
        let first = new(&s, &k).await;
        assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
        s.release(&k, first).await?;
        let second = new(&s, &k).await;
        assert_ne!(first, second, "a token per reservation");
        assert_eq!(s.complete(&k, second).await?, Completion::Recorded);
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
        s.release(&k, second).await?; // releasing a completed key changes nothing
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(s.reserve(&k).await?.is_new());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_frees_the_key() -> Result<(), StoreError> {
        let s = store(Duration::from_secs(2));
        let k = key("a");
        new(&s, &k).await;
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(s.reserve(&k).await?.is_new());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_the_key_and_a_lease_taken_over_is_lost() -> Result<(), StoreError> {
        let s = store(Duration::from_secs(2));
        let k = key("a");
        let first = new(&s, &k).await;
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(1500)).await;
            assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
            assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
        }
        // Run out, nobody took it: renewing takes it again.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
        assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
        // Run out and taken over: lost, and the late holder frees nothing.
        tokio::time::advance(Duration::from_secs(3)).await;
        let second = new(&s, &k).await;
        assert_eq!(s.renew(&k, first).await?, Renewal::Lost);
        s.release(&k, first).await?;
        assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
        // The late holder's effect did run: it is recorded, as superseded.
        assert_eq!(s.complete(&k, first).await?, Completion::Superseded);
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
        assert_eq!(s.renew(&k, second).await?, Renewal::Lost);
        assert_eq!(s.complete(&k, second).await?, Completion::Superseded);
        // A retry of a completion that landed.
        assert_eq!(s.complete(&k, first).await?, Completion::Recorded);
        assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate, "still done");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn complete_after_the_lease_ran_out_unclaimed_is_recorded() -> Result<(), StoreError> {
        let s = store(Duration::from_secs(2));
        let k = key("a");
        let token = new(&s, &k).await;
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(s.complete(&k, token).await?, Completion::Recorded);
        assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
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
        let t = new(&s, &a).await;
        s.complete(&a, t).await?;
        tokio::time::advance(Duration::from_millis(1)).await;
        let t = new(&s, &b).await;
        s.complete(&b, t).await?;
        assert!(s.reserve(&c).await?.is_new());
        assert_eq!(s.len(), 2);
        assert_eq!(s.reserve(&b).await?, Reservation::Duplicate);
        assert!(s.reserve(&a).await?.is_new(), "oldest done key evicted");
        assert_eq!(
            s.reserve(&key("d")).await,
            Err(StoreError::Full { capacity: 2 })
        );
        Ok(())
    }
}
