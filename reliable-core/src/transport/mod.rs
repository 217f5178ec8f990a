//! The traits broker adapters implement: [`Transport`] on the producer side, [`DeliverySource`]
//! and [`Acker`] on the consumer side.
//!
//! The core knows nothing of any broker client. An adapter (AMQP, Kafka, the in-memory broker in
//! [`crate::memory`]) implements:
//!
//! * [`Transport::publish`]: send one message and resolve when the broker *confirmed* it (AMQP
//!   `basic.ack` of a persistent message; Kafka delivery report under `acks=all`) or refused it,
//!   with the refusal classified as a [`PublishError`] so the [`Producer`](crate::producer::Producer)
//!   knows whether to resend. The producer adds timeouts, resends and the in-flight window: a
//!   transport does one attempt and does not retry on its own.
//! * [`DeliverySource::next`] (and [`DeliverySource::next_batch`] for several at once): hand the
//!   pipeline the next [`Delivery`], each carrying an [`Acker`]
//!   that settles it (ack / nack / reject). Offset-based transports settle by marking the offset
//!   finished in an [`OffsetTracker`](crate::offsets::OffsetTracker) and commit its watermark.
//!
//! All traits are object safe; the SDK stores them as `Arc<dyn Transport>` and
//! `Box<dyn Acker>`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::message::Message;

mod completion;
mod lag;

pub(crate) use completion::{Answer, Answers, Token};
pub use completion::{Answered, Completion};
pub use lag::ConsumerLag;

/// How the broker's answer to a handed-off message comes back (the second half of
/// [`Transport::submit`]).
pub enum Attempt {
    /// The transport answers through the [`Completion`] it was given: no future per message.
    Callback,
    /// This future resolves on the broker's confirm or refusal; the transport dismissed the
    /// [`Completion`]. Must be cancel safe: the producer drops it when the attempt times out.
    Future(BoxFuture<'static, Result<(), PublishError>>),
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Callback => "Attempt::Callback",
            Self::Future(_) => "Attempt::Future",
        })
    }
}

/// The hand-off of one message to the client (the first half of [`Transport::submit`]).
pub enum Submission {
    /// Decided at once: the client has the message in its send order (`Ok`, with how its
    /// answer comes back) or refused it (a full client queue, a missing topic).
    Now(Result<Attempt, PublishError>),
    /// The hand-off is still running (e.g. waiting for a channel): resolves once the client
    /// has the message, or with the refusal. Must be cancel safe.
    Later(BoxFuture<'static, Result<Attempt, PublishError>>),
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Now(result) => f.debug_tuple("Submission::Now").field(result).finish(),
            Self::Later(_) => f.write_str("Submission::Later"),
        }
    }
}

/// Producer side of a broker adapter: one publish attempt, resolved by the broker's answer.
///
/// Implementations must resolve `Ok(())` only after the broker confirmed the message durably
/// (invariant 1) and must not retry by themselves; the [`Producer`](crate::producer::Producer)
/// does that with the same message id (invariant 6). They may take arbitrarily long: the producer
/// bounds every attempt with a timeout and drops the future on expiry, so `publish` and both
/// halves of `submit` must be cancel safe (dropping them must not corrupt the transport).
///
/// # Order
///
/// The producer keeps the order its caller sends in by calling [`submit`](Self::submit) for one
/// message at a time, in send order, and waiting for each [`Submission`] before it starts the
/// next; the attempts then run concurrently. A transport keeps that order when a message
/// whose submission has resolved reaches the broker before any message submitted after it, in
/// the same [`lane`](Self::lane) (an AMQP channel; a Kafka partition). Implement `submit` to
/// hand the message to the client in `submit` itself ([`Submission::Now`], e.g. rdkafka's
/// `send`) or in a [`Submission::Later`] (lapin's `basic_publish`); the default only starts
/// [`publish`](Self::publish) in the attempt, which keeps no order.
///
/// # Answers without a future per message
///
/// `submit` gets a [`Completion`] naming the attempt. A transport that tracks confirms itself
/// (a delivery callback, a confirm driver) keeps it with the message, returns
/// [`Attempt::Callback`] and completes it when the broker answers; the producer takes such
/// answers in bulk and bounds the attempts with one FIFO timer sweep instead of a timer each.
/// Otherwise the transport dismisses it and returns an [`Attempt::Future`].
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes `msg` and waits for the broker's confirm or refusal.
    async fn publish(&self, msg: &Message) -> Result<(), PublishError>;

    /// Hands `msg` to the client (see [Order](#order)) and says how its answer comes back:
    /// through `done` ([`Attempt::Callback`]) or a future ([`Attempt::Future`], `done`
    /// dismissed). A refusal known at hand-off (a full client queue, a missing topic) is the
    /// submission's error. Default: an attempt future that runs [`publish`](Self::publish).
    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        done.dismiss();
        Submission::Now(Ok(Attempt::Future(Box::pin(async move {
            self.publish(&msg).await
        }))))
    }

    /// The ordering lane of `msg`: the producer keeps send order among messages of one lane
    /// and lets lanes proceed independently while one of them resends (e.g. a Kafka record
    /// key, since one key always lands in one partition). Default: one lane for every message.
    fn lane(&self, msg: &Message) -> u64 {
        let _ = msg;
        0
    }

    /// Called once by [`Producer::close`](crate::producer::Producer::close), after the
    /// producer has settled every pending message, so the transport can flush and close its
    /// client (e.g. wait for librdkafka's last delivery reports, close an AMQP channel).
    ///
    /// Several producers may share one transport (clones of one client, as a dead-letter
    /// producer does): each producer's close calls it once, so it must tolerate repeated calls.
    ///
    /// Should finish within the producer's
    /// [`confirm_timeout`](crate::producer::ProducerConfig::confirm_timeout): the producer
    /// drops the future after that (so it must be cancel safe) and returns from its close.
    /// Must not block an async worker thread: run blocking client calls in
    /// [`spawn_blocking`](tokio::task::spawn_blocking). Publishes after `close` may fail.
    /// Default: does nothing.
    async fn close(&self) {}

    /// The `transport` label of the producer's [metrics](crate::metrics): `amqp`, `kafka`,
    /// `memory` or `custom`, from the type's path. Override to name a wrapper's transport.
    fn metrics_label(&self) -> &'static str {
        crate::metrics::transport_label(std::any::type_name::<Self>())
    }

    /// Whether the client is connected to its broker now, for
    /// [`ProducerHealth::connected`](crate::producer::ProducerHealth::connected): `Some(true)`
    /// connected, `Some(false)` not, `None` when the transport cannot tell (the default).
    /// Must be cheap and must not block: it reads state the client already keeps.
    fn connected(&self) -> Option<bool> {
        None
    }
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        (**self).publish(msg).await
    }

    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        Arc::clone(&*self).submit(msg, done)
    }

    fn lane(&self, msg: &Message) -> u64 {
        (**self).lane(msg)
    }

    async fn close(&self) {
        (**self).close().await
    }

    fn metrics_label(&self) -> &'static str {
        (**self).metrics_label()
    }

    fn connected(&self) -> Option<bool> {
        (**self).connected()
    }
}

/// Why a broker did not confirm a publish. [`is_retryable`](Self::is_retryable) tells the
/// producer whether resending the same message can succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker refused the message for now (AMQP `basic.nack`, Kafka retriable delivery
    /// error). Retryable: the producer resends after a backoff.
    #[error("broker nacked the message ({reason}); it will be resent")]
    Nacked {
        /// What the broker or client said.
        reason: String,
    },
    /// No queue or partition takes the message (AMQP `basic.return` under `mandatory`; Kafka
    /// unknown topic). Not retryable: bind a queue for the routing key or create the topic.
    #[error(
        "message is unroutable ({reason}); bind a queue for its routing key or create the topic"
    )]
    Unroutable {
        /// What the broker said.
        reason: String,
    },
    /// The connection or channel went away before the confirm. Retryable: the transport
    /// reconnects and the producer resends.
    #[error("connection lost before the confirm ({reason}); it will be resent after reconnecting")]
    ConnectionLost {
        /// What the client reported.
        reason: String,
    },
    /// The attempt timed out without a confirm. Retryable. Set by the producer's confirm
    /// timeout; transports with their own deadline may return it too.
    #[error("no confirm within the attempt timeout; it will be resent")]
    Timeout,
    /// The client's local queue is full (e.g. librdkafka `QueueFull`). Retryable after a backoff.
    #[error("transport is busy ({reason}); it will be resent after a backoff")]
    Busy {
        /// What the client reported.
        reason: String,
    },
    /// The message is larger than the broker accepts. Not retryable: shrink the payload or raise
    /// the broker's limit (AMQP `max_message_size`, Kafka `message.max.bytes`).
    #[error(
        "message is {size} bytes, the broker accepts at most {limit}; shrink it or raise the limit"
    )]
    TooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The broker's limit in bytes.
        limit: usize,
    },
    /// A configuration or authorization problem no resend can fix (access refused, unsafe
    /// setting, missing exchange). Not retryable: fix the configuration named in `reason`.
    #[error("fatal transport error: {reason}; fix the configuration, resending cannot help")]
    Fatal {
        /// What is wrong. Must never contain credentials (invariant 8).
        reason: String,
    },
}

impl PublishError {
    /// Whether resending the same message may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Nacked { .. }
            | Self::ConnectionLost { .. }
            | Self::Timeout
            | Self::Busy { .. } => true,
            Self::Unroutable { .. } | Self::TooLarge { .. } | Self::Fatal { .. } => false,
        }
    }
}

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
    /// [`Transport::metrics_label`].
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
