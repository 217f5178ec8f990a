//! Offset tracking for offset-based transports (Kafka): out-of-order completion in, the
//! contiguous committable watermark per partition out (loss-matrix row L5; invariant 5).
//!
//! A consumer with several handlers in flight finishes offsets out of order. Committing the
//! highest finished offset would skip the unfinished ones below it after a crash. The tracker
//! records every offset when it is handed out ([`track`](OffsetTracker::track)) and when it is
//! finished ([`complete`](OffsetTracker::complete)); [`committable`](OffsetTracker::committable)
//! is the Kafka-style commit position (the next offset to read): every tracked offset below it is
//! finished, and it never passes an unfinished one. Gaps between offsets (compaction,
//! transaction markers) are fine: only tracked offsets count.
//!
//! ```
//! use reliable_core::offsets::OffsetTracker;
//! use reliable_core::TopicPartition;
//!
//! let tracker = OffsetTracker::new();
//! let tp = TopicPartition::new("orders", 0);
//! for offset in [10, 11, 12] {
//!     tracker.track(&tp, offset);
//! }
//! tracker.complete(&tp, 12)?;
//! assert_eq!(tracker.committable(&tp), Some(10)); // 10 and 11 are unfinished
//! tracker.complete(&tp, 10)?;
//! assert_eq!(tracker.committable(&tp), Some(11));
//! tracker.complete(&tp, 11)?;
//! assert_eq!(tracker.committable(&tp), Some(13));
//! # Ok::<(), reliable_core::offsets::OffsetError>(())
//! ```
//!
//! The tracker's owner (a consumer) is the only one that may change it; everyone else gets an
//! [`OffsetsView`], which reads the same state and cannot finish, commit or revoke anything.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::transport::TopicPartition;

/// Tracks in-flight offsets per partition. Thread safe: share it (in an `Arc`) between the
/// ackers that complete offsets and the task that commits.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<TopicPartition, PartitionState>>,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Tracked and not yet finished.
    in_flight: BTreeSet<i64>,
    /// One past the highest tracked offset.
    next: Option<i64>,
    /// The last position reported as committed.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

/// A misuse of the tracker; each says what the caller did wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffsetError {
    /// The offset was not tracked (or was already completed): complete only offsets you tracked,
    /// once each.
    #[error("offset {offset} of {partition} is not in flight; complete each tracked offset once")]
    NotInFlight {
        /// The partition.
        partition: TopicPartition,
        /// The offset.
        offset: i64,
    },
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, PartitionState>> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `offset` was handed out for processing. Call in the order the consumer
    /// received the offsets (increasing per partition); an offset at or below one already
    /// tracked is ignored (a redelivery after a seek is tracked once).
    pub fn track(&self, partition: &TopicPartition, offset: i64) {
        let mut parts = self.lock();
        let st = parts.entry(partition.clone()).or_default();
        if st.next.is_some_and(|n| offset < n) {
            return;
        }
        st.in_flight.insert(offset);
        st.next = Some(offset.saturating_add(1));
    }

    /// Whether `offset` of `partition` is tracked and not yet finished.
    pub fn is_in_flight(&self, partition: &TopicPartition, offset: i64) -> bool {
        self.lock()
            .get(partition)
            .is_some_and(|st| st.in_flight.contains(&offset))
    }

    /// Records that processing of `offset` is final (handled, or dead-lettered and confirmed).
    pub fn complete(&self, partition: &TopicPartition, offset: i64) -> Result<(), OffsetError> {
        let mut parts = self.lock();
        let removed = parts
            .get_mut(partition)
            .is_some_and(|st| st.in_flight.remove(&offset));
        if removed {
            Ok(())
        } else {
            Err(OffsetError::NotInFlight {
                partition: partition.clone(),
                offset,
            })
        }
    }

    /// The commit position for `partition`: every tracked offset below it is finished. `None`
    /// when nothing was tracked there.
    pub fn committable(&self, partition: &TopicPartition) -> Option<i64> {
        self.lock()
            .get(partition)
            .and_then(PartitionState::committable)
    }

    /// The offsets of `partition` still in flight, lowest first.
    pub fn in_flight(&self, partition: &TopicPartition) -> Vec<i64> {
        self.lock()
            .get(partition)
            .map(|st| st.in_flight.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The positions that moved since the last [`mark_committed`](Self::mark_committed), to
    /// commit now.
    pub fn pending_commits(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(tp, st)| {
                let c = st.committable()?;
                (st.committed != Some(c)).then(|| (tp.clone(), c))
            })
            .collect();
        out.sort();
        out
    }

    /// Records that `position` was committed for `partition`.
    pub fn mark_committed(&self, partition: &TopicPartition, position: i64) {
        if let Some(st) = self.lock().get_mut(partition) {
            st.committed = Some(position);
        }
    }

    /// A read-only view of this tracker, to hand to callers that may watch the offsets but
    /// must not change them.
    pub fn view(&self) -> OffsetsView<'_> {
        OffsetsView { tracker: self }
    }

    /// Forgets a revoked partition and returns its final commit position (commit it in the
    /// rebalance callback before the partition moves). Offsets still in flight there keep the
    /// position below them; their later completion is reported as
    /// [`OffsetError::NotInFlight`].
    pub fn revoke(&self, partition: &TopicPartition) -> Option<i64> {
        self.lock()
            .remove(partition)
            .and_then(|st| st.committable())
    }
}

/// A read-only view of an [`OffsetTracker`]: each partition's commit position, its unfinished
/// offsets and its last committed position. It reads the tracker live (every call sees the
/// current state) and has no method that changes it, so a holder cannot move a commit past
/// unfinished work (invariant 5):
///
/// ```compile_fail
/// use reliable_core::offsets::OffsetTracker;
/// use reliable_core::TopicPartition;
///
/// let tracker = OffsetTracker::new();
/// let tp = TopicPartition::new("orders", 0);
/// tracker.track(&tp, 0);
/// tracker.view().complete(&tp, 0); // error: `OffsetsView` cannot finish an offset
/// ```
#[derive(Clone, Copy, Debug)]
pub struct OffsetsView<'a> {
    tracker: &'a OffsetTracker,
}

/// One partition's offsets at one moment, from [`OffsetsView::partitions`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionOffsets {
    /// The partition.
    pub partition: TopicPartition,
    /// The position a commit would store now (every tracked offset below it is finished);
    /// `None` when nothing was tracked there.
    pub committable: Option<i64>,
    /// How many tracked offsets are not finished yet.
    pub unfinished: usize,
    /// The last position reported committed; `None` before the first commit.
    pub committed: Option<i64>,
}

impl OffsetsView<'_> {
    /// The position a commit of `partition` would store now; `None` when nothing was tracked
    /// there.
    pub fn committable(&self, partition: &TopicPartition) -> Option<i64> {
        self.tracker.committable(partition)
    }

    /// The unfinished offsets of `partition`, lowest first.
    pub fn unfinished(&self, partition: &TopicPartition) -> Vec<i64> {
        self.tracker.in_flight(partition)
    }

    /// The last position reported committed for `partition`; `None` before its first commit.
    pub fn committed(&self, partition: &TopicPartition) -> Option<i64> {
        self.tracker
            .lock()
            .get(partition)
            .and_then(|st| st.committed)
    }

    /// Every tracked partition, sorted by partition.
    pub fn partitions(&self) -> Vec<PartitionOffsets> {
        let mut out: Vec<PartitionOffsets> = self
            .tracker
            .lock()
            .iter()
            .map(|(tp, st)| PartitionOffsets {
                partition: tp.clone(),
                committable: st.committable(),
                unfinished: st.in_flight.len(),
                committed: st.committed,
            })
            .collect();
        out.sort_by(|a, b| a.partition.cmp(&b.partition));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_skipped_and_double_complete_is_an_error() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 1);
        assert_eq!(t.committable(&tp), None);
        t.track(&tp, 5);
        t.track(&tp, 9);
        assert_eq!(t.committable(&tp), Some(5));
        assert_eq!(t.complete(&tp, 5), Ok(()));
        assert_eq!(t.committable(&tp), Some(9));
        assert!(t.complete(&tp, 5).is_err());
        assert_eq!(t.complete(&tp, 9), Ok(()));
        assert_eq!(t.committable(&tp), Some(10));
    }

    #[test]
    fn pending_commits_report_only_moves() {
        let t = OffsetTracker::new();
        let a = TopicPartition::new("t", 0);
        t.track(&a, 0);
        assert_eq!(t.pending_commits(), vec![(a.clone(), 0)]);
        t.mark_committed(&a, 0);
        assert!(t.pending_commits().is_empty());
        assert_eq!(t.complete(&a, 0), Ok(()));
        assert_eq!(t.pending_commits(), vec![(a.clone(), 1)]);
        assert_eq!(t.revoke(&a), Some(1));
        assert!(t.pending_commits().is_empty());
    }

    #[test]
    fn redelivered_offsets_are_not_tracked_twice() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        t.track(&tp, 0);
        t.track(&tp, 1);
        t.track(&tp, 0);
        assert_eq!(t.in_flight(&tp), vec![0, 1]);
    }
}
