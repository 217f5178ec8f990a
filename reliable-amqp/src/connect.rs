//! Where the adapter's channels come from: a URL (the adapter owns and re-opens the
//! connection), an existing `lapin::Connection` (the adapter opens channels on it), or an
//! existing `lapin::Channel` (used as it is).
//!
//! Re-opening is retried with exponential backoff and jitter (backon), bounded by the
//! settings' [`ReconnectPolicy`](crate::settings::ReconnectPolicy).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};

use reliable_core::redact;

use crate::error::AmqpError;
use crate::settings::{ReconnectPolicy, DEFAULT_HEARTBEAT};

/// The longest one attempt to open a connection and channel may take.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An AMQP URL, parsed once, whose credentials are never displayed (invariant 8).
#[derive(Clone)]
pub(crate) struct SecretUrl {
    /// Host, port and vhost, without credentials (see [`target`]).
    target: Arc<str>,
    /// What lapin connects with. Its `Debug` shows the password: never format it.
    uri: Arc<AMQPUri>,
}

impl SecretUrl {
    /// Parses `url`. A failure is [`AmqpError::InvalidUrl`], whose text never quotes the
    /// URL (the parser's own message does, credentials included).
    pub(crate) fn parse(url: &str) -> Result<Self, AmqpError> {
        // A `/`, `?` or `#` in the userinfo (which ends at the last `@`) means the URL
        // parser would end the authority inside the credentials and send their tail as host,
        // port or vhost.
        if redact::userinfo(url).is_some_and(|u| u.contains(['/', '?', '#'])) {
            return Err(AmqpError::InvalidUrl);
        }
        let uri = url.parse::<AMQPUri>().map_err(|_| AmqpError::InvalidUrl)?;
        Ok(Self {
            target: Arc::from(target(url)),
            uri: Arc::new(uri),
        })
    }
}

/// Host, port and vhost of `url` for messages (never its credentials, user name included),
/// or a placeholder when they cannot be told from the credentials.
fn target(url: &str) -> String {
    redact::host_and_path(url).map_or_else(
        || "<unparsable host>".to_owned(),
        |(host, path)| format!("{host}{path}"),
    )
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "amqp://***@{}", self.target)
    }
}

/// Where channels come from.
#[derive(Clone)]
pub(crate) enum Source {
    Url(SecretUrl),
    Connection(Arc<Connection>),
    Channel(Channel),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Url(url) => f.debug_tuple("Url").field(url).finish(),
            Source::Connection(_) => f.write_str("Connection(wrapped)"),
            Source::Channel(c) => write!(f, "Channel({})", c.id()),
        }
    }
}

/// A live channel, with the connection the adapter owns (URL sources only).
pub(crate) struct Link {
    pub(crate) channel: Channel,
    pub(crate) connection: Option<Connection>,
}

impl Source {
    /// A source that connects to `url`, parsed here once: an unparsable URL is the
    /// non-retryable [`AmqpError::InvalidUrl`], never a connect attempt. Its connections
    /// propose the presets' heartbeat until [`with_heartbeat`](Self::with_heartbeat) says
    /// otherwise.
    pub(crate) fn url(url: &str) -> Result<Self, AmqpError> {
        let source = SecretUrl::parse(url).map(Source::Url)?;
        if let Source::Url(parsed) = &source {
            if let Some(heartbeat) = parsed.uri.query.heartbeat {
                tracing::warn!(
                    target_broker = %parsed.target,
                    url_heartbeat_s = heartbeat,
                    "the URL's `heartbeat` parameter is replaced by the settings' heartbeat; \
                     set it with AmqpSettings::with_heartbeat"
                );
            }
        }
        Ok(source.with_heartbeat(DEFAULT_HEARTBEAT))
    }

    /// Connections opened from a URL propose `heartbeat` (whole seconds; see
    /// [`AmqpSettings::with_heartbeat`](crate::settings::AmqpSettings::with_heartbeat)).
    /// A wrapped connection or channel keeps the heartbeat its owner negotiated.
    pub(crate) fn with_heartbeat(self, heartbeat: Duration) -> Self {
        match self {
            Source::Url(mut url) => {
                let mut uri = (*url.uri).clone();
                let seconds = u16::try_from(heartbeat.as_secs()).unwrap_or(u16::MAX);
                // lapin proposes this in tune-ok unless the broker's is lower (and non-zero).
                uri.query.heartbeat = Some(seconds);
                url.uri = Arc::new(uri);
                Source::Url(url)
            }
            other => other,
        }
    }

    /// Host, port and vhost for messages (no credentials).
    pub(crate) fn target(&self) -> String {
        match self {
            Source::Url(url) => url.target.to_string(),
            Source::Connection(_) => "a wrapped connection".to_owned(),
            Source::Channel(_) => "a wrapped channel".to_owned(),
        }
    }

    /// Opens one channel, once.
    async fn open_once(&self) -> Result<Link, lapin::Error> {
        match self {
            Source::Url(url) => {
                let connection =
                    Connection::connect_uri((*url.uri).clone(), ConnectionProperties::default())
                        .await?;
                let channel = connection.create_channel().await?;
                Ok(Link {
                    channel,
                    connection: Some(connection),
                })
            }
            Source::Connection(connection) => Ok(Link {
                channel: connection.create_channel().await?,
                connection: None,
            }),
            Source::Channel(channel) => {
                if channel.status().connected() {
                    Ok(Link {
                        channel: channel.clone(),
                        connection: None,
                    })
                } else {
                    // The adapter cannot re-open a channel it was handed; its owner must.
                    Err(lapin::ErrorKind::InvalidChannel(channel.id()).into())
                }
            }
        }
    }

    /// Opens a channel, retrying with backoff as the policy allows; each attempt runs
    /// `setup` on the new channel (confirm.select, basic.qos, ...).
    pub(crate) async fn open<F, Fut>(
        &self,
        policy: ReconnectPolicy,
        setup: F,
    ) -> Result<Link, lapin::Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<(), lapin::Error>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_attempts.saturating_sub(1))
            .with_jitter();
        let target = self.target();
        (|| async {
            let attempt = async {
                let link = self.open_once().await?;
                setup(link.channel.clone()).await?;
                Ok(link)
            };
            // A broker that accepts TCP but does not answer (still starting) must not hold
            // the caller for ever.
            tokio::time::timeout(OPEN_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer from the broker within {OPEN_TIMEOUT:?}"),
                    )
                    .into())
                })
        })
        .retry(backoff)
        .when(|e: &lapin::Error| !matches!(self, Source::Channel(_)) && retryable(e))
        .notify(|e: &lapin::Error, delay| {
            tracing::warn!(target_broker = %target, error = %e, ?delay, "opening an AMQP channel failed; retrying");
        })
        .await
    }
}

/// Whether re-opening after this error may help (I/O, lost connection, closed channel).
pub(crate) fn retryable(error: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    match error.kind() {
        K::IOError(_)
        | K::InvalidChannelState(..)
        | K::InvalidConnectionState(_)
        | K::InvalidChannel(_)
        | K::MissingHeartbeatError => true,
        // Hard protocol errors close the connection (e.g. connection-forced on shutdown);
        // soft ones (access refused, not found) are configuration problems.
        K::ProtocolError(e) => matches!(e.kind(), lapin::protocol::AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unparsable_url_is_a_typed_error_that_does_not_quote_it() {
        for url in [
            "amqp:alice:secret@host",
            "amqp://alice:secret@host:notaport/v",
            "http://alice:secret@host:5672/v",
            // Unencoded `/` in the password: the parser would take `123` as the port and
            // send `ss@host:5672/v` as the vhost.
            "amqp://alice:123/secret@host:5672/v",
        ] {
            let error = Source::url(url).unwrap_err();
            assert!(matches!(error, AmqpError::InvalidUrl), "{url}: {error:?}");
            let text = format!("{error} {error:?}");
            assert!(
                !text.contains("secret") && !text.contains("alice"),
                "{text}"
            );
            assert!(
                text.contains("amqp://user:password@host:port/vhost"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_url_source_proposes_the_safe_presets_heartbeat() {
        // Without a proposal lapin takes the broker's heartbeat (RabbitMQ: 60 s), and a link
        // that stops carrying bytes goes unnoticed for two of them (L12).
        let source = Source::url("amqp://u:p@rabbit:5672/v").unwrap();
        let Source::Url(url) = &source else {
            panic!("not a URL source");
        };
        assert_eq!(url.uri.query.heartbeat, Some(5));
        // The settings' value replaces the preset's, and one in the URL.
        let source = Source::url("amqp://u:p@rabbit:5672/v?heartbeat=0")
            .unwrap()
            .with_heartbeat(Duration::from_secs(7));
        let Source::Url(url) = &source else {
            panic!("not a URL source");
        };
        assert_eq!(url.uri.query.heartbeat, Some(7));
        assert_eq!(source.target(), "rabbit:5672/v");
    }

    #[test]
    fn a_parsed_url_shows_only_host_port_and_vhost() {
        let source = Source::url("amqp://alice:p%2Fa%40ss@rabbit:5673/%2f").unwrap();
        let Source::Url(url) = &source else {
            panic!("not a URL source");
        };
        assert_eq!(url.uri.authority.userinfo.password, "p/a@ss");
        assert_eq!(url.uri.authority.port, 5673);
        assert_eq!(source.target(), "rabbit:5673/%2f");
        let debug = format!("{source:?}");
        assert!(!debug.contains("alice") && !debug.contains("ss"), "{debug}");
        // An unencoded `@` in the password is unambiguous (the last `@` ends it).
        let source = Source::url("amqp://alice:p@ss@rabbit/v").unwrap();
        assert_eq!(source.target(), "rabbit/v");
    }

    #[test]
    fn passwords_holding_delimiters_never_show() {
        // Neither `Xq7` (before the delimiter) nor `Zk9` (after it) may show.
        for password in [
            "Xq7/Zk9", "Xq7?Zk9", "Xq7#Zk9", "Xq7@Zk9", "Xq7:Zk9", "Xq7%Zk9",
        ] {
            for scheme in ["amqp", "amqps"] {
                let url = format!("{scheme}://alice:{password}@rabbit:5672/v?heartbeat=10");
                let text = match Source::url(&url) {
                    Ok(source) => {
                        assert_eq!(source.target(), "rabbit:5672/v", "{url}");
                        format!("{source:?}")
                    }
                    // `/`, `?`, `#`: lapin would read the password's tail as host or vhost.
                    Err(e) => format!("{e} {e:?}"),
                };
                assert!(
                    !text.contains("Xq7") && !text.contains("Zk9") && !text.contains("alice"),
                    "{url} -> {text}"
                );
            }
        }
    }
}
