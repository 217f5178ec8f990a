//! The ordered hand-off of one publish ([`Transport::submit`](reliable_core::Transport::submit))
//! and the wait for its decision (loss-matrix rows L1, L2, L12).
//!
//! RabbitMQ keeps publish order per channel, so a publisher keeps its caller's order when each
//! message reaches lapin (delivery tag assigned, frames queued) before the next one is handed
//! over. The submission therefore does everything that must happen in order: the closed check,
//! the wait for an earlier undecided attempt of the same message (one undecided copy at a
//! time), the channel (which may reconnect), the order across a channel switch (see
//! [`order`](super::order)) and the registration with the channel's confirm driver, which is
//! the moment lapin queues the frames. The attempt it returns only waits for the driver's
//! decision, so many attempts run at once without reordering anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reliable_core::{Message, PublishError};

use super::classify::classify;
use super::confirms::{Outcome, Target};
use super::transactions::only_result;
use super::AmqpPublisher;
use crate::settings::PublishMode;

/// The wait for one publish's decision.
pub(super) type Attempt = futures::future::BoxFuture<'static, Result<(), PublishError>>;

/// A caller that gave up on a confirm after waiting at least this long marks the channel
/// suspect: a confirm normally takes milliseconds, so a wait this long means the link or the
/// broker stalls, and the resend goes out on a fresh connection instead of into the same one.
const SUSPECT_AFTER: Duration = Duration::from_secs(1);

impl AmqpPublisher {
    /// Hands `msg` to lapin in order and returns the attempt that waits for its decision (see
    /// the [module docs](self)). In transaction mode, and without publisher confirms, the
    /// whole publish runs here and the attempt is its ready result.
    pub(super) async fn hand_off(self, msg: Arc<Message>) -> Result<Attempt, PublishError> {
        if self.is_closed() {
            return Err(PublishError::Fatal {
                reason: "the publisher is closed; publish through an open one".to_owned(),
            });
        }
        match self.inner.settings.publish_mode() {
            PublishMode::Confirms => self.hand_off_confirmed(&msg).await,
            PublishMode::Transactions => {
                let result = self
                    .publish_tx(std::slice::from_ref(&*msg))
                    .await
                    .and_then(only_result);
                Ok(decided(result))
            }
        }
    }

    /// Confirm mode: registers `msg` with the channel's confirm driver. The attempt waits for
    /// the decision at most the settings' [`confirm_timeout`](crate::AmqpSettings::confirm_timeout),
    /// counted from the registration (not from the attempt's first poll), then fails with
    /// [`PublishError::Timeout`] and the channel is suspect, as it is when the attempt is
    /// dropped after [`SUSPECT_AFTER`].
    async fn hand_off_confirmed(&self, msg: &Message) -> Result<Attempt, PublishError> {
        let target = Target::new(
            &msg.id_text(),
            msg.destination().unwrap_or(&self.inner.exchange),
            msg.routing_key().unwrap_or_default(),
            msg.payload().len(),
        );
        if let Some(outcome) = self.inner.inflight.earlier(&target).await {
            return Ok(decided(outcome));
        }
        let live = self.live().await.map_err(|e| classify(&e))?;
        if self.inner.settings.publisher_confirms() {
            self.behind_lost(live.generation, &target).await?;
        }
        let timeout = self.inner.settings.confirm_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let suspect = SuspectOnDrop::new(self.clone(), live.generation);
        let publish = self.basic_publish(&live.channel, msg);
        if !self.inner.settings.publisher_confirms() {
            // Explicit opt-out (DataLoss::NoPublisherConfirms): written to the socket is all
            // we know.
            let result = match tokio::time::timeout_at(deadline, publish).await {
                Ok(written) => written.map(drop).map_err(|e| classify(&e)),
                Err(_) => Err(PublishError::Timeout),
            };
            suspect.settle(&result);
            return Ok(decided(result));
        }
        let pending = match live.confirms.register(target, publish).await {
            Ok(pending) => pending,
            Err(error) => {
                suspect.settle(&Err(error.clone()));
                return Err(error);
            }
        };
        let id = msg.id();
        Ok(Box::pin(async move {
            let result = tokio::time::timeout_at(deadline, pending.decided())
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(message_id = %id, ?timeout, "no confirm within the confirm timeout");
                    Err(PublishError::Timeout)
                });
            suspect.settle(&result);
            result
        }))
    }
}

/// An attempt already decided at hand-off.
fn decided(outcome: Outcome) -> Attempt {
    Box::pin(std::future::ready(outcome))
}

/// Marks a channel suspect when the wait for a confirm on it fails with a lost connection or
/// a timeout, or is dropped after [`SUSPECT_AFTER`] (the core producer's attempt timeout drops
/// it): the next publish opens a fresh connection rather than resend into one that may have
/// gone silent. Owns its publisher handle, so the attempt that holds it is `'static`.
struct SuspectOnDrop {
    publisher: AmqpPublisher,
    generation: u64,
    since: Instant,
    armed: bool,
}

impl SuspectOnDrop {
    fn new(publisher: AmqpPublisher, generation: u64) -> Self {
        Self {
            publisher,
            generation,
            since: Instant::now(),
            armed: true,
        }
    }

    /// The wait ended with `result`: the channel is suspect when the connection was lost or
    /// the confirm did not come in time.
    fn settle(mut self, result: &Outcome) {
        self.armed = false;
        if matches!(
            result,
            Err(PublishError::ConnectionLost { .. } | PublishError::Timeout)
        ) {
            self.publisher.invalidate(self.generation);
        }
    }
}

impl Drop for SuspectOnDrop {
    fn drop(&mut self) {
        if self.armed && self.since.elapsed() >= SUSPECT_AFTER {
            tracing::warn!(
                generation = self.generation,
                waited = ?self.since.elapsed(),
                "confirm wait abandoned: the channel is suspect, the next publish opens a fresh connection"
            );
            self.publisher.invalidate(self.generation);
        }
    }
}
