//! `reliable-stores`: durable [`IdempotencyStore`]s for `reliable` (loss-matrix row L8).
//!
//! The core's [`InMemoryIdempotencyStore`](reliable_core::idempotency::InMemoryIdempotencyStore)
//! forgets every key when its process ends and is not shared between processes. The stores here
//! keep the same protocol — [`reserve`](IdempotencyStore::reserve) a key as a lease,
//! [`complete`](IdempotencyStore::complete) it after the effect,
//! [`release`](IdempotencyStore::release) it after a failure — in a place that survives:
//!
//! | store | feature | survives a restart | shared by several processes | key recorded atomically with the effect |
//! |---|---|---|---|---|
//! | [`RedbStore`] | `redb` | yes (fsync'd commits) | no: one process per file | no |
//! | [`RedisStore`] | `redis` | as far as Redis persists (AOF) | yes | no |
//! | [`PostgresStore`] | `postgres` | yes | yes | yes, with [`PostgresStore::complete_in`] / [`PostgresStore::apply_once`] (the inbox pattern) |
//!
//! Every store plugs into the pipeline's
//! [`DedupeLayer`](reliable_core::pipeline::DedupeLayer) as it is:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn demo() -> Result<(), reliable_stores::StoresError> {
//! use std::sync::Arc;
//! use reliable_core::pipeline::DedupeLayer;
//! use reliable_stores::{RedisStore, RedisStoreConfig};
//!
//! let config = RedisStoreConfig::default();
//! let lease = config.lease;
//! let store = RedisStore::connect("redis://127.0.0.1:6379/0", config).await?;
//! // Wait for a key held by another consumer at most as long as its lease.
//! let dedupe = DedupeLayer::new(Arc::new(store)).with_in_progress_wait(lease);
//! # let _ = dedupe;
//! # Ok(())
//! # }
//! ```
//!
//! # Which store
//!
//! - One consumer process that must deduplicate across its own restarts: [`RedbStore`].
//! - Several consumer processes or machines: [`RedisStore`] or [`PostgresStore`].
//! - The effect is a write to PostgreSQL: [`PostgresStore`] in its inbox form, so the effect
//!   and the key commit in one transaction and even a crash between them cannot apply the
//!   effect twice. With the other stores a crash after the effect and before
//!   [`complete`](IdempotencyStore::complete) frees the key when its lease ends, and the
//!   redelivered copy applies the effect again.
//!
//! # Attempt counts (loss-matrix row L10)
//!
//! Each store is also an [`AttemptCounter`]: the pipeline records a delivery before the handler
//! runs and clears the count once the message is settled, so a consumer that aborts on a
//! poison message finds the count after its restart and can dead-letter the message after N
//! deliveries. Redis and PostgreSQL counts are shared by every consumer of the same server and
//! prefix or table. A count lives the store's TTL after its last delivery, then starts over and
//! is purged with the expired keys, so messages that are never settled leave nothing behind.
//!
//! # Features
//!
//! `redb`, `redis` and `postgres`, one per store, **all on by default**: like the facade crate's
//! adapters, so a plain `cargo build` / `cargo test` of the workspace builds and tests every
//! store. An application that needs one store turns the others off:
//! `reliable-stores = { version = "0.1", default-features = false, features = ["redis"] }`.
//!
//! # Errors
//!
//! Constructors return [`StoresError`], which says what to do. Once built, every backend
//! failure is a [`StoreError::Unavailable`] (retryable: the pipeline requeues the message)
//! that comes back within the store's timeout, and whose reason never contains a password.
//!
//! # Leases (loss-matrix row L11)
//!
//! A reservation is a lease named by a [`LeaseToken`] made for that one reservation. The
//! pipeline's `DedupeLayer` renews it every third of the store's lease while the handler runs,
//! so a handler slower than the lease keeps its key; the lease only has to outlast a few
//! renewals, and it bounds how long a crashed consumer blocks its message. Renewing, completing
//! and releasing check the token in one atomic step (a Lua script in Redis, one statement in
//! PostgreSQL, one write transaction in redb): a holder whose lease ran out and was taken over,
//! in another process or in the same one, can neither extend nor free the new holder's
//! reservation. Its late `complete` still records the key, since its effect did run, and answers
//! [`Completion::Superseded`] so the layer can report that the effect may have run twice.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
#[cfg(feature = "postgres")]
mod postgres_store;
#[cfg(feature = "redb")]
mod redb_store;
#[cfg(feature = "redis")]
mod redis_store;
mod util;

pub use error::StoresError;
#[cfg(feature = "postgres")]
pub use postgres_store::{
    Applied, ApplyError, PostgresStore, PostgresStoreConfig, TxFuture, DEFAULT_TABLE,
};
#[cfg(feature = "redb")]
pub use redb_store::{RedbStore, RedbStoreConfig};
#[cfg(feature = "redis")]
pub use redis_store::{
    RedisStore, RedisStoreConfig, DEFAULT_ATTEMPTS_KEY_PREFIX, DEFAULT_KEY_PREFIX,
};

/// The `deadpool-postgres` version [`PostgresStore`] is built against (its pool type is part of
/// the API). Its own re-export `deadpool_postgres::tokio_postgres` is the matching
/// `tokio-postgres`.
#[cfg(feature = "postgres")]
pub use deadpool_postgres;
/// The `tokio-postgres` version [`PostgresStore`] is built against: use its
/// [`Transaction`](tokio_postgres::Transaction) for [`PostgresStore::complete_in`].
#[cfg(feature = "postgres")]
pub use tokio_postgres;

pub use reliable_core::attempts::AttemptCounter;
pub use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError,
};
