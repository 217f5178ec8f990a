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
         run, that --kafka-bootstrap lists their client listeners (host:port,...) and that \
         --kafka-security-protocol is the listeners' protocol"
    )]
    Kafka {
        /// The bootstrap servers, credentials masked.
        bootstrap: String,
        /// What the audit was doing.
        step: &'static str,
        /// rdkafka's error.
        reason: String,
    },
    /// The Kafka cluster refused the TLS handshake or the SASL login, or a certificate or key
    /// file cannot be read. The text says what to check and holds no user name or password.
    #[error(
        "Kafka at {bootstrap}: {source} (the doctor's options for these: --kafka-ca, \
         --kafka-client-cert/--kafka-client-key, --kafka-sasl-mechanism, --kafka-sasl-user and \
         RELIABLE_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file)"
    )]
    KafkaSecurity {
        /// The bootstrap servers, credentials masked.
        bootstrap: String,
        /// The SDK's typed TLS or login error.
        #[source]
        source: reliable_kafka::SecurityError,
    },
    /// Kafka TLS or SASL was asked of a build without the `tls` feature.
    #[error(
        "Kafka TLS and SASL (--kafka-security-protocol ssl or sasl_ssl) are not in this build \
         of `reliable`: rebuild it with `--features tls` (cargo install --path reliable-doctor \
         --features tls, or cargo build -p reliable-doctor --features tls), which needs the \
         OpenSSL headers (Debian: libssl-dev)"
    )]
    TlsNotBuilt,
    /// A blocking part of the audit panicked or was cancelled.
    #[error("the audit's worker thread failed: {0}; run it again, and report it if it persists")]
    Worker(String),
}
