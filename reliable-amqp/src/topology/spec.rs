//! Queue declarations: [`QueueSpec`], and the [`DeadLetterTarget`] a queue rejects to.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::ExchangeKind;

use crate::settings::{AmqpSettings, DataLoss, InvalidSetting, QueueType, UnsafeSetting};

/// The `x-delivery-limit` the SDK declares on every quorum queue unless told otherwise.
///
/// A quorum queue counts how often each message went back to the queue; past the limit the
/// broker dead-letters the message, or drops it when the queue has no dead-letter exchange.
/// RabbitMQ 3.x has no limit unless one is declared; RabbitMQ 4.0 and later apply 20 when none
/// is declared, and 4.0-4.2 count every return (`basic.nack` or `basic.reject` with requeue,
/// a closed channel with unacked deliveries). 20 is soon reached by healthy messages: the
/// pipeline requeues while a dependency is down, and a consumer that restarts returns its
/// whole prefetch. 1000 keeps a healthy message through hours of outage (the pipeline holds a
/// delivery for [`PipelineConfig::requeue_delay`](reliable_core::pipeline::PipelineConfig),
/// 30 s by default, before each requeue) while a message that crashes its consumer still ends
/// in the dead-letter queue eventually.
///
/// The limit is declared explicitly, never as `-1`: RabbitMQ 4.x reads `-1` as "no limit",
/// but RabbitMQ 3.x compares it as a number, so the first requeue already exceeds it.
pub const DEFAULT_DELIVERY_LIMIT: i64 = 1_000;

/// What happens to publishes when a queue with a length limit is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// The broker nacks new publishes (`x-overflow: reject-publish`): the publisher sees it.
    RejectPublish,
    /// The broker dead-letters new publishes (`x-overflow: reject-publish-dlx`); classic
    /// queues only (a quorum queue falls back to dropping the oldest message, and to
    /// at-most-once dead-lettering).
    RejectPublishDlx,
}

impl Overflow {
    fn value(self) -> &'static str {
        match self {
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// Where a queue's rejected, expired and over-limit messages go: a durable dead-letter
/// exchange and the durable queue bound to it.
///
/// Naming the queue, not only the exchange, is what lets the SDK know the route is real: a
/// message dead-lettered to an exchange no queue is bound to is dropped.
/// [`declare_queue`](super::declare_queue) declares the exchange, the queue and the binding
/// along with the queue that dead-letters to them, and
/// [`AmqpConsumer::connect_checked`](crate::AmqpConsumer::connect_checked) declares them again
/// (idempotently) before it consumes.
///
/// By default the exchange is a fanout (every dead-lettered message reaches the queue,
/// whatever its routing key) and the queue a quorum queue ([`QueueSpec::quorum`]).
///
/// ```
/// use reliable_amqp::topology::{DeadLetterTarget, QueueSpec};
///
/// let orders = QueueSpec::quorum("orders.eu")
///     .with_dead_letter(DeadLetterTarget::new("orders.dlx", "orders.dlq"));
/// let target = orders.dead_letter_target().expect("named above");
/// assert_eq!((target.exchange(), target.queue().name()), ("orders.dlx", "orders.dlq"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTarget {
    exchange: String,
    exchange_kind: Option<ExchangeKind>,
    routing_key: Option<String>,
    queue: Box<QueueSpec>,
}

impl DeadLetterTarget {
    /// Dead-letters to the fanout exchange `exchange`, bound to the quorum queue `queue`.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            exchange: exchange.into(),
            exchange_kind: None,
            routing_key: None,
            queue: Box::new(QueueSpec::quorum(queue)),
        }
    }

    /// Dead-letters with `routing_key` (`x-dead-letter-routing-key`) instead of the message's
    /// own, and binds the queue with it. The exchange is then a direct exchange unless
    /// [`with_exchange_kind`](Self::with_exchange_kind) says otherwise.
    pub fn with_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_key = Some(routing_key.into());
        self
    }

    /// The dead-letter exchange's type, for an exchange that already exists with another one
    /// (declaring an existing exchange with another type fails). A direct or topic exchange
    /// needs [`with_routing_key`](Self::with_routing_key) to route every dead-lettered message.
    pub fn with_exchange_kind(mut self, kind: ExchangeKind) -> Self {
        self.exchange_kind = Some(kind);
        self
    }

    /// Declares the dead-letter queue as `queue` describes instead of as a quorum queue
    /// named as given to [`new`](Self::new).
    pub fn with_queue(mut self, queue: QueueSpec) -> Self {
        self.queue = Box::new(queue);
        self
    }

    /// The dead-letter exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The dead-letter exchange's type: as set, else fanout without a routing key and direct
    /// with one.
    pub fn exchange_kind(&self) -> ExchangeKind {
        match (&self.exchange_kind, &self.routing_key) {
            (Some(kind), _) => kind.clone(),
            (None, None) => ExchangeKind::Fanout,
            (None, Some(_)) => ExchangeKind::Direct,
        }
    }

    /// The dead-letter routing key, if one replaces the message's own.
    pub fn routing_key(&self) -> Option<&str> {
        self.routing_key.as_deref()
    }

    /// The dead-letter queue's declaration.
    pub fn queue(&self) -> &QueueSpec {
        &self.queue
    }

    /// The key the dead-letter queue is bound with.
    pub(crate) fn binding_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or("")
    }

    /// Whether the binding catches every dead-lettered message: a fanout catches all; a
    /// direct or topic exchange catches all only when every message is dead-lettered with the
    /// routing key the queue is bound with.
    pub(crate) fn routes_every_message(&self) -> bool {
        match self.exchange_kind() {
            ExchangeKind::Fanout => true,
            ExchangeKind::Direct | ExchangeKind::Topic => self.routing_key.is_some(),
            _ => false,
        }
    }
}

/// A queue's declaration: name, type and arguments.
///
/// The constructors are the safe declarations: durable, quorum by default, an explicit
/// delivery limit ([`DEFAULT_DELIVERY_LIMIT`]) and, once a dead-letter exchange is set,
/// at-least-once dead-lettering (`x-dead-letter-strategy: at-least-once` with `x-overflow:
/// reject-publish`, RabbitMQ 3.10 and later) so that a message rejected while the dead-letter
/// queue cannot take it stays in the source queue instead of being dropped.
///
/// ```
/// use reliable_amqp::topology::{DeadLetterTarget, QueueSpec};
///
/// let spec = QueueSpec::quorum("orders.eu")
///     .with_dead_letter(DeadLetterTarget::new("orders.dlx", "orders.dlq"))
///     .with_delivery_limit(50)?;
/// let args = spec.arguments();
/// assert!(args.contains_key("x-dead-letter-strategy"));
/// assert!(args.contains_key("x-delivery-limit"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    name: String,
    queue_type: QueueType,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
    /// The target's exchange type and queue, when the queue is known (see
    /// [`QueueSpec::with_dead_letter`]); `None` after only an exchange was named.
    dead_letter_queue: Option<(Option<ExchangeKind>, Box<QueueSpec>)>,
    max_length: Option<(i64, Overflow)>,
    delivery_limit: i64,
}

impl QueueSpec {
    /// A durable quorum queue with an explicit delivery limit: the safe default.
    pub fn quorum(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            queue_type: QueueType::Quorum,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            dead_letter_queue: None,
            max_length: None,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// A durable classic queue (not replicated; dead-letters at most once).
    pub fn classic_durable(name: impl Into<String>) -> Self {
        Self {
            queue_type: QueueType::ClassicDurable,
            ..Self::quorum(name)
        }
    }

    /// A queue of the type the settings name (which may be the opted-out transient type).
    pub fn from_settings(name: impl Into<String>, settings: &AmqpSettings) -> Self {
        Self {
            queue_type: settings.queue_type(),
            ..Self::quorum(name)
        }
    }

    /// Changes the type; [`QueueType::ClassicTransient`] is refused (it loses data) — get it
    /// through [`from_settings`](Self::from_settings) with the explicit opt-out instead.
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Result<Self, UnsafeSetting> {
        if !queue_type.durable() {
            return Err(DataLoss::NonDurableQueues.into());
        }
        self.queue_type = queue_type;
        Ok(self)
    }

    /// Dead-letters rejected (nack without requeue), expired and over-limit messages to
    /// `target`: its exchange and routing key become the queue's arguments, and
    /// [`declare_queue`](super::declare_queue) declares the exchange, the dead-letter queue and
    /// the binding first. On a quorum queue, dead-lettering is at least once.
    pub fn with_dead_letter(mut self, target: DeadLetterTarget) -> Self {
        self.dead_letter_exchange = Some(target.exchange);
        self.dead_letter_routing_key = target.routing_key;
        self.dead_letter_queue = Some((target.exchange_kind, target.queue));
        self
    }

    /// Dead-letters rejected, expired and over-limit messages to `exchange`, keeping their
    /// routing key; at least once on a quorum queue.
    ///
    /// Nothing here says which queue the exchange routes to, so a consumer cannot show that a
    /// reject reaches one, and refuses `DeadLetter::BrokerReject`; name the queue with
    /// [`with_dead_letter`](Self::with_dead_letter) instead.
    pub fn with_dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self.dead_letter_queue = None;
        self
    }

    /// Dead-letters with this routing key instead of the message's own.
    pub fn with_dead_letter_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.dead_letter_routing_key = Some(routing_key.into());
        self
    }

    /// Limits the queue to `messages` ready messages, with the given overflow behaviour.
    /// On a dead-lettering quorum queue keep [`Overflow::RejectPublish`]: anything else turns
    /// its dead-lettering into at-most-once.
    pub fn with_max_length(mut self, messages: i64, overflow: Overflow) -> Self {
        self.max_length = Some((messages, overflow));
        self
    }

    /// Quorum queues only: dead-letter a message (or drop it, without a dead-letter exchange)
    /// once it went back to the queue more than `limit` times (`x-delivery-limit`). Default
    /// [`DEFAULT_DELIVERY_LIMIT`], which explains the sizing.
    ///
    /// `limit` must be at least 1: 0 dead-letters or drops a message at its first requeue
    /// (an outage would empty the queue), and -1, "no limit" on RabbitMQ 4.x, means the same
    /// as 0 on RabbitMQ 3.x.
    pub fn with_delivery_limit(mut self, limit: i64) -> Result<Self, InvalidSetting> {
        if limit < 1 {
            return Err(InvalidSetting {
                setting: "delivery_limit",
                value: limit.to_string(),
                expected: "at least 1 (0 drops or dead-letters a message at its first \
                           requeue; -1 means no limit on RabbitMQ 4.x but the same as 0 on \
                           RabbitMQ 3.x); keep the default unless poison messages must leave \
                           sooner",
            });
        }
        self.delivery_limit = limit;
        Ok(self)
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's type.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// The dead-letter exchange, if the queue dead-letters.
    pub fn dead_letter_exchange(&self) -> Option<&str> {
        self.dead_letter_exchange.as_deref()
    }

    /// The dead-letter target, when [`with_dead_letter`](Self::with_dead_letter) named one.
    pub fn dead_letter_target(&self) -> Option<DeadLetterTarget> {
        let exchange = self.dead_letter_exchange.clone()?;
        let (exchange_kind, queue) = self.dead_letter_queue.clone()?;
        Some(DeadLetterTarget {
            exchange,
            exchange_kind,
            routing_key: self.dead_letter_routing_key.clone(),
            queue,
        })
    }

    /// The declared `x-delivery-limit` (quorum queues only; other types have none).
    pub fn delivery_limit(&self) -> Option<i64> {
        (self.queue_type == QueueType::Quorum).then_some(self.delivery_limit)
    }

    /// Why dead-lettering from this queue is at most once, or `None` when it is at least once
    /// (a quorum queue with a dead-letter exchange and `reject-publish` overflow).
    pub(crate) fn at_most_once_because(&self) -> Option<&'static str> {
        if self.queue_type != QueueType::Quorum {
            return Some(
                "only quorum queues dead-letter at least once; classic queues publish the dead \
                 letter without confirms and remove the message at once",
            );
        }
        match self.max_length {
            Some((_, Overflow::RejectPublish)) | None => None,
            Some((_, Overflow::RejectPublishDlx)) => Some(
                "a quorum queue with x-overflow reject-publish-dlx falls back to drop-head, \
                 which RabbitMQ only combines with at-most-once dead-lettering",
            ),
        }
    }

    pub(crate) fn options(&self) -> QueueDeclareOptions {
        QueueDeclareOptions {
            durable: self.queue_type.durable(),
            ..QueueDeclareOptions::default()
        }
    }

    /// The declaration arguments (`x-queue-type`, dead-lettering, limits).
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let quorum = self.queue_type == QueueType::Quorum;
        args.insert(
            ShortString::from("x-queue-type"),
            text(self.queue_type.x_queue_type()),
        );
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert(ShortString::from("x-dead-letter-exchange"), text(dlx));
            if quorum {
                // Kept in the source queue until the dead-letter queue confirmed it.
                args.insert(
                    ShortString::from("x-dead-letter-strategy"),
                    text("at-least-once"),
                );
            }
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert(ShortString::from("x-dead-letter-routing-key"), text(key));
        }
        match self.max_length {
            Some((max, overflow)) => {
                args.insert(
                    ShortString::from("x-max-length"),
                    AMQPValue::LongLongInt(max),
                );
                args.insert(ShortString::from("x-overflow"), text(overflow.value()));
            }
            // At-least-once dead-lettering needs it (with drop-head, RabbitMQ falls back to
            // at-most-once); without a length limit it changes nothing else.
            None if quorum && self.dead_letter_exchange.is_some() => {
                args.insert(
                    ShortString::from("x-overflow"),
                    text(Overflow::RejectPublish.value()),
                );
            }
            None => {}
        }
        if quorum {
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(self.delivery_limit),
            );
        }
        args
    }
}
