//! Settling one AMQP delivery (ack, nack, reject), bounded in time, with lapin's answers
//! checked.

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use reliable_core::{AckError, Acker};

use crate::connect::retryable;

/// The longest an ack, nack, reject or close step may wait for the connection.
pub(super) const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settles one AMQP delivery; checks lapin's `Ok(false)` (already settled, or channel gone).
pub(super) struct AmqpAcker {
    pub(super) acker: lapin::Acker,
}

impl AmqpAcker {
    /// Runs one settle call, bounded by [`SETTLE_TIMEOUT`], and checks lapin's answer.
    async fn settle(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = lapin::Result<bool>>,
    ) -> Result<(), AckError> {
        let result = tokio::time::timeout(SETTLE_TIMEOUT, call)
            .await
            .map_err(|_| AckError::ConnectionLost {
                reason: format!("{operation}: no progress within {SETTLE_TIMEOUT:?}"),
            })?;
        match result {
            Ok(true) => Ok(()),
            Ok(false) if self.acker.poisoned() => Err(AckError::ConnectionLost {
                reason: format!("{operation}: the delivery's channel closed"),
            }),
            Ok(false) => Err(AckError::Stale {
                reason: format!("{operation}: the delivery was already settled"),
            }),
            Err(error) if retryable(&error) => Err(AckError::ConnectionLost {
                reason: format!("{operation}: {error}"),
            }),
            Err(error) => Err(AckError::Other {
                reason: format!("{operation}: {error}"),
            }),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.settle("basic.ack", self.acker.ack(BasicAckOptions::default()))
            .await
    }

    /// `basic.nack`: on RabbitMQ 4.3 and later a nack with requeue is a plain return that does
    /// not count towards a quorum queue's delivery limit (a `basic.reject` with requeue does).
    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        self.settle("basic.nack", self.acker.nack(options)).await
    }

    async fn reject(&self) -> Result<(), AckError> {
        self.settle(
            "basic.reject",
            self.acker.reject(BasicRejectOptions { requeue: false }),
        )
        .await
    }
}
