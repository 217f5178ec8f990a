//! Errors of the RabbitMQ adapter, each saying what to do next.
//!
//! Publish outcomes are reported in the core's terms (see [`crate::publisher`]); this module
//! covers connecting, topology and settings.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

use crate::settings::SettingsError;

/// What went wrong talking to RabbitMQ outside a publish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The broker could not be reached or refused the login. Check that it runs and the URL's
    /// host, port, vhost and credentials (the credentials are never shown here).
    #[error("cannot connect to RabbitMQ at {target}: {source}; check that the broker runs and the URL is right")]
    Connect {
        /// Host, port and vhost, without credentials.
        target: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A queue the application expects does not exist. Declare it (see
    /// [`crate::topology::declare_queue`]) before publishing or consuming.
    #[error(
        "queue `{queue}` does not exist; declare it first (reliable_amqp::topology::declare_queue)"
    )]
    QueueMissing {
        /// The queue's name.
        queue: String,
    },
    /// The broker already has the queue or exchange with different settings (durability,
    /// type, arguments): AMQP's PRECONDITION_FAILED. Either delete it and declare it again
    /// with the expected settings, or change the expected settings to match it.
    #[error(
        "{kind} `{name}` exists with other settings than expected ({broker_says}); \
         delete and re-declare it with the expected settings, or change what you expect"
    )]
    SettingsMismatch {
        /// `queue` or `exchange`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The broker's explanation, e.g. `inequivalent arg 'durable'`.
        broker_says: String,
    },
    /// The URL given to `connect` is not an AMQP URL. Not retryable: fix the URL. The text
    /// never quotes the URL, which may hold credentials.
    #[error(
        "the AMQP URL could not be parsed; expected amqp://user:password@host:port/vhost \
         (percent-encode `/`, `?`, `#`, `@` and `:` in the user name, password and vhost)"
    )]
    InvalidUrl,
    /// The TLS handshake failed: the broker's certificate is not signed by a CA the client
    /// trusts, names another host, or the broker refused the client certificate. Not retried:
    /// fix the CA file or the URL. The reason is rustls's, with no credentials in it.
    #[error(
        "TLS handshake with RabbitMQ at {target} failed: {reason}; check that the CA file given \
         to AmqpSettings::with_tls (TlsConfig::ca_file) holds the CA that signed the broker's \
         certificate, that the URL's host is in that certificate, and that the port is the \
         broker's TLS listener"
    )]
    Tls {
        /// Host, port and vhost, without credentials.
        target: String,
        /// What rustls reported, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// An `amqps://` URL, but this build has no TLS: lapin would speak plain AMQP to the TLS
    /// port. Enable the `tls` feature.
    #[error(
        "the URL is amqps:// but reliable-amqp was built without TLS; enable the `tls` feature \
         (reliable-amqp/tls, or tls of the reliable crate)"
    )]
    TlsNotBuilt,
    /// TLS settings ([`AmqpSettings::with_tls`](crate::AmqpSettings::with_tls)) with a plain
    /// `amqp://` URL, which would not be encrypted. Use `amqps://` (and the TLS port).
    #[error(
        "TLS settings were given but the URL for {target} is amqp:// (not encrypted); use \
         amqps:// and the broker's TLS port (usually 5671)"
    )]
    TlsWithoutAmqps {
        /// Host, port and vhost, without credentials.
        target: String,
    },
    /// A list of node URLs given to `connect_cluster` cannot stand for one cluster (empty, an
    /// unparsable URL, mixed vhosts or credentials). Not retryable: fix the list.
    #[error(transparent)]
    Nodes(#[from] NodeListError),
    /// Settings refused (data loss or out of range).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// Any other AMQP failure, with the operation that failed.
    #[error("RabbitMQ {operation} failed: {source}")]
    Amqp {
        /// The AMQP operation, e.g. `queue.declare`.
        operation: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

/// Why a list of node URLs cannot stand for one RabbitMQ cluster (see
/// [`Nodes::parse`](crate::Nodes::parse)). The text names URLs by their index in the list and
/// never quotes a URL, a user name or a password; a vhost is named (it is no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeListError {
    /// No URL was given.
    #[error(
        "no RabbitMQ node given; pass at least one amqp://user:password@host:port/vhost \
         (one per node of the cluster)"
    )]
    Empty,
    /// The URL at `index` is no AMQP URL (see [`AmqpError::InvalidUrl`]).
    #[error(
        "the node URL at index {index} could not be parsed; expected \
         amqp://user:password@host:port/vhost (percent-encode `/`, `?`, `#`, `@` and `:` in \
         the user name, password and vhost)"
    )]
    InvalidUrl {
        /// Its index in the list (from 0).
        index: usize,
    },
    /// The URL at `index` names another vhost than the first URL. A publisher or consumer
    /// talks to one vhost; every node of a cluster serves every vhost, so give every URL the
    /// same one.
    #[error(
        "the node URL at index {index} names vhost `{vhost}` but the first names `{expected}`; \
         every URL of one list must name the same vhost (use one list per vhost)"
    )]
    MixedVhosts {
        /// Its index in the list (from 0).
        index: usize,
        /// The vhost it names (decoded).
        vhost: String,
        /// The vhost the first URL names (decoded).
        expected: String,
    },
    /// The URL at `index` has another user or password than the first URL (which one is not
    /// said: both are secrets). The nodes of a cluster share their users, so a difference is a
    /// mistake that would make the client's login depend on the node it reaches.
    #[error(
        "the node URL at index {index} has other credentials than the first; the nodes of a \
         cluster share their users: give every URL the same user and password"
    )]
    MixedCredentials {
        /// Its index in the list (from 0).
        index: usize,
    },
}

impl From<crate::settings::UnsafeSetting> for AmqpError {
    fn from(e: crate::settings::UnsafeSetting) -> Self {
        AmqpError::Settings(e.into())
    }
}

impl From<crate::settings::InvalidSetting> for AmqpError {
    fn from(e: crate::settings::InvalidSetting) -> Self {
        AmqpError::Settings(e.into())
    }
}

impl AmqpError {
    /// A failure to connect to `target`: [`AmqpError::Tls`] when the TLS handshake failed,
    /// otherwise [`AmqpError::Connect`].
    pub(crate) fn connect(target: String, source: lapin::Error) -> Self {
        match crate::tls::tls_failure(&source) {
            Some(reason) => AmqpError::Tls { target, reason },
            None => AmqpError::Connect { target, source },
        }
    }

    /// Wraps a lapin error of `operation`, mapping NOT_FOUND and PRECONDITION_FAILED on
    /// `kind` `name` to their plain-words variants.
    pub(crate) fn classify(
        operation: &'static str,
        kind: &'static str,
        name: &str,
        source: lapin::Error,
    ) -> Self {
        match soft_error(&source) {
            Some((AMQPSoftError::NOTFOUND, _)) if kind == "queue" => AmqpError::QueueMissing {
                queue: name.to_owned(),
            },
            Some((AMQPSoftError::PRECONDITIONFAILED, text)) => AmqpError::SettingsMismatch {
                kind,
                name: name.to_owned(),
                broker_says: text,
            },
            _ => AmqpError::Amqp { operation, source },
        }
    }
}

/// The AMQP soft error (channel-level: 404, 406, ...) inside a lapin error, with its text.
pub(crate) fn soft_error(error: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), e.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}
