//! The driver's clock: the one timer that fires for the next backoff end, callback-attempt
//! expiry or deadline, the sweeps it runs, and the bound put on future steps.

use std::cmp::Reverse;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{Driver, SendError, Stage};
use crate::transport::PublishError;

impl Driver {
    /// The timer fired: backoffs that ended become due, waiting messages past their deadline
    /// are handed back.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        while let Some(&(ends, token)) = self.expiring.front() {
            if ends > now {
                break;
            }
            self.expiring.pop_front();
            if self.current(token) {
                self.decided(token.ticket, Err(PublishError::Timeout));
            }
        }
        while let Some(Reverse((at, ticket))) = self.backoff.peek().copied() {
            if at > now {
                break;
            }
            self.backoff.pop();
            if self.tracked.contains_key(&ticket) {
                self.due.insert(ticket);
            }
        }
        while let Some(&ticket) = self.by_deadline.front() {
            let Some(t) = self.tracked.get(&ticket) else {
                self.by_deadline.pop_front();
                continue;
            };
            if t.deadline.is_none_or(|d| d > now) {
                break;
            }
            self.by_deadline.pop_front();
            if t.stage == Stage::InFlight {
                if t.callback {
                    // Its timeout would end after the deadline: decided now, as timed out.
                    self.decided(ticket, Err(PublishError::Timeout));
                }
                continue; // a future attempt's budget ends by the deadline
            }
            let (attempts, elapsed) = (t.attempts, now.saturating_duration_since(t.first_sent));
            let last_error = PublishError::Timeout;
            tracing::warn!(parent: &t.span(), attempts, "publish deadline exceeded while waiting for its turn");
            self.settle(ticket, |message| {
                Err(SendError::DeadlineExceeded {
                    message,
                    last_error,
                    attempts,
                    elapsed,
                })
            });
        }
    }

    /// Sets the timer to the next backoff end or the next deadline of a message not in flight.
    pub(super) fn arm_timer(&mut self) {
        while self
            .expiring
            .front()
            .is_some_and(|&(_, token)| !self.current(token))
        {
            self.expiring.pop_front(); // answered already
        }
        let expiry = self.expiring.front().map(|(at, _)| *at);
        let backoff = self.backoff.peek().map(|Reverse((at, _))| *at);
        let deadline = self
            .by_deadline
            .front()
            .and_then(|ticket| self.tracked.get(ticket))
            .and_then(|t| t.deadline);
        let next = [expiry, backoff, deadline].into_iter().flatten().min();
        if next != self.timer_at {
            if let Some(at) = next {
                self.timer.as_mut().reset(at);
            }
            self.timer_at = next;
        }
    }
}

/// When a step started at `now` times out: `confirm_timeout`, cut to what is left of the
/// `deadline`; `None` when that is too far away to represent.
pub(super) fn step_end(
    confirm_timeout: Duration,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<Instant> {
    let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
    now.checked_add(confirm_timeout.min(left))
}

/// `step` for `ticket`, failed with [`PublishError::Timeout`] at `ends`.
pub(super) async fn bounded<T>(
    ticket: u64,
    ends: Option<Instant>,
    step: impl Future<Output = Result<T, PublishError>>,
) -> (u64, Result<T, PublishError>) {
    let result = match ends {
        Some(ends) => tokio::time::timeout_at(ends, step)
            .await
            .unwrap_or(Err(PublishError::Timeout)),
        None => step.await,
    };
    (ticket, result)
}
