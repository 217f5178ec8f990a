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
//! let wire = msg.wire_headers();
//! assert!(wire.iter().any(|h| h == (headers::IDEMPOTENCY_KEY, "order-42-paid")));
//!
//! let back = Message::from_wire(msg.payload().clone(), &wire)?;
//! assert_eq!(back.id(), msg.id());
//! assert_eq!(back.idempotency_key(), msg.idempotency_key());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

//!
//! # Memory
//!
//! A [`Message`] is 88 bytes inline and, with the default key and no user headers, allocates
//! nothing beyond its payload: the id is its 128 bits (its text is written on the stack when
//! the headers are, see [`WireHeaders`]), the default key is "the message id", destination and
//! routing key are shared strings (`Arc<str>`: give many messages one [`Arc<str>`](SharedStr)
//! and they share it), and the rare fields (a business key, user headers) live in one box made
//! only when one of them is set.

mod id;
mod key;
#[cfg(feature = "serde")]
mod typed;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

pub use id::{IdText, MessageId};
pub use key::{IdempotencyKey, SharedStr};
#[cfg(feature = "serde")]
pub use typed::{DecodeError, EncodeError, APPLICATION_JSON};
pub use wire::{WireHeaders, WireIter};

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
    /// A user header, not reserved: the payload's media type. `Message::json` (feature
    /// `serde`) writes `application/json`, and `Message::decode_json` refuses other types.
    pub const CONTENT_TYPE: &str = "content-type";
}

/// A message's headers, apart from the SDK's reserved ones (which live in typed fields).
pub type Headers = BTreeMap<String, String>;

/// The headers of a message without user headers.
static NO_HEADERS: Headers = BTreeMap::new();

/// A message the SDK delivers: payload, headers, destination, routing key and identities.
///
/// Cloning is cheap for the payload ([`Bytes`] is reference counted) and the shared strings;
/// user headers are copied. See the [module docs](self#memory) for its layout.
#[derive(Clone)]
pub struct Message {
    id: MessageId,
    payload: Bytes,
    destination: Option<Arc<str>>,
    routing_key: Option<Arc<str>>,
    /// A business key or user headers; `None` when neither is set (never an empty box).
    rare: Option<Box<Rare>>,
}

/// The fields most messages leave unset.
#[derive(Clone, Default)]
struct Rare {
    /// The business key; `None`: the key is the message id. Never the id's own text.
    key: Option<Arc<str>>,
    headers: Headers,
}

impl Message {
    /// A message with a fresh [`MessageId`] and the idempotency key defaulting to that id.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            id: MessageId::new(),
            payload: payload.into(),
            destination: None,
            routing_key: None,
            rare: None,
        }
    }

    /// Replaces the message id. When the idempotency key was still the default (the old id), it
    /// follows the new id.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        let key = self.rare.as_mut().and_then(|r| r.key.take());
        self.set_key(key);
        self
    }

    /// Sets the idempotency key from a business key. Fails when it is empty or too long.
    pub fn with_idempotency_key(self, key: impl Into<String>) -> Result<Self, MessageFormatError> {
        Ok(self.with_key(IdempotencyKey::new(key)?))
    }

    /// Sets an already validated idempotency key.
    pub fn with_key(mut self, key: IdempotencyKey) -> Self {
        let shared = match key.as_shared() {
            Some(text) => Arc::clone(text),
            None => Arc::from(key.as_str()),
        };
        self.set_key(Some(shared));
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
    ///
    /// Takes any [`SharedStr`] (`&str`, `String`, `Arc<str>`, ...); pass one `Arc<str>` to many
    /// messages to share it instead of copying the name into each.
    pub fn with_destination(mut self, destination: impl SharedStr) -> Self {
        self.destination = Some(destination.into_shared());
        self
    }

    /// Sets the AMQP routing key or the Kafka partition key. Takes any [`SharedStr`], like
    /// [`with_destination`](Self::with_destination).
    pub fn with_routing_key(mut self, key: impl SharedStr) -> Self {
        self.routing_key = Some(key.into_shared());
        self
    }

    /// Adds or replaces a header in place; reserved SDK header names are ignored.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        if !is_reserved(&name) {
            self.rare
                .get_or_insert_with(Box::default)
                .headers
                .insert(name, value.into());
        }
    }

    /// The message id; the same on every resend.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The idempotency key consumers deduplicate on.
    ///
    /// Returned by value (since the compact message, which keeps no key text for the default
    /// key): the default key is the id's text made on the stack, a business key a shared
    /// string; neither allocates. Pass `&msg.idempotency_key()` where a `&IdempotencyKey` is
    /// wanted.
    pub fn idempotency_key(&self) -> IdempotencyKey {
        IdempotencyKey::of(self.id, self.business_key())
    }

    /// Whether the idempotency key is the message id (the default: no key header is written).
    pub fn key_is_id(&self) -> bool {
        self.business_key().is_none()
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The user headers (without the SDK's reserved ones).
    pub fn headers(&self) -> &Headers {
        self.rare.as_ref().map_or(&NO_HEADERS, |r| &r.headers)
    }

    /// One user header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name).map(String::as_str)
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
    /// Returns [`WireHeaders`], which holds the id's text on the stack (nothing is allocated);
    /// iterate it by reference. (Before the compact message this returned the iterator itself:
    /// write `msg.wire_headers().iter()` or `for (name, value) in &msg.wire_headers()`.)
    ///
    /// ```
    /// use reliable_core::message::{headers, Message};
    ///
    /// let plain = Message::new("x");
    /// let wire = plain.wire_headers();
    /// let names: Vec<&str> = wire.iter().map(|(k, _)| k).collect();
    /// assert_eq!(names, [headers::MESSAGE_ID]);
    ///
    /// let keyed = Message::new("x").with_idempotency_key("order-42")?;
    /// for (name, value) in &keyed.wire_headers() {
    ///     assert!(name != headers::IDEMPOTENCY_KEY || value == "order-42");
    /// }
    /// # Ok::<(), reliable_core::message::MessageFormatError>(())
    /// ```
    pub fn wire_headers(&self) -> WireHeaders<'_> {
        WireHeaders::new(
            self.id.text(),
            self.business_key().map(|k| &**k),
            self.rare
                .as_ref()
                .map(|r| &r.headers)
                .filter(|h| !h.is_empty()),
        )
    }

    /// The message id as header text (the `x-message-id` value).
    ///
    /// Returned by value (since the compact message, which keeps no id text): [`IdText`] holds
    /// the 36 bytes inline and dereferences to `str`; use `.as_str()` or `&*` where a `&str` is
    /// wanted.
    pub fn id_text(&self) -> IdText {
        self.id.text()
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
                headers::IDEMPOTENCY_KEY => key = Some(IdempotencyKey::shared(value)?),
                _ if is_reserved(name) => {}
                _ => {
                    user.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        let id: MessageId = id.ok_or(MessageFormatError::MissingHeader {
            header: headers::MESSAGE_ID,
        })?;
        let mut msg = Self {
            id,
            payload: payload.into(),
            destination: None,
            routing_key: None,
            rare: (!user.is_empty()).then(|| {
                Box::new(Rare {
                    key: None,
                    headers: user,
                })
            }),
        };
        msg.set_key(key.and_then(|k| k.as_shared().cloned()));
        Ok(msg)
    }

    fn business_key(&self) -> Option<&Arc<str>> {
        self.rare.as_ref().and_then(|r| r.key.as_ref())
    }

    /// Sets the business key; the id's own text (or `None`) means the default key. Keeps the
    /// invariants: no key equal to the id's text, no empty box.
    fn set_key(&mut self, key: Option<Arc<str>>) {
        let key = key.filter(|k| **k != *self.id.text());
        match (&mut self.rare, key) {
            (Some(rare), key) => {
                rare.key = key;
                if rare.key.is_none() && rare.headers.is_empty() {
                    self.rare = None;
                }
            }
            (None, Some(key)) => {
                self.rare = Some(Box::new(Rare {
                    key: Some(key),
                    headers: Headers::new(),
                }))
            }
            (None, None) => {}
        }
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.payload == other.payload
            && self.destination == other.destination
            && self.routing_key == other.routing_key
            && self.business_key() == other.business_key()
            && self.headers() == other.headers()
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("idempotency_key", &self.idempotency_key())
            .field("payload", &self.payload)
            .field("headers", self.headers())
            .field("destination", &self.destination())
            .field("routing_key", &self.routing_key())
            .finish()
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
mod tests;
