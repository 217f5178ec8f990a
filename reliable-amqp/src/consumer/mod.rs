//! The manual-ack consumer: implements the core's [`DeliverySource`] over a lapin consumer
//! (loss-matrix rows L4 and L9).
//!
//! * Manual acks only (auto-ack needs the explicit [`DataLoss::AutoAck`](crate::DataLoss)
//!   opt-out); nothing is acked by the adapter — each [`Delivery`] is settled through its
//!   [`Acker`] by the pipeline, after the handler's outcome is final.
//! * `basic.qos` bounds the unacked deliveries per channel (the settings' prefetch).
//! * Acks are coalesced by default ([`AckCoalescing::DEFAULT`]): the acks of a channel go out
//!   as `basic.ack` frames with `multiple=true`, each covering only a run of deliveries that
//!   were all acked, written as soon as the channel's writer is free (acks asked for during a
//!   write share the next frame); nacks and rejects go out alone, first and in
//!   order; closing or dropping the consumer writes every ack asked for. An ack resolves once
//!   the frame that covers it was written. The [`coalesce`] module says how;
//!   [`AmqpConsumer::with_ack_coalescing`] tunes it or turns it [`Off`](AckCoalescing::Off)
//!   (one `basic.ack` per delivery).
//! * The broker's `redelivered` flag is exposed as [`Delivery::redelivered`].
//! * [`next_batch`](DeliverySource::next_batch) waits for one delivery as
//!   [`next`](DeliverySource::next) does, then adds the deliveries lapin has already
//!   buffered, up to the batch size, without waiting.
//! * `nack(false)` / `reject()` hand the message to the queue's dead-letter exchange, if it
//!   has one. The pipeline's `DeadLetter::BrokerReject` relies on that, so it is accepted only
//!   over a consumer started with [`AmqpConsumer::connect_checked`] (or
//!   [`from_connection_checked`](AmqpConsumer::from_connection_checked)) whose queue provably
//!   dead-letters, at least once, to a durable queue: the queue's [`QueueSpec`] names a
//!   [`DeadLetterTarget`](crate::topology::DeadLetterTarget), the broker holds the queue with
//!   exactly those arguments, and the consumer declares the dead-letter exchange, queue and
//!   binding again before it consumes. Anywhere else, [`DeliverySource::rejects_to_dead_letter`]
//!   is `false` and the pipeline refuses `BrokerReject` with `PipelineError::NoBrokerDeadLetter`
//!   before it takes a delivery; [`AmqpConsumer::dead_letter_route`] says why.
//! * When the stream ends (consumer cancelled by the broker, channel or connection lost),
//!   [`next`](DeliverySource::next) returns the retryable [`ConsumeError::ConnectionLost`];
//!   the next call re-opens the channel (with backoff) and consumes again. Unacked
//!   deliveries of the lost channel are redelivered by the broker with `redelivered = true`.
//! * [`AmqpConsumer::connect_cluster`] (and
//!   [`connect_cluster_checked`](AmqpConsumer::connect_cluster_checked)) take the URLs of
//!   several nodes of one cluster: after the loss of its node the consumer consumes again
//!   through another node (loss-matrix row L13).
//!
//! ```no_run
//! use reliable_amqp::consumer::AmqpConsumer;
//! use reliable_amqp::settings::AmqpSettings;
//! use reliable_amqp::topology::{DeadLetterTarget, QueueSpec};
//! use reliable_core::DeliverySource;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! let orders = QueueSpec::quorum("orders.eu")
//!     .with_dead_letter(DeadLetterTarget::new("orders.dlx", "orders.dlq"));
//! let mut consumer = AmqpConsumer::connect_checked(url, &orders, AmqpSettings::safe()).await?;
//! assert!(consumer.dead_letter_route().is_ok()); // DeadLetter::BrokerReject is safe here
//! while let Some(delivery) = consumer.next().await? {
//!     println!("{} redelivered={}", delivery.message().id(), delivery.redelivered());
//!     delivery.ack().await?; // after the work is done
//! }
//! # Ok(()) }
//! ```

mod acker;
mod channel;
pub mod coalesce;
mod convert;
mod key;
mod source;

use std::fmt;
use std::sync::Arc;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use reliable_core::ConsumeError;
// Named by the module docs.
#[cfg(doc)]
use reliable_core::{Acker, Delivery, DeliverySource};
use tracing::Instrument;

use crate::connect::{Link, Source};
use crate::error::{soft_error, AmqpError};
use crate::settings::AmqpSettings;
use crate::topology::{self, DeadLetterRoute, NoDeadLetterRoute, QueueSpec};
use acker::SETTLE_TIMEOUT;
use channel::Current;
pub use coalesce::AckCoalescing;
use coalesce::Coalescer;
pub use key::{KeyExtractor, KeyFn};

/// A manual-ack RabbitMQ consumer of one queue.
pub struct AmqpConsumer {
    source: Source,
    settings: AmqpSettings,
    queue: String,
    current: Option<Current>,
    closed: bool,
    /// How the channels' deliveries are acknowledged on the wire.
    acks: AckCoalescing,
    /// Where a reject goes, as verified at start (or why it is not known).
    dead_letter: Result<DeadLetterRoute, NoDeadLetterRoute>,
    /// Keys deliveries without the SDK's identity headers.
    keys: KeyExtractor,
    /// The loss of the channel met while a batch was being filled, returned by the next call
    /// so the deliveries already taken are handed out first.
    deferred: Option<ConsumeError>,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("source", &self.source)
            .field("queue", &self.queue)
            .field("consuming", &self.current.is_some())
            .field("acks", &self.acks)
            .field("dead_letter", &self.dead_letter)
            .field("keys", &self.keys)
            .field("deferred", &self.deferred)
            .field("settings", &self.settings)
            .finish()
    }
}

impl AmqpConsumer {
    /// Connects to `url` and starts consuming `queue`. The adapter owns the connection and
    /// re-opens it after a loss. Credentials never appear in logs or errors. An unparsable
    /// URL fails at once with [`AmqpError::InvalidUrl`] (no connect attempt). For a cluster,
    /// give every node: [`connect_cluster`](Self::connect_cluster).
    ///
    /// Nothing is known here about the queue's dead-lettering, so the pipeline refuses
    /// `DeadLetter::BrokerReject` over this consumer; use
    /// [`connect_checked`](Self::connect_checked) for that.
    pub async fn connect(
        url: &str,
        queue: &str,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::url(url)?.for_settings(&settings)?;
        Self::start(source, queue, settings, None).await
    }

    /// Connects to one of the nodes of a RabbitMQ cluster, given as one `amqp://` URL per
    /// node, and starts consuming `queue`; after the loss of that node it consumes again
    /// through another one. All URLs must name the same vhost and carry the same user and
    /// password; an empty list, an unparsable URL or a mixed list fails at once with
    /// [`AmqpError::Nodes`] (see [`Nodes::parse`](crate::Nodes::parse)). A list of one URL is
    /// [`connect`](Self::connect). Nodes are chosen as for the publisher (see
    /// [`AmqpPublisher::connect_cluster`](crate::AmqpPublisher::connect_cluster)): rounds
    /// over the list starting after the node that failed last, each node bounded by the open
    /// timeout, one round per attempt of the settings'
    /// [`ReconnectPolicy`](crate::settings::ReconnectPolicy); when every node failed
    /// through all attempts, [`AmqpError::Connect`] names each node (no credentials).
    ///
    /// # When a node is lost
    ///
    /// RabbitMQ closes the connections of a node that stops (or the heartbeat declares a
    /// silent one dead): [`next`](DeliverySource::next) returns the retryable
    /// [`ConsumeError::ConnectionLost`], and the next call consumes again through another
    /// node. Deliveries of the lost channel that the broker has not seen acked (lapin may
    /// still hand out what it had buffered; their acks fail, or on a silent link are written
    /// but never arrive) are put back in the queue by the broker once it closes that
    /// connection, and delivered again, with [`Delivery::redelivered`] set, through the new
    /// channel: each message is handled at least once and deduplicated by its id (L8).
    ///
    /// A quorum queue's leader lives on one node, and a consumer on any node receives its
    /// messages (its node relays them from the leader). When the leader moves to another
    /// node, consumers connected to surviving nodes go on consuming; only a consumer whose
    /// own node was lost re-subscribes, as above.
    ///
    /// ```no_run
    /// use reliable_amqp::{AmqpConsumer, AmqpSettings};
    /// use reliable_core::DeliverySource;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = [
    ///     "amqp://app:secret@rabbit-1:5672/orders",
    ///     "amqp://app:secret@rabbit-2:5672/orders",
    /// ];
    /// let mut consumer =
    ///     AmqpConsumer::connect_cluster(&nodes, "orders.eu", AmqpSettings::safe()).await?;
    /// loop {
    ///     match consumer.next().await {
    ///         Ok(Some(delivery)) => delivery.ack().await?, // after the work is done
    ///         Ok(None) => break,
    ///         // The node was lost: the next call consumes through another node.
    ///         Err(lost) if lost.is_retryable() => continue,
    ///         Err(fatal) => return Err(fatal.into()),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster<S: AsRef<str>>(
        urls: &[S],
        queue: &str,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::cluster(urls)?.for_settings(&settings)?;
        Self::start(source, queue, settings, None).await
    }

    /// [`connect_checked`](Self::connect_checked) on a cluster: connects to one of `urls` as
    /// [`connect_cluster`](Self::connect_cluster) does and checks the queue `spec` describes
    /// there, once, before it consumes. After the loss of its node the consumer consumes
    /// again through another node without checking again: the queue's arguments and its
    /// dead-letter topology are the cluster's, the same through every node.
    ///
    /// ```no_run
    /// use reliable_amqp::topology::{DeadLetterTarget, QueueSpec};
    /// use reliable_amqp::{AmqpConsumer, AmqpSettings};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = ["amqp://app:secret@rabbit-1:5672/%2f", "amqp://app:secret@rabbit-2:5672/%2f"];
    /// let orders = QueueSpec::quorum("orders.eu")
    ///     .with_dead_letter(DeadLetterTarget::new("orders.dlx", "orders.dlq"));
    /// let consumer =
    ///     AmqpConsumer::connect_cluster_checked(&nodes, &orders, AmqpSettings::safe()).await?;
    /// assert!(consumer.dead_letter_route().is_ok());
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster_checked<S: AsRef<str>>(
        urls: &[S],
        spec: &QueueSpec,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::cluster(urls)?.for_settings(&settings)?;
        Self::start(source, spec.name(), settings, Some(spec)).await
    }

    /// Consumes `queue` on channels opened on an existing connection (see
    /// [`connect`](Self::connect)).
    pub async fn from_connection(
        connection: Connection,
        queue: &str,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::Connection(Arc::new(connection));
        Self::start(source, queue, settings, None).await
    }

    /// Connects to `url` and consumes the queue `spec` describes, after checking it against
    /// the broker; the check runs before `basic.consume`, so nothing is delivered to a consumer
    /// that fails it.
    ///
    /// * The queue must exist with exactly `spec`'s durability, type and arguments
    ///   ([`topology::verify_queue`]); otherwise [`AmqpError::QueueMissing`] or
    ///   [`AmqpError::SettingsMismatch`].
    /// * When `spec` names a [`DeadLetterTarget`](crate::topology::DeadLetterTarget) and
    ///   dead-letters at least once (a quorum queue), the dead-letter exchange, queue and
    ///   binding are declared again (idempotent; needs the configure permission on them), so
    ///   a missing binding is created. One that exists with other settings fails with
    ///   [`AmqpError::SettingsMismatch`]. Then [`dead_letter_route`](Self::dead_letter_route)
    ///   is `Ok` and the pipeline accepts `DeadLetter::BrokerReject`.
    /// * Otherwise the consumer still starts, but `dead_letter_route` says why a reject is
    ///   not known to reach a durable queue, and the pipeline refuses `BrokerReject`.
    ///
    /// A queue whose dead-lettering comes from a policy rather than its arguments cannot be
    /// checked over AMQP; dead-letter through `DeadLetter::publish` there.
    pub async fn connect_checked(
        url: &str,
        spec: &QueueSpec,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::url(url)?.for_settings(&settings)?;
        Self::start(source, spec.name(), settings, Some(spec)).await
    }

    /// [`connect_checked`](Self::connect_checked) on an existing connection.
    pub async fn from_connection_checked(
        connection: Connection,
        spec: &QueueSpec,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::Connection(Arc::new(connection));
        Self::start(source, spec.name(), settings, Some(spec)).await
    }

    async fn start(
        source: Source,
        queue: &str,
        settings: AmqpSettings,
        spec: Option<&QueueSpec>,
    ) -> Result<Self, AmqpError> {
        let span = tracing::info_span!("reliable.amqp.consumer.start", queue);
        async move {
            let mut consumer = Self {
                source,
                settings,
                queue: queue.to_owned(),
                current: None,
                closed: false,
                acks: AckCoalescing::default(),
                dead_letter: Err(NoDeadLetterRoute::Unchecked {
                    queue: queue.to_owned(),
                }),
                keys: KeyExtractor::default(),
                deferred: None,
            };
            let classify = |e| AmqpError::classify("basic.consume", "queue", queue, e);
            let link = consumer.open_link().await.map_err(|e| {
                // No connection and channel on any node: say where it tried. A refusal by
                // the broker (a soft error) is about the queue or the user, not the nodes.
                if soft_error(&e).is_some() {
                    classify(e)
                } else {
                    AmqpError::connect(consumer.source.target(), e)
                }
            })?;
            if let Some(spec) = spec {
                match consumer.check(&link, spec).await {
                    Ok(route) => consumer.dead_letter = route,
                    Err(error) => {
                        close_link(link, "dead-letter check failed").await;
                        return Err(error);
                    }
                }
            }
            if let Err(no_route) = &consumer.dead_letter {
                tracing::debug!(reason = %no_route, "DeadLetter::BrokerReject will be refused over this consumer");
            }
            consumer.consume_on(link).await.map_err(classify)?;
            Ok(consumer)
        }
        .instrument(span)
        .await
    }

    /// Checks `spec` on the consumer's own connection (see [`topology::check_route`]).
    async fn check(
        &self,
        link: &Link,
        spec: &QueueSpec,
    ) -> Result<Result<DeadLetterRoute, NoDeadLetterRoute>, AmqpError> {
        let connection = match (&self.source, &link.connection) {
            (Source::Nodes(_), Some(owned)) => owned,
            (Source::Connection(shared), _) => &**shared,
            // The consumer has no constructor from a channel; nothing to check on.
            _ => {
                return Ok(Err(NoDeadLetterRoute::Unchecked {
                    queue: self.queue.clone(),
                }))
            }
        };
        topology::check_route(connection, spec).await
    }

    /// Keys deliveries that lack the SDK's identity headers (from other clients) with
    /// `extractor` instead of the default [`KeyExtractor::MessageIdOrContentHash`]: the AMQP
    /// `message-id` when set, otherwise a hash of exchange, routing key and body, under which
    /// two distinct messages with the same body on the same route count as one (see
    /// [`KeyExtractor`]). Applies from the next delivery on.
    pub fn with_key_extractor(mut self, extractor: KeyExtractor) -> Self {
        self.keys = extractor;
        self
    }

    /// Sets how deliveries are acknowledged on the wire (default [`AckCoalescing::DEFAULT`]:
    /// coalesced into `multiple=true` acks, written as soon as the writer is free; see
    /// [`coalesce`]).
    /// Applies to the current channel if it has not delivered anything yet (so call it right
    /// after connecting), and to every channel opened after a loss.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), reliable_amqp::error::AmqpError> {
    /// use reliable_amqp::consumer::{AckCoalescing, AmqpConsumer};
    /// use reliable_amqp::settings::AmqpSettings;
    ///
    /// let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// let consumer = AmqpConsumer::connect(url, "orders", AmqpSettings::safe())
    ///     .await?
    ///     .with_ack_coalescing(AckCoalescing::Off); // one basic.ack per delivery
    /// # let _ = consumer;
    /// # Ok(()) }
    /// ```
    pub fn with_ack_coalescing(mut self, acks: AckCoalescing) -> Self {
        self.acks = acks;
        if let Some(current) = self.current.as_mut() {
            if !current.delivered {
                current.acks = coalescer(&current.link, acks);
            }
        }
        self
    }

    /// How deliveries are acknowledged on the wire.
    pub fn ack_coalescing(&self) -> AckCoalescing {
        self.acks
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Where a rejected delivery goes, as verified when the consumer started, or why that is
    /// not known (then the pipeline refuses `DeadLetter::BrokerReject`).
    ///
    /// ```no_run
    /// # async fn run(consumer: reliable_amqp::AmqpConsumer) {
    /// match consumer.dead_letter_route() {
    ///     Ok(route) => println!("rejects go to {}", route.dead_letter_queue()),
    ///     Err(why) => println!("use DeadLetter::publish: {why}"),
    /// }
    /// # }
    /// ```
    pub fn dead_letter_route(&self) -> Result<&DeadLetterRoute, &NoDeadLetterRoute> {
        self.dead_letter.as_ref()
    }

    async fn open_link(&self) -> Result<Link, lapin::Error> {
        let prefetch = self.settings.prefetch();
        self.source
            .open(self.settings.reconnect(), |channel| async move {
                channel
                    .basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
            })
            .await
    }

    async fn consume_on(&mut self, link: Link) -> Result<(), lapin::Error> {
        let options = BasicConsumeOptions {
            no_ack: !self.settings.manual_ack(),
            ..BasicConsumeOptions::default()
        };
        let consumer = link
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.queue, prefetch = self.settings.prefetch(), channel = link.channel.id(), acks = ?self.acks, "AMQP consumer started");
        let acks = coalescer(&link, self.acks);
        self.current = Some(Current {
            link,
            consumer,
            acks,
            delivered: false,
        });
        Ok(())
    }

    async fn subscribe(&mut self) -> Result<(), lapin::Error> {
        let link = self.open_link().await?;
        self.consume_on(link).await
    }
}

/// The ack coalescer of `link`'s channel under `acks`, if any.
fn coalescer(link: &Link, acks: AckCoalescing) -> Option<Coalescer> {
    acks.limits()
        .map(|limits| Coalescer::start(Arc::new(link.channel.clone()), limits))
}

/// Closes a channel and the connection the adapter owns, each step bounded: after a broker
/// loss the answers may never come, and the broker requeues unacked deliveries when the
/// channel goes anyway.
async fn close_link(link: Link, why: &str) {
    let _ = tokio::time::timeout(SETTLE_TIMEOUT, link.channel.close(200, why.into())).await;
    if let Some(connection) = link.connection {
        let _ = tokio::time::timeout(SETTLE_TIMEOUT, connection.close(200, why.into())).await;
    }
}
