//! How an attempt's end is decided (confirm, final refusal, resend after a backoff) and how a
//! message is settled: its outcome handed to its handle, its window slot and lane released.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::{Driver, Reply, Stage};
use crate::message::Message;
use crate::producer::handle::Outcome;
use crate::producer::stats::ResendCause;
use crate::producer::{Confirmed, SendError, SendOrder};
use crate::transport::PublishError;

impl Driver {
    /// An attempt ended: confirm, final refusal, or a resend after a backoff.
    pub(super) fn decided(&mut self, ticket: u64, result: Result<(), PublishError>) {
        let Some(t) = self.tracked.get_mut(&ticket) else {
            return;
        };
        let _entered = t.span().entered();
        let attempts = t.attempts;
        let err = match result {
            Ok(()) => {
                let latency = Instant::now().saturating_duration_since(t.first_sent);
                tracing::debug!(attempts, ?latency, "confirmed");
                let id = t.msg.id();
                return self.settle(ticket, |_| {
                    Ok(Confirmed {
                        id,
                        attempts,
                        latency,
                    })
                });
            }
            Err(e) => e,
        };
        let cfg = &self.inner.config;
        let Some(cause) = ResendCause::of(&err).filter(|_| err.is_retryable()) else {
            tracing::warn!(error = %err, attempts, "publish refused");
            return self.settle(ticket, |message| {
                Err(SendError::Refused {
                    message,
                    source: err,
                    attempts,
                })
            });
        };
        if attempts >= cfg.max_attempts {
            tracing::warn!(error = %err, attempts, "publish attempts exhausted");
            return self.settle(ticket, |message| {
                Err(SendError::AttemptsExhausted {
                    message,
                    last_error: err,
                    attempts,
                })
            });
        }
        let delay = t
            .delays
            .get_or_insert_with(|| Box::new(cfg.backoff.delays()))
            .next()
            .unwrap_or(cfg.backoff.max_delay);
        let now = Instant::now();
        let resend_at = now.checked_add(delay);
        let past_deadline = t
            .deadline
            .is_some_and(|d| resend_at.is_none_or(|at| at >= d));
        if past_deadline {
            tracing::warn!(error = %err, attempts, "publish deadline exceeded");
            let elapsed = now.saturating_duration_since(t.first_sent);
            return self.settle(ticket, |message| {
                Err(SendError::DeadlineExceeded {
                    message,
                    last_error: err,
                    attempts,
                    elapsed,
                })
            });
        }
        tracing::debug!(error = %err, ?cause, attempts, ?delay, "resending");
        t.stage = Stage::Parked;
        t.cause = Some(cause);
        let lane = t.lane;
        if cfg.order == SendOrder::Preserved {
            self.lanes.failed(lane, ticket);
        }
        match resend_at {
            Some(at) => self.backoff.push(Reverse((at, ticket))),
            None => {
                self.due.insert(ticket);
            }
        }
    }

    /// Settles `ticket` with the outcome `outcome` builds (from the message, for a hand-back)
    /// and hands it to the message's [`SendHandle`](super::SendHandle).
    ///
    /// The outbox entry leaves on confirm; a handed-back message's claim travels with the
    /// outcome, so the entry leaves only once the handle gives the message to the caller.
    pub(super) fn settle(
        &mut self,
        ticket: u64,
        outcome: impl FnOnce(Box<Message>) -> Result<Confirmed, SendError>,
    ) {
        let Some(t) = self.tracked.remove(&ticket) else {
            return;
        };
        if self.inner.config.order == SendOrder::Preserved {
            let released = self.lanes.settled(t.lane, ticket);
            for held in released.into_iter().rev() {
                self.fresh.push_front(held);
            }
        }
        self.due.remove(&ticket);
        let id = t.msg.id();
        let result = outcome(Box::new(Arc::unwrap_or_clone(t.msg)));
        let claim = match &result {
            Ok(c) => {
                self.inner
                    .counters
                    .confirmed
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.latency.record(c.latency);
                self.inner.counters.metrics.confirmed(c.latency);
                if let Some(claim) = t.claim {
                    claim.remove();
                }
                None
            }
            Err(e) => {
                self.inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.inner.counters.metrics.handed_back(e);
                t.claim
            }
        };
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.inner.counters.metrics.settled();
        self.released += 1;
        let outcome = Outcome { result, claim };
        match t.reply {
            Reply::One(reply) => {
                if let Err(outcome) = reply.send(outcome) {
                    outcome.unreceived(id);
                }
            }
            Reply::Batch(reply) => reply.send(id, outcome),
        }
    }
}
