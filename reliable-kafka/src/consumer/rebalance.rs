//! Partition revoke: wait for the revoked partitions' deliveries in flight, then commit what is
//! finished there, before librdkafka hands the partitions to another member.
//!
//! librdkafka runs the rebalance callback synchronously, on the thread that polls the
//! consumer: inside [`KafkaConsumer::next`](super::KafkaConsumer) (the `StreamConsumer`
//! serves rebalance events while it is polled for records), or in the consumer's drop, which
//! closes the group membership. The partitions move as soon as the callback returns, so the
//! wait has to happen inside it, synchronously. Where it runs decides how:
//!
//! * on a multi-thread tokio runtime's worker, inside [`tokio::task::block_in_place`]: the
//!   worker hands its other tasks (the handlers settling the deliveries, timers) to another
//!   thread for the duration, so the runtime keeps running;
//! * on a current-thread runtime, not at all: the handlers could only run on this very thread,
//!   so waiting would only stall them. What is finished is committed at once (the commit
//!   itself still blocks the thread for a round trip, and for the rest of a periodic commit
//!   already in flight, since commits are serialised) and the rest is redelivered to the new
//!   owner;
//! * on a thread outside any runtime (a plain thread dropping the consumer), plainly: blocking
//!   there stalls no runtime. (A blocking-pool thread counts as its runtime's; on a
//!   multi-thread runtime `block_in_place` runs the wait inline there.)

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use reliable_core::TopicPartition;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{lock, Shared};
use crate::config::redact;

/// How often the drain looks whether the revoked partitions' deliveries have settled.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// The rdkafka context: drains and commits on partition revoke; keeps the lag of the owned
/// partitions.
pub(super) struct ConsumerCtx {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for ConsumerCtx {
    /// librdkafka's statistics (every `statistics.interval.ms`, served while polled): the
    /// offsets behind the lag.
    fn stats(&self, statistics: Statistics) {
        self.shared.lag.report(&statistics);
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            self.shared.on_revoke(consumer, revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            self.shared.lag.assigned(
                assigned
                    .elements()
                    .iter()
                    .map(|e| TopicPartition::new(e.topic(), e.partition())),
            );
        }
    }
}

/// Where the revoke callback runs, which decides how it may wait.
enum Caller {
    /// A thread of a multi-thread runtime: a worker, its `block_on` thread or a blocking-pool
    /// thread.
    MultiThreadRuntime,
    /// The thread of a current-thread runtime.
    CurrentThreadRuntime,
    /// A thread outside any runtime: blocking is fine.
    Plain,
}

impl Caller {
    fn here() -> Self {
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::CurrentThread) => Self::CurrentThreadRuntime,
            Ok(_) => Self::MultiThreadRuntime,
            Err(_) => Self::Plain,
        }
    }
}

impl Shared {
    /// The revoke callback: drain (where that is allowed), then commit what is finished and
    /// forget the partitions.
    pub(super) fn on_revoke(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        revoked: &TopicPartitionList,
    ) {
        let parts: Vec<TopicPartition> = revoked
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        let names: Vec<String> = parts.iter().map(ToString::to_string).collect();
        let span = tracing::info_span!("reliable.kafka.revoke", partitions = ?names);
        let _entered = span.enter();
        if consumer.assignment_lost() {
            // The group already gave the partitions away: a commit now would be refused or
            // would race the new owner.
            for tp in &parts {
                self.forget(tp);
            }
            tracing::warn!(
                partitions = parts.len(),
                "partitions lost; unfinished work will be redelivered to their new owner"
            );
            return;
        }
        match Caller::here() {
            Caller::MultiThreadRuntime => tokio::task::block_in_place(|| {
                self.drain(&parts);
                self.commit_revoked(consumer, &parts);
            }),
            Caller::CurrentThreadRuntime => {
                tracing::debug!("current-thread runtime: committing without waiting for deliveries in flight (their handlers run on this thread)");
                self.commit_revoked(consumer, &parts);
            }
            Caller::Plain => {
                self.drain(&parts);
                self.commit_revoked(consumer, &parts);
            }
        }
    }

    /// Blocks until every delivery handed out from `parts` has settled, no delivery is left
    /// that could settle, or the drain timeout passed.
    fn drain(&self, parts: &[TopicPartition]) {
        let deadline = Instant::now() + self.revoke_drain_timeout;
        loop {
            let unsettled: usize = parts.iter().map(|tp| self.unsettled(tp).len()).sum();
            if unsettled == 0 {
                return;
            }
            if self.ackers.load(AtomicOrdering::Acquire) == 0 {
                tracing::debug!(
                    unsettled,
                    "the deliveries in flight were dropped unsettled; not waiting for them"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    unsettled,
                    timeout = ?self.revoke_drain_timeout,
                    "revoke drain timed out; unfinished deliveries will be redelivered to the partitions' new owner"
                );
                return;
            }
            std::thread::sleep(DRAIN_POLL);
        }
    }

    /// Forgets the revoked partitions and commits their finished watermark, under the commit
    /// lock (see the [`commit`](super::commit) module).
    fn commit_revoked(&self, consumer: &BaseConsumer<ConsumerCtx>, parts: &[TopicPartition]) {
        let _serial = lock(&self.commit_lock);
        let mut tpl = TopicPartitionList::new();
        for tp in parts {
            let unfinished = self.unsettled(tp);
            if let Some(position) = self.forget(tp) {
                if !unfinished.is_empty() {
                    tracing::warn!(partition = %tp, ?unfinished, position, "revoking with work in flight; it will be redelivered");
                }
                if let Err(e) =
                    tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(position))
                {
                    tracing::warn!(partition = %tp, position, error = %e, "cannot commit on revoke; the partition's new owner starts at its last committed position");
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => tracing::debug!(
                partitions = tpl.count(),
                "committed finished work of revoked partitions"
            ),
            Err(e) => {
                tracing::warn!(error = %redact(&self.config, e.to_string()), "commit on revoke failed; finished messages will be redelivered")
            }
        }
    }
}
