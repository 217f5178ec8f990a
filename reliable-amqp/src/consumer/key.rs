//! [`KeyExtractor`]: the idempotency key of a delivery that does not come from this SDK.

use std::fmt;
use std::sync::Arc;

use reliable_core::{IdempotencyKey, MessageId};

use sha2::{Digest, Sha256};

/// What a [`KeyExtractor::custom`] function returns for a delivery: its key's text, or `None`
/// to use the default ([`KeyExtractor::MessageIdOrContentHash`]).
pub type KeyFn = dyn Fn(&lapin::message::Delivery) -> Option<String> + Send + Sync;

/// How an [`AmqpConsumer`](super::AmqpConsumer) keys a delivery that lacks this SDK's identity
/// headers (`x-message-id`, `x-idempotency-key`): one published by another client or
/// language. Deduplication ([`DedupeLayer`](reliable_core::pipeline::DedupeLayer)) and attempt
/// counting (loss-matrix rows L8 and L10) work on the key, so it must be the same on every
/// redelivery and resend of the message. Deliveries that carry the SDK's headers always keep
/// the key their producer gave them.
///
/// The default, [`MessageIdOrContentHash`](Self::MessageIdOrContentHash), trades as follows:
/// a producer that sets the AMQP `message-id` property decides which messages are the same;
/// without it the content decides, so a resend of the same message is recognised but **two
/// distinct messages with the same exchange, routing key and body are taken for one** and the
/// second is not handled. Where that can happen (e.g. "increment" commands), key on a business
/// header with [`header`](Self::header) or a function with [`custom`](Self::custom).
///
/// A key that is empty or longer than [`IdempotencyKey::MAX_LEN`] bytes is replaced by the
/// content hash (with a warning). The delivery's [`MessageId`] is the AMQP `message-id` when
/// that is a UUID, otherwise one derived from the key, so it too is stable.
///
/// ```no_run
/// use reliable_amqp::consumer::{AmqpConsumer, KeyExtractor};
/// use reliable_amqp::settings::AmqpSettings;
///
/// # async fn run() -> Result<(), reliable_amqp::AmqpError> {
/// let consumer = AmqpConsumer::connect("amqp://127.0.0.1:5672/%2f", "orders", AmqpSettings::safe())
///     .await?
///     .with_key_extractor(KeyExtractor::header("order-id"));
/// # let _ = consumer;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum KeyExtractor {
    /// The AMQP `message-id` property when set, otherwise the content hash (see
    /// [`ContentHash`](Self::ContentHash)). The default.
    #[default]
    MessageIdOrContentHash,
    /// Always `sha256:<64 hex digits>`, the SHA-256 of the exchange, the routing key and the
    /// body (each length-prefixed). Headers and other properties are left out: the broker adds
    /// some on redelivery (`x-delivery-count`, `x-death`), and clients often stamp a fresh
    /// `timestamp` or `message-id` on every publish, resends included.
    ContentHash,
    /// The text value of this AMQP header (e.g. a business id); the default when the header is
    /// missing or not text.
    Header(String),
    /// A function of the lapin delivery; the default when it returns `None`.
    Custom(Arc<KeyFn>),
}

impl KeyExtractor {
    /// Keys on the text header `name`; see [`Header`](Self::Header).
    pub fn header(name: impl Into<String>) -> Self {
        Self::Header(name.into())
    }

    /// Keys with `f`; see [`Custom`](Self::Custom).
    pub fn custom(
        f: impl Fn(&lapin::message::Delivery) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self::Custom(Arc::new(f))
    }

    /// The key and message id of `delivery`; `headers` are its text headers. `None` only if
    /// even the content hash were refused as a key (it is 71 ASCII bytes, so never).
    pub(super) fn identity(
        &self,
        delivery: &lapin::message::Delivery,
        headers: &[(String, String)],
    ) -> Option<(IdempotencyKey, MessageId)> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        let hash = || content_hash(delivery);
        let default = || message_id.clone().unwrap_or_else(hash);
        let text = match self {
            Self::MessageIdOrContentHash => default(),
            Self::ContentHash => hash(),
            Self::Header(name) => headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(default),
            Self::Custom(f) => f(delivery).unwrap_or_else(default),
        };
        let key = IdempotencyKey::new(text)
            .or_else(|error| {
                tracing::warn!(%error, "unusable idempotency key for a delivery; keying it by its content hash instead");
                IdempotencyKey::new(content_hash(delivery))
            })
            .ok()?;
        let id = message_id
            .and_then(|id| id.parse::<MessageId>().ok())
            .or_else(|| id_of(&key))?;
        Some((key, id))
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageIdOrContentHash => f.write_str("MessageIdOrContentHash"),
            Self::ContentHash => f.write_str("ContentHash"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// `sha256:<hex>` of the delivery's exchange, routing key and body.
fn content_hash(delivery: &lapin::message::Delivery) -> String {
    let mut h = Sha256::new();
    h.update(b"reliable-amqp content key v1\0");
    for part in [
        delivery.exchange.as_str().as_bytes(),
        delivery.routing_key.as_str().as_bytes(),
        &delivery.data,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A version-8 UUID (RFC 9562, custom) made of the SHA-256 of `key`: the same key, the same id.
fn id_of(key: &IdempotencyKey) -> Option<MessageId> {
    let mut h = Sha256::new();
    h.update(b"reliable-amqp message id v1\0");
    h.update(key.as_str().as_bytes());
    let digest = h.finalize();
    let bytes: [u8; 16] = digest.get(..16)?.try_into().ok()?;
    uuid::Uuid::new_v8(bytes).to_string().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_derived_from_keys_are_stable_version_8_uuids() {
        let key = IdempotencyKey::new("sha256:00").unwrap();
        let id = id_of(&key).unwrap();
        assert_eq!(Some(id), id_of(&key));
        assert_ne!(Some(id), id_of(&IdempotencyKey::new("other").unwrap()));
        assert_eq!(id.as_uuid().get_version_num(), 8);
    }
}
