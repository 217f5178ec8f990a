//! Committing the finished watermark (loss-matrix row L5; invariant 5): on demand, periodically
//! and on close.
//!
//! Every commit — these and the one on partition revoke — takes the consumer's commit lock and
//! reads the positions to commit *inside* it. So commits reach the group one after the other,
//! each with the newest watermark at the time it is sent: a commit still running when the
//! consumer closes (or is dropped) cannot land after the final one with an older position.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use reliable_core::TopicPartition;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{lock, RawConsumer, Shared};
use crate::config::redact;

/// Why a commit did not happen. The positions stay uncommitted, and the next commit (periodic,
/// on demand, on revoke or on close) sends them again; if the consumer stops first, the
/// finished messages above the last committed position are delivered again (and deduplicated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CommitError {
    /// librdkafka refused a position while the request was built.
    #[error("cannot commit {partition} at offset {position}: {reason}; it is retried by the next commit")]
    Request {
        partition: TopicPartition,
        position: i64,
        reason: String,
    },
    /// The blocking commit task was cancelled or panicked.
    #[error(
        "the commit task did not finish ({reason}); the positions are retried by the next commit"
    )]
    Task { reason: String },
    /// The group coordinator did not take the commit.
    #[error("Kafka did not take the commit of {partitions} partition(s): {reason}; it is retried by the next commit")]
    Kafka { partitions: usize, reason: String },
}

/// Commits every partition's finished watermark that moved since its last commit; returns how
/// many partitions were committed. Blocks for a round trip to the group coordinator: call it
/// where blocking is allowed.
///
/// `consumer` is borrowed, not owned, so the last handle of the consumer (whose drop runs the
/// revoke callback, which takes the commit lock too) is never dropped while the lock is held.
pub(super) fn commit_moved(consumer: &RawConsumer, shared: &Shared) -> Result<usize, CommitError> {
    let _serial = lock(&shared.commit_lock);
    let pending = shared.tracker.pending_commits();
    if pending.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, position) in &pending {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*position))
            .map_err(|e| CommitError::Request {
                partition: tp.clone(),
                position: *position,
                reason: e.to_string(),
            })?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| CommitError::Kafka {
            partitions: pending.len(),
            reason: redact(&shared.config, e.to_string()),
        })?;
    for (tp, position) in &pending {
        shared.tracker.mark_committed(tp, *position);
        shared.lag.committed(tp, *position);
        tracing::trace!(partition = %tp, position, "committed");
    }
    Ok(pending.len())
}

/// [`commit_moved`] on the blocking pool.
pub(super) async fn commit_now(
    consumer: &Arc<RawConsumer>,
    shared: &Arc<Shared>,
) -> Result<usize, CommitError> {
    let (consumer, shared) = (consumer.clone(), shared.clone());
    tokio::task::spawn_blocking(move || commit_moved(&consumer, &shared))
        .await
        .map_err(|e| CommitError::Task {
            reason: e.to_string(),
        })?
}

/// The background task that commits every `interval`, with its stop signal.
pub(super) struct PeriodicCommit {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl PeriodicCommit {
    /// Starts committing every `interval`. Must run inside a tokio runtime. The task holds the
    /// consumer only while it commits, so dropping the [`KafkaConsumer`](super::KafkaConsumer)
    /// closes the client there and then, not later inside this task.
    pub(super) fn start(
        consumer: Weak<RawConsumer>,
        shared: Arc<Shared>,
        interval: Duration,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(consumer, shared, interval, stopped));
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the task and waits for it: a commit it has started finishes first, and no commit
    /// of it starts afterwards.
    pub(super) async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the periodic commit task failed; the final commit covers its positions");
            }
        }
    }
}

impl Drop for PeriodicCommit {
    /// Without an async context to wait in, the task is aborted. A commit it already runs on
    /// the blocking pool still completes; it reads its positions under the commit lock, so it
    /// cannot move a partition backwards.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(
    consumer: Weak<RawConsumer>,
    shared: Arc<Shared>,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A stop (or a dropped sender) between commits ends the task; a commit in progress is
        // not interrupted.
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let Some(consumer) = consumer.upgrade() else {
            return;
        };
        if let Err(e) = commit_now(&consumer, &shared).await {
            tracing::warn!(error = %e, "periodic commit failed; retrying at the next interval");
        }
    }
}
