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
    /// One delivery per partition at a time: a record is handed out only after every earlier
    /// record of its partition was settled (acked, rejected or nacked). Partitions are processed
    /// concurrently.
    PerPartition,
    /// One delivery per (partition, record key) at a time: records of one key are handled in log
    /// order, different keys of a partition concurrently. Records without a key are ordered per
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

/// Records kept in memory, and which keys are busy in the ordered modes. The consumer's
/// `gate` mutex around it also orders a requeue against a revoke: a record is handed back
/// only while its offset is still in flight, and a revoke drops every record of its
/// partitions, so nothing of a revoked partition is handed out again.
#[derive(Default)]
pub(super) struct Gate {
    /// Ordered modes: keys with a delivery handed out and unsettled, with that delivery's
    /// ticket.
    busy: HashMap<GateKey, u64>,
    /// Ordered modes: records waiting for their key, in log order.
    waiting: HashMap<GateKey, VecDeque<Held>>,
    /// Ordered modes: free keys with a waiting record, to hand out first.
    ready: VecDeque<GateKey>,
    /// Records in `waiting`.
    pub(super) held: usize,
    /// The last ticket issued.
    ticket: u64,
    /// Unordered mode: records handed back by `nack(true)`, to hand out again before any new
    /// record.
    requeued: VecDeque<(TopicPartition, Held)>,
}

impl Gate {
    /// Marks `key` busy; returns the ticket that frees it.
    pub(super) fn issue(&mut self, key: GateKey) -> u64 {
        self.ticket = self.ticket.wrapping_add(1);
        self.busy.insert(key, self.ticket);
        self.ticket
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

    /// Ordered `nack(true)`: puts `held` back at the head of `key`'s queue and frees the key,
    /// if `ticket` still holds it; false when the partition was revoked meanwhile.
    pub(super) fn requeue_head(&mut self, key: &GateKey, ticket: u64, held: Held) -> bool {
        if self.busy.get(key) != Some(&ticket) {
            return false;
        }
        self.waiting
            .entry(key.clone())
            .or_default()
            .push_front(held);
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

    /// Frees `key` if `ticket` still holds it; true when a waiting record became ready.
    pub(super) fn release(&mut self, key: &GateKey, ticket: u64) -> bool {
        if self.busy.get(key) != Some(&ticket) {
            return false;
        }
        self.busy.remove(key);
        if self.waiting.get(key).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(key.clone());
            return true;
        }
        false
    }

    /// The next waiting record whose key is free, marking the key busy.
    pub(super) fn take_ready(&mut self) -> Option<(GateKey, Held, u64)> {
        while let Some(key) = self.ready.pop_front() {
            if self.busy.contains_key(&key) {
                continue;
            }
            let Some(queue) = self.waiting.get_mut(&key) else {
                continue;
            };
            let Some(held) = queue.pop_front() else {
                self.waiting.remove(&key);
                continue;
            };
            if queue.is_empty() {
                self.waiting.remove(&key);
            }
            self.held = self.held.saturating_sub(1);
            let ticket = self.issue(key.clone());
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
