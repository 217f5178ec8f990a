//! [`PostgresStoreConfig`]: the settings of a [`PostgresStore`](super::PostgresStore).

use std::time::Duration;

use reliable_core::idempotency::{DEFAULT_LEASE, DEFAULT_TTL};

use super::DEFAULT_TABLE;

/// Settings of a [`PostgresStore`].
///
/// ```
/// use reliable_stores::PostgresStoreConfig;
///
/// let config = PostgresStoreConfig { table: "orders_inbox".into(), ..Default::default() };
/// assert_eq!(config.pool_size, 16);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresStoreConfig {
    /// How long a completed key is remembered: the deduplication window. Default 24 h. Also
    /// how long an attempt count lives after its last delivery
    /// ([`AttemptCounter`](reliable_core::attempts::AttemptCounter)), so the counts of messages
    /// that are never settled are purged like expired keys.
    pub ttl: Duration,
    /// How long a reservation lasts unless renewed, completed or released: the longest a
    /// crashed consumer blocks a message. The pipeline's `DedupeLayer` renews it every third of
    /// this while the handler runs, so it must exceed a few renewal round trips (and
    /// [`timeout`](Self::timeout)), not the handler's run. Default 5 min.
    pub lease: Duration,
    /// The table, a plain lower-case identifier (`[a-z_][a-z0-9_]*`, at most 48 bytes), created
    /// if missing, with the attempt counts in `<table>_attempts` beside it. Default
    /// [`DEFAULT_TABLE`].
    pub table: String,
    /// The longest any one call waits (for a pooled connection and for the server) before it
    /// answers [`StoreError::Unavailable`]. Default 5 s.
    pub timeout: Duration,
    /// Most connections the store's pool opens. Default 16.
    pub pool_size: usize,
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            table: DEFAULT_TABLE.to_owned(),
            timeout: Duration::from_secs(5),
            pool_size: 16,
        }
    }
}
