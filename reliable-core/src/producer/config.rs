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
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
            max_attempts: 20,
            max_in_flight: 1024,
            backoff: BackoffPolicy::default(),
        }
    }
}
