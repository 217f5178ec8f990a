//! [`SendError`] and [`BatchError`]: a message the producer could not get confirmed, handed
//! back with the reason.

use std::time::Duration;

use crate::message::{Message, MessageId};
use crate::transport::PublishError;

/// A message the producer could not get confirmed, handed back with the reason.
///
/// Every variant except [`SendError::Aborted`] carries the message: resend it later, store it, or
/// report it; it is never dropped in silence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The broker refused the message for good (unroutable, too large, fatal configuration).
    #[error("message {} refused after {attempts} attempt(s): {source}", message.id())]
    Refused {
        /// The message, handed back.
        message: Box<Message>,
        /// The broker's refusal; its text says what to fix.
        source: PublishError,
        /// Attempts made.
        attempts: u32,
    },
    /// Every allowed attempt failed with a retryable error.
    #[error("message {} not confirmed after {attempts} attempts (last: {last_error}); check the broker and send it again", message.id())]
    AttemptsExhausted {
        /// The message, handed back.
        message: Box<Message>,
        /// The last attempt's error.
        last_error: PublishError,
        /// Attempts made.
        attempts: u32,
    },
    /// The overall deadline passed before a confirm.
    #[error("message {} not confirmed within {elapsed:?} ({attempts} attempts, last: {last_error}); check the broker and send it again", message.id())]
    DeadlineExceeded {
        /// The message, handed back.
        message: Box<Message>,
        /// The last attempt's error.
        last_error: PublishError,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
    },
    /// The producer was closed; the message was never sent.
    #[error("producer is closed; message {} was not sent, use an open producer", message.id())]
    Closed {
        /// The message, handed back.
        message: Box<Message>,
    },
    /// A [`Producer::send_batch`](super::Producer::send_batch) larger than the in-flight window can never fit; split it.
    #[error("a batch of {size} messages cannot fit the in-flight window of {window}; send smaller batches (message {} handed back)", message.id())]
    BatchTooLarge {
        /// The batch's first message, handed back.
        message: Box<Message>,
        /// Messages in the batch.
        size: usize,
        /// The window ([`ProducerConfig::max_in_flight`](super::ProducerConfig::max_in_flight)).
        window: usize,
    },
    /// The producer's outbox (feature `outbox`) could not store the message; it was not sent.
    #[error("message {} not sent: the outbox could not store it ({reason})", message.id())]
    NotSpooled {
        /// The message, handed back.
        message: Box<Message>,
        /// What the outbox reported.
        reason: String,
    },
    /// The task tracking the message ended without an answer (the runtime shut down). Whether the
    /// broker has the message is unknown; send it again (consumers deduplicate by key). With an
    /// outbox (feature `outbox`) the message stays in it and is sent again by the next
    /// `Producer::replay_outbox`.
    #[error("tracking of message {id} was aborted (runtime shut down); its fate is unknown, send it again")]
    Aborted {
        /// The message id.
        id: MessageId,
    },
}

impl SendError {
    /// The message handed back, if this error carries it.
    pub fn message(&self) -> Option<&Message> {
        match self {
            Self::Refused { message, .. }
            | Self::AttemptsExhausted { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::NotSpooled { message, .. }
            | Self::BatchTooLarge { message, .. }
            | Self::Closed { message } => Some(message),
            Self::Aborted { .. } => None,
        }
    }

    /// Takes the message back, if this error carries it.
    pub fn into_message(self) -> Option<Message> {
        match self {
            Self::Refused { message, .. }
            | Self::AttemptsExhausted { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::NotSpooled { message, .. }
            | Self::BatchTooLarge { message, .. }
            | Self::Closed { message } => Some(*message),
            Self::Aborted { .. } => None,
        }
    }
}

/// Why [`Producer::send_batch`](super::Producer::send_batch) sent nothing: the error (carrying the batch's first message)
/// and the batch's other messages, handed back in order.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} more messages of the batch handed back)", rest.len())]
pub struct BatchError {
    /// What went wrong; carries the batch's first message.
    #[source]
    pub error: SendError,
    /// The batch's other messages, in order.
    pub rest: Vec<Message>,
}

impl BatchError {
    /// `msgs` must not be empty (checked by the caller).
    pub(super) fn new(msgs: Vec<Message>, error: impl FnOnce(Box<Message>) -> SendError) -> Self {
        let mut it = msgs.into_iter();
        let head = it
            .next()
            .unwrap_or_else(|| Message::new(bytes::Bytes::new()));
        Self {
            error: error(Box::new(head)),
            rest: it.collect(),
        }
    }
}
