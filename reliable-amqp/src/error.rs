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
