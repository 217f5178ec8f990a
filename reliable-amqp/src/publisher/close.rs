//! Shutting a publisher down: [`AmqpPublisher::close`], bounded, the one documented way.

use std::sync::atomic::Ordering;

use super::{AmqpPublisher, State};
use crate::connect::Source;

impl AmqpPublisher {
    /// Closes the publisher, the one way to shut it down: waits for the confirms of publishes
    /// still in flight, then closes the channel and, when the adapter owns it (URL
    /// publishers), the connection. Each step is bounded by the settings'
    /// [`confirm_timeout`](crate::settings::AmqpSettings::confirm_timeout), so `close` returns within three
    /// times that. Publishes after `close` fail with the non-retryable [`PublishError::Fatal`](reliable_core::PublishError::Fatal);
    /// publishes still waiting when it returns resolve with an error, never `Ok` without a
    /// confirm. A wrapped connection or channel is left open for its owner (only the
    /// adapter's own channel is closed).
    ///
    /// Closing affects every clone (they share the channel). Under the core's `Producer`, call
    /// `Producer::close`: it settles every pending message first, then closes the publisher if
    /// the producer holds its only handle (a publisher shared with other producers or with the
    /// application stays open for them). Dropping the last clone without `close` closes the
    /// owned connection in the background once its confirms are in (bounded).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use reliable_amqp::{AmqpPublisher, AmqpSettings};
    /// let publisher = AmqpPublisher::connect("amqp://127.0.0.1:5672/%2f", AmqpSettings::safe()).await?;
    /// publisher.close().await;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let previous = std::mem::replace(&mut *self.inner.lock_state(), State::Idle);
        let State::Live(live) = previous else {
            return; // nothing open (an open under way sees `closed` and is dropped)
        };
        let bound = self.inner.settings.confirm_timeout();
        if tokio::time::timeout(bound, live.channel.wait_for_confirms())
            .await
            .is_err()
        {
            tracing::warn!(?bound, "closing with confirms still pending");
        }
        if matches!(self.inner.source, Source::Channel(_)) {
            return; // the owner's channel
        }
        let _ = tokio::time::timeout(
            bound,
            live.channel.close(200, "reliable publisher closing".into()),
        )
        .await;
        if let Some(connection) = &live.connection {
            let _ = tokio::time::timeout(
                bound,
                connection.close(200, "reliable publisher closing".into()),
            )
            .await;
        }
        tracing::info!(target_broker = %self.inner.source.target(), "AMQP publisher closed");
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}
