//! Dead-letter routes (loss-matrix row L9): declaring a dead-letter exchange and queue, and
//! telling whether a queue's rejected messages provably reach a durable queue at least once.
//!
//! RabbitMQ drops a rejected message when the queue has no dead-letter exchange, when the
//! exchange routes it to no queue, and, with at-most-once dead-lettering (classic queues, and
//! quorum queues by default), when the dead-letter queue cannot take it at that moment. AMQP
//! offers no call that lists a queue's arguments or an exchange's bindings, so the check relies
//! on what the broker does accept:
//!
//! * the consumed queue is re-declared with the arguments its [`QueueSpec`] names: RabbitMQ
//!   accepts only equivalent arguments (406 PRECONDITION_FAILED otherwise), so a success proves
//!   the queue dead-letters to that exchange, at least once;
//! * the dead-letter exchange, the dead-letter queue and the binding between them are declared
//!   again; declarations are idempotent, and a binding that was missing now exists, so the
//!   route is made true rather than guessed. An exchange or queue that exists with other
//!   settings (not durable, another type) fails with 406.
//!
//! Each step runs on a channel of its own, since the broker closes a channel on a 406.

use lapin::{Connection, ExchangeKind};

use super::spec::{DeadLetterTarget, QueueSpec};
use super::{bind_queue, declare_exchange, declare_queue, verify_queue};
use crate::error::AmqpError;

/// Declares a durable fanout dead-letter exchange `exchange` and a durable quorum queue
/// `queue` bound to it, and returns the queue's spec. Point other queues at it with
/// [`QueueSpec::with_dead_letter`] (`DeadLetterTarget::new(exchange, queue)`), which also lets
/// consumers verify the route; [`declare_queue`] then declares all three itself.
pub async fn declare_dead_letter(
    channel: &lapin::Channel,
    exchange: &str,
    queue: &str,
) -> Result<QueueSpec, AmqpError> {
    let target = DeadLetterTarget::new(exchange, queue);
    declare_dead_letter_target(channel, &target).await?;
    Ok(target.queue().clone())
}

/// Declares `target`'s durable exchange and queue and binds them (all idempotent).
pub async fn declare_dead_letter_target(
    channel: &lapin::Channel,
    target: &DeadLetterTarget,
) -> Result<(), AmqpError> {
    declare_exchange(channel, target.exchange(), target.exchange_kind()).await?;
    declare_queue(channel, target.queue()).await?;
    bind_queue(
        channel,
        target.queue().name(),
        target.exchange(),
        target.binding_key(),
    )
    .await
}

/// A verified dead-letter route: the consumed queue dead-letters, at least once, to an
/// exchange bound to a durable queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterRoute {
    queue: String,
    exchange: String,
    routing_key: Option<String>,
    dead_letter_queue: String,
}

impl DeadLetterRoute {
    /// The consumed queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// The dead-letter exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }
    /// The dead-letter routing key, if one replaces the message's own.
    pub fn routing_key(&self) -> Option<&str> {
        self.routing_key.as_deref()
    }
    /// The durable queue rejected messages end in.
    pub fn dead_letter_queue(&self) -> &str {
        &self.dead_letter_queue
    }
}

/// Why a consumer's rejects are not known to reach a durable dead-letter queue; with any of
/// these, the pipeline refuses `DeadLetter::BrokerReject` (`PipelineError::NoBrokerDeadLetter`)
/// before it takes a delivery. Each says what to do instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoDeadLetterRoute {
    /// The consumer was started from a queue name only, so nothing shows where a rejected
    /// message goes.
    #[error(
        "the consumer of `{queue}` was started from its name only, so nothing shows where a \
         rejected message goes; start it with AmqpConsumer::connect_checked and the queue's \
         QueueSpec (with_dead_letter(DeadLetterTarget::new(exchange, dead_letter_queue))), or \
         use DeadLetter::publish"
    )]
    Unchecked {
        /// The consumed queue.
        queue: String,
    },
    /// The queue has no dead-letter exchange: a rejected message is dropped.
    #[error(
        "queue `{queue}` has no dead-letter exchange, so a rejected message is dropped; declare \
         it with QueueSpec::with_dead_letter(DeadLetterTarget::new(exchange, dead_letter_queue)), \
         or use DeadLetter::publish"
    )]
    NoDeadLetterExchange {
        /// The consumed queue.
        queue: String,
    },
    /// The queue dead-letters to an exchange, but its declaration names no dead-letter queue,
    /// so nothing shows the exchange routes anywhere (an unroutable dead letter is dropped).
    #[error(
        "queue `{queue}` dead-letters to exchange `{exchange}` but its declaration names no \
         dead-letter queue, so nothing shows the exchange routes anywhere (a dead letter no \
         queue is bound for is dropped); use QueueSpec::with_dead_letter(DeadLetterTarget::new(\
         \"{exchange}\", dead_letter_queue)), or DeadLetter::publish"
    )]
    UnknownTarget {
        /// The consumed queue.
        queue: String,
        /// Its dead-letter exchange.
        exchange: String,
    },
    /// A direct or topic dead-letter exchange without a dead-letter routing key: messages keep
    /// their own routing keys, which the dead-letter queue's binding does not all match.
    #[error(
        "queue `{queue}` dead-letters to the {kind:?} exchange `{exchange}` with each message's \
         own routing key, which the dead-letter queue's binding does not all match; set \
         DeadLetterTarget::with_routing_key, use a fanout exchange, or use DeadLetter::publish"
    )]
    UnboundRoutingKey {
        /// The consumed queue.
        queue: String,
        /// Its dead-letter exchange.
        exchange: String,
        /// The exchange's type.
        kind: ExchangeKind,
    },
    /// The dead-letter queue is not durable: its messages vanish when the broker restarts.
    #[error(
        "the dead-letter queue `{dead_letter_queue}` of `{queue}` is not durable, so dead \
         letters vanish when the broker restarts; declare it durable (QueueSpec::quorum), or \
         use DeadLetter::publish"
    )]
    NotDurable {
        /// The consumed queue.
        queue: String,
        /// Its dead-letter queue.
        dead_letter_queue: String,
    },
    /// Dead-lettering from the queue is at most once: a message rejected while the dead-letter
    /// queue cannot take it is dropped.
    #[error(
        "queue `{queue}` dead-letters at most once ({why}), so a message rejected while the \
         dead-letter queue cannot take it is dropped; use a quorum queue \
         (QueueSpec::quorum(..).with_dead_letter(..) dead-letters at least once), or \
         DeadLetter::publish"
    )]
    AtMostOnce {
        /// The consumed queue.
        queue: String,
        /// Why, in words.
        why: &'static str,
    },
}

/// What the declaration alone says about `spec`'s dead-letter route: the target to make true
/// on the broker, or why there is no route worth checking.
pub(crate) fn route_of(spec: &QueueSpec) -> Result<DeadLetterTarget, NoDeadLetterRoute> {
    let queue = spec.name().to_owned();
    let Some(exchange) = spec.dead_letter_exchange() else {
        return Err(NoDeadLetterRoute::NoDeadLetterExchange { queue });
    };
    let Some(target) = spec.dead_letter_target() else {
        return Err(NoDeadLetterRoute::UnknownTarget {
            queue,
            exchange: exchange.to_owned(),
        });
    };
    if !target.routes_every_message() {
        return Err(NoDeadLetterRoute::UnboundRoutingKey {
            queue,
            exchange: exchange.to_owned(),
            kind: target.exchange_kind(),
        });
    }
    if !target.queue().queue_type().durable() {
        return Err(NoDeadLetterRoute::NotDurable {
            queue,
            dead_letter_queue: target.queue().name().to_owned(),
        });
    }
    if let Some(why) = spec.at_most_once_because() {
        return Err(NoDeadLetterRoute::AtMostOnce { queue, why });
    }
    Ok(target)
}

/// Checks `spec` against the live broker and, when it names an at-least-once dead-letter
/// route, makes that route true (see the module docs).
///
/// `Err` when the broker contradicts the declaration: the queue is missing
/// ([`AmqpError::QueueMissing`]), it or the dead-letter exchange or queue exists with other
/// settings ([`AmqpError::SettingsMismatch`]), or the broker cannot be reached. `Ok(Err(..))`
/// when the declaration itself shows no route a reject could rely on.
pub(crate) async fn check_route(
    connection: &Connection,
    spec: &QueueSpec,
) -> Result<Result<DeadLetterRoute, NoDeadLetterRoute>, AmqpError> {
    verify_queue(connection, spec).await?;
    let target = match route_of(spec) {
        Ok(target) => target,
        Err(no_route) => return Ok(Err(no_route)),
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| AmqpError::Amqp {
            operation: "channel.open",
            source,
        })?;
    let declared = declare_dead_letter_target(&channel, &target).await;
    let _ = channel.close(200, "dead-letter route checked".into()).await;
    declared?;
    tracing::info!(
        queue = spec.name(),
        exchange = target.exchange(),
        dead_letter_queue = target.queue().name(),
        "dead-letter route verified: rejects reach a durable queue at least once"
    );
    Ok(Ok(DeadLetterRoute {
        queue: spec.name().to_owned(),
        exchange: target.exchange().to_owned(),
        routing_key: target.routing_key().map(str::to_owned),
        dead_letter_queue: target.queue().name().to_owned(),
    }))
}
