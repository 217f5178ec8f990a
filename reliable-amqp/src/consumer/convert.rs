//! Turning a lapin delivery into the core's [`Delivery`].

use lapin::types::{AMQPValue, FieldTable};
use reliable_core::{Acker, Delivery, Message};

use super::key::KeyExtractor;

/// The header a quorum queue sets on a redelivery: how many times the message went back to the
/// queue before this delivery (absent on the first delivery).
const DELIVERY_COUNT: &str = "x-delivery-count";

/// The core's delivery for a lapin delivery from `queue`, settled through `acker`. `quorum`: the queue is a quorum queue, whose redeliveries carry `x-delivery-count`, so a
/// first delivery (no header, not redelivered) counts 1. `keys` keys a delivery without the
/// SDK's identity headers.
pub(super) fn to_delivery(
    delivery: lapin::message::Delivery,
    acker: Box<dyn Acker>,
    queue: &str,
    quorum: bool,
    keys: &KeyExtractor,
) -> Delivery {
    let count = delivery_count(
        delivery.properties.headers().as_ref(),
        delivery.redelivered,
        quorum,
    );
    let headers = text_headers(delivery.properties.headers().as_ref());
    let wire = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let message = match Message::from_wire(delivery.data.clone(), wire) {
        Ok(message) => message,
        Err(error) => {
            // Not produced through reliable: keep it deliverable, with a key that is the same
            // on every redelivery (so deduplication and attempt counting work for it).
            let mut message = Message::new(delivery.data.clone());
            if let Some((key, id)) = keys.identity(&delivery, &headers) {
                message = message.with_id(id).with_key(key);
            }
            tracing::debug!(%error, key = %message.idempotency_key(), extractor = ?keys, "delivery without reliable's identity headers; keyed by the consumer's KeyExtractor");
            for (name, value) in &headers {
                message.set_header(name.as_str(), value.as_str());
            }
            message
        }
    }
    .with_destination(delivery.exchange.as_str())
    .with_routing_key(delivery.routing_key.as_str());
    tracing::trace!(message_id = %message.id(), redelivered = delivery.redelivered, delivery_count = ?count, "delivery");
    let converted = Delivery::new(message, acker)
        .with_redelivered(delivery.redelivered)
        .with_origin(queue);
    match count {
        Some(n) => converted.with_delivery_count(n),
        None => converted,
    }
}

/// This delivery's number (1 for the first) from the broker's `x-delivery-count`, or `None`
/// where the broker's count is not known (a classic queue, or a redelivery without the header):
/// the pipeline then counts with its attempt counter.
fn delivery_count(table: Option<&FieldTable>, redelivered: bool, quorum: bool) -> Option<u32> {
    let returned = table
        .and_then(|t| t.inner().get(DELIVERY_COUNT))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
            AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
            _ => None,
        });
    match returned {
        Some(n) => Some(n.saturating_add(1)),
        None if quorum && !redelivered => Some(1),
        None => None,
    }
}

/// The text-valued headers of a delivery.
fn text_headers(table: Option<&FieldTable>) -> Vec<(String, String)> {
    table
        .map(|t| {
            t.inner()
                .iter()
                .filter_map(|(k, v)| match v {
                    AMQPValue::LongString(s) => Some((
                        k.to_string(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    )),
                    AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}
