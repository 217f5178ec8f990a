//! The confirming publisher: implements the core's [`Transport`] over a lapin channel
//! (loss-matrix rows L1, L2).
//!
//! * Every channel it opens is in confirm mode (or, with
//!   [`PublishMode::Transactions`](crate::settings::PublishMode::Transactions), in
//!   transaction mode); every message is persistent (delivery mode 2) and published with
//!   `mandatory`; the message id travels as the AMQP `message-id` property and, with the
//!   idempotency key, as headers in the core's wire format.
//! * A publish resolves `Ok` only on the broker's `basic.ack` (invariant 1).
//! * An unroutable message is returned by the broker *and then acked*. lapin attaches a
//!   return to whichever confirm resolves next, and a multiple-ack resolves its confirms in no
//!   fixed order, so a per-channel confirm driver collects every return of a batch, keyed by
//!   the message id the return carries, before it decides any confirm of that batch: a
//!   returned message resolves [`PublishError::Unroutable`], never `Ok`.
//! * A publish waits for its confirm (or, with transactions, its commit) at most the settings'
//!   [`confirm_timeout`](AmqpSettings::confirm_timeout), then fails with the retryable
//!   [`PublishError::Timeout`]: the message is not known to be confirmed; resend it.
//! * [`Transport::submit`] keeps the caller's order: its submission resolves once lapin has
//!   assigned the message its delivery tag and queued its frames on the channel (RabbitMQ keeps
//!   publish order per channel), and its attempt only waits for the decision. The core's
//!   producer submits one message at a time in send order.
//! * When the channel or connection goes away, pending publishes fail with the retryable
//!   [`PublishError::ConnectionLost`] and the next publish re-opens a channel (backoff per
//!   [`ReconnectPolicy`](crate::settings::ReconnectPolicy)). The caller — usually the core's
//!   reliable producer — resends the same [`Message`], so the resend carries the original id.
//!
//! # Clusters: several nodes (loss-matrix row L13)
//!
//! [`AmqpPublisher::connect_cluster`] takes the URLs of several nodes of one RabbitMQ cluster
//! ([`Nodes`](crate::Nodes)) and connects to the first that opens. When its node is lost, the
//! publisher's next channel goes to another node, and what was unconfirmed on the lost channel
//! is resent there by the machinery above: nothing is `Ok` without a confirm from the node
//! that took the resend. See [`connect_cluster`](AmqpPublisher::connect_cluster) for how a
//! node is chosen.
//!
//! # Transactions, the slower alternative
//!
//! With [`AmqpSettings::transactional`] the channel is in transaction mode instead:
//! [`Transport::publish`] commits each message on its own (`tx.commit` waits for the broker to
//! have it durably), and [`AmqpPublisher::publish_batch`] commits a batch at once, rolling back
//! on failure so the whole batch can be retried. Each commit is a synchronous round trip with
//! an fsync, and only one transaction runs per channel at a time, so throughput is far below
//! confirms (which keep many publishes in flight); use it when a batch must commit as a whole.
//!
//! # Resend across recovery
//!
//! Put the publisher under the core's reliable producer
//! (`reliable_core::producer::Producer::new(publisher, config)`): it times out, backs off and
//! resends the same message after a `ConnectionLost`, and this publisher re-opens the channel
//! (and, for URL publishers, the connection) on the next attempt.
//!
//! ```no_run
//! use reliable_amqp::publisher::AmqpPublisher;
//! use reliable_amqp::settings::AmqpSettings;
//! use reliable_core::{Message, Transport};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let publisher = AmqpPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpSettings::safe()).await?;
//! let msg = Message::new(&b"hello"[..]).with_routing_key("orders.eu"); // default exchange
//! publisher.publish(&msg).await?; // Ok only once the broker confirmed it
//!
//! // Or wrap a connection the application already has:
//! let conn = reliable_amqp::lapin::Connection::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     Default::default(),
//! ).await?;
//! let publisher = AmqpPublisher::from_connection(conn, AmqpSettings::safe()).await?;
//! # let _ = publisher;
//! # Ok(()) }
//! ```

mod channel;
mod classify;
mod close;
mod confirms;
mod health;
mod inflight;
mod order;
mod submit;
mod transactions;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use reliable_core::transport::{Attempt, Completion, Submission};
use reliable_core::{Message, PublishError, Transport};
use tracing::Instrument;

use crate::connect::Source;
use crate::error::AmqpError;
use crate::settings::AmqpSettings;
use channel::{LiveChannel, State};
use inflight::Inflight;
use order::Channels;

/// A publish refused, with the message handed back to the caller (invariant 2).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// Why it was not confirmed; [`PublishError::is_retryable`] says whether resending helps.
    pub error: PublishError,
    /// The message, unchanged: resend it (same id) or hand it on.
    pub message: Message,
}

/// A RabbitMQ publisher that resolves each publish only on the broker's confirm.
///
/// Cheap to clone (shared state); safe to use from many tasks at once. Implements the core's
/// [`Transport`], so the core's reliable producer can drive it.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    settings: AmqpSettings,
    exchange: String,
    live: std::sync::Mutex<State>,
    generation: AtomicU64,
    /// Undecided attempts by message id, across this publisher's channels.
    inflight: Arc<Inflight>,
    /// The channels opened, for the order across a channel switch.
    channels: Channels,
    /// Set by [`AmqpPublisher::close`]: no channel is opened again.
    closed: AtomicBool,
}

impl Inner {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole, never left half-written: a poisoned lock is usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("source", &self.inner.source)
            .field("exchange", &self.inner.exchange)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl AmqpPublisher {
    /// Connects to `url` and opens a confirm-mode channel. The adapter owns the connection and
    /// re-opens it after a loss. The URL's credentials never appear in logs or errors. An
    /// unparsable URL fails at once with [`AmqpError::InvalidUrl`] (no connect attempt). For
    /// a cluster, give every node: [`connect_cluster`](Self::connect_cluster).
    pub async fn connect(url: &str, settings: AmqpSettings) -> Result<Self, AmqpError> {
        let source = Source::url(url)?.for_settings(&settings)?;
        Self::start(source, settings).await
    }

    /// Connects to one of the nodes of a RabbitMQ cluster, given as one `amqp://` URL per
    /// node, and opens a confirm-mode channel there; after the loss of that node, publishes
    /// go on through another node. All URLs must name the same vhost and carry the same user
    /// and password; an empty list, an unparsable URL or a mixed list fails at once with
    /// [`AmqpError::Nodes`] (no connect attempt; see [`Nodes::parse`](crate::Nodes::parse)).
    /// A list of one URL is [`connect`](Self::connect).
    ///
    /// # Choosing a node
    ///
    /// * Each time the publisher needs a connection (at start, after a loss) it makes *rounds*
    ///   over the list: every node once, in list order, each attempt bounded by the open
    ///   timeout (10 s). The first node whose connection and confirm-mode channel open wins.
    /// * A round starts with the node of the last connection, unless that node failed: its
    ///   connection was lost, a confirm on it did not come within the confirm timeout (the
    ///   link may be silent, L12), or an open on it failed. Then the round starts with the
    ///   node after it. So a lost node is tried last, not first, and the nodes take turns.
    /// * A node that refuses connections costs one refused connect; one that accepts TCP but
    ///   never answers (behind a partition) costs one open timeout. One round is one attempt
    ///   of the settings' [`ReconnectPolicy`](crate::settings::ReconnectPolicy): when every
    ///   node failed, the round is retried after the policy's backoff, and once the policy's
    ///   attempts are spent the open fails with [`AmqpError::Connect`] (here) or the retryable
    ///   `ConnectionLost` (a publish), naming every node (host, port and vhost) with why it
    ///   failed. At worst `max_attempts × (nodes × 10 s + max_delay)`.
    /// * An error no other node would answer differently (a refused login, a refused
    ///   `confirm.select`) ends the round at once, as it does for one URL.
    /// * The log says which node was chosen and why one was skipped (`tracing`, info and
    ///   warn), naming nodes by host, port and vhost only (invariant 8).
    ///
    /// # When a node is lost
    ///
    /// RabbitMQ closes the connections of a node that stops (or the client's heartbeat
    /// declares a silent one dead). The publishes not yet confirmed on that channel fail with
    /// the retryable [`PublishError::ConnectionLost`]; the core's reliable producer resends
    /// each with the same message id, and this publisher sends the resends over a new
    /// connection to another node. A message the lost node had taken before it went is then
    /// in the queue twice: consumers drop the copy by its id (L8).
    ///
    /// Quorum queues (the safe preset's) have a leader on one node and followers on others,
    /// and any node accepts publishes for any queue: the node a client is connected to
    /// forwards them to the leader and confirms once a quorum has written them. So the node
    /// chosen need not hold the queue's leader; when the leader moves (its node is lost, or
    /// the cluster rebalances) publishes through the surviving nodes keep going to the new
    /// leader without the client doing anything, and only the connections to a lost node
    /// are re-opened.
    ///
    /// ```no_run
    /// use reliable_amqp::{AmqpPublisher, AmqpSettings};
    /// use reliable_core::producer::{Producer, ProducerConfig};
    /// use reliable_core::Message;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = [
    ///     "amqp://app:secret@rabbit-1:5672/orders",
    ///     "amqp://app:secret@rabbit-2:5672/orders",
    ///     "amqp://app:secret@rabbit-3:5672/orders",
    /// ];
    /// let publisher = AmqpPublisher::connect_cluster(&nodes, AmqpSettings::safe()).await?;
    /// // The producer resends what a lost node left unconfirmed, through another node.
    /// let producer = Producer::new(publisher, ProducerConfig::default());
    /// let confirmed = producer
    ///     .send(Message::new(&b"order 42"[..]).with_routing_key("orders.eu"))
    ///     .await?
    ///     .await?;
    /// # let _ = confirmed;
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster<S: AsRef<str>>(
        urls: &[S],
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::cluster(urls)?.for_settings(&settings)?;
        Self::start(source, settings).await
    }

    /// Publishes on channels opened on an existing connection. After a channel loss the
    /// adapter opens a new channel on it; after a connection loss the owner must reconnect
    /// (publishes fail with the retryable [`PublishError::ConnectionLost`] meanwhile).
    pub async fn from_connection(
        connection: Connection,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        Self::start(Source::Connection(Arc::new(connection)), settings).await
    }

    /// Publishes on an existing channel, which is put in confirm (or transaction) mode. The
    /// adapter cannot re-open a channel it was handed: once it closes, publishes fail with
    /// [`PublishError::ConnectionLost`]. Prefer [`from_connection`](Self::from_connection).
    ///
    /// Do not publish on the channel elsewhere, nor call its `wait_for_confirms`: the adapter
    /// owns its confirms and returns (it uses `wait_for_confirms` itself to collect returns).
    pub async fn from_channel(channel: Channel, settings: AmqpSettings) -> Result<Self, AmqpError> {
        Self::start(Source::Channel(channel), settings).await
    }

    async fn start(source: Source, settings: AmqpSettings) -> Result<Self, AmqpError> {
        let publisher = Self {
            inner: Arc::new(Inner {
                source,
                settings,
                exchange: String::new(),
                live: std::sync::Mutex::new(State::Idle),
                generation: AtomicU64::new(0),
                inflight: Arc::default(),
                channels: Channels::default(),
                closed: AtomicBool::new(false),
            }),
        };
        publisher
            .live()
            .await
            .map_err(|source| AmqpError::connect(publisher.inner.source.target(), source))?;
        Ok(publisher)
    }

    /// Sets the exchange used for messages without a destination (default: the AMQP default
    /// exchange `""`, which routes by queue name).
    pub fn with_default_exchange(self, exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.exchange = exchange;
                inner
            }
            // Shared with clones: those keep their exchange and channel; this one opens its own.
            Err(shared) => Inner {
                source: shared.source.clone(),
                settings: shared.settings.clone(),
                exchange,
                live: std::sync::Mutex::new(State::Idle),
                generation: AtomicU64::new(0),
                inflight: Arc::default(),
                channels: Channels::default(),
                closed: AtomicBool::new(false),
            },
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    /// Publishes an owned message; on failure the message is handed back inside [`Refused`].
    pub async fn send(&self, message: Message) -> Result<(), Refused> {
        match self.publish(&message).await {
            Ok(()) => Ok(()),
            Err(error) => Err(Refused { error, message }),
        }
    }

    fn properties(&self, msg: &Message) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in &msg.wire_headers() {
            table.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        let mode = if self.inner.settings.persistent_messages() {
            2
        } else {
            1
        };
        BasicProperties::default()
            .with_message_id(ShortString::from(msg.id_text().as_str()))
            .with_delivery_mode(mode)
            .with_headers(table)
    }

    /// lapin's `basic_publish` of `msg` on `channel`, owning what it needs: it can be handed
    /// to the confirm driver, which then owns it to its end.
    fn basic_publish(
        &self,
        channel: &Channel,
        msg: &Message,
    ) -> impl Future<Output = lapin::Result<PublisherConfirm>> + Send + 'static {
        let channel = channel.clone();
        let exchange = ShortString::from(msg.destination().unwrap_or(&self.inner.exchange));
        let routing_key = ShortString::from(msg.routing_key().unwrap_or_default());
        let options = BasicPublishOptions {
            mandatory: self.inner.settings.mandatory(),
            immediate: false,
        };
        let payload = msg.payload().clone();
        let properties = self.properties(msg);
        async move {
            channel
                .basic_publish(exchange, routing_key, options, &payload, properties)
                .await
        }
    }
}

#[async_trait]
impl Transport for AmqpPublisher {
    /// Submits `msg` and waits for its attempt.
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let attempt = self
            .clone()
            .hand_off(Arc::new(msg.clone()))
            .await
            .inspect_err(not_confirmed)?;
        attempt.await.inspect_err(not_confirmed)
    }

    /// Hands `msg` to lapin in send order: the submission resolves once lapin has queued its
    /// frames on the channel and registered it with the channel's confirm driver (confirm
    /// mode), or once the whole publish is done (transactions, or no publisher confirms); the
    /// attempt waits for the broker's decision, at most the settings'
    /// [`confirm_timeout`](AmqpSettings::confirm_timeout) from the hand-off. Publishes
    /// submitted one after another reach the broker in that order on one channel.
    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        done.dismiss();
        let span = tracing::debug_span!(
            "amqp_publish",
            message_id = %msg.id(),
            idempotency_key = %msg.idempotency_key(),
        );
        let publisher = AmqpPublisher::clone(&self);
        let attempt_span = span.clone();
        Submission::Later(Box::pin(
            async move {
                let attempt = publisher.hand_off(msg).await.inspect_err(not_confirmed)?;
                Ok(Attempt::Future(Box::pin(
                    async move { attempt.await.inspect_err(not_confirmed) }
                        .instrument(attempt_span),
                )))
            }
            .instrument(span),
        ))
    }

    /// Called by `Producer::close` once its messages are settled: closes the publisher when
    /// the producer holds its only handle, and leaves it open while other clones of it (another
    /// producer, the application) are still in use; the last one to go closes it.
    async fn close(&self) {
        if Arc::strong_count(&self.inner) > 1 {
            tracing::debug!("publisher shared with other handles: left open");
            return;
        }
        AmqpPublisher::close(self).await
    }

    /// `Some(true)` while the publisher's channel and its connection are open; see
    /// [`ProducerHealth::connected`](reliable_core::producer::ProducerHealth::connected).
    /// After a loss it stays `false` until the next publish re-opens a channel.
    fn connected(&self) -> Option<bool> {
        Some(self.link_up())
    }
}

fn not_confirmed(error: &PublishError) {
    tracing::debug!(%error, retryable = error.is_retryable(), "publish not confirmed");
}

#[cfg(test)]
mod tests;
