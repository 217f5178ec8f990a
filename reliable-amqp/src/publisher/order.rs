//! Send order across a channel switch (issue 18).
//!
//! RabbitMQ keeps publish order per channel only. When a channel is lost, its undecided
//! publishes fail with [`PublishError::ConnectionLost`] and the producer resends them in their
//! original order; but a message handed over after the loss and before the producer has
//! heard of those failures would go out on the new channel ahead of their resends. So, before a
//! publish is written on a channel:
//!
//! * it waits until every publish on this publisher's older channels is decided (bounded by
//!   that channel's drain bound), so every loss on them is known;
//! * then, while publishes lost with a channel in the last [`LOST_WINDOW`] are not resent yet,
//!   any other message is refused with the retryable [`PublishError::ConnectionLost`] before
//!   anything is written: the producer resends it behind them. A lost message's resend, and a
//!   refused message's next submission, always pass.
//!
//! The window only has to cover the moment between a loss and the producer learning of it:
//! from then on the producer's [`SendOrder::Preserved`](reliable_core::producer::SendOrder)
//! holds new messages itself until the resends are confirmed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reliable_core::PublishError;

use super::confirms::{Settlement, Target};
use super::AmqpPublisher;

/// How long a publish lost with its channel holds back other messages until it is resent.
const LOST_WINDOW: Duration = Duration::from_secs(2);

/// How long a refused message's pass is kept for its next submission.
const PASS_RETENTION: Duration = Duration::from_secs(300);

/// Messages lost with a channel and not resent yet, and messages refused behind them, by
/// attempt key.
#[derive(Default)]
pub(super) struct Lost {
    state: Mutex<LostState>,
}

#[derive(Default)]
struct LostState {
    /// Lost with their channel, not resent yet.
    lost: HashMap<String, Instant>,
    /// Refused behind lost ones: their next submission passes.
    passes: HashMap<String, Instant>,
}

impl Lost {
    fn lock(&self) -> MutexGuard<'_, LostState> {
        // Single inserts and removals: a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The publish of `key` was lost with its channel: the producer will resend it.
    pub(super) fn record(&self, key: &str) {
        self.lock().lost.insert(key.to_owned(), Instant::now());
    }

    /// Whether a publish of `key` may be written now (see the [module docs](self)); if not,
    /// its next submission may.
    pub(super) fn may_go(&self, key: &str) -> bool {
        let mut state = self.lock();
        if state.lost.remove(key).is_some() || state.passes.remove(key).is_some() {
            return true;
        }
        let now = Instant::now();
        state
            .lost
            .retain(|_, at| now.duration_since(*at) < LOST_WINDOW);
        if state.lost.is_empty() {
            state
                .passes
                .retain(|_, at| now.duration_since(*at) < PASS_RETENTION);
            return true;
        }
        state.passes.insert(key.to_owned(), now);
        false
    }
}

/// The channels a publisher opened that may still hold undecided publishes.
#[derive(Default)]
pub(super) struct Channels {
    opened: Mutex<Vec<Opened>>,
}

struct Opened {
    generation: u64,
    settlement: Settlement,
    /// How long a publish on a newer channel waits for this one's publishes at most.
    bound: Duration,
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, Vec<Opened>> {
        // Whole entries are pushed and removed: a poisoned list is still consistent.
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Channel `generation` opened; its publishes are decided as `settlement` says.
    pub(super) fn opened(&self, generation: u64, settlement: Settlement, bound: Duration) {
        self.lock().push(Opened {
            generation,
            settlement,
            bound,
        });
    }

    /// The channels older than `generation` with undecided publishes; forgets the settled ones.
    fn older_undecided(&self, generation: u64) -> Vec<(Settlement, Duration)> {
        let mut opened = self.lock();
        opened.retain(|c| c.generation >= generation || c.settlement.undecided());
        opened
            .iter()
            .filter(|c| c.generation < generation)
            .map(|c| (c.settlement.clone(), c.bound))
            .collect()
    }
}

impl AmqpPublisher {
    /// Whether `target` may be written on channel `generation` now without going ahead of a
    /// publish lost with an older channel (see the [module docs](self)). A refusal is the
    /// retryable [`PublishError::ConnectionLost`]; nothing was written.
    pub(super) async fn behind_lost(
        &self,
        generation: u64,
        target: &Target,
    ) -> Result<(), PublishError> {
        for (settlement, bound) in self.inner.channels.older_undecided(generation) {
            if tokio::time::timeout(bound, settlement.settled())
                .await
                .is_err()
            {
                tracing::warn!(
                    ?bound,
                    "publishes on a replaced channel are still undecided; publishing anyway"
                );
            }
        }
        if self.inner.inflight.may_go(target.attempt_key()) {
            return Ok(());
        }
        tracing::debug!(
            message_id = %target.id,
            "publishes lost with a replaced channel are not resent yet; this one goes behind them"
        );
        Err(PublishError::ConnectionLost {
            reason: "messages handed over before this one were lost with the previous channel \
                     and are not resent yet; this one was not written, so its resend goes \
                     behind theirs"
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_messages_hold_back_others_once_and_pass_themselves() {
        let lost = Lost::default();
        assert!(lost.may_go("a"), "nothing lost");
        lost.record("b");
        assert!(!lost.may_go("c"), "c would overtake b's resend");
        assert!(lost.may_go("b"), "b's resend");
        assert!(lost.may_go("c"), "c's next submission");
        assert!(lost.may_go("d"), "nothing lost any more");
        lost.record("e");
        assert!(!lost.may_go("f"));
        assert!(!lost.may_go("g"));
        assert!(
            lost.may_go("f"),
            "refused once, passes on its next submission"
        );
    }
}
