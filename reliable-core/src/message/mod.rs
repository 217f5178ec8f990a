//! The message model: payload, headers, destination, routing key and the two identities every
//! message carries.
//!
//! # Identities
//!
//! * [`MessageId`]: unique and time-ordered (a UUIDv7), assigned by the SDK when the message is
//!   built unless the caller sets one. It names one logical message: every resend carries the same
//!   id (invariant 6), so it is how confirms, returns and logs are matched to a publish.
//! * [`IdempotencyKey`]: the key consumers deduplicate on. It defaults to the message id; derive it
//!   from a business key (an order number, a payment id) when two *different* messages must count
//!   as the same effect.
//!
//! # Wire format (stable)
//!
//! Both identities travel as message headers with UTF-8 string values; adapters write them with
//! [`Message::wire_headers`] and read them back with [`Message::from_wire`]:
//!
//! | header                          | value                                                   |
//! |---------------------------------|---------------------------------------------------------|
//! | [`headers::MESSAGE_ID`] `x-message-id` | the UUIDv7 in lower-case hyphenated form, 36 characters, e.g. `0190b5f2-6c1e-7a3b-9d4e-2f1a3b4c5d6e` |
//! | [`headers::IDEMPOTENCY_KEY`] `x-idempotency-key` | any non-empty UTF-8 string of at most [`IdempotencyKey::MAX_LEN`] bytes; written only when the key differs from the message id (absent: the key is the message id) |
//! | [`headers::DEAD_LETTER_REASON`] `x-dead-letter-reason` | set only on dead-lettered copies: why the handler gave up |
//!
//! Header names starting with `x-message-` and `x-idempotency-` are reserved for the SDK. This
//! format is part of the public contract: changing it is a breaking change.
//!
//! The key header is left out when the key is the message id (the default): it would repeat the
//! id. Headers are not free on small messages (with 100-byte payloads, raw rdkafka carrying the
//! identity headers ran at about two thirds of its header-less throughput, and a second header
//! added about 1.2 µs of client CPU per message; see the README's performance section).
//! Readers take a missing key header to mean the message id, so messages written with both
//! headers still read back the same.
//!
//! ```
//! use reliable_core::message::{headers, Message};
//!
//! let msg = Message::new(&b"order 42 paid"[..])
//!     .with_destination("orders")
//!     .with_routing_key("eu")
//!     .with_idempotency_key("order-42-paid")?
//!     .with_header("content-type", "text/plain");
//! let wire: Vec<(&str, &str)> = msg.wire_headers().collect();
//! assert!(wire.contains(&(headers::IDEMPOTENCY_KEY, "order-42-paid")));
//!
//! let back = Message::from_wire(msg.payload().clone(), wire.iter().map(|(k, v)| (*k, *v)))?;
//! assert_eq!(back.id(), msg.id());
//! assert_eq!(back.idempotency_key(), msg.idempotency_key());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

/// Header names the SDK writes and reads. Values are UTF-8 strings; see the module docs.
pub mod headers {
    /// Carries the [`MessageId`](super::MessageId) (UUIDv7, lower-case hyphenated).
    pub const MESSAGE_ID: &str = "x-message-id";
    /// Carries the [`IdempotencyKey`](super::IdempotencyKey).
    pub const IDEMPOTENCY_KEY: &str = "x-idempotency-key";
    /// Set on dead-lettered copies: the handler's final error, as text.
    pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
    /// Set on dead-lettered copies of offset-based deliveries: the original's topic.
    pub const ORIGIN_TOPIC: &str = "x-origin-topic";
    /// Set on dead-lettered copies of offset-based deliveries: the original's partition.
    pub const ORIGIN_PARTITION: &str = "x-origin-partition";
    /// Set on dead-lettered copies of offset-based deliveries: the original's offset.
    pub const ORIGIN_OFFSET: &str = "x-origin-offset";
    /// Set on dead-lettered copies of queue deliveries whose adapter names the queue: the
    /// original's queue.
    pub const ORIGIN_QUEUE: &str = "x-origin-queue";
    /// Set on dead-lettered copies whose deliveries were counted (broker count or attempt
    /// counter): how many times the message was delivered, the last one included.
    pub const DELIVERY_ATTEMPTS: &str = "x-delivery-attempts";
}

/// A unique, time-ordered message id (UUIDv7).
///
/// Ids generated later in the same process compare greater; ids from different processes are
/// ordered by their millisecond timestamp. Displayed and parsed as the lower-case hyphenated UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A fresh id: UUIDv7, unique and ordered by creation time.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<uuid::Uuid> for MessageId {
    fn from(value: uuid::Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

impl FromStr for MessageId {
    type Err = MessageFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| MessageFormatError::InvalidMessageId {
                value: s.chars().take(64).collect(),
            })
    }
}

/// The key consumers deduplicate on; defaults to the message id's text.
///
/// Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Longest accepted key, in bytes (fits AMQP short strings and common database key columns).
    pub const MAX_LEN: usize = 255;

    /// A key from a business identifier. Fails when the key is empty or longer than
    /// [`IdempotencyKey::MAX_LEN`] bytes.
    pub fn new(key: impl Into<String>) -> Result<Self, MessageFormatError> {
        let key: String = key.into();
        if key.is_empty() {
            return Err(MessageFormatError::EmptyIdempotencyKey);
        }
        if key.len() > Self::MAX_LEN {
            return Err(MessageFormatError::IdempotencyKeyTooLong { len: key.len() });
        }
        Ok(Self(Arc::from(key)))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<MessageId> for IdempotencyKey {
    fn from(id: MessageId) -> Self {
        Self(id_text(id))
    }
}

fn id_text(id: MessageId) -> Arc<str> {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    Arc::from(&*id.0.hyphenated().encode_lower(&mut buf))
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", &*self.0)
    }
}

/// A message's headers, apart from the SDK's reserved ones (which live in typed fields).
pub type Headers = BTreeMap<String, String>;

/// A message the SDK delivers: payload, headers, destination, routing key and identities.
///
/// Cloning is cheap for the payload ([`Bytes`] is reference counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    id: MessageId,
    /// The id's header text, shared with the default idempotency key (one allocation for both).
    id_text: Arc<str>,
    idempotency_key: IdempotencyKey,
    payload: Bytes,
    headers: Headers,
    destination: Option<String>,
    routing_key: Option<String>,
}

impl Message {
    /// A message with a fresh [`MessageId`] and the idempotency key defaulting to that id.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let id = MessageId::new();
        let id_text = id_text(id);
        Self {
            id,
            idempotency_key: IdempotencyKey(id_text.clone()),
            id_text,
            payload: payload.into(),
            headers: Headers::new(),
            destination: None,
            routing_key: None,
        }
    }

    /// Replaces the message id. When the idempotency key was still the default (the old id), it
    /// follows the new id.
    pub fn with_id(mut self, id: MessageId) -> Self {
        let text = id_text(id);
        if *self.idempotency_key.0 == *self.id_text {
            self.idempotency_key = IdempotencyKey(text.clone());
        }
        self.id = id;
        self.id_text = text;
        self
    }

    /// Sets the idempotency key from a business key. Fails when it is empty or too long.
    pub fn with_idempotency_key(
        mut self,
        key: impl Into<String>,
    ) -> Result<Self, MessageFormatError> {
        self.idempotency_key = IdempotencyKey::new(key)?;
        Ok(self)
    }

    /// Sets an already validated idempotency key.
    pub fn with_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = key;
        self
    }

    /// Adds or replaces a header. Reserved SDK header names are ignored here: the identities are
    /// set through [`with_id`](Self::with_id) and [`with_idempotency_key`](Self::with_idempotency_key).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_header(name, value);
        self
    }

    /// Sets where the message goes: the AMQP exchange or the Kafka topic. `None` (the default)
    /// means the transport's configured default destination.
    pub fn with_destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Sets the AMQP routing key or the Kafka partition key.
    pub fn with_routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// Adds or replaces a header in place; reserved SDK header names are ignored.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        if !is_reserved(&name) {
            self.headers.insert(name, value.into());
        }
    }

    /// The message id; the same on every resend.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The idempotency key consumers deduplicate on.
    pub fn idempotency_key(&self) -> &IdempotencyKey {
        &self.idempotency_key
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The user headers (without the SDK's reserved ones).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// One user header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The destination (exchange or topic), if set.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// The routing key (AMQP) or partition key (Kafka), if set.
    pub fn routing_key(&self) -> Option<&str> {
        self.routing_key.as_deref()
    }

    /// Every header to put on the wire: the SDK's identity headers first (the key only when it
    /// is not the message id), then the user headers.
    ///
    /// ```
    /// use reliable_core::message::{headers, Message};
    ///
    /// let plain = Message::new("x");
    /// let names: Vec<&str> = plain.wire_headers().map(|(k, _)| k).collect();
    /// assert_eq!(names, [headers::MESSAGE_ID]);
    ///
    /// let keyed = Message::new("x").with_idempotency_key("order-42")?;
    /// assert!(keyed.wire_headers().any(|h| h == (headers::IDEMPOTENCY_KEY, "order-42")));
    /// # Ok::<(), reliable_core::message::MessageFormatError>(())
    /// ```
    pub fn wire_headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let key = self.idempotency_key.as_str();
        std::iter::once((headers::MESSAGE_ID, &*self.id_text))
            .chain((key != &*self.id_text).then_some((headers::IDEMPOTENCY_KEY, key)))
            .chain(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The message id as header text (the `x-message-id` value).
    pub fn id_text(&self) -> &str {
        &self.id_text
    }

    /// Rebuilds a message from what a transport received: the payload and every header. The
    /// message id header is required; without a key header the key is the message id. The
    /// other headers become user headers. Destination and
    /// routing key are transport metadata: set them with the `with_*` builders if needed.
    pub fn from_wire<'a>(
        payload: impl Into<Bytes>,
        wire_headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, MessageFormatError> {
        let mut id = None;
        let mut key = None;
        let mut user = Headers::new();
        for (name, value) in wire_headers {
            match name {
                headers::MESSAGE_ID => id = Some(value.parse::<MessageId>()?),
                headers::IDEMPOTENCY_KEY => key = Some(IdempotencyKey::new(value)?),
                _ if is_reserved(name) => {}
                _ => {
                    user.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        let id: MessageId = id.ok_or(MessageFormatError::MissingHeader {
            header: headers::MESSAGE_ID,
        })?;
        let id_text = id_text(id);
        let idempotency_key = key.unwrap_or_else(|| IdempotencyKey(id_text.clone()));
        Ok(Self {
            id,
            id_text,
            idempotency_key,
            payload: payload.into(),
            headers: user,
            destination: None,
            routing_key: None,
        })
    }
}

fn is_reserved(name: &str) -> bool {
    name == headers::MESSAGE_ID || name == headers::IDEMPOTENCY_KEY
}

/// Why a message could not be built or decoded. Fix the producer (or the header) named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageFormatError {
    /// A required SDK header is missing: the message was not produced by this SDK (or a proxy
    /// stripped headers). Produce it through `reliable`, or set the header yourself.
    #[error(
        "header `{header}` is missing; produce the message through reliable or set the header"
    )]
    MissingHeader {
        /// The missing header's name.
        header: &'static str,
    },
    /// The `x-message-id` header is not a UUID.
    #[error("header `x-message-id` holds {value:?}, not a UUID; the producer must write a UUIDv7")]
    InvalidMessageId {
        /// The offending value (truncated to 64 characters).
        value: String,
    },
    /// The idempotency key is empty.
    #[error("idempotency key is empty; derive it from a non-empty business key")]
    EmptyIdempotencyKey,
    /// The idempotency key is longer than [`IdempotencyKey::MAX_LEN`].
    #[error("idempotency key is {len} bytes, more than 255; hash long business keys first")]
    IdempotencyKeyTooLong {
        /// The key's length in bytes.
        len: usize,
    },
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    fn round_trip(msg: &Message) -> Message {
        let wire: Vec<(String, String)> = msg
            .wire_headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Message::from_wire(
            msg.payload().clone(),
            wire.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .expect("decodes")
    }

    #[test]
    fn the_key_header_travels_only_when_it_is_not_the_message_id() {
        let plain = Message::new("x").with_header("trace", "t1");
        let names: Vec<&str> = plain.wire_headers().map(|(k, _)| k).collect();
        assert_eq!(names, [headers::MESSAGE_ID, "trace"]);
        let back = round_trip(&plain);
        assert_eq!(back.id(), plain.id());
        assert_eq!(back.idempotency_key(), plain.idempotency_key());
        assert_eq!(back.idempotency_key().as_str(), plain.id_text());

        let keyed = Message::new("x")
            .with_idempotency_key("order-42")
            .expect("valid key");
        assert_eq!(keyed.wire_headers().count(), 2);
        assert_eq!(round_trip(&keyed).idempotency_key().as_str(), "order-42");
    }

    #[test]
    fn messages_written_with_both_identity_headers_read_back_the_same() {
        let id = MessageId::new().to_string();
        let msg = Message::from_wire(
            &b"x"[..],
            [
                (headers::MESSAGE_ID, id.as_str()),
                (headers::IDEMPOTENCY_KEY, id.as_str()),
            ],
        )
        .expect("decodes");
        assert_eq!(msg.id_text(), id);
        assert_eq!(msg.idempotency_key().as_str(), id);
        assert!(matches!(
            Message::from_wire(&b"x"[..], [(headers::IDEMPOTENCY_KEY, "k")]),
            Err(MessageFormatError::MissingHeader {
                header: headers::MESSAGE_ID
            })
        ));
    }
}
