//! [`AttemptCounter`] for [`PostgresStore`]: delivery counts in `<table>_attempts`, shared by
//! every consumer of the same database and table.

use async_trait::async_trait;
use reliable_core::attempts::AttemptCounter;
use reliable_core::idempotency::StoreError;
use reliable_core::message::IdempotencyKey;

use super::PostgresStore;
use crate::util::{bounded, millis_i64, ScrubbedError};

/// One upsert per delivery answers the new count, committed before the handler runs, so a
/// consumer that aborts in the handler finds it after its restart. A count lives
/// [`ttl`](super::PostgresStoreConfig::ttl) after its last delivery (by the server's clock):
/// past that a record starts over at 1, and [`PostgresStore::purge_expired`] (also run as keys
/// complete) deletes it, so messages never settled leave no rows behind for ever.
#[async_trait]
impl AttemptCounter for PostgresStore {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError> {
        let inner = &self.inner;
        let what = "PostgreSQL record_attempt";
        let ttl = millis_i64(inner.config.ttl);
        let client = self.client().await?;
        let n = bounded(inner.config.timeout, what, async {
            client
                .query_one(inner.sql.record_attempt.as_str(), &[&key.as_str(), &ttl])
                .await
                .and_then(|row| row.try_get::<_, i32>(0))
                .map_err(|e| inner.scrubber.unavailable(what, e))
        })
        .await?;
        Ok(u32::try_from(n).unwrap_or(1))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.execute(
            "PostgreSQL clear_attempts",
            &self.inner.sql.clear_attempts,
            &[&key.as_str()],
        )
        .await
        .map(|_| ())
    }
}
