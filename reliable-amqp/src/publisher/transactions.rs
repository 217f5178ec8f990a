//! Transaction mode, the slower alternative to confirms (loss-matrix row L1): each commit is a
//! synchronous round trip with an fsync, and one transaction runs per channel at a time.

use reliable_core::{Message, PublishError};

use super::classify::{classify, unroutable};
use super::confirms::Returns;
use super::{AmqpPublisher, LiveChannel};
use crate::connect::Source;
use crate::settings::PublishMode;

impl AmqpPublisher {
    /// Transaction mode: publishes `batch` in one transaction (`tx.commit` once) and returns
    /// one result per message, in order. On a failed commit the transaction is rolled back
    /// and every message gets the (retryable) error; resend the batch with the same messages.
    /// Returned (unroutable) messages get [`PublishError::Unroutable`]. Slower than confirms;
    /// fails with [`PublishError::Fatal`] unless the settings use [`PublishMode::Transactions`].
    pub async fn publish_batch(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        if self.inner.settings.publish_mode() != PublishMode::Transactions {
            let error = PublishError::Fatal {
                reason:
                    "publish_batch needs PublishMode::Transactions (AmqpSettings::transactional())"
                        .to_owned(),
            };
            return batch.iter().map(|_| Err(error.clone())).collect();
        }
        match self.publish_tx(batch).await {
            Ok(results) => results,
            Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    pub(super) async fn publish_tx(
        &self,
        batch: &[Message],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let live = self.live().await.map_err(|e| classify(&e))?;
        let timeout = self.inner.settings.confirm_timeout();
        let result = tokio::time::timeout(timeout, self.commit_on(&live, batch))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(
                    messages = batch.len(),
                    ?timeout,
                    "no tx.commit-ok within the confirm timeout"
                );
                if !matches!(self.inner.source, Source::Channel(_)) {
                    // The channel may hold this batch's publishes uncommitted: close it (which
                    // discards them) rather than let the next batch commit them.
                    let channel = live.channel.clone();
                    tokio::spawn(async move {
                        let _ = channel.close(200, "transaction timed out".into()).await;
                    });
                    self.invalidate(live.generation);
                }
                Err(PublishError::Timeout)
            });
        if matches!(result, Err(PublishError::ConnectionLost { .. })) {
            self.invalidate(live.generation);
        }
        result
    }

    /// Publishes and commits `batch` in one transaction, unbounded in time: the caller
    /// ([`publish_tx`](Self::publish_tx)) bounds it by the confirm timeout.
    async fn commit_on(
        &self,
        live: &LiveChannel,
        batch: &[Message],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let _transaction = live.tx.lock().await;
        let attempt = async {
            for msg in batch {
                self.basic_publish(&live.channel, msg).await?;
            }
            live.channel.tx_commit().await?;
            // Returns arrive before commit-ok; outside confirm mode lapin keeps them here.
            live.channel.wait_for_confirms().await
        };
        match attempt.await {
            Ok(returned) => {
                let mut returns = Returns::default();
                returned.into_iter().for_each(|r| returns.add(r));
                Ok(batch
                    .iter()
                    .map(|msg| match returns.take(&msg.id_text()) {
                        Some(r) => Err(unroutable(&r)),
                        None => Ok(()),
                    })
                    .collect())
            }
            Err(e) => {
                let error = classify(&e);
                if !matches!(error, PublishError::ConnectionLost { .. }) {
                    let _ = live.channel.tx_rollback().await;
                }
                tracing::warn!(%error, messages = batch.len(), "AMQP transaction rolled back");
                Err(error)
            }
        }
    }
}

/// The one result of a one-message transaction. No result means no commit is known to stand
/// behind the message, so it is never `Ok` (invariant 1).
pub(super) fn only_result(mut results: Vec<Result<(), PublishError>>) -> Result<(), PublishError> {
    match (results.pop(), results.is_empty()) {
        (Some(result), true) => result,
        (None, _) => Err(PublishError::Fatal {
            reason: "the transaction reported no result for the message, so no commit is known \
                     to include it"
                .to_owned(),
        }),
        (Some(_), false) => Err(PublishError::Fatal {
            reason: "the transaction reported several results for one message".to_owned(),
        }),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_without_a_result_is_never_ok() {
        assert!(matches!(
            only_result(Vec::new()),
            Err(PublishError::Fatal { .. })
        ));
        assert!(matches!(
            only_result(vec![Ok(()), Ok(())]),
            Err(PublishError::Fatal { .. })
        ));
        assert_eq!(only_result(vec![Ok(())]), Ok(()));
        assert_eq!(
            only_result(vec![Err(PublishError::Timeout)]),
            Err(PublishError::Timeout)
        );
    }
}
