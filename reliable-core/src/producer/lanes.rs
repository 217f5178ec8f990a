//! Ordering lanes: which message the driver may hand to the transport next under
//! [`SendOrder::Preserved`](super::SendOrder::Preserved).
//!
//! Every message belongs to the lane its transport names ([`Transport::lane`]); tickets grow in
//! send order. A lane is *recovering* from the moment one of its messages fails retryably until
//! every such message is resent and decided. The rules:
//!
//! * A lane that is not recovering submits its messages as they come (send order, since the
//!   driver submits one message at a time).
//! * A recovering lane holds its messages that were never submitted; they go, in order, once
//!   the lane has recovered.
//! * A failed message is resent only when it is the lane's earliest failed message and no
//!   earlier message's first attempt is still undecided: an earlier message may yet fail, and
//!   its resend must go first.
//! * The lane has recovered when no message waits for a resend and every resend is decided
//!   (confirmed or handed back), so a held message cannot overtake a resend that fails again.
//!
//! What no lane can prevent: a later message whose attempt was already with the broker when an
//! earlier one failed may be confirmed before that one's resend (an AMQP nack of one message, a
//! Kafka record that librdkafka gave up on). Connection and channel losses fail every undecided
//! attempt of the channel, which are then resent in order.
//!
//! [`Transport::lane`]: crate::Transport::lane

use std::collections::{BTreeSet, HashMap, VecDeque};

/// The lanes with something in flight, waiting or held.
#[derive(Debug, Default)]
pub(super) struct Lanes {
    lanes: HashMap<u64, Lane, rustc_hash::FxBuildHasher>,
}

#[derive(Debug, Default)]
struct Lane {
    /// First attempts submitted and not yet decided.
    first: BTreeSet<u64>,
    /// Resends submitted and not yet decided.
    resent: BTreeSet<u64>,
    /// Failed retryably, waiting to be resent.
    failed: BTreeSet<u64>,
    /// Never submitted, held while the lane recovers, in send order.
    held: VecDeque<u64>,
}

impl Lane {
    fn recovering(&self) -> bool {
        !self.failed.is_empty() || !self.resent.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.first.is_empty() && !self.recovering() && self.held.is_empty()
    }
}

impl Lanes {
    /// Whether `ticket`, never submitted, may be submitted now; if not, it is held until its
    /// lane has recovered (and comes back from [`decided`](Self::decided) or
    /// [`settled`](Self::settled)).
    pub(super) fn admit(&mut self, lane: u64, ticket: u64) -> bool {
        let l = self.lanes.entry(lane).or_default();
        if l.recovering() {
            l.held.push_back(ticket);
            return false;
        }
        l.first.insert(ticket);
        true
    }

    /// Whether `ticket`, which failed, may be resent now.
    pub(super) fn may_resend(&self, lane: u64, ticket: u64) -> bool {
        self.lanes.get(&lane).is_some_and(|l| {
            l.failed.first() == Some(&ticket) && l.first.first().is_none_or(|&u| u > ticket)
        })
    }

    /// `ticket`, which failed, is being resent.
    pub(super) fn resending(&mut self, lane: u64, ticket: u64) {
        if let Some(l) = self.lanes.get_mut(&lane) {
            l.failed.remove(&ticket);
            l.resent.insert(ticket);
        }
    }

    /// `ticket`'s attempt failed retryably: it waits for its resend.
    pub(super) fn failed(&mut self, lane: u64, ticket: u64) {
        let l = self.lanes.entry(lane).or_default();
        l.first.remove(&ticket);
        l.resent.remove(&ticket);
        l.failed.insert(ticket);
    }

    /// `ticket` is settled (confirmed or handed back). Returns the held messages its lane now
    /// releases, in send order (empty unless the lane just recovered).
    pub(super) fn settled(&mut self, lane: u64, ticket: u64) -> VecDeque<u64> {
        let Some(l) = self.lanes.get_mut(&lane) else {
            return VecDeque::new();
        };
        l.first.remove(&ticket);
        l.resent.remove(&ticket);
        l.failed.remove(&ticket);
        if let Some(at) = l.held.iter().position(|&t| t == ticket) {
            l.held.remove(at);
        }
        let released = if l.recovering() {
            VecDeque::new()
        } else {
            std::mem::take(&mut l.held)
        };
        if l.is_empty() {
            self.lanes.remove(&lane);
        }
        released
    }

    /// Whether any lane holds or waits to resend something.
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.lanes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_without_failures_admits_everything() {
        let mut lanes = Lanes::default();
        assert!(lanes.admit(1, 0));
        assert!(lanes.admit(1, 1));
        assert!(lanes.settled(1, 1).is_empty());
        assert!(lanes.settled(1, 0).is_empty());
        assert!(lanes.idle());
    }

    #[test]
    fn a_failure_holds_new_messages_until_the_resends_are_confirmed() {
        let mut lanes = Lanes::default();
        for t in 0..3 {
            assert!(lanes.admit(7, t));
        }
        lanes.failed(7, 1);
        assert!(!lanes.admit(7, 3), "held while the lane recovers");
        assert!(lanes.admit(8, 4), "other lanes go on");
        // 0 is earlier and undecided: it may still fail and must be resent first.
        assert!(!lanes.may_resend(7, 1));
        assert!(lanes.settled(7, 0).is_empty());
        assert!(lanes.may_resend(7, 1));
        lanes.resending(7, 1);
        // 2 was submitted before the failure and fails too: it goes after 1's resend.
        lanes.failed(7, 2);
        assert!(
            lanes.may_resend(7, 2),
            "an earlier resend in flight keeps its place"
        );
        lanes.resending(7, 2);
        assert!(lanes.settled(7, 1).is_empty(), "2's resend is undecided");
        assert_eq!(lanes.settled(7, 2), VecDeque::from([3]));
        assert!(lanes.admit(7, 3));
        assert!(lanes.settled(7, 3).is_empty());
        assert!(lanes.settled(8, 4).is_empty());
        assert!(lanes.idle());
    }

    #[test]
    fn resends_go_in_ticket_order() {
        let mut lanes = Lanes::default();
        for t in 0..3 {
            assert!(lanes.admit(0, t));
        }
        lanes.failed(0, 2);
        lanes.failed(0, 0);
        assert!(!lanes.may_resend(0, 2), "0 failed too and goes first");
        assert!(lanes.may_resend(0, 0));
        lanes.resending(0, 0);
        assert!(!lanes.may_resend(0, 2), "1's first attempt is undecided");
        lanes.failed(0, 1);
        assert!(lanes.may_resend(0, 1));
    }

    #[test]
    fn a_held_message_handed_back_leaves_the_lane() {
        let mut lanes = Lanes::default();
        assert!(lanes.admit(0, 0));
        lanes.failed(0, 0);
        assert!(!lanes.admit(0, 1));
        assert!(lanes.settled(0, 1).is_empty(), "deadline passed while held");
        assert!(lanes.settled(0, 0).is_empty());
        assert!(lanes.idle());
    }
}
