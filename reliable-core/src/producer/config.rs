//! [`ProducerConfig`]: how the producer bounds and retries publishes.

use std::time::Duration;

use crate::backoff::BackoffPolicy;

/// How the producer bounds and retries publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProducerConfig {
    /// How long one attempt may wait for the broker's confirm before it is resent. Default 5 s.
    /// Also bounds the transport's close in [`Producer::close`](super::Producer::close).
    pub confirm_timeout: Duration,
    /// The longest a message may stay unconfirmed, over all attempts; then it is handed back in
    /// [`SendError::DeadlineExceeded`](super::SendError::DeadlineExceeded). Default 60 s.
    pub deadline: Duration,
    /// The most publish attempts per message (at least 1); then it is handed back in
    /// [`SendError::AttemptsExhausted`](super::SendError::AttemptsExhausted). Default 20.
    pub max_attempts: u32,
    /// The most messages unconfirmed at once; [`Producer::send`](super::Producer::send) waits
    /// while the window is full. Default 1024.
    pub max_in_flight: usize,
    /// The delay between attempts. Default: [`BackoffPolicy::default`].
    pub backoff: BackoffPolicy,
    /// Whether resends keep the send order. Default: [`SendOrder::Preserved`].
    pub order: SendOrder,
}

/// Whether a producer keeps its caller's send order when it resends (see
/// [`Producer`](super::Producer), "Order").
///
/// Messages always reach the transport in the order they were sent (per producer, per
/// [`lane`](crate::Transport::lane)); the choice is what happens once one of them has to be
/// resent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SendOrder {
    /// A lane with a message to resend holds its later, not yet submitted messages until the
    /// resends are confirmed (or handed back), and resends in the original order, each only
    /// once every earlier message of its lane is decided. The broker sees each lane in send
    /// order, at the cost of that lane's throughput while it recovers.
    #[default]
    Preserved,
    /// Each message is resent on its own after its backoff, while later messages keep going:
    /// the most throughput during faults, and a resent message lands behind newer ones.
    Relaxed,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
            max_attempts: 20,
            max_in_flight: 1024,
            backoff: BackoffPolicy::default(),
            order: SendOrder::default(),
        }
    }
}
