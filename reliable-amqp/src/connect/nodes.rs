//! The node list of a URL source: parsed URLs that never show their credentials, the public
//! [`Nodes`] list checked to belong to one cluster, and the [`NodeSet`] cursor that says which
//! node a round of connects starts with.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, ConnectionStatus};

use reliable_core::redact;

use crate::error::{AmqpError, NodeListError};

use super::{bounded, retryable, Link};

/// An AMQP URL, parsed once, whose credentials are never displayed (invariant 8).
#[derive(Clone)]
pub(crate) struct SecretUrl {
    /// Host, port and vhost, without credentials (see [`target`]).
    pub(super) target: Arc<str>,
    /// What lapin connects with. Its `Debug` shows the password: never format it.
    pub(super) uri: Arc<AMQPUri>,
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

    /// `amqp` or `amqps`.
    pub(crate) fn scheme(&self) -> AMQPScheme {
        self.uri.scheme.clone()
    }

    /// Host, port and vhost, without credentials.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Warns when the URL sets a heartbeat: the settings' heartbeat replaces it.
    pub(super) fn warn_about_heartbeat(&self) {
        if let Some(heartbeat) = self.uri.query.heartbeat {
            tracing::warn!(
                target_broker = %self.target,
                url_heartbeat_s = heartbeat,
                "the URL's `heartbeat` parameter is replaced by the settings' heartbeat; \
                 set it with AmqpSettings::with_heartbeat"
            );
        }
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

/// The nodes of one RabbitMQ cluster, as a list of `amqp://` URLs checked to belong together:
/// what [`AmqpPublisher::connect_cluster`](crate::AmqpPublisher::connect_cluster) and
/// [`AmqpConsumer::connect_cluster`](crate::AmqpConsumer::connect_cluster) connect to.
/// Parse one yourself to check a configuration before connecting.
///
/// Every URL is a full AMQP URL of one node; all of them name the same vhost and carry the
/// same user and password (a cluster shares its vhosts and users), and each may differ in
/// scheme, host, port and query. [`parse`](Self::parse) refuses anything else with a
/// [`NodeListError`] that names the URL by its index, never by its text. `Debug` shows
/// `amqp://***@host:port/vhost` per node, never credentials (invariant 8).
///
/// ```
/// use reliable_amqp::{NodeListError, Nodes};
///
/// let nodes = Nodes::parse(&[
///     "amqp://app:secret@rabbit-1:5672/orders",
///     "amqp://app:secret@rabbit-2:5672/orders",
/// ])?;
/// assert_eq!(
///     nodes.targets().collect::<Vec<_>>(),
///     ["rabbit-1:5672/orders", "rabbit-2:5672/orders"]
/// );
/// assert!(!format!("{nodes:?}").contains("secret"));
///
/// let mixed = Nodes::parse(&["amqp://app:secret@r1/orders", "amqp://app:secret@r2/billing"]);
/// assert!(matches!(mixed, Err(NodeListError::MixedVhosts { index: 1, .. })));
/// # Ok::<(), NodeListError>(())
/// ```
#[derive(Clone)]
pub struct Nodes {
    /// Never empty.
    pub(super) urls: Arc<[SecretUrl]>,
}

impl Nodes {
    /// Parses and checks `urls`, one per node, in the order they are tried first.
    ///
    /// Fails with [`NodeListError::Empty`] for no URL, [`NodeListError::InvalidUrl`] for an
    /// unparsable one, [`NodeListError::MixedVhosts`] or [`NodeListError::MixedCredentials`]
    /// when a URL's vhost, user or password differs from the first URL's.
    pub fn parse<S: AsRef<str>>(urls: &[S]) -> Result<Self, NodeListError> {
        let parsed = urls
            .iter()
            .enumerate()
            .map(|(index, url)| {
                SecretUrl::parse(url.as_ref()).map_err(|_| NodeListError::InvalidUrl { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = parsed.first().ok_or(NodeListError::Empty)?;
        for (index, url) in parsed.iter().enumerate().skip(1) {
            if url.uri.vhost != first.uri.vhost {
                return Err(NodeListError::MixedVhosts {
                    index,
                    vhost: url.uri.vhost.clone(),
                    expected: first.uri.vhost.clone(),
                });
            }
            // Compared as lapin will send them (a URL without credentials logs in as lapin's
            // default user), never shown.
            let (user, other) = (&url.uri.authority.userinfo, &first.uri.authority.userinfo);
            if user.username != other.username || user.password != other.password {
                return Err(NodeListError::MixedCredentials { index });
            }
        }
        Ok(Self {
            urls: parsed.into(),
        })
    }

    /// A list of one node.
    pub(super) fn one(url: SecretUrl) -> Self {
        Self {
            urls: Arc::from([url]),
        }
    }

    /// Host, port and vhost of each node, in list order, without credentials: what logs and
    /// errors name the nodes by.
    pub fn targets(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.urls.iter().map(|url| &*url.target)
    }
}

impl fmt::Debug for Nodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Nodes")?;
        f.debug_list().entries(self.urls.iter()).finish()
    }
}

/// A source's node list and where its next round starts. Clones share the cursor.
#[derive(Clone)]
pub(crate) struct NodeSet {
    pub(super) nodes: Nodes,
    pub(super) cursor: Arc<Mutex<Cursor>>,
    /// The extra TLS settings of `amqps://` connections (empty: the system's CA store).
    pub(super) tls: Arc<OwnedTLSConfig>,
}

#[derive(Default)]
pub(super) struct Cursor {
    /// The node tried first by the next round.
    next: usize,
    /// The node of the last link opened, with its connection's status: when that connection
    /// is gone by the next open, its node is the one that failed.
    last: Option<(usize, ConnectionStatus)>,
}

impl NodeSet {
    fn lock(&self) -> MutexGuard<'_, Cursor> {
        // Two plain fields, each written whole: a poisoned lock is still consistent.
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn target(&self, node: usize) -> &str {
        &self.nodes.urls[node % self.nodes.urls.len()].target
    }

    /// The node the next round starts with: the one last opened, or the one after it when
    /// that connection has gone meanwhile (the node was lost, or closed it).
    pub(super) fn first(&self) -> usize {
        let n = self.nodes.urls.len();
        let mut cursor = self.lock();
        if let Some((node, status)) = cursor.last.take() {
            if status.connected() {
                cursor.last = Some((node, status));
            } else if cursor.next == node && n > 1 {
                cursor.next = (node + 1) % n;
                tracing::info!(
                    lost = %self.target(node),
                    first = %self.target(cursor.next),
                    "the connection to a RabbitMQ node is gone; trying the next node first"
                );
            }
        }
        cursor.next
    }

    /// An attempt on `node` failed: the next round starts after it.
    pub(super) fn failed(&self, node: usize) {
        let n = self.nodes.urls.len();
        let mut cursor = self.lock();
        if cursor.next == node {
            cursor.next = (node + 1) % n;
        }
    }

    /// The link to `node` failed for the reason `why` (its connection was lost, or a confirm
    /// did not come in time and the link may be silent while it still looks open): the next
    /// round starts with the next node.
    pub(super) fn avoid(&self, node: usize, why: &'static str) {
        let n = self.nodes.urls.len();
        if n < 2 {
            return;
        }
        let mut cursor = self.lock();
        if cursor.next == node {
            cursor.next = (node + 1) % n;
            tracing::info!(
                node = %self.target(node),
                reason = why,
                first = %self.target(cursor.next),
                "the link to a RabbitMQ node failed; the next connection tries the next node first"
            );
        }
    }

    /// A link to `node` is open: the next round starts with it again.
    fn opened(&self, node: usize, status: ConnectionStatus) {
        let mut cursor = self.lock();
        cursor.next = node;
        cursor.last = Some((node, status));
    }

    /// One round: every node once, starting with [`first`](Self::first), each attempt bounded
    /// by [`OPEN_TIMEOUT`]. The first node that opens wins. A retryable failure moves on to the
    /// next node; one that is not (a refused login, a refused setup) ends the round with that
    /// error, since every node of a cluster would answer the same. When every node failed,
    /// the error names each with its failure (one node: its own error, unchanged).
    pub(super) async fn round<F, Fut>(&self, setup: &F) -> Result<Link, lapin::Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<(), lapin::Error>>,
    {
        let n = self.nodes.urls.len();
        let first = self.first();
        let mut failures: Vec<(usize, lapin::Error)> = Vec::new();
        for node in (first..first + n).map(|i| i % n) {
            let url = &self.nodes.urls[node];
            let attempt = async {
                let connection = Connection::connect_uri_with_config(
                    (*url.uri).clone(),
                    ConnectionProperties::default(),
                    (*self.tls).clone(),
                    lapin::runtime::default_runtime()?,
                )
                .await?;
                let channel = connection.create_channel().await?;
                setup(channel.clone()).await?;
                Ok((channel, connection))
            };
            match bounded(attempt).await {
                Ok((channel, connection)) => {
                    self.opened(node, connection.status().clone());
                    if n > 1 {
                        tracing::info!(
                            node = %url.target,
                            index = node,
                            nodes = n,
                            skipped = failures.len(),
                            "RabbitMQ node chosen: the first of this round that opened"
                        );
                    }
                    return Ok(Link {
                        channel,
                        connection: Some(connection),
                        node: Some(node),
                        target: url.target.clone(),
                    });
                }
                Err(error) => {
                    self.failed(node);
                    if !retryable(&error) {
                        return Err(error);
                    }
                    if n > 1 {
                        tracing::warn!(
                            node = %url.target,
                            %error,
                            next = %self.target(node + 1),
                            "RabbitMQ node skipped: no connection and channel could be opened on it"
                        );
                    }
                    failures.push((node, error));
                }
            }
        }
        if n == 1 {
            if let Some((_, error)) = failures.pop() {
                return Err(error);
            }
        }
        let kind = match failures.last().map(|(_, e)| e.kind()) {
            Some(lapin::ErrorKind::IOError(e)) => e.kind(),
            _ => std::io::ErrorKind::Other,
        };
        let each = failures
            .iter()
            .map(|(node, error)| format!("{}: {error}", self.target(*node)))
            .collect::<Vec<_>>()
            .join("; ");
        Err(std::io::Error::new(kind, format!("no node could be opened ({each})")).into())
    }
}
