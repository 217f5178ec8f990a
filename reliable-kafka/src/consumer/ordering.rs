//! Which deliveries may overlap ([`Ordering`]), and the [`Gate`]: the records the consumer
//! holds in memory instead of handing them out now — held back because their partition (or
//! key) is busy in an ordered mode, or handed back by `nack(true)` to be handed out again.

use std::collections::{HashMap, HashSet, VecDeque};

use reliable_core::{Message, TopicPartition};

/// Which deliveries of one consumer may be processed at the same time; see the
/// [module docs](super#ordering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ordering {
    /// The records of a partition are handled one at a time, in log order. `next` hands a
    /// record out only after every earlier record of its partition was settled (acked,
    /// rejected or nacked); `next_batch` hands a partition's records out together as one
    /// [sequence](reliable_core::Delivery::sequence), which the pipeline handles one record
    /// at a time, and no later record of the partition until that run is settled. Partitions
    /// are processed concurrently.
    PerPartition,
    /// The same per (partition, record key): records of one key are handled in log order,
    /// different keys of a partition concurrently. Records without a key are ordered per
    /// partition.
    PerKey,
    /// No ordering: records are handed out as they arrive, several of one partition may be in
    /// flight and finish out of order. The offset tracker still never commits past unfinished
    /// work.
    Unordered,
}

/// What an ordered mode serialises on: a partition, or a partition and a record key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct GateKey {
    pub(super) partition: TopicPartition,
    pub(super) key: Option<Box<[u8]>>,
}

/// A record kept in memory until it is handed out.
pub(super) struct Held {
    pub(super) offset: i64,
    pub(super) message: Message,
    pub(super) redelivered: bool,
}

/// A run: the records of one key handed out together (in one batch), as one sequence. The
/// key stays busy until every record of the run is settled.
struct Run {
    /// The run's ticket, also the sequence its deliveries carry.
    ticket: u64,
    /// The hand-out call that started the run; only that call adds records to it.
    epoch: u64,
    /// Records of the run not settled yet.
    outstanding: u32,
    /// Records of the run handed back by `nack(true)` so far: the next one goes behind them.
    requeued: usize,
}

/// Records kept in memory, and which keys are busy in the ordered modes. The consumer's
/// `gate` mutex around it also orders a requeue against a revoke: a record is handed back
/// only while its offset is still in flight, and a revoke drops every record of its
/// partitions, so nothing of a revoked partition is handed out again.
#[derive(Default)]
pub(super) struct Gate {
    /// Ordered modes: keys with a run handed out and not settled yet.
    busy: HashMap<GateKey, Run>,
    /// Ordered modes: records waiting for their key, in log order.
    waiting: HashMap<GateKey, VecDeque<Held>>,
    /// Ordered modes: keys with a waiting record that may be free, to hand out first.
    ready: VecDeque<GateKey>,
    /// Records in `waiting`.
    pub(super) held: usize,
    /// The last ticket issued.
    ticket: u64,
    /// The current hand-out call.
    epoch: u64,
    /// Unordered mode: records handed back by `nack(true)`, to hand out again before any new
    /// record.
    requeued: VecDeque<(TopicPartition, Held)>,
}

impl Gate {
    /// Starts a hand-out call (one `next` or `next_batch`): runs started by earlier calls
    /// take no more records.
    pub(super) fn begin(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// Marks `key` busy with a new run of one record; returns the run's ticket.
    pub(super) fn issue(&mut self, key: GateKey) -> u64 {
        self.ticket = self.ticket.wrapping_add(1);
        self.busy.insert(
            key,
            Run {
                ticket: self.ticket,
                epoch: self.epoch,
                outstanding: 1,
                requeued: 0,
            },
        );
        self.ticket
    }

    /// Adds a record for `key` to the key's run, if this call started that run and no record
    /// of the key is waiting (those go first); returns the run's ticket.
    pub(super) fn join(&mut self, key: &GateKey) -> Option<u64> {
        if self.waiting.contains_key(key) {
            return None;
        }
        let run = self.busy.get_mut(key)?;
        if run.epoch != self.epoch {
            return None;
        }
        run.outstanding += 1;
        Some(run.ticket)
    }

    /// Whether a record for `key` must wait (its key is busy or has records waiting).
    pub(super) fn must_wait(&self, key: &GateKey) -> bool {
        self.busy.contains_key(key) || self.waiting.contains_key(key)
    }

    /// Ordered modes: queues `held` behind the records already waiting for `key`.
    pub(super) fn hold(&mut self, key: GateKey, held: Held) {
        self.waiting.entry(key).or_default().push_back(held);
        self.held += 1;
    }

    /// Ordered `nack(true)`: puts `held` back at the head of `key`'s queue, behind the records
    /// of its run handed back before it (a run's requeues, made in run order, come back in run
    /// order), and settles it in its run, if `ticket` still holds the key; false when the
    /// partition was revoked meanwhile.
    pub(super) fn requeue_head(&mut self, key: &GateKey, ticket: u64, held: Held) -> bool {
        let Some(run) = self.busy.get_mut(key).filter(|r| r.ticket == ticket) else {
            return false;
        };
        let at = run.requeued;
        run.requeued += 1;
        let queue = self.waiting.entry(key.clone()).or_default();
        queue.insert(at.min(queue.len()), held);
        self.held += 1;
        self.release(key, ticket);
        true
    }

    /// Unordered `nack(true)`: queues `held` to be handed out again.
    pub(super) fn requeue(&mut self, partition: TopicPartition, held: Held) {
        self.requeued.push_back((partition, held));
    }

    /// Unordered mode: the next record handed back by `nack(true)`.
    pub(super) fn take_requeued(&mut self) -> Option<(TopicPartition, Held)> {
        self.requeued.pop_front()
    }

    /// Settles one record of the run `ticket` of `key`; frees the key once its whole run is
    /// settled. True when a waiting record became ready.
    pub(super) fn release(&mut self, key: &GateKey, ticket: u64) -> bool {
        let Some(run) = self.busy.get_mut(key).filter(|r| r.ticket == ticket) else {
            return false;
        };
        run.outstanding = run.outstanding.saturating_sub(1);
        if run.outstanding > 0 {
            return false;
        }
        self.busy.remove(key);
        if self.waiting.get(key).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(key.clone());
            return true;
        }
        false
    }

    /// The next waiting record whose key is free, or busy with a run this call started (the
    /// record joins it); keys take turns, one record each.
    pub(super) fn take_ready(&mut self) -> Option<(GateKey, Held, u64)> {
        while let Some(key) = self.ready.pop_front() {
            let joins = match self.busy.get(&key) {
                None => false,
                Some(run) if run.epoch == self.epoch => true,
                // Busy with an earlier call's run: queued again when that run is settled.
                Some(_) => continue,
            };
            let Some(queue) = self.waiting.get_mut(&key) else {
                continue;
            };
            let Some(held) = queue.pop_front() else {
                self.waiting.remove(&key);
                continue;
            };
            let more = !queue.is_empty();
            if !more {
                self.waiting.remove(&key);
            }
            self.held = self.held.saturating_sub(1);
            let ticket = match self.busy.get_mut(&key).filter(|_| joins) {
                Some(run) => {
                    run.outstanding += 1;
                    run.ticket
                }
                None => self.issue(key.clone()),
            };
            if more {
                self.ready.push_back(key.clone());
            }
            return Some((key, held, ticket));
        }
        None
    }

    /// Offsets of `tp` kept in memory (tracked as unfinished, not with a handler now).
    pub(super) fn kept_offsets(&self, tp: &TopicPartition) -> HashSet<i64> {
        let waiting = self
            .waiting
            .iter()
            .filter(|(k, _)| &k.partition == tp)
            .flat_map(|(_, q)| q.iter().map(|h| h.offset));
        let requeued = self
            .requeued
            .iter()
            .filter(|(p, _)| p == tp)
            .map(|(_, h)| h.offset);
        waiting.chain(requeued).collect()
    }

    /// Drops everything about a revoked partition.
    pub(super) fn forget(&mut self, tp: &TopicPartition) {
        self.busy.retain(|k, _| &k.partition != tp);
        let mut dropped = 0;
        self.waiting.retain(|k, q| {
            let keep = &k.partition != tp;
            if !keep {
                dropped += q.len();
            }
            keep
        });
        self.held = self.held.saturating_sub(dropped);
        self.ready.retain(|k| &k.partition != tp);
        self.requeued.retain(|(p, _)| p != tp);
    }
}
