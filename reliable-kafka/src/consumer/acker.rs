//! Settling one delivery: `ack`, `reject` and `nack(false)` finish its offset in the tracker;
//! `nack(true)` hands the record back to the consumer, which hands it out again.
//!
//! A requeue never seeks the partition. The acker keeps a copy of the message (its payload is
//! reference counted) and puts it back in the consumer's memory, under the same lock a revoke
//! takes. A seek would be worse on every count: librdkafka keeps one fetch position per
//! partition, so a second seek close behind a first replaces it and the first offset never
//! comes back in this session (the watermark then stays frozen below it); a seek with a zero
//! timeout cannot report a failure; a seek with a timeout blocks; and every seek throws away
//! the prefetched records and fetches them again.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use async_trait::async_trait;
use reliable_core::{AckError, Acker, Message, TopicPartition};
use tracing::Instrument as _;

use super::ordering::{GateKey, Held};
use super::{lock, Shared};

/// In an ordered mode, the hold a delivery has on its partition (or key).
pub(super) struct Ticket {
    pub(super) key: GateKey,
    pub(super) id: u64,
}

/// Settles one delivery.
pub(super) struct KafkaAcker {
    shared: Arc<Shared>,
    partition: TopicPartition,
    offset: i64,
    /// A copy of the message, handed out again on `nack(true)`.
    message: Message,
    ticket: Option<Ticket>,
}

impl KafkaAcker {
    /// An acker for the delivery of `offset`; counted in the consumer's live ackers until it
    /// is dropped.
    pub(super) fn new(
        shared: Arc<Shared>,
        partition: TopicPartition,
        offset: i64,
        message: Message,
        ticket: Option<Ticket>,
    ) -> Self {
        shared.ackers.fetch_add(1, AtomicOrdering::AcqRel);
        Self {
            shared,
            partition,
            offset,
            message,
            ticket,
        }
    }

    fn span(&self, outcome: &'static str) -> tracing::Span {
        tracing::debug_span!(
            "reliable.kafka.settle",
            outcome,
            message_id = %self.message.id(),
            partition = %self.partition,
            offset = self.offset,
        )
    }

    fn stale(&self) -> AckError {
        AckError::Stale {
            reason: format!(
                "offset {} of {} is no longer in flight (its partition was revoked); the partition's new owner delivers it again",
                self.offset, self.partition
            ),
        }
    }

    /// Marks the offset finished, so the commit watermark may pass it.
    fn finish(&self) -> Result<(), AckError> {
        let done = self
            .shared
            .tracker
            .complete(&self.partition, self.offset)
            .map_err(|e| AckError::Stale {
                reason: e.to_string(),
            });
        self.release();
        match &done {
            Ok(()) => tracing::trace!("finished"),
            Err(e) => tracing::debug!(error = %e, "settled after its partition was revoked"),
        }
        done
    }

    /// Frees the partition (or key) for its next record and wakes a waiting `next()`.
    fn release(&self) {
        if let Some(t) = &self.ticket {
            lock(&self.shared.gate).release(&t.key, t.id);
            self.shared.settled.notify_one();
        }
    }

    /// Hands the record back to the consumer, unless its partition was revoked meanwhile.
    fn requeue(&self) -> Result<(), AckError> {
        let held = Held {
            offset: self.offset,
            message: self.message.clone(),
            redelivered: true,
        };
        let requeued = {
            let mut gate = lock(&self.shared.gate);
            if !self
                .shared
                .tracker
                .is_in_flight(&self.partition, self.offset)
            {
                false
            } else if let Some(t) = &self.ticket {
                // Ordered: back to the head of its partition's (or key's) queue.
                gate.requeue_head(&t.key, t.id, held)
            } else {
                gate.requeue(self.partition.clone(), held);
                true
            }
        };
        if !requeued {
            self.release();
            return Err(self.stale());
        }
        self.shared.settled.notify_one();
        tracing::debug!("requeued; handed out again before newer records");
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        self.shared.ackers.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<(), AckError> {
        let span = self.span("ack");
        async { self.finish() }.instrument(span).await
    }

    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        if requeue {
            let span = self.span("requeue");
            async { self.requeue() }.instrument(span).await
        } else {
            let span = self.span("nack");
            async { self.finish() }.instrument(span).await
        }
    }

    async fn reject(&self) -> Result<(), AckError> {
        let span = self.span("reject");
        async { self.finish() }.instrument(span).await
    }
}
