//! [`IdempotencyKey`] and [`SharedStr`], the conversion the text builders take.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::{IdText, MessageFormatError, MessageId};

/// The key consumers deduplicate on; defaults to the message id's text.
///
/// Cheap to clone and to make: the default key (the message id) is its 36-byte text held inline,
/// without allocation; a business key is a shared string. Keys compare, hash and order by their
/// text, so a key made from an id equals the key made from that id's text.
#[derive(Clone)]
pub struct IdempotencyKey(Repr);

#[derive(Clone)]
enum Repr {
    /// The message id's text.
    Id(IdText),
    /// A business key.
    Shared(Arc<str>),
}

impl IdempotencyKey {
    /// Longest accepted key, in bytes (fits AMQP short strings and common database key columns).
    pub const MAX_LEN: usize = 255;

    /// A key from a business identifier. Fails when the key is empty or longer than
    /// [`IdempotencyKey::MAX_LEN`] bytes.
    pub fn new(key: impl Into<String>) -> Result<Self, MessageFormatError> {
        Self::shared(key.into())
    }

    /// A key from text that is checked here: empty and over-long keys are refused.
    pub(super) fn shared(key: impl SharedStr + AsRef<str>) -> Result<Self, MessageFormatError> {
        let len = key.as_ref().len();
        if len == 0 {
            return Err(MessageFormatError::EmptyIdempotencyKey);
        }
        if len > Self::MAX_LEN {
            return Err(MessageFormatError::IdempotencyKeyTooLong { len });
        }
        Ok(Self(Repr::Shared(key.into_shared())))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Id(text) => text.as_str(),
            Repr::Shared(text) => text,
        }
    }

    /// The business key's shared text, `None` for a key made from a message id.
    pub(crate) fn as_shared(&self) -> Option<&Arc<str>> {
        match &self.0 {
            Repr::Id(_) => None,
            Repr::Shared(text) => Some(text),
        }
    }

    /// The message id's text, `None` for a business key: lets the idempotency store read the
    /// id's bytes without checking them again as UTF-8.
    pub(crate) fn as_id_text(&self) -> Option<&IdText> {
        match &self.0 {
            Repr::Id(text) => Some(text),
            Repr::Shared(_) => None,
        }
    }

    /// The key of a message whose business key is `shared`, or its id when `None`.
    pub(super) fn of(id: MessageId, shared: Option<&Arc<str>>) -> Self {
        match shared {
            Some(text) => Self(Repr::Shared(Arc::clone(text))),
            None => Self::from(id),
        }
    }
}

impl From<MessageId> for IdempotencyKey {
    fn from(id: MessageId) -> Self {
        Self(Repr::Id(id.text()))
    }
}

impl PartialEq for IdempotencyKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdempotencyKey {}

impl PartialOrd for IdempotencyKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdempotencyKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for IdempotencyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.as_str())
    }
}

/// Text a [`Message`](super::Message) keeps as a shared string (`Arc<str>`): its destination
/// and routing key.
///
/// Implemented for `&str`, `&String`, `String`, `Box<str>`, `Cow<str>`, `Arc<str>` and
/// `&Arc<str>`. An `Arc<str>` is kept as is, so messages built from one shared `Arc<str>`
/// (one destination for many messages) allocate nothing for it; the other forms copy the text
/// into one allocation.
pub trait SharedStr {
    /// The text as a shared string.
    fn into_shared(self) -> Arc<str>;
}

impl SharedStr for &str {
    fn into_shared(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl SharedStr for &String {
    fn into_shared(self) -> Arc<str> {
        Arc::from(self.as_str())
    }
}

impl SharedStr for String {
    fn into_shared(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl SharedStr for Box<str> {
    fn into_shared(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl SharedStr for Cow<'_, str> {
    fn into_shared(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl SharedStr for Arc<str> {
    fn into_shared(self) -> Arc<str> {
        self
    }
}

impl SharedStr for &Arc<str> {
    fn into_shared(self) -> Arc<str> {
        Arc::clone(self)
    }
}
