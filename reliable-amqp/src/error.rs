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

/// Host, port and vhost of an AMQP URL, never its credentials.
///
/// The credentials end at the LAST `@` of the URL (a password may hold unencoded `/`, `?`,
/// `#` or `@`), so everything up to it is dropped before the path is split off; the query
/// and fragment are dropped too. Without any `@`, an authority that is not `host[:port]`
/// (e.g. `user:secret`) is not shown at all.
pub(crate) fn redacted_target(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (rest, had_userinfo) = match rest.rfind('@') {
        Some(at) => (&rest[at + 1..], true),
        None => (rest, false),
    };
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let port_ok = host
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()));
    if !had_userinfo && !port_ok {
        // `amqp://user:secret` (no `@`): what looks like a port may be a password.
        return "<unparsable host>".to_owned();
    }
    format!("{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_target_never_shows_credentials() {
        let t = redacted_target("amqp://user:s3cret@host:5672/%2f");
        assert_eq!(t, "host:5672/%2f");
        assert!(!t.contains("s3cret") && !t.contains("user"));
        assert_eq!(redacted_target("amqp://host"), "host");
        assert_eq!(
            redacted_target("amqp://host:5672/v?heartbeat=10"),
            "host:5672/v"
        );
    }

    #[test]
    fn redacted_target_hides_passwords_holding_url_delimiters() {
        for password in [
            "pa/ss",
            "pa?ss",
            "pa#ss",
            "pa@ss",
            "p/a?s#s@x",
            "123/ss",
            "/?#@",
        ] {
            let url = format!("amqp://u:{password}@h:5672/v");
            let t = redacted_target(&url);
            assert_eq!(t, "h:5672/v", "{url}");
            assert!(!t.contains("ss") && !t.contains("u:"), "{url} -> {t}");
        }
        // No `@` at all: a `user:secret` authority is not a host and port.
        let t = redacted_target("amqp://user:secret");
        assert!(!t.contains("secret"), "{t}");
        assert!(!redacted_target("amqp:user:secret@host").contains("secret"));
    }
}
