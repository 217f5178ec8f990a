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
//!
//! # Cost
//!
//! A consumer calls [`track`](OffsetTracker::track) once per record received and
//! [`complete`](OffsetTracker::complete) once per record settled, so both are cheap: one lock,
//! one hash of the partition, and a bit set or cleared in a window of 64-bit words that starts
//! at the oldest unfinished offset. Finding the commit position is one `trailing_zeros`.
//! [`track_many`](OffsetTracker::track_many) and [`complete_many`](OffsetTracker::complete_many)
//! take the lock and find the partition once for a whole batch.
//!
//! Memory per partition is one bit per offset from the oldest unfinished one to the newest
//! tracked one (the span; `max_held` bounds how many records are unfinished, not how far apart
//! they are). A span wider than 2^20 offsets (128 KiB) switches that partition to an ordered
//! set of its unfinished offsets, whose size follows their count however far apart they are,
//! and back to the window once the oldest ones finish and the span is a quarter of that.

mod pending;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rustc_hash::FxBuildHasher;

use crate::transport::TopicPartition;
use pending::Pending;

/// The tracker's state: a fast hasher, since the partition is hashed once per record (the keys
/// come from the consumer's assignment, not from untrusted input).
type Partitions = HashMap<TopicPartition, PartitionState, FxBuildHasher>;

/// Tracks in-flight offsets per partition. Thread safe: share it (in an `Arc`) between the
/// ackers that complete offsets and the task that commits.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<Partitions>,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Tracked and not yet finished.
    in_flight: Pending,
    /// One past the highest tracked offset.
    next: Option<i64>,
    /// The last position reported as committed.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.in_flight.first().or(self.next)
    }

    /// Tracks `offset` unless it is below one tracked already (see [`OffsetTracker::track`]).
    fn track(&mut self, offset: i64) {
        if self.next.is_some_and(|n| offset < n) {
            return;
        }
        self.in_flight.insert(offset);
        self.next = Some(offset.saturating_add(1));
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

    fn lock(&self) -> MutexGuard<'_, Partitions> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `offset` was handed out for processing. Call in the order the consumer
    /// received the offsets (increasing per partition); an offset at or below one already
    /// tracked is ignored (a redelivery after a seek is tracked once).
    pub fn track(&self, partition: &TopicPartition, offset: i64) {
        self.track_many(partition, &[offset]);
    }

    /// Records that each of `offsets` was handed out, in order, as [`track`](Self::track) does
    /// one by one (each offset at or below one already tracked is ignored), under one lock: for
    /// a batch of records polled from one partition.
    ///
    /// ```
    /// use reliable_core::offsets::OffsetTracker;
    /// use reliable_core::TopicPartition;
    ///
    /// let tracker = OffsetTracker::new();
    /// let tp = TopicPartition::new("orders", 0);
    /// tracker.track_many(&tp, &[3, 4, 7, 4]); // 5 and 6 are a gap; the second 4 is ignored
    /// assert_eq!(tracker.in_flight(&tp), vec![3, 4, 7]);
    /// ```
    pub fn track_many(&self, partition: &TopicPartition, offsets: &[i64]) {
        if offsets.is_empty() {
            return;
        }
        let mut parts = self.lock();
        // Look the partition up without cloning its key; clone only to add it.
        let st = match parts.get_mut(partition) {
            Some(st) => st,
            None => parts.entry(partition.clone()).or_default(),
        };
        for &offset in offsets {
            st.track(offset);
        }
    }

    /// Whether `offset` of `partition` is tracked and not yet finished.
    pub fn is_in_flight(&self, partition: &TopicPartition, offset: i64) -> bool {
        self.lock()
            .get(partition)
            .is_some_and(|st| st.in_flight.contains(offset))
    }

    /// Records that processing of `offset` is final (handled, or dead-lettered and confirmed).
    pub fn complete(&self, partition: &TopicPartition, offset: i64) -> Result<(), OffsetError> {
        self.complete_many(partition, &[offset])
    }

    /// Records that processing of each of `offsets` is final, as [`complete`](Self::complete)
    /// does one by one, under one lock: for a batch settled at once. Every offset that is in
    /// flight is completed, in any order, even when others in the batch are not; the first
    /// offset that was not in flight (not tracked, completed before, or listed twice) is
    /// returned as [`OffsetError::NotInFlight`].
    ///
    /// ```
    /// use reliable_core::offsets::{OffsetError, OffsetTracker};
    /// use reliable_core::TopicPartition;
    ///
    /// let tracker = OffsetTracker::new();
    /// let tp = TopicPartition::new("orders", 0);
    /// tracker.track_many(&tp, &[10, 11, 12, 13]);
    /// tracker.complete_many(&tp, &[11, 10])?;
    /// assert_eq!(tracker.committable(&tp), Some(12));
    /// let err = tracker.complete_many(&tp, &[12, 10, 99]).unwrap_err();
    /// assert_eq!(err, OffsetError::NotInFlight { partition: tp.clone(), offset: 10 });
    /// assert_eq!(tracker.committable(&tp), Some(13)); // 12 was completed all the same
    /// # Ok::<(), OffsetError>(())
    /// ```
    pub fn complete_many(
        &self,
        partition: &TopicPartition,
        offsets: &[i64],
    ) -> Result<(), OffsetError> {
        let mut parts = self.lock();
        let mut st = parts.get_mut(partition);
        let mut first_missing = None;
        for &offset in offsets {
            let removed = st.as_mut().is_some_and(|st| st.in_flight.remove(offset));
            if !removed && first_missing.is_none() {
                first_missing = Some(offset);
            }
        }
        match first_missing {
            None => Ok(()),
            Some(offset) => Err(OffsetError::NotInFlight {
                partition: partition.clone(),
                offset,
            }),
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
            .map(|st| st.in_flight.to_vec())
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

    #[test]
    fn gaps_across_word_boundaries_never_hold_the_watermark() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        // 0..200 without the multiples of 7 and without 60..=70 (a word boundary inside).
        let tracked: Vec<i64> = (0..200)
            .filter(|o| o % 7 != 0 && !(60..=70).contains(o))
            .collect();
        t.track_many(&tp, &tracked);
        assert_eq!(t.in_flight(&tp), tracked);
        // Finish from the top down: the watermark stays at the lowest until it goes.
        for (i, &o) in tracked.iter().enumerate().rev() {
            assert_eq!(t.committable(&tp), Some(tracked[0]));
            t.complete(&tp, o).unwrap();
            assert_eq!(t.view().partitions()[0].unfinished, i);
        }
        assert_eq!(t.committable(&tp), Some(200));
        // Then bottom up, one gap word at a time.
        t.track_many(&tp, &[200, 330, 331, 520]);
        t.complete(&tp, 200).unwrap();
        assert_eq!(t.committable(&tp), Some(330));
        t.complete_many(&tp, &[331, 330]).unwrap();
        assert_eq!(t.committable(&tp), Some(520));
        assert!(!t.is_in_flight(&tp, 400));
        assert!(
            t.complete(&tp, 400).is_err(),
            "a gap offset was never tracked"
        );
    }

    #[test]
    fn the_top_offset_saturates() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        t.track_many(&tp, &[i64::MAX - 2, i64::MAX]);
        assert_eq!(t.committable(&tp), Some(i64::MAX - 2));
        t.complete(&tp, i64::MAX - 2).unwrap();
        assert_eq!(t.committable(&tp), Some(i64::MAX));
        t.complete(&tp, i64::MAX).unwrap();
        assert_eq!(t.committable(&tp), Some(i64::MAX));
        assert!(t.complete(&tp, i64::MAX).is_err());
    }

    #[test]
    fn one_stuck_offset_under_a_long_run_goes_sparse_and_back() {
        let t = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        t.track(&tp, 0);
        let run = 1i64 << 21; // twice the window cap
        for o in 1..run {
            t.track(&tp, o);
            t.complete(&tp, o).unwrap();
        }
        {
            let parts = t.lock();
            let st = &parts[&tp];
            assert!(st.in_flight.is_sparse());
            assert_eq!(st.in_flight.len(), 1);
        }
        assert_eq!(t.committable(&tp), Some(0));
        t.track(&tp, run);
        t.complete(&tp, 0).unwrap();
        assert_eq!(t.committable(&tp), Some(run));
        assert!(!t.lock()[&tp].in_flight.is_sparse());
        t.complete(&tp, run).unwrap();
        assert_eq!(t.committable(&tp), Some(run + 1));
    }
}
