//! The producer's counters: [`ProducerStats`], [`ResendCounts`], [`ResendCause`] and the
//! [`Unconfirmed`] listing.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::{IdempotencyKey, MessageId};
use crate::metrics::ProducerMetrics;
use crate::transport::PublishError;

/// Why a message was resent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResendCause {
    /// The broker nacked it.
    Nack,
    /// No confirm within the attempt timeout.
    Timeout,
    /// The connection was lost before the confirm.
    ConnectionLost,
    /// The client was busy (local queue full).
    Busy,
}

impl ResendCause {
    /// The cause a retryable error stands for; `None` for the others.
    pub(super) fn of(err: &PublishError) -> Option<Self> {
        match err {
            PublishError::Nacked { .. } => Some(Self::Nack),
            PublishError::Timeout => Some(Self::Timeout),
            PublishError::ConnectionLost { .. } => Some(Self::ConnectionLost),
            PublishError::Busy { .. } => Some(Self::Busy),
            _ => None,
        }
    }
}

/// Resends counted by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResendCounts {
    /// Resends after a nack.
    pub nack: u64,
    /// Resends after a confirm timeout.
    pub timeout: u64,
    /// Resends after a lost connection.
    pub connection_lost: u64,
    /// Resends after the client was busy.
    pub busy: u64,
}

impl ResendCounts {
    /// All resends.
    pub fn total(&self) -> u64 {
        self.nack + self.timeout + self.connection_lost + self.busy
    }
}

/// A snapshot of the producer's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProducerStats {
    /// Messages accepted by [`Producer::send`](super::Producer::send).
    pub sent: u64,
    /// Publish attempts made (first sends plus resends).
    pub attempts: u64,
    /// Messages the broker confirmed.
    pub confirmed: u64,
    /// Resends by cause.
    pub resent: ResendCounts,
    /// Messages handed back in an error.
    pub failed: u64,
    /// Messages not yet settled.
    pub in_flight: u64,
    /// Median time from the first send to the confirm (`None` before the first confirm).
    pub confirm_latency_p50: Option<Duration>,
    /// 99th percentile of the time from the first send to the confirm.
    pub confirm_latency_p99: Option<Duration>,
}

/// A message still waiting for its confirm, as listed by
/// [`Producer::unconfirmed`](super::Producer::unconfirmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconfirmed {
    /// The message id.
    pub id: MessageId,
    /// The idempotency key.
    pub idempotency_key: IdempotencyKey,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the first attempt started.
    pub first_sent: Instant,
    /// When the latest attempt started.
    pub last_sent: Instant,
}

/// The live counters behind [`ProducerStats`], and the same events for the `metrics` recorder
/// (nothing without the feature).
pub(super) struct Counters {
    pub(super) sent: AtomicU64,
    pub(super) attempts: AtomicU64,
    pub(super) confirmed: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) resent_nack: AtomicU64,
    pub(super) resent_timeout: AtomicU64,
    pub(super) resent_connection: AtomicU64,
    pub(super) resent_busy: AtomicU64,
    pub(super) metrics: ProducerMetrics,
}

impl Counters {
    /// Zeroed counters of a producer over a `transport` transport (its metrics label).
    pub(super) fn new(transport: &'static str) -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            sent: zero(),
            attempts: zero(),
            confirmed: zero(),
            failed: zero(),
            resent_nack: zero(),
            resent_timeout: zero(),
            resent_connection: zero(),
            resent_busy: zero(),
            metrics: ProducerMetrics::new(transport),
        }
    }

    /// The resend counter of `cause`.
    pub(super) fn resent(&self, cause: ResendCause) -> &AtomicU64 {
        match cause {
            ResendCause::Nack => &self.resent_nack,
            ResendCause::Timeout => &self.resent_timeout,
            ResendCause::ConnectionLost => &self.resent_connection,
            ResendCause::Busy => &self.resent_busy,
        }
    }
}
