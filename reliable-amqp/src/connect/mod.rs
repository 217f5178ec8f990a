//! Where the adapter's channels come from: a list of node URLs (the adapter owns and re-opens
//! the connection, on another node of the cluster when one is lost), an existing
//! `lapin::Connection` (the adapter opens channels on it), or an existing `lapin::Channel`
//! (used as it is).
//!
//! Re-opening is retried with exponential backoff and jitter (backon), bounded by the
//! settings' [`ReconnectPolicy`](crate::settings::ReconnectPolicy). For a node list one
//! attempt of the policy is one *round*: every node once, in list order starting after the
//! last node that failed, each bounded by [`OPEN_TIMEOUT`]. So a dead node costs one refused
//! connection, a silent one one open timeout, never the backoff budget (loss-matrix row L13).

mod nodes;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{Channel, Connection};

use crate::error::AmqpError;
use crate::settings::{AmqpSettings, ReconnectPolicy, DEFAULT_HEARTBEAT};
use crate::tls::{self, TlsConfig};

pub use nodes::Nodes;
pub(crate) use nodes::{NodeSet, SecretUrl};

/// The longest one attempt to open a connection and channel (on one node) may take.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where channels come from.
#[derive(Clone)]
pub(crate) enum Source {
    /// URLs: the adapter owns the connection and moves along the list when a node fails.
    Nodes(NodeSet),
    Connection(Arc<Connection>),
    Channel(Channel),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // One URL shows as it did before node lists existed.
            Source::Nodes(set) if set.nodes.urls.len() == 1 => {
                f.debug_tuple("Url").field(&set.nodes.urls[0]).finish()
            }
            Source::Nodes(set) => set.nodes.fmt(f),
            Source::Connection(_) => f.write_str("Connection(wrapped)"),
            Source::Channel(c) => write!(f, "Channel({})", c.id()),
        }
    }
}

/// A live channel, with the connection the adapter owns (URL sources only).
pub(crate) struct Link {
    pub(crate) channel: Channel,
    pub(crate) connection: Option<Connection>,
    /// The index of the node the connection goes to, in its source's list (URL sources only).
    pub(crate) node: Option<usize>,
    /// Host, port and vhost of that node (no credentials), or what was wrapped.
    pub(crate) target: Arc<str>,
}

impl Source {
    /// A source that connects to `url`, parsed here once: an unparsable URL is the
    /// non-retryable [`AmqpError::InvalidUrl`], never a connect attempt. Its connections
    /// propose the presets' heartbeat until [`with_heartbeat`](Self::with_heartbeat) says
    /// otherwise. A list of one node.
    pub(crate) fn url(url: &str) -> Result<Self, AmqpError> {
        let parsed = SecretUrl::parse(url)?;
        parsed.warn_about_heartbeat();
        Ok(Source::nodes(Nodes::one(parsed)).with_heartbeat(DEFAULT_HEARTBEAT))
    }

    /// A source that connects to any of `urls` (see [`Nodes::parse`]), with the presets'
    /// heartbeat until [`with_heartbeat`](Self::with_heartbeat) says otherwise.
    pub(crate) fn cluster<S: AsRef<str>>(urls: &[S]) -> Result<Self, AmqpError> {
        let nodes = Nodes::parse(urls)?;
        nodes.urls.iter().for_each(SecretUrl::warn_about_heartbeat);
        Ok(Source::nodes(nodes).with_heartbeat(DEFAULT_HEARTBEAT))
    }

    /// A source that connects to `nodes`, starting with the first.
    pub(crate) fn nodes(nodes: Nodes) -> Self {
        Source::Nodes(NodeSet {
            nodes,
            cursor: Arc::default(),
            tls: Arc::default(),
        })
    }

    /// Connections opened from URLs propose `heartbeat` (whole seconds; see
    /// [`AmqpSettings::with_heartbeat`](crate::settings::AmqpSettings::with_heartbeat)).
    /// A wrapped connection or channel keeps the heartbeat its owner negotiated.
    pub(crate) fn with_heartbeat(self, heartbeat: Duration) -> Self {
        match self {
            Source::Nodes(set) => {
                let seconds = u16::try_from(heartbeat.as_secs()).unwrap_or(u16::MAX);
                let urls = set
                    .nodes
                    .urls
                    .iter()
                    .map(|url| {
                        let mut uri = (*url.uri).clone();
                        // lapin proposes this in tune-ok unless the broker's is lower (and
                        // non-zero).
                        uri.query.heartbeat = Some(seconds);
                        SecretUrl {
                            target: url.target.clone(),
                            uri: Arc::new(uri),
                        }
                    })
                    .collect();
                Source::Nodes(NodeSet {
                    nodes: Nodes { urls },
                    ..set
                })
            }
            other => other,
        }
    }

    /// This source as `settings` want it: their heartbeat, and their TLS settings for
    /// `amqps://` URLs. Refuses an `amqps://` URL in a build without TLS and TLS settings with
    /// an `amqp://` URL (see [`crate::tls`]). Wrapped connections and channels are kept as they
    /// are.
    pub(crate) fn for_settings(self, settings: &AmqpSettings) -> Result<Self, AmqpError> {
        match self.with_heartbeat(settings.heartbeat()) {
            Source::Nodes(set) => {
                for url in set.nodes.urls.iter() {
                    tls::check_scheme(url, settings.tls())?;
                }
                let tls = settings.tls().map(TlsConfig::to_lapin).unwrap_or_default();
                Ok(Source::Nodes(NodeSet {
                    tls: Arc::new(tls),
                    ..set
                }))
            }
            other => Ok(other),
        }
    }

    /// Host, port and vhost for messages (no credentials); for several nodes, each one's,
    /// comma separated.
    pub(crate) fn target(&self) -> String {
        match self {
            Source::Nodes(set) => set.nodes.targets().collect::<Vec<_>>().join(", "),
            Source::Connection(_) => "a wrapped connection".to_owned(),
            Source::Channel(_) => "a wrapped channel".to_owned(),
        }
    }

    /// The link to `node` of this source failed (`why`): the next connection starts with the
    /// next node (see [`NodeSet::avoid`]). Nothing for wrapped sources.
    pub(crate) fn avoid(&self, node: Option<usize>, why: &'static str) {
        if let (Source::Nodes(set), Some(node)) = (self, node) {
            set.avoid(node, why);
        }
    }

    /// Opens one channel: one round over the nodes, or one attempt on what was wrapped.
    async fn open_once<F, Fut>(&self, setup: &F) -> Result<Link, lapin::Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<(), lapin::Error>>,
    {
        let wrapped = |channel: Channel, what: &str| Link {
            channel,
            connection: None,
            node: None,
            target: Arc::from(what),
        };
        match self {
            Source::Nodes(set) => set.round(setup).await,
            Source::Connection(connection) => {
                bounded(async {
                    let channel = connection.create_channel().await?;
                    setup(channel.clone()).await?;
                    Ok(wrapped(channel, "a wrapped connection"))
                })
                .await
            }
            Source::Channel(channel) => {
                if channel.status().connected() {
                    bounded(async {
                        setup(channel.clone()).await?;
                        Ok(wrapped(channel.clone(), "a wrapped channel"))
                    })
                    .await
                } else {
                    // The adapter cannot re-open a channel it was handed; its owner must.
                    Err(lapin::ErrorKind::InvalidChannel(channel.id()).into())
                }
            }
        }
    }

    /// Opens a channel, retrying with backoff as the policy allows; each attempt runs
    /// `setup` on the new channel (confirm.select, basic.qos, ...). For a node list each
    /// attempt is one round over the nodes (see [`NodeSet::round`]).
    pub(crate) async fn open<F, Fut>(
        &self,
        policy: ReconnectPolicy,
        setup: F,
    ) -> Result<Link, lapin::Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<(), lapin::Error>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_attempts.saturating_sub(1))
            .with_jitter();
        let target = self.target();
        (|| self.open_once(&setup))
            .retry(backoff)
            .when(|e: &lapin::Error| !matches!(self, Source::Channel(_)) && retryable(e))
            .notify(|e: &lapin::Error, delay| {
                tracing::warn!(target_broker = %target, error = %e, ?delay, "opening an AMQP channel failed; retrying");
            })
            .await
    }
}

/// `attempt`, bounded by [`OPEN_TIMEOUT`]: a broker that accepts TCP but does not answer
/// (still starting, or behind a partition) must not hold the caller for ever.
pub(super) async fn bounded<T>(
    attempt: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    tokio::time::timeout(OPEN_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the broker within {OPEN_TIMEOUT:?}"),
            )
            .into())
        })
}

/// Whether re-opening after this error may help (I/O, lost connection, closed channel).
pub(crate) fn retryable(error: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    match error.kind() {
        // A certificate the client does not trust fails the same way on every attempt.
        K::IOError(_) => tls::tls_failure(error).is_none(),
        K::InvalidChannelState(..)
        | K::InvalidConnectionState(_)
        | K::InvalidChannel(_)
        | K::MissingHeartbeatError => true,
        // Hard protocol errors close the connection (e.g. connection-forced on shutdown);
        // soft ones (access refused, not found) are configuration problems.
        K::ProtocolError(e) => matches!(e.kind(), lapin::protocol::AMQPErrorKind::Hard(_)),
        _ => false,
    }
}
