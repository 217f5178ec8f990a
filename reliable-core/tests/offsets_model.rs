//! The offset tracker against a model: the plain `BTreeSet` tracker it replaced. Random
//! sequences of tracks (increasing with gaps across word boundaries, repeats, redeliveries
//! below, jumps past the bitset window's cap, offsets near `i64::MAX` and `i64::MIN`),
//! completions (valid, twice, never tracked, after a revoke), batch calls, commits and revokes
//! must give the same answers from both.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::Index;
use reliable_core::offsets::{OffsetError, OffsetTracker};
use reliable_core::TopicPartition;

/// The tracker as it was: a `BTreeSet` of in-flight offsets per partition.
#[derive(Default)]
struct Model {
    parts: BTreeMap<TopicPartition, ModelPartition>,
}

#[derive(Default)]
struct ModelPartition {
    in_flight: BTreeSet<i64>,
    next: Option<i64>,
    committed: Option<i64>,
}

impl ModelPartition {
    fn committable(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

impl Model {
    fn track(&mut self, tp: &TopicPartition, offset: i64) {
        let st = self.parts.entry(tp.clone()).or_default();
        if st.next.is_some_and(|n| offset < n) {
            return;
        }
        st.in_flight.insert(offset);
        st.next = Some(offset.saturating_add(1));
    }

    fn complete(&mut self, tp: &TopicPartition, offset: i64) -> Result<(), OffsetError> {
        if self
            .parts
            .get_mut(tp)
            .is_some_and(|st| st.in_flight.remove(&offset))
        {
            Ok(())
        } else {
            Err(OffsetError::NotInFlight {
                partition: tp.clone(),
                offset,
            })
        }
    }

    fn committable(&self, tp: &TopicPartition) -> Option<i64> {
        self.parts.get(tp).and_then(ModelPartition::committable)
    }

    fn in_flight(&self, tp: &TopicPartition) -> Vec<i64> {
        self.parts
            .get(tp)
            .map(|st| st.in_flight.iter().copied().collect())
            .unwrap_or_default()
    }

    fn pending_commits(&self) -> Vec<(TopicPartition, i64)> {
        self.parts
            .iter()
            .filter_map(|(tp, st)| {
                let c = st.committable()?;
                (st.committed != Some(c)).then(|| (tp.clone(), c))
            })
            .collect()
    }

    fn mark_committed(&mut self, tp: &TopicPartition, position: i64) {
        if let Some(st) = self.parts.get_mut(tp) {
            st.committed = Some(position);
        }
    }

    fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        self.parts.remove(tp).and_then(|st| st.committable())
    }
}

/// How far the next tracked offset is from the last one tracked.
fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => Just(1i64),
        1 => Just(0i64),
        1 => -5i64..0,
        3 => 2i64..140,
        1 => (1i64 << 20) - 70..(1i64 << 20) + 70,
        1 => (1i64 << 22)..(1i64 << 23),
    ]
}

/// Where a partition's offsets start.
fn start() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(62i64),
        Just(-5i64),
        Just(i64::MAX - 150),
        Just(i64::MIN + 3),
        Just(1i64 << 40),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Track(usize, i64),
    TrackMany(usize, Vec<i64>),
    /// Completes an offset tracked at some point (maybe finished or revoked since), or when
    /// the flag is set an offset near the last tracked one (maybe never tracked).
    Complete(usize, Index, bool, i64),
    CompleteMany(usize, Vec<(Index, bool, i64)>),
    Commit(usize),
    Revoke(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let part = 0usize..2;
    let pick = (any::<Index>(), prop::bool::weighted(0.2), -70i64..70);
    prop_oneof![
        8 => (part.clone(), step()).prop_map(|(p, s)| Op::Track(p, s)),
        2 => (part.clone(), prop::collection::vec(step(), 0..20))
            .prop_map(|(p, s)| Op::TrackMany(p, s)),
        8 => (part.clone(), pick.clone()).prop_map(|(p, (i, near, d))| Op::Complete(p, i, near, d)),
        2 => (part.clone(), prop::collection::vec(pick, 0..20)).prop_map(|(p, v)| Op::CompleteMany(p, v)),
        1 => part.clone().prop_map(Op::Commit),
        1 => part.prop_map(Op::Revoke),
    ]
}

/// Per partition: the last offset passed to `track` and every offset ever tracked.
struct Cursor {
    last: i64,
    history: Vec<i64>,
}

impl Cursor {
    fn advance(&mut self, step: i64) -> i64 {
        self.last = self.last.saturating_add(step);
        self.history.push(self.last);
        self.last
    }

    fn pick(&self, index: &Index, near: bool, delta: i64) -> i64 {
        if near || self.history.is_empty() {
            self.last.saturating_add(delta)
        } else {
            self.history[index.index(self.history.len())]
        }
    }
}

/// Runs every completion (no short circuit) and keeps the first error, as `complete_many` does.
fn first_error(results: impl Iterator<Item = Result<(), OffsetError>>) -> Result<(), OffsetError> {
    let results: Vec<_> = results.collect();
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

proptest! {
    #[test]
    fn the_tracker_answers_like_the_btreeset_model(
        starts in (start(), start()),
        ops in prop::collection::vec(op(), 1..250),
    ) {
        let tracker = OffsetTracker::new();
        let mut model = Model::default();
        let tps = [TopicPartition::new("t", 0), TopicPartition::new("t", 1)];
        let mut cursors = [starts.0, starts.1].map(|s| Cursor { last: s, history: Vec::new() });
        for op in ops {
            match op {
                Op::Track(p, s) => {
                    let offset = cursors[p].advance(s);
                    tracker.track(&tps[p], offset);
                    model.track(&tps[p], offset);
                }
                Op::TrackMany(p, steps) => {
                    let offsets: Vec<i64> = steps.iter().map(|&s| cursors[p].advance(s)).collect();
                    tracker.track_many(&tps[p], &offsets);
                    for &o in &offsets {
                        model.track(&tps[p], o);
                    }
                }
                Op::Complete(p, i, near, d) => {
                    let offset = cursors[p].pick(&i, near, d);
                    prop_assert_eq!(tracker.complete(&tps[p], offset), model.complete(&tps[p], offset));
                }
                Op::CompleteMany(p, picks) => {
                    let offsets: Vec<i64> = picks.iter().map(|(i, n, d)| cursors[p].pick(i, *n, *d)).collect();
                    let expected = first_error(offsets.iter().map(|&o| model.complete(&tps[p], o)));
                    prop_assert_eq!(tracker.complete_many(&tps[p], &offsets), expected);
                }
                Op::Commit(p) => {
                    if let Some(c) = model.committable(&tps[p]) {
                        tracker.mark_committed(&tps[p], c);
                        model.mark_committed(&tps[p], c);
                    }
                }
                Op::Revoke(p) => {
                    prop_assert_eq!(tracker.revoke(&tps[p]), model.revoke(&tps[p]));
                }
            }
            prop_assert_eq!(tracker.pending_commits(), model.pending_commits());
            let view = tracker.view();
            for (p, tp) in tps.iter().enumerate() {
                prop_assert_eq!(tracker.committable(tp), model.committable(tp));
                let in_flight = model.in_flight(tp);
                prop_assert_eq!(&tracker.in_flight(tp), &in_flight);
                prop_assert_eq!(view.committed(tp), model.parts.get(tp).and_then(|st| st.committed));
                let last = cursors[p].last;
                for o in cursors[p].history.iter().rev().take(8).copied().chain([last.saturating_add(1), last.saturating_sub(64)]) {
                    prop_assert_eq!(tracker.is_in_flight(tp, o), in_flight.contains(&o), "offset {}", o);
                }
            }
            let partitions = view.partitions();
            prop_assert_eq!(partitions.len(), model.parts.len());
            for (seen, (tp, st)) in partitions.iter().zip(&model.parts) {
                prop_assert_eq!(&seen.partition, tp);
                prop_assert_eq!(seen.committable, st.committable());
                prop_assert_eq!(seen.unfinished, st.in_flight.len());
                prop_assert_eq!(seen.committed, st.committed);
            }
        }
    }

    #[test]
    fn complete_many_is_repeated_complete(
        tracked in prop::collection::btree_set(0i64..300, 0..120),
        batches in prop::collection::vec(prop::collection::vec(-5i64..310, 0..40), 1..8),
    ) {
        let one = OffsetTracker::new();
        let many = OffsetTracker::new();
        let tp = TopicPartition::new("t", 0);
        let tracked: Vec<i64> = tracked.into_iter().collect();
        for &o in &tracked {
            one.track(&tp, o);
        }
        many.track_many(&tp, &tracked);
        for batch in batches {
            let expected = first_error(batch.iter().map(|&o| one.complete(&tp, o)));
            prop_assert_eq!(many.complete_many(&tp, &batch), expected);
            prop_assert_eq!(many.in_flight(&tp), one.in_flight(&tp));
            prop_assert_eq!(many.committable(&tp), one.committable(&tp));
        }
    }
}
