//! One undecided copy at a time (loss-matrix row L12): the publisher's undecided attempts by
//! message and destination, across its channels, so a resend waits for an earlier attempt that
//! may still land instead of writing a second copy (see [`confirms`](super::confirms)).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reliable_core::PublishError;

use super::confirms::{Decision, Outcome, Target};
use super::order::Lost;

/// How long the outcome of an abandoned attempt (its caller gave up waiting) is kept for the
/// resend that will ask for it; longer than any backoff between two attempts.
const ABANDONED_RETENTION: Duration = Duration::from_secs(300);

/// The undecided publish attempts of one publisher, by message id, across its channels, and
/// the outcomes of abandoned attempts until a resend collects them.
#[derive(Default)]
pub(super) struct Inflight {
    attempts: Mutex<HashMap<String, Attempt>>,
    next_token: AtomicU64,
    /// Attempts lost with their channel, until resent (see [`order`](super::order)).
    lost: Lost,
}

struct Attempt {
    token: u64,
    decision: Decision,
    /// Set when it was decided with nobody waiting: kept for the resend.
    abandoned_at: Option<Instant>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Attempt>> {
        // Single inserts and removals: a poisoned map is still consistent.
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outcome of the earlier attempt of `target` (same message id, same exchange and
    /// routing key), waiting for it if it is undecided: `Ok` (the broker confirmed this
    /// message) or a refusal that a resend cannot fix. `None` when there is none, or when it
    /// failed retryably: then publish again.
    pub(super) async fn earlier(&self, target: &Target) -> Option<Outcome> {
        let key = target.attempt_key();
        let mut decision = {
            let mut attempts = self.lock();
            let attempt = attempts.get(key)?;
            if attempt.abandoned_at.is_some() {
                let collected = attempts.remove(key)?;
                let outcome = collected.decision.borrow().clone();
                return outcome;
            }
            attempt.decision.clone()
        };
        tracing::debug!(message_id = %target.id, "an earlier attempt is undecided; waiting for it instead of sending a second copy");
        let outcome = decision
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone())?;
        match outcome {
            Err(e) if e.is_retryable() => None,
            outcome => Some(outcome),
        }
    }

    /// Whether a publish of `key` may be written now, or must go behind the resends of
    /// attempts lost with their channel (see [`order`](super::order)).
    pub(super) fn may_go(&self, key: &str) -> bool {
        self.lost.may_go(key)
    }

    pub(super) fn insert(&self, key: &str, decision: Decision) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let attempt = Attempt {
            token,
            decision,
            abandoned_at: None,
        };
        self.lock().insert(key.to_owned(), attempt);
        token
    }

    /// Attempt `token` of `key` was decided with `outcome`, seen by `watchers` receivers (one is
    /// this table's own). With nobody else waiting, an outcome a resend must not repeat (`Ok`,
    /// or a final refusal) is kept for it; anything else leaves the table.
    pub(super) fn decided(&self, key: &str, token: u64, outcome: &Outcome, watchers: usize) {
        let mut attempts = self.lock();
        let Some(attempt) = attempts.get_mut(key).filter(|a| a.token == token) else {
            return;
        };
        if matches!(outcome, Err(PublishError::ConnectionLost { .. })) {
            self.lost.record(key);
        }
        let keep = watchers <= 1 && !matches!(outcome, Err(e) if e.is_retryable());
        if !keep {
            attempts.remove(key);
            return;
        }
        let now = Instant::now();
        attempt.abandoned_at = Some(now);
        attempts.retain(|_, a| {
            a.abandoned_at
                .is_none_or(|at| now.duration_since(at) < ABANDONED_RETENTION)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::classify::lost;
    use tokio::sync::watch;

    #[tokio::test]
    async fn an_abandoned_attempt_answers_its_resend_and_nothing_else() {
        let inflight = Inflight::default();
        let original = Target::for_test("m", "orders", 1);
        let (reply, decision) = watch::channel(None);
        let token = inflight.insert(original.attempt_key(), decision);
        // Decided with nobody but the table watching: the caller gave up.
        inflight.decided(
            original.attempt_key(),
            token,
            &Ok(()),
            reply.receiver_count(),
        );
        reply.send_replace(Some(Ok(())));
        // A dead-letter copy keeps the id but goes elsewhere: it must be published.
        assert_eq!(
            inflight
                .earlier(&Target::for_test("m", "orders.dlx", 1))
                .await,
            None
        );
        // The resend of the same message collects the confirm instead of a second copy.
        assert_eq!(inflight.earlier(&original).await, Some(Ok(())));
        assert_eq!(inflight.earlier(&original).await, None, "collected once");

        // A retryable failure is not kept: the resend goes out.
        let (reply, decision) = watch::channel(None);
        let token = inflight.insert(original.attempt_key(), decision);
        let lost = Err(lost("gone"));
        inflight.decided(original.attempt_key(), token, &lost, reply.receiver_count());
        assert_eq!(inflight.earlier(&original).await, None);
    }
}
