//! The consumer side of an adapter: the [`DeliverySource`] the pipeline pulls [`Delivery`]s
//! from, the [`Acker`] that settles each, and their errors.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::ConsumerLag;
use crate::message::Message;

/// Where a delivery sits in an offset-based log (Kafka): topic, partition and offset.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// The partition the delivery came from.
    pub partition: TopicPartition,
    /// The delivery's offset in that partition.
    pub offset: i64,
}

/// A topic (or stream) and one of its partitions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic's name.
    pub topic: Arc<str>,
    /// The partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic-partition pair.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Settles one delivery with the broker. Implemented by adapters; the pipeline calls exactly one
/// method exactly once per delivery, after the handler's outcome is final (invariant 4).
///
/// For offset-based transports `ack`, `reject` and `nack(false)` mark the offset finished (the
/// commit watermark may pass it); `nack(true)` must make the message come back (seek back or
/// keep the watermark below it).
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message was handled (or dead-lettered with a confirm): remove it from the broker.
    async fn ack(&self) -> Result<(), AckError>;
    /// The message was not handled: requeue it (`requeue = true`) or drop it / route it to the
    /// broker's dead-letter exchange (`requeue = false`).
    async fn nack(&self, requeue: bool) -> Result<(), AckError>;
    /// The message is unacceptable: drop it or route it to the broker's dead-letter exchange.
    async fn reject(&self) -> Result<(), AckError>;
}

/// Why a delivery could not be settled. The broker then redelivers it (at-least-once), and the
/// idempotency check keeps the effect single.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The channel or consumer session that received the delivery is gone; the broker
    /// redelivers the message to another consumer. Nothing to do: deduplication absorbs it.
    #[error(
        "connection lost before the delivery was settled ({reason}); the broker will redeliver it"
    )]
    ConnectionLost {
        /// What the client reported.
        reason: String,
    },
    /// The delivery was already settled or its partition was revoked; nothing to do.
    #[error("delivery is stale ({reason}); it was already settled or its partition was revoked")]
    Stale {
        /// Why it is stale.
        reason: String,
    },
    /// Anything else; the broker will redeliver the message after the session ends.
    #[error("could not settle the delivery: {reason}")]
    Other {
        /// What went wrong.
        reason: String,
    },
}

/// One consumed message plus the means to settle it.
///
/// Settling consumes the delivery, so it is settled at most once.
pub struct Delivery {
    message: Message,
    redelivered: bool,
    delivery_count: Option<u32>,
    origin: Option<Arc<str>>,
    position: Option<Position>,
    sequence: Option<u64>,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery of `message`, settled through `acker`.
    pub fn new(message: Message, acker: Box<dyn Acker>) -> Self {
        Self {
            message,
            redelivered: false,
            delivery_count: None,
            origin: None,
            position: None,
            sequence: None,
            acker,
        }
    }

    /// Marks the delivery as a redelivery (AMQP `redelivered` flag).
    pub fn with_redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// Sets how many times the broker has delivered this message, this delivery included (1 on
    /// the first delivery), where the broker counts (a RabbitMQ quorum queue's
    /// `x-delivery-count` header, plus one). The pipeline uses it to stop a message that
    /// keeps crashing its consumer ([`PipelineConfig::max_deliveries`](crate::pipeline::PipelineConfig::max_deliveries)).
    pub fn with_delivery_count(mut self, count: u32) -> Self {
        self.delivery_count = Some(count);
        self
    }

    /// Names the queue the delivery came from, for the dead letter's `x-origin-queue` header
    /// (offset-based deliveries name their topic through [`with_position`](Self::with_position)).
    pub fn with_origin(mut self, queue: impl Into<Arc<str>>) -> Self {
        self.origin = Some(queue.into());
        self
    }

    /// Sets the delivery's log position (offset-based transports).
    pub fn with_position(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    /// Puts the delivery in the sequence `sequence`: within one batch
    /// ([`DeliverySource::next_batch`]), the deliveries of one sequence are handled in the
    /// order of the batch, one at a time: a delivery's handler starts only after the one before
    /// it in its sequence succeeded, or was settled. A source that keeps an order (Kafka's
    /// per-partition or per-key ordering) names each run of records it hands out together by
    /// one sequence; deliveries without one are handled concurrently.
    ///
    /// ```
    /// use reliable_core::{Delivery, Message};
    /// # use reliable_core::{Acker, AckError};
    /// # struct Noop;
    /// # #[async_trait::async_trait]
    /// # impl Acker for Noop {
    /// #     async fn ack(&self) -> Result<(), AckError> { Ok(()) }
    /// #     async fn nack(&self, _requeue: bool) -> Result<(), AckError> { Ok(()) }
    /// #     async fn reject(&self) -> Result<(), AckError> { Ok(()) }
    /// # }
    /// let delivery = Delivery::new(Message::new("a"), Box::new(Noop)).with_sequence(7);
    /// assert_eq!(delivery.sequence(), Some(7));
    /// ```
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// The delivery's sequence, if its source keeps an order (see
    /// [`with_sequence`](Self::with_sequence)).
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Whether the broker says it delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// How many times the broker has delivered this message, this delivery included, when the
    /// broker counts (see [`with_delivery_count`](Self::with_delivery_count)).
    pub fn delivery_count(&self) -> Option<u32> {
        self.delivery_count
    }

    /// The queue the delivery came from, when the adapter names it.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The log position, for offset-based transports.
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// Acknowledges the delivery.
    pub async fn ack(self) -> Result<(), AckError> {
        self.acker.ack().await
    }

    /// Negatively acknowledges the delivery, requeueing it or not.
    pub async fn nack(self, requeue: bool) -> Result<(), AckError> {
        self.acker.nack(requeue).await
    }

    /// Rejects the delivery.
    pub async fn reject(self) -> Result<(), AckError> {
        self.acker.reject().await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message_id", &self.message.id())
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("origin", &self.origin)
            .field("position", &self.position)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// Consumer side of a broker adapter: the stream of deliveries the pipeline pulls from.
///
/// Adapters must not acknowledge anything on their own (no auto-ack, no auto-commit): the
/// pipeline settles each delivery through its [`Acker`] after the handler (invariant 4).
#[async_trait]
pub trait DeliverySource: Send {
    /// The next delivery; `Ok(None)` when the source has ended for good. Must be cancel safe:
    /// the pipeline drops this future when it shuts down, and no delivery may be lost then
    /// (an unsettled delivery is redelivered by the broker).
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError>;

    /// Up to `max` deliveries (at least one, `max` taken as 1 when 0); an empty `Vec` when the
    /// source has ended for good. Waits only for the first delivery: the rest are what the
    /// source already has ready. Must be cancel safe like [`next`](Self::next).
    ///
    /// A source whose deliveries must be handled in an order (a Kafka consumer in an ordered
    /// mode) names the deliveries of one batch that must not overlap by one
    /// [sequence](Delivery::with_sequence), in the order they must be handled: the pipeline
    /// handles the deliveries of a sequence one at a time, and everything else concurrently.
    ///
    /// The default returns what one call to [`next`](Self::next) returns.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let _ = max;
        Ok(self.next().await?.into_iter().collect())
    }

    /// Called once after the pipeline has drained and settled every delivery: stop consuming and
    /// make the final commit (offset-based transports commit their watermark here).
    async fn close(&mut self) -> Result<(), ConsumeError>;

    /// Whether [`Acker::reject`] hands the message to a broker-side dead letter (an AMQP queue
    /// can route rejected messages to its dead-letter exchange). `false` where a reject can
    /// only drop the message, as on Kafka: the pipeline then refuses
    /// [`DeadLetter::BrokerReject`](crate::pipeline::DeadLetter::BrokerReject) before it takes
    /// a delivery. Default `true`.
    fn rejects_to_dead_letter(&self) -> bool {
        true
    }

    /// The `transport` label of the pipeline's [metrics](crate::metrics), as
    /// [`Transport::metrics_label`](super::Transport::metrics_label).
    fn metrics_label(&self) -> &'static str {
        crate::metrics::transport_label(std::any::type_name::<Self>())
    }

    /// A live view of this source's lag, for
    /// [`PipelineHealth::lag`](crate::pipeline::PipelineHealth::lag). The pipeline asks once,
    /// when it is built. Default `None`: the source cannot tell (a queue's backlog is the
    /// broker's to report).
    fn consumer_lag(&self) -> Option<Arc<dyn ConsumerLag>> {
        None
    }
}

/// Why a delivery source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The connection dropped; the pipeline backs off and calls `next` again while the adapter
    /// reconnects. Unsettled deliveries are redelivered by the broker.
    #[error("consumer connection lost ({reason}); retrying after a backoff")]
    ConnectionLost {
        /// What the client reported.
        reason: String,
    },
    /// A problem no retry can fix (access refused, missing queue or topic, unsafe setting).
    #[error("fatal consumer error: {reason}; fix the configuration and restart")]
    Fatal {
        /// What is wrong. Must never contain credentials (invariant 8).
        reason: String,
    },
    /// The final commit at close failed; the uncommitted messages will be delivered again.
    #[error("final commit failed ({reason}); the uncommitted messages will be redelivered")]
    Commit {
        /// What the client reported.
        reason: String,
    },
}

impl ConsumeError {
    /// Whether calling [`DeliverySource::next`] again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::ConnectionLost { .. })
    }
}
