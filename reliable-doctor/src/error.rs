//! Why an audit could not run. Every message says what to do, and shows connection strings
//! only through `reliable_core::redact` (invariant 8: no password in any output).

use thiserror::Error;

/// Why an audit could not run (the exit code is 2).
#[derive(Debug, Error)]
pub enum DoctorError {
    /// No broker was named.
    #[error(
        "nothing to audit: give --amqp-url and/or --management-url for RabbitMQ, \
         --kafka-bootstrap for Kafka (or set RELIABLE_AMQP_URL, RELIABLE_AMQP_MANAGEMENT_URL, \
         RELIABLE_KAFKA_BOOTSTRAP)"
    )]
    NothingToAudit,
    /// A URL does not parse.
    #[error("{what} {url} is not a valid URL ({reason}); give e.g. {example}")]
    InvalidUrl {
        /// Which option it came from.
        what: &'static str,
        /// The URL, credentials masked.
        url: String,
        /// Why it does not parse.
        reason: String,
        /// What a valid one looks like.
        example: &'static str,
    },
    /// The RabbitMQ node did not accept an AMQP connection.
    #[error(
        "RabbitMQ at {url} did not accept an AMQP connection: {reason}; check that the node \
         runs, the address and port, and the user, password and vhost"
    )]
    AmqpUnreachable {
        /// The AMQP URL, credentials masked.
        url: String,
        /// The client's error, secrets scrubbed.
        reason: String,
    },
    /// The management API could not be read.
    #[error(
        "the RabbitMQ management API at {url} could not be read ({path}: {reason}); check that \
         the rabbitmq_management plugin is enabled (rabbitmq-plugins enable \
         rabbitmq_management), the port (15672 by default), and that the user may read it \
         (tag monitoring or administrator)"
    )]
    Management {
        /// The management URL, credentials masked.
        url: String,
        /// The API path that failed.
        path: String,
        /// The HTTP client's error or status, secrets scrubbed.
        reason: String,
    },
    /// The Kafka cluster could not be read.
    #[error(
        "Kafka at {bootstrap} could not be audited ({step}: {reason}); check that the brokers \
         run and that --kafka-bootstrap lists their client listeners (host:port,...)"
    )]
    Kafka {
        /// The bootstrap servers, credentials masked.
        bootstrap: String,
        /// What the audit was doing.
        step: &'static str,
        /// rdkafka's error.
        reason: String,
    },
    /// A blocking part of the audit panicked or was cancelled.
    #[error("the audit's worker thread failed: {0}; run it again, and report it if it persists")]
    Worker(String),
}
