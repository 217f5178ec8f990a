//! `reliable-kafka`: the Kafka adapter of `reliable`, over rdkafka.
//!
//! | module | what it is for | loss-matrix rows |
//! |---|---|---|
//! | [`config`] | safe producer and consumer presets; validation of a user's `ClientConfig` | L5, L7 |
//! | [`topic`] | [`ensure_topic`]: replication factor, `min.insync.replicas` and unclean leader election checked against the live cluster | L6 |
//! | [`producer`] | [`KafkaTransport`]: the core [`Transport`](reliable_core::Transport) over an `acks=all` idempotent producer | L7 |
//! | [`consumer`] | [`KafkaConsumer`]: the core [`DeliverySource`](reliable_core::DeliverySource) with gap-safe manual commits | L5 |
//! | [`security`] | [`KafkaSecurity`]: TLS and SASL/SCRAM settings (feature `ssl`), and their typed errors | |
//!
//! Deduplication (L8), resend and dead-lettering come from `reliable-core`'s
//! [`Producer`](reliable_core::producer::Producer) and
//! [`Pipeline`](reliable_core::pipeline::Pipeline), which run on top of these types. Dead letters
//! go to a topic through a second [`KafkaTransport`] and
//! [`DeadLetter::publish`](reliable_core::pipeline::DeadLetter::publish); the original's offset
//! is finished only after that publish is confirmed.
//!
//! Re-exports the rdkafka version it is built against, so users wrap the same types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod consumer;
pub mod producer;
pub mod security;
pub mod topic;

pub use config::{Safety, UnsafeConfigError};
pub use consumer::{KafkaConsumer, KafkaConsumerBuilder, Ordering};
pub use producer::{KafkaTransport, KafkaTransportBuilder};
pub use rdkafka;
pub use security::{KafkaSecurity, Scram, SecurityError};
pub use topic::{ensure_topic, TopicError, TopicSpec, TopicStatus};

/// Why a Kafka client could not be set up. Each variant says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client configuration weakens the safe preset.
    #[error(transparent)]
    UnsafeConfig(#[from] UnsafeConfigError),
    /// A topic is unsafe or could not be checked.
    #[error(transparent)]
    Topic(TopicError),
    /// The cluster refused the TLS handshake or the login, a certificate file cannot be read,
    /// or librdkafka was built without TLS. Says what to check; never holds a secret.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// librdkafka refused to create the client, or a required setting is missing.
    #[error("could not set up the Kafka {client}: {reason}")]
    Client {
        /// `"producer"` or `"consumer"`.
        client: &'static str,
        /// What is wrong (credentials redacted).
        reason: String,
    },
}

impl From<TopicError> for Error {
    /// A security failure met while checking a topic is [`Error::Security`].
    fn from(error: TopicError) -> Self {
        match error {
            TopicError::Security(e) => Error::Security(e),
            other => Error::Topic(other),
        }
    }
}
