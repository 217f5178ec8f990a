//! The inbox form of [`PostgresStore`]: the key recorded in the transaction of the business
//! write, so the two commit together or not at all.

use std::future::Future;
use std::pin::Pin;

use reliable_core::idempotency::StoreError;
use reliable_core::message::IdempotencyKey;
use tokio_postgres::Transaction;

use super::PostgresStore;
use crate::util::{bounded, millis_i64, ScrubbedError};

/// The future a [`PostgresStore::apply_once`] closure returns: the business write, run inside
/// the transaction it is given.
pub type TxFuture<'t, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

/// What [`PostgresStore::apply_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<T> {
    /// The key was new: the write ran and committed together with the key. Holds its result.
    New(T),
    /// The key's effect had committed before: nothing ran. Acknowledge the message.
    Duplicate,
}

/// Why [`PostgresStore::apply_once`] did not commit. Either way the transaction was rolled back:
/// neither the effect nor the key is recorded, and the message must be retried.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError<E> {
    /// PostgreSQL failed or did not answer in time (retryable). When the failure was the commit
    /// itself, the outcome is unknown; a retry answers [`Applied::Duplicate`] if it did commit.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The business write returned an error.
    #[error("the write inside the idempotent transaction failed: {0}")]
    Write(E),
}

impl PostgresStore {
    /// Records `key` as done inside `tx`, the transaction of your business write: the inbox
    /// pattern by hand. Commit `tx` and both are recorded; roll it back and neither is.
    ///
    /// Use it under a [`DedupeLayer`](reliable_core::pipeline::DedupeLayer) over this store:
    /// the layer's `reserve` makes a concurrent duplicate wait, and after a crash between the
    /// commit and the acknowledgement the redelivered copy is recognised as a duplicate.
    pub async fn complete_in(
        &self,
        tx: &Transaction<'_>,
        key: &IdempotencyKey,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        bounded(inner.config.timeout, "PostgreSQL complete_in", async {
            tx.execute(
                inner.sql.complete_in.as_str(),
                &[&key.as_str(), &millis_i64(inner.config.ttl)],
            )
            .await
            .map(|_| ())
            .map_err(|e| inner.scrubber.unavailable("PostgreSQL complete_in", e))
        })
        .await
    }

    /// Runs `write` and records `key` in one transaction, unless `key`'s effect committed
    /// before: the inbox pattern. Returns [`Applied::New`] with the write's result, or
    /// [`Applied::Duplicate`] when the key was done already (nothing ran).
    ///
    /// A concurrent call with the same key, from any process, waits on the key's row until
    /// this transaction ends, then answers `Duplicate` (committed) or runs (rolled back).
    /// On any error the transaction is rolled back; see [`ApplyError`].
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    pub async fn apply_once<T, E, F>(
        &self,
        key: &IdempotencyKey,
        write: F,
    ) -> Result<Applied<T>, ApplyError<E>>
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> TxFuture<'t, T, E>,
    {
        let inner = &self.inner;
        let what = "PostgreSQL apply_once";
        let fail = |e: tokio_postgres::Error| inner.scrubber.unavailable(what, e);
        let mut client = self.client().await?;
        let tx = bounded(inner.config.timeout, what, async {
            client.transaction().await.map_err(fail)
        })
        .await?;
        // Row lock on the key until commit: a concurrent duplicate waits here.
        let claimed = bounded(inner.config.lease, what, async {
            tx.query_opt(
                inner.sql.claim_done.as_str(),
                &[&key.as_str(), &millis_i64(inner.config.ttl)],
            )
            .await
            .map_err(fail)
        })
        .await?;
        if claimed.is_none() {
            let _ = tx.rollback().await;
            tracing::debug!("duplicate: the key's effect committed before");
            return Ok(Applied::Duplicate);
        }
        let result = match write(&tx).await {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(ApplyError::Write(e));
            }
        };
        bounded(inner.config.timeout, what, async {
            tx.commit().await.map_err(fail)
        })
        .await?;
        Ok(Applied::New(result))
    }
}
