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
mod delivery;
mod lag;

pub(crate) use completion::{Answer, Answers, Token};
pub use completion::{Answered, Completion};
pub use delivery::{
    AckError, Acker, ConsumeError, Delivery, DeliverySource, Position, TopicPartition,
};
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
