//! The consumer's current channel: its lapin consumer, its ack coalescer, and how one item of
//! its stream becomes a delivery or the loss of the channel.

use reliable_core::{Acker, ConsumeError, Delivery};

use super::acker::AmqpAcker;
use super::coalesce::Coalescer;
use super::convert;
use super::key::KeyExtractor;
use crate::connect::Link;

/// What the consumer holds of its current channel.
pub(super) struct Current {
    pub(super) link: Link,
    pub(super) consumer: lapin::Consumer,
    /// The channel's ack coalescer, unless coalescing is off. Dropped with the channel's
    /// consumer, it writes the acks asked for and stops.
    pub(super) acks: Option<Coalescer>,
    /// Whether a delivery was handed out on this channel.
    pub(super) delivered: bool,
}

impl Current {
    /// What one item of this channel's stream becomes: a delivery handed out, or the loss of
    /// the channel (an error, or the end of the stream), after which the caller drops this
    /// channel so the next call consumes again on a new one. Shared by
    /// [`next`](DeliverySource::next) and [`next_batch`](DeliverySource::next_batch), so each
    /// delivery is handed out the same way. `quorum`: `queue` is a quorum queue (its
    /// redeliveries count themselves); `keys` keys deliveries from other clients.
    pub(super) fn take(
        &mut self,
        item: Option<Result<lapin::message::Delivery, lapin::Error>>,
        queue: &str,
        quorum: bool,
        keys: &KeyExtractor,
    ) -> Result<Delivery, ConsumeError> {
        match item {
            Some(Ok(delivery)) => {
                // Registered before it is handed out, so no multiple ack can cover it unsettled.
                let acker: Box<dyn Acker> = match &self.acks {
                    Some(acks) => Box::new(acks.register(delivery.delivery_tag)),
                    None => Box::new(AmqpAcker {
                        acker: delivery.acker.clone(),
                    }),
                };
                self.delivered = true;
                Ok(convert::to_delivery(delivery, acker, queue, quorum, keys))
            }
            Some(Err(error)) => {
                tracing::warn!(%queue, %error, "AMQP consumer lost; will consume again");
                Err(ConsumeError::ConnectionLost {
                    reason: error.to_string(),
                })
            }
            None => {
                tracing::warn!(%queue, "AMQP consumer stream ended (cancelled or channel closed); will consume again");
                Err(ConsumeError::ConnectionLost {
                    reason: "the broker ended the consumer (cancelled, or its channel closed)"
                        .to_owned(),
                })
            }
        }
    }
}
