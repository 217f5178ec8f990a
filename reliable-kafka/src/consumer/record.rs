//! From librdkafka to the SDK: a record becomes a [`Message`], a client error a
//! [`ConsumeError`].

use std::borrow::Cow;
use std::sync::Arc;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::ClientConfig;
use reliable_core::{ConsumeError, Message};

use crate::config::redact;

/// Rebuilds the SDK message from a record. Records produced without the SDK's identity
/// headers get a fresh id and an idempotency key derived from their position, so their
/// redeliveries still deduplicate.
pub(super) fn decode(record: &BorrowedMessage<'_>, topic: &Arc<str>) -> Message {
    let payload = record.payload().unwrap_or_default();
    // Header values are borrowed from the record; only a value that is not UTF-8 is copied
    // (lossily).
    let headers: Vec<(&str, Cow<'_, str>)> = record
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| Some((h.key, String::from_utf8_lossy(h.value?))))
                .collect()
        })
        .unwrap_or_default();
    let wire = headers.iter().map(|(k, v)| (*k, v.as_ref()));
    // The payload is copied once, into the message.
    let message = match Message::from_wire(payload.to_vec(), wire) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(topic = record.topic(), partition = record.partition(), offset = record.offset(), error = %e, "record without SDK identity headers; deriving its idempotency key from its position");
            let position_key = format!(
                "kafka:{}/{}/{}",
                record.topic(),
                record.partition(),
                record.offset()
            );
            let mut m = Message::new(payload.to_vec());
            for (k, v) in &headers {
                m.set_header(*k, v.as_ref());
            }
            m.clone().with_idempotency_key(position_key).unwrap_or(m)
        }
    };
    let message = message.with_destination(topic);
    match record.key() {
        Some(key) => message.with_routing_key(String::from_utf8_lossy(key)),
        None => message,
    }
}

/// A client error as the pipeline sees it: authorization and configuration errors are fatal,
/// the rest are librdkafka's to recover from.
pub(super) fn classify(e: &KafkaError, config: &ClientConfig) -> ConsumeError {
    let reason = redact(config, e.to_string());
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::InvalidConfig,
        ) => ConsumeError::Fatal { reason },
        _ => ConsumeError::ConnectionLost { reason },
    }
}
