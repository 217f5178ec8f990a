//! Idempotency stores: how consumers recognise a message whose effect already happened
//! (loss-matrix rows L8 and L11).
//!
//! Resends and redeliveries make duplicates; the pipeline's
//! [`DedupeLayer`](crate::pipeline::DedupeLayer) asks the store before the handler runs:
//!
//! 1. [`reserve`](IdempotencyStore::reserve) the message's key: [`Reservation::New`] means run
//!    the handler, and carries the [`LeaseToken`] of this one reservation;
//!    [`Reservation::Duplicate`] means the effect already happened (skip and ack);
//!    [`Reservation::InProgress`] means another worker holds the key right now (retry later).
//! 2. While the handler runs, [`renew`](IdempotencyStore::renew) the lease well before it ends
//!    (the layer does so every third of [`lease_duration`](IdempotencyStore::lease_duration)).
//! 3. On success, [`complete`](IdempotencyStore::complete) the key; on failure,
//!    [`release`](IdempotencyStore::release) it so a redelivery can try again.
//!
//! A reservation is a lease: if the worker dies without completing or releasing, the key becomes
//! free again after the lease (so a crashed consumer cannot block a message for ever). Renewal is
//! what keeps a live but slow handler's key from being taken over by a second copy (which would
//! apply the effect twice). `renew`, `complete` and `release` name the reservation by its token,
//! so a holder whose lease ran out and was taken over can neither extend nor free the new
//! holder's reservation; `complete` still records the key (the effect did run) and says, with
//! [`Completion::Superseded`], that the effect may have run twice.
//!
//! # Batches
//!
//! A consumer that takes deliveries in batches asks about all their keys at once:
//! [`reserve_many`](IdempotencyStore::reserve_many) and
//! [`complete_many`](IdempotencyStore::complete_many) answer per key exactly what the single
//! calls made one after the other, in the batch's order, would answer (so a key that comes
//! twice in one batch is [`New`](Reservation::New) at most once), but in one round trip: one
//! lock for [`InMemoryIdempotencyStore`], one Lua script call for Redis, one multi-row
//! statement for PostgreSQL, one write transaction for redb. The trait's default loops over
//! the single calls, so a store without a batch form still answers them. There is no batched
//! `renew` or `release`: those run per handler, on their own schedule.
//!
//! # Durable stores
//!
//! The trait is shaped for a database store that records the key **in the same transaction as
//! the business effect** (e.g. PostgreSQL): `reserve` inserts the key with a lease
//! (`INSERT .. ON CONFLICT` deciding New / Duplicate / InProgress), the handler writes the key's
//! `done` mark inside its own transaction, and `complete` is then a check. That makes "effect
//! applied" and "key recorded" atomic, so even a crash between handler and `complete` cannot
//! apply the effect twice. [`InMemoryIdempotencyStore`] gives the same answers within one
//! process.

mod memory;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::message::IdempotencyKey;

pub use memory::{InMemoryIdempotencyStore, InMemoryStoreConfig};

/// Names one reservation of one key: what [`Reservation::New`] hands the holder, and what
/// [`renew`](IdempotencyStore::renew), [`complete`](IdempotencyStore::complete) and
/// [`release`](IdempotencyStore::release) check, so that they act only for the holder.
///
/// Each reservation gets a fresh token (a UUIDv7: unique across processes and machines), so two
/// tasks of one process that held the same key one after the other never mistake each other's
/// lease. A token means something only to the store that made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A token no other reservation has.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().as_u128())
    }

    /// The token a store stored as [`as_u128`](Self::as_u128).
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token as a number, for stores that keep it in a numeric column.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

/// 32 lower-case hexadecimal digits: the form stores keep in a text value.
impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({self})")
    }
}

/// The answer to [`IdempotencyStore::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// First time this key is seen (or its earlier attempt was released or its lease expired):
    /// the caller now holds the key under this token, and must keep it renewed and then
    /// `complete` or `release` it.
    New(LeaseToken),
    /// The key's effect already happened: skip the message and acknowledge it.
    Duplicate,
    /// Another worker holds the key right now: try again later.
    InProgress,
}

impl Reservation {
    /// The token of a [`New`](Self::New) reservation.
    pub fn token(&self) -> Option<LeaseToken> {
        match self {
            Self::New(token) => Some(*token),
            Self::Duplicate | Self::InProgress => None,
        }
    }

    /// Whether the caller now holds the key.
    pub fn is_new(&self) -> bool {
        matches!(self, Self::New(_))
    }
}

/// The answer to [`IdempotencyStore::renew`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The caller holds the key for another full lease: its lease was still running, or had run
    /// out with nobody taking the key since (then it is taken again), or the key is already
    /// completed under this very lease.
    Renewed,
    /// Another worker took the key over after this lease ran out, or completed it: the caller
    /// no longer holds the key, and its handler may be applying the effect alongside another.
    Lost,
}

/// The answer to [`IdempotencyStore::complete`]. Either way the key is now recorded as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Recorded under the caller's lease (still held, or run out with nobody taking the key
    /// since), or found recorded under it already (a retry of a completion that landed): as far
    /// as the store can tell, the effect ran once.
    Recorded,
    /// The caller's lease had run out and another worker had taken the key over or completed
    /// it: the key is recorded as done all the same (the effect did run), but the effect may
    /// have run more than once. Lengthen the lease or look at why renewals failed.
    Superseded,
}

/// A store failure. Retryable: the pipeline requeues the message rather than dead-lettering it.
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
///
/// Object safe: the pipeline holds stores as `Arc<dyn IdempotencyStore>` as readily as concrete
/// types.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// How long a reservation lasts unless renewed, or `None` when reservations never run out by
    /// themselves (they are held until `complete` or `release`). The
    /// [`DedupeLayer`](crate::pipeline::DedupeLayer) renews a lease every third of this while
    /// the handler runs, and never renews when it is `None`.
    fn lease_duration(&self) -> Option<Duration>;

    /// Claims `key` for processing. [`Reservation::New`] carries the token that names this
    /// reservation in the calls below.
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError>;

    /// Extends the lease of the reservation `token` to a full
    /// [`lease_duration`](Self::lease_duration) from now, if that reservation still holds the
    /// key or the key is free; never takes a key another reservation holds or a completed key.
    /// See [`Renewal`].
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError>;

    /// Marks `key`'s effect as done; later reservations answer [`Reservation::Duplicate`].
    /// Records the key even when the reservation `token` was taken over (the effect did run),
    /// and says so with [`Completion::Superseded`]. Idempotent: repeating a completion that
    /// landed answers [`Completion::Recorded`], so a failed call may simply be retried.
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError>;

    /// Gives up the reservation `token` after a failure; the next reservation answers
    /// [`Reservation::New`]. Does nothing when `token` no longer holds the key (its lease ran
    /// out and another worker took it, or the key is completed).
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError>;

    /// Claims each of `keys` and answers, in the same order, exactly what
    /// [`reserve`](Self::reserve) called on them one after the other would: a key that comes
    /// twice gets [`Reservation::New`] at most once (its later copies answer
    /// [`InProgress`](Reservation::InProgress), or [`Duplicate`](Reservation::Duplicate) when
    /// the key is done). See [Batches](crate::idempotency#batches).
    ///
    /// `Err` means no answer is known for any key. The stores of this project undo what the
    /// batch reserved before it failed (a transaction that is not committed, one atomic
    /// statement or script, or an explicit release); only a batch whose answer is lost after
    /// it landed leaves its keys held, until their leases run out, as a single `reserve` whose
    /// answer is lost does.
    ///
    /// The default calls [`reserve`](Self::reserve) once per key, and releases the keys it
    /// reserved when a later call fails.
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            match self.reserve(key).await {
                Ok(answer) => answers.push(answer),
                Err(error) => {
                    for (key, answer) in keys.iter().zip(&answers) {
                        if let Reservation::New(token) = answer {
                            // Best effort: a key not released frees when its lease ends.
                            let _ = self.release(key, *token).await;
                        }
                    }
                    return Err(error);
                }
            }
        }
        Ok(answers)
    }

    /// Marks each key's effect as done under its reservation's token and answers, in the same
    /// order, exactly what [`complete`](Self::complete) called on the pairs one after the other
    /// would (a key that comes twice is already done for its later copies: they answer
    /// [`Recorded`](Completion::Recorded) under the same token, and
    /// [`Superseded`](Completion::Superseded) under another). See [Batches](crate::idempotency#batches).
    ///
    /// Idempotent like `complete`: after an `Err` (no answer known for any pair) retry the
    /// whole batch; pairs that landed answer `Recorded` again.
    ///
    /// The default calls [`complete`](Self::complete) once per pair.
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        let mut answers = Vec::with_capacity(completions.len());
        for (key, token) in completions {
            answers.push(self.complete(key, *token).await?);
        }
        Ok(answers)
    }
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for std::sync::Arc<S> {
    fn lease_duration(&self) -> Option<Duration> {
        (**self).lease_duration()
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        (**self).reserve(key).await
    }
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        (**self).renew(key, token).await
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        (**self).complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        (**self).release(key, token).await
    }
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        (**self).reserve_many(keys).await
    }
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        (**self).complete_many(completions).await
    }
}

/// The default deduplication window of every store: how long a completed key is remembered.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The default lease of every store: how long a reservation lasts without being renewed,
/// completed or released (the longest a crashed consumer blocks its message's key).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_shown_as_32_hex_digits() {
        let (a, b) = (LeaseToken::generate(), LeaseToken::generate());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(LeaseToken::from_u128(a.as_u128()), a);
        assert_eq!(
            LeaseToken::from_u128(255).to_string(),
            format!("{:032x}", 255)
        );
        assert_eq!(Reservation::New(a).token(), Some(a));
        assert_eq!(Reservation::Duplicate.token(), None);
        assert!(!Reservation::InProgress.is_new());
    }

    #[test]
    fn the_store_trait_is_object_safe() {
        fn takes(_: &dyn IdempotencyStore) {}
        takes(&InMemoryIdempotencyStore::default());
    }
}
