//! One message's delivery: attempts, resends and the final outcome, run by one task per
//! message.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::message::Message;
use crate::transport::PublishError;

use super::handle::{Claim, Outcome};
use super::stats::ResendCause;
use super::{Confirmed, Inner, SendError};

impl Inner {
    /// The body of a message's delivery task: delivers, records the outcome and hands it to
    /// the message's [`SendHandle`](super::SendHandle).
    ///
    /// The outbox entry leaves on confirm; a handed-back message's claim travels with the
    /// outcome, so the entry leaves only once the handle gives the message to the caller.
    pub(super) async fn run(
        self: Arc<Self>,
        ticket: u64,
        msg: Message,
        first_sent: Instant,
        permit: OwnedSemaphorePermit,
        claim: Option<Claim>,
        tx: oneshot::Sender<Outcome>,
    ) {
        let id = msg.id();
        let result = self.deliver(ticket, msg, first_sent).await;
        let claim = match &result {
            Ok(c) => {
                self.counters.confirmed.fetch_add(1, Ordering::Relaxed);
                self.latency.record(c.latency);
                if let Some(claim) = claim {
                    claim.remove();
                }
                None
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                claim
            }
        };
        // Leave the pending map before the window so `flush` sees an empty map.
        self.pending.remove(&ticket);
        drop(permit);
        if let Err(outcome) = tx.send(Outcome { result, claim }) {
            outcome.unreceived(id);
        }
    }

    /// Attempts until confirm, final refusal, attempts exhausted or deadline; never longer than
    /// the deadline.
    async fn deliver(
        &self,
        ticket: u64,
        msg: Message,
        first_sent: Instant,
    ) -> Result<Confirmed, SendError> {
        let cfg = &self.config;
        // `None`: a deadline too far away to represent (e.g. `Duration::MAX`) is no deadline.
        let deadline = first_sent.checked_add(cfg.deadline);
        // Built at the first resend: most messages never need it.
        let mut delays = None;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // The first attempt's entry was written by `start`.
            let now = if attempts == 1 {
                first_sent
            } else {
                let now = Instant::now();
                if let Some(mut e) = self.pending.get_mut(&ticket) {
                    e.attempts = attempts;
                    e.last_sent = now;
                }
                now
            };
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let budget = cfg
                .confirm_timeout
                .min(deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now)));
            let result = match tokio::time::timeout(budget, (*self.transport).publish(&msg)).await {
                Ok(r) => r,
                Err(_) => Err(PublishError::Timeout),
            };
            let err = match result {
                Ok(()) => {
                    let latency = Instant::now().saturating_duration_since(first_sent);
                    tracing::debug!(attempts, ?latency, "confirmed");
                    return Ok(Confirmed {
                        id: msg.id(),
                        attempts,
                        latency,
                    });
                }
                Err(e) => e,
            };
            let Some(cause) = ResendCause::of(&err).filter(|_| err.is_retryable()) else {
                tracing::warn!(error = %err, attempts, "publish refused");
                return Err(SendError::Refused {
                    message: Box::new(msg),
                    source: err,
                    attempts,
                });
            };
            if attempts >= cfg.max_attempts {
                tracing::warn!(error = %err, attempts, "publish attempts exhausted");
                return Err(SendError::AttemptsExhausted {
                    message: Box::new(msg),
                    last_error: err,
                    attempts,
                });
            }
            let delay = delays
                .get_or_insert_with(|| cfg.backoff.delays())
                .next()
                .unwrap_or(cfg.backoff.max_delay);
            let now = Instant::now();
            let past_deadline =
                deadline.is_some_and(|d| now.checked_add(delay).is_none_or(|t| t >= d));
            if past_deadline {
                tracing::warn!(error = %err, attempts, "publish deadline exceeded");
                return Err(SendError::DeadlineExceeded {
                    message: Box::new(msg),
                    last_error: err,
                    attempts,
                    elapsed: now.saturating_duration_since(first_sent),
                });
            }
            tracing::debug!(error = %err, ?cause, attempts, ?delay, "resending");
            tokio::time::sleep(delay).await;
            self.counters.resent(cause).fetch_add(1, Ordering::Relaxed);
        }
    }
}
