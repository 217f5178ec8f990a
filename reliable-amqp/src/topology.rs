//! Topology helpers: durable exchanges, durable queues (quorum by default), a dead-letter
//! exchange and queue, bindings, and a check against the live broker.
//!
//! Everything declared here survives a broker restart (loss-matrix row L3) unless the
//! settings carry the explicit [`DataLoss::NonDurableQueues`](crate::settings::DataLoss)
//! opt-out.
//!
//! ```no_run
//! use reliable_amqp::lapin::{Connection, ConnectionProperties, ExchangeKind};
//! use reliable_amqp::topology::{self, QueueSpec};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let conn = Connection::connect("amqp://127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let ch = conn.create_channel().await?;
//! let dlq = topology::declare_dead_letter(&ch, "orders.dlx", "orders.dlq").await?;
//! topology::declare_exchange(&ch, "orders", ExchangeKind::Direct).await?;
//! let orders = QueueSpec::quorum("orders.eu").with_dead_letter_exchange("orders.dlx");
//! topology::declare_queue(&ch, &orders).await?;
//! topology::bind_queue(&ch, "orders.eu", "orders", "eu").await?;
//! topology::verify_queue(&conn, &orders).await?; // exists, durable, quorum, same arguments
//! # let _ = dlq;
//! # Ok(()) }
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::error::AmqpError;
use crate::settings::{AmqpSettings, DataLoss, QueueType, UnsafeSetting};

/// What happens to publishes when a queue with a length limit is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// The broker nacks new publishes (`x-overflow: reject-publish`): the publisher sees it.
    RejectPublish,
    /// The broker dead-letters new publishes (`x-overflow: reject-publish-dlx`); classic
    /// queues only.
    RejectPublishDlx,
}

/// A queue's declaration: name, type and arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    name: String,
    queue_type: QueueType,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
    max_length: Option<(i64, Overflow)>,
    delivery_limit: Option<i64>,
}

impl QueueSpec {
    /// A durable quorum queue: the safe default.
    pub fn quorum(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            queue_type: QueueType::Quorum,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            max_length: None,
            delivery_limit: None,
        }
    }

    /// A durable classic queue (not replicated).
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
    /// `exchange`, keeping their routing key.
    pub fn with_dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// Dead-letters with this routing key instead of the message's own.
    pub fn with_dead_letter_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.dead_letter_routing_key = Some(routing_key.into());
        self
    }

    /// Limits the queue to `messages` ready messages, with the given overflow behaviour.
    pub fn with_max_length(mut self, messages: i64, overflow: Overflow) -> Self {
        self.max_length = Some((messages, overflow));
        self
    }

    /// Quorum queues only: dead-letter a message after it was returned to the queue this many
    /// times (`x-delivery-limit`), so a poison message cannot loop for ever.
    pub fn with_delivery_limit(mut self, limit: i64) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's type.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    fn options(&self) -> QueueDeclareOptions {
        QueueDeclareOptions {
            durable: self.queue_type.durable(),
            ..QueueDeclareOptions::default()
        }
    }

    /// The declaration arguments (`x-queue-type`, dead-lettering, limits).
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        args.insert(
            ShortString::from("x-queue-type"),
            text(self.queue_type.x_queue_type()),
        );
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert(ShortString::from("x-dead-letter-exchange"), text(dlx));
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert(ShortString::from("x-dead-letter-routing-key"), text(key));
        }
        if let Some((max, overflow)) = self.max_length {
            args.insert(
                ShortString::from("x-max-length"),
                AMQPValue::LongLongInt(max),
            );
            let overflow = match overflow {
                Overflow::RejectPublish => "reject-publish",
                Overflow::RejectPublishDlx => "reject-publish-dlx",
            };
            args.insert(ShortString::from("x-overflow"), text(overflow));
        }
        if let Some(limit) = self.delivery_limit {
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(limit),
            );
        }
        args
    }
}

/// Declares a durable exchange of `kind`.
pub async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), AmqpError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|e| AmqpError::classify("exchange.declare", "exchange", name, e))
}

/// Declares the queue `spec` describes (durable unless it is the opted-out transient type).
/// Fails with [`AmqpError::SettingsMismatch`] when it exists with other settings.
pub async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    channel
        .queue_declare(spec.name.as_str().into(), spec.options(), spec.arguments())
        .await
        .map(drop)
        .map_err(|e| AmqpError::classify("queue.declare", "queue", &spec.name, e))
}

/// Binds `queue` to `exchange` with `routing_key`.
pub async fn bind_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::classify("queue.bind", "queue", queue, e))
}

/// Declares a durable fanout dead-letter exchange `exchange` and a durable quorum queue
/// `queue` bound to it, and returns the queue's spec. Point other queues at it with
/// [`QueueSpec::with_dead_letter_exchange`].
pub async fn declare_dead_letter(
    channel: &Channel,
    exchange: &str,
    queue: &str,
) -> Result<QueueSpec, AmqpError> {
    declare_exchange(channel, exchange, ExchangeKind::Fanout).await?;
    let spec = QueueSpec::quorum(queue);
    declare_queue(channel, &spec).await?;
    bind_queue(channel, queue, exchange, "").await?;
    Ok(spec)
}

/// What [`verify_queue`] found on the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// Ready messages in the queue.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Checks against the live broker that the queue exists with the durability, type and
/// arguments `spec` describes, without creating it.
///
/// A missing queue is [`AmqpError::QueueMissing`]; other settings on the broker are
/// [`AmqpError::SettingsMismatch`] in plain words. Uses short-lived channels of its own,
/// because the broker closes a channel on either failure.
pub async fn verify_queue(
    connection: &Connection,
    spec: &QueueSpec,
) -> Result<QueueState, AmqpError> {
    let open = || async {
        connection
            .create_channel()
            .await
            .map_err(|source| AmqpError::Amqp {
                operation: "channel.open",
                source,
            })
    };
    // Passive: does it exist? (Does not create it.)
    let channel = open().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(spec.name.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(|e| AmqpError::classify("queue.declare(passive)", "queue", &spec.name, e))?;
    // It exists: re-declaring with the expected settings succeeds only if they are equivalent.
    let queue = channel
        .queue_declare(spec.name.as_str().into(), spec.options(), spec.arguments())
        .await
        .map_err(|e| AmqpError::classify("queue.declare", "queue", &spec.name, e))?;
    let _ = channel.close(200, "verified".into()).await;
    Ok(QueueState {
        messages: queue.message_count(),
        consumers: queue.consumer_count(),
    })
}
