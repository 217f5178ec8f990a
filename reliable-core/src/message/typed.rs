//! Typed messages (feature `serde`): build a [`Message`] from any `Serialize` value and decode
//! its payload back into a `Deserialize` type, as JSON.
//!
//! The payload is the value's JSON and the message carries the header
//! [`headers::CONTENT_TYPE`] `content-type: application/json`, an ordinary user header that
//! travels as an AMQP header or a Kafka record header. Decoding accepts a payload without that
//! header (a message from another client) and refuses one that names another content type.
//!
//! A payload that does not decode is the producer's bug or a message for another consumer: no
//! retry can fix it. [`DecodeError`] therefore converts into a permanent
//! [`HandlerError`], so `msg.decode_json::<T>()?` in a handler sends such a message to the dead
//! letter with the reason, without retries. [`json_handler`](crate::pipeline::json_handler)
//! does the decoding before a handler that takes the typed value.
//!
//! ```
//! use reliable_core::Message;
//!
//! let msg = Message::json(&vec![1, 2, 3])?.with_destination("numbers");
//! assert_eq!(msg.header("content-type"), Some("application/json"));
//! assert_eq!(msg.decode_json::<Vec<u32>>()?, [1, 2, 3]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{headers, Message};
use crate::pipeline::HandlerError;

/// The `content-type` value [`Message::json`] writes.
///
/// ```
/// use reliable_core::message::{headers, APPLICATION_JSON};
/// use reliable_core::Message;
///
/// let msg = Message::json(&"hello")?;
/// assert_eq!(msg.header(headers::CONTENT_TYPE), Some(APPLICATION_JSON));
/// # Ok::<(), reliable_core::message::EncodeError>(())
/// ```
pub const APPLICATION_JSON: &str = "application/json";

impl Message {
    /// A message whose payload is `value` as JSON, with the header `content-type:
    /// application/json` (and, like [`Message::new`], a fresh id and the default key).
    ///
    /// Fails with [`EncodeError`] when `value`'s `Serialize` implementation fails (a map with
    /// keys that are not strings, a custom implementation's error).
    ///
    /// ```
    /// use reliable_core::Message;
    ///
    /// let msg = Message::json(&[("order", 42)])?
    ///     .with_destination("orders")
    ///     .with_idempotency_key("order-42")?;
    /// assert_eq!(&msg.payload()[..], br#"[["order",42]]"#);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, EncodeError> {
        let payload = serde_json::to_vec(value).map_err(|source| EncodeError {
            type_name: std::any::type_name::<T>(),
            source,
        })?;
        Ok(Self::new(payload).with_header(headers::CONTENT_TYPE, APPLICATION_JSON))
    }

    /// Decodes the payload as JSON into `T`.
    ///
    /// A message without a `content-type` header is decoded as JSON; one whose content type is
    /// neither `application/json` nor `application/<something>+json` (parameters such as
    /// `; charset=utf-8` allowed, case ignored) fails with [`DecodeError::ContentType`]
    /// without looking at the payload. In a handler, `?` turns the error into a permanent
    /// [`HandlerError`]: the message goes to the dead letter, never to a retry.
    ///
    /// ```
    /// use reliable_core::message::DecodeError;
    /// use reliable_core::Message;
    ///
    /// let msg = Message::new(r#"{"order": 42}"#);
    /// let value: std::collections::BTreeMap<String, u64> = msg.decode_json()?;
    /// assert_eq!(value["order"], 42);
    ///
    /// let garbage = Message::new("not json");
    /// assert!(matches!(garbage.decode_json::<u64>(), Err(DecodeError::Json { .. })));
    /// # Ok::<(), DecodeError>(())
    /// ```
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        if let Some(found) = self.header(headers::CONTENT_TYPE) {
            if !is_json(found) {
                return Err(DecodeError::ContentType {
                    found: truncate(found),
                });
            }
        }
        serde_json::from_slice(self.payload()).map_err(|source| DecodeError::Json {
            type_name: std::any::type_name::<T>(),
            source,
        })
    }
}

/// Whether a `content-type` value names JSON: `application/json` or `application/*+json`,
/// parameters ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == APPLICATION_JSON
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"))
}

/// A header value cut to 64 characters for an error message (a dead-letter reason is bounded).
fn truncate(value: &str) -> String {
    value.chars().take(64).collect()
}

/// A value could not be encoded as a JSON message ([`Message::json`]). The value is the
/// problem, not the broker: fix its `Serialize` implementation (JSON object keys must be
/// strings) and build the message again.
///
/// ```
/// use std::collections::HashMap;
/// use reliable_core::Message;
///
/// // JSON object keys must be strings.
/// let bad: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
/// let err = Message::json(&bad).unwrap_err();
/// assert!(err.to_string().contains("could not encode"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("could not encode a `{type_name}` as JSON: {source}; fix the value's Serialize implementation (JSON object keys must be strings)")]
pub struct EncodeError {
    type_name: &'static str,
    #[source]
    source: serde_json::Error,
}

impl EncodeError {
    /// The Rust type that failed to encode, as [`std::any::type_name`] spells it.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use reliable_core::Message;
    ///
    /// let bad: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    /// let err = Message::json(&bad).unwrap_err();
    /// assert!(err.type_name().contains("HashMap"));
    /// ```
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

/// A payload could not be decoded into the type a handler asked for
/// ([`Message::decode_json`]). No retry fixes it: it converts into a permanent
/// [`HandlerError`], so the pipeline dead-letters the message with this text as its
/// `x-dead-letter-reason`. Fix the producer, or the type if the format changed on purpose.
///
/// ```
/// use reliable_core::message::DecodeError;
/// use reliable_core::pipeline::{ErrorKind, HandlerError};
/// use reliable_core::Message;
///
/// let err = Message::new("{").decode_json::<u32>().unwrap_err();
/// assert!(matches!(err, DecodeError::Json { .. }));
/// assert!(err.to_string().contains("could not decode"));
/// assert_eq!(HandlerError::from(err).kind(), ErrorKind::Permanent);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message's `content-type` header names something other than JSON: it was meant for
    /// another consumer, or produced without [`Message::json`].
    #[error("could not decode the payload: its content-type is {found:?}, not JSON; route it to a consumer of that format or produce it with Message::json")]
    ContentType {
        /// The header's value (at most 64 characters).
        found: String,
    },
    /// The payload is not valid JSON, or not JSON of the expected shape.
    #[error("could not decode the JSON payload into `{type_name}`: {source}; fix the producer, or the type if the format changed on purpose")]
    Json {
        /// The Rust type asked for, as [`std::any::type_name`] spells it.
        type_name: &'static str,
        /// What serde_json found (line and column, the missing or unknown field).
        #[source]
        source: serde_json::Error,
    },
}

/// A payload that does not decode is a permanent failure: the pipeline dead-letters it at once
/// (no [`RetryLayer`](crate::pipeline::RetryLayer) attempt), with the decode error as reason.
///
/// ```
/// use reliable_core::pipeline::{handler_fn, HandlerError};
/// use reliable_core::Message;
///
/// let handler = handler_fn(|msg: Message| async move {
///     let amount: u64 = msg.decode_json()?; // `?`: DecodeError -> permanent HandlerError
///     assert!(amount > 0);
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = handler;
/// ```
impl From<DecodeError> for HandlerError {
    fn from(err: DecodeError) -> Self {
        HandlerError::permanent(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ErrorKind;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u64,
        item: String,
    }

    #[test]
    fn a_value_round_trips_through_a_message_and_its_wire_headers() {
        let order = Order {
            id: 42,
            item: "tea".into(),
        };
        let msg = Message::json(&order).expect("encodes");
        assert_eq!(msg.header(headers::CONTENT_TYPE), Some(APPLICATION_JSON));
        let wire: Vec<(String, String)> = msg
            .wire_headers()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let back = Message::from_wire(
            msg.payload().clone(),
            wire.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .expect("wire format");
        assert_eq!(back.decode_json::<Order>().expect("decodes"), order);
    }

    #[test]
    fn json_content_types_are_recognised() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/vnd.orders.v1+json ",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in ["text/plain", "application/+json", "application/xml", ""] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn a_payload_without_a_content_type_is_decoded_as_json() {
        let msg = Message::new(r#"{"id":7,"item":"cup"}"#);
        assert_eq!(
            msg.decode_json::<Order>().expect("decodes"),
            Order {
                id: 7,
                item: "cup".into()
            }
        );
    }

    #[test]
    fn another_content_type_is_refused_without_reading_the_payload() {
        let msg = Message::new(r#"{"id":7,"item":"cup"}"#).with_header("content-type", "text/csv");
        let err = msg.decode_json::<Order>().expect_err("refused");
        assert!(matches!(&err, DecodeError::ContentType { found } if found == "text/csv"));
        assert!(err.to_string().contains("could not decode"), "{err}");
    }

    #[test]
    fn a_bad_payload_is_a_permanent_handler_error_naming_the_type() {
        let msg = Message::json(&serde_json::json!({ "id": "not a number" })).expect("encodes");
        let err = msg.decode_json::<Order>().expect_err("wrong shape");
        let text = err.to_string();
        assert!(text.contains("could not decode"), "{text}");
        assert!(text.contains("Order"), "{text}");
        let handler_err = HandlerError::from(err);
        assert_eq!(handler_err.kind(), ErrorKind::Permanent);
        assert!(!handler_err.is_retryable());
    }

    #[test]
    fn a_value_that_cannot_be_json_is_an_encode_error() {
        let bad = std::collections::BTreeMap::from([((1u8, 2u8), 3u8)]);
        let err = Message::json(&bad).expect_err("tuple keys");
        assert!(err.type_name().contains("BTreeMap"));
        assert!(err.to_string().contains("could not encode"), "{err}");
    }
}
