//! [`InMemoryIdempotencyStore`]: the idempotency store in process memory, with a TTL, leases
//! and a size bound.
//!
//! Every call costs O(1) amortised, however many keys are held: a key that is a message id is
//! looked up by its 128 bits, and expired or evicted entries are found at the fronts of two
//! time-ordered chains rather than by scanning (see [`table`]).

#[cfg(test)]
mod model;
mod table;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timings;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use self::table::{Key, Table};
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
///
/// Every call takes O(1) time amortised, however many keys are held; the batch calls take the
/// store's lock once per batch.
#[derive(Debug, Default)]
pub struct InMemoryIdempotencyStore {
    config: InMemoryStoreConfig,
    table: Mutex<Table>,
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
            table: Mutex::default(),
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

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live(&self, e: Entry, now: Instant) -> bool {
        match e {
            Entry::Reserved { until, .. } => now < until,
            Entry::Done { at, .. } => now.saturating_duration_since(at) < self.config.ttl,
        }
    }

    /// The slot of `key` if held, and its entry if that has not expired.
    fn lookup(&self, table: &Table, key: Key<'_>, now: Instant) -> (Option<usize>, Option<Entry>) {
        let slot = table.find(key);
        let live = slot
            .map(|slot| table.entry(slot))
            .filter(|e| self.live(*e, now));
        (slot, live)
    }

    /// [`reserve`](IdempotencyStore::reserve) on the locked table.
    fn reserve_in(
        &self,
        table: &mut Table,
        key: &IdempotencyKey,
        now: Instant,
    ) -> Result<Reservation, StoreError> {
        let found = Key::of(key);
        let (slot, live) = self.lookup(table, found, now);
        match live {
            Some(Entry::Done { .. }) => return Ok(Reservation::Duplicate),
            Some(Entry::Reserved { .. }) => return Ok(Reservation::InProgress),
            None => {}
        }
        let token = table.token();
        let until = now + self.config.lease;
        let entry = Entry::Reserved { until, token };
        self.put(table, (key, found, slot), entry, now)?;
        Ok(Reservation::New(token))
    }

    /// [`complete`](IdempotencyStore::complete) on the locked table.
    fn complete_in(
        &self,
        table: &mut Table,
        key: &IdempotencyKey,
        token: LeaseToken,
        now: Instant,
    ) -> Result<Completion, StoreError> {
        let found = Key::of(key);
        let (slot, live) = self.lookup(table, found, now);
        let answer = match live {
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
        self.put(
            table,
            (key, found, slot),
            Entry::Done { at: now, token },
            now,
        )?;
        Ok(answer)
    }

    /// Stores `entry` under the key (as given, as looked up, and its slot if held), making room
    /// first when the key is new.
    fn put(
        &self,
        table: &mut Table,
        (key, found, slot): (&IdempotencyKey, Key<'_>, Option<usize>),
        entry: Entry,
        now: Instant,
    ) -> Result<(), StoreError> {
        match slot {
            Some(slot) => table.set(slot, entry),
            None => {
                self.make_room(table, now)?;
                table.insert(found, key, entry);
            }
        }
        Ok(())
    }

    /// Makes room for one entry: drops expired entries, then the oldest completed ones.
    ///
    /// Only when full. Expired entries are dropped from the fronts of the table's time-ordered
    /// chains, each once; completed keys are evicted a tenth of the capacity at a time (one
    /// warning per tenth rather than per key, and room for many inserts after).
    fn make_room(&self, table: &mut Table, now: Instant) -> Result<(), StoreError> {
        let capacity = self.config.capacity.max(1);
        if table.len() < capacity {
            return Ok(());
        }
        table.drop_expired(|e| self.live(e, now));
        if table.len() < capacity {
            return Ok(());
        }
        let evicted = table.evict_oldest_done((capacity / 10).max(1));
        if evicted == 0 {
            return Err(StoreError::Full { capacity });
        }
        tracing::warn!(
            evicted,
            capacity,
            "idempotency store full: forgetting the oldest completed keys before their TTL"
        );
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryIdempotencyStore {
    fn lease_duration(&self) -> Option<Duration> {
        Some(self.config.lease)
    }

    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let mut table = self.lock();
        let now = table.now();
        self.reserve_in(&mut table, key, now)
    }

    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        let mut table = self.lock();
        let now = table.now();
        let found = Key::of(key);
        let (slot, live) = self.lookup(&table, found, now);
        let ours = match slot.map(|slot| table.entry(slot)) {
            // Its own lease, running or run out with nobody taking the key since.
            Some(Entry::Reserved { token: t, .. }) => t == token,
            Some(Entry::Done { token: t, .. }) if live.is_some() => {
                return Ok(if t == token {
                    Renewal::Renewed
                } else {
                    Renewal::Lost
                });
            }
            Some(Entry::Done { .. }) | None => true,
        };
        if !ours && live.is_some() {
            return Ok(Renewal::Lost);
        }
        let until = now + self.config.lease;
        let entry = Entry::Reserved { until, token };
        self.put(&mut table, (key, found, slot), entry, now)?;
        Ok(Renewal::Renewed)
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        let mut table = self.lock();
        let now = table.now();
        self.complete_in(&mut table, key, token, now)
    }

    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        let mut table = self.lock();
        if let Some(slot) = table.find(Key::of(key)) {
            if matches!(table.entry(slot), Entry::Reserved { token: t, .. } if t == token) {
                table.remove(slot);
            }
        }
        Ok(())
    }

    /// All keys under one lock, one after the other as [`reserve`](Self::reserve) would; when
    /// the store turns out full part-way, the keys this batch reserved are freed again before
    /// the lock is let go, so the failed batch holds nothing.
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        let mut table = self.lock();
        let now = table.now();
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            match self.reserve_in(&mut table, key, now) {
                Ok(answer) => answers.push(answer),
                Err(error) => {
                    for (key, answer) in keys.iter().zip(&answers) {
                        if answer.is_new() {
                            if let Some(slot) = table.find(Key::of(key)) {
                                table.remove(slot);
                            }
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
        let mut table = self.lock();
        let now = table.now();
        completions
            .iter()
            .map(|(key, token)| self.complete_in(&mut table, key, *token, now))
            .collect()
    }
}
