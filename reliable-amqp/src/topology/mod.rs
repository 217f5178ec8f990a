//! Topology helpers: durable exchanges, durable queues (quorum by default), dead-letter
//! exchanges and queues, bindings, and checks against the live broker.
//!
//! Everything declared here survives a broker restart (loss-matrix row L3) unless the
//! settings carry the explicit [`DataLoss::NonDurableQueues`](crate::settings::DataLoss)
//! opt-out. Quorum queues get an explicit delivery limit ([`DEFAULT_DELIVERY_LIMIT`]), and a
//! queue declared with a [`DeadLetterTarget`] dead-letters at least once to a queue the SDK
//! declares and binds itself (row L9; see [`DeadLetterTarget`] and [`NoDeadLetterRoute`]).
//!
//! ```no_run
//! use reliable_amqp::lapin::{Connection, ConnectionProperties, ExchangeKind};
//! use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let conn = Connection::connect("amqp://127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let ch = conn.create_channel().await?;
//! topology::declare_exchange(&ch, "orders", ExchangeKind::Direct).await?;
//! let orders = QueueSpec::quorum("orders.eu")
//!     .with_dead_letter(DeadLetterTarget::new("orders.dlx", "orders.dlq"));
//! topology::declare_queue(&ch, &orders).await?; // also orders.dlx, orders.dlq and their binding
//! topology::bind_queue(&ch, "orders.eu", "orders", "eu").await?;
//! topology::verify_queue(&conn, &orders).await?; // exists, durable, quorum, same arguments
//! # Ok(()) }
//! ```

mod dead_letter;
mod spec;
#[cfg(test)]
mod tests;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

use crate::error::AmqpError;

pub(crate) use dead_letter::check_route;
pub use dead_letter::{
    declare_dead_letter, declare_dead_letter_target, DeadLetterRoute, NoDeadLetterRoute,
};
pub use spec::{DeadLetterTarget, Overflow, QueueSpec, DEFAULT_DELIVERY_LIMIT};

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

/// Declares the queue `spec` describes (durable unless it is the opted-out transient type),
/// after its dead-letter exchange, dead-letter queue and their binding when `spec` names a
/// [`DeadLetterTarget`]. Fails with [`AmqpError::SettingsMismatch`] when one of them exists
/// with other settings.
pub async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    if let Some(target) = spec.dead_letter_target() {
        Box::pin(declare_dead_letter_target(channel, &target)).await?;
    }
    if spec.dead_letter_exchange().is_none() && spec.delivery_limit().is_some() {
        tracing::debug!(
            queue = spec.name(),
            "quorum queue without a dead-letter exchange: a message past its delivery limit \
             would be dropped"
        );
    }
    channel
        .queue_declare(spec.name().into(), spec.options(), spec.arguments())
        .await
        .map(drop)
        .map_err(|e| AmqpError::classify("queue.declare", "queue", spec.name(), e))
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

/// What [`verify_queue`] found on the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// Ready messages in the queue.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Checks against the live broker that the queue exists with the durability, type and
/// arguments `spec` describes (dead-lettering and delivery limit included), without creating
/// it.
///
/// A missing queue is [`AmqpError::QueueMissing`]; other settings on the broker are
/// [`AmqpError::SettingsMismatch`] in plain words. Uses short-lived channels of its own,
/// because the broker closes a channel on either failure.
pub async fn verify_queue(
    connection: &Connection,
    spec: &QueueSpec,
) -> Result<QueueState, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| AmqpError::Amqp {
            operation: "channel.open",
            source,
        })?;
    // Passive: does it exist? (Does not create it.)
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(spec.name().into(), passive, FieldTable::default())
        .await
        .map_err(|e| AmqpError::classify("queue.declare(passive)", "queue", spec.name(), e))?;
    // It exists: re-declaring with the expected settings succeeds only if they are equivalent.
    let queue = channel
        .queue_declare(spec.name().into(), spec.options(), spec.arguments())
        .await
        .map_err(|e| AmqpError::classify("queue.declare", "queue", spec.name(), e))?;
    let _ = channel.close(200, "verified".into()).await;
    Ok(QueueState {
        messages: queue.message_count(),
        consumers: queue.consumer_count(),
    })
}
