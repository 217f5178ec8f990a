//! Message ids: [`MessageId`], its header text [`IdText`], and the generator behind
//! [`MessageId::new`].

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::str::FromStr;

use uuid::timestamp::context::ThreadLocalContext;

use super::MessageFormatError;

thread_local! {
    /// This thread's UUIDv7 counter and clock state (no destructor: nothing to register).
    static V7: uuid::ContextV7 = const { uuid::ContextV7::new() };
}

/// A unique, time-ordered message id (UUIDv7), 16 bytes.
///
/// Ids made later on the same thread compare greater; other ids are ordered by their
/// millisecond timestamp. Displayed and parsed as the lower-case hyphenated UUID;
/// [`text`](Self::text) writes that form on the stack.
///
/// # Generator
///
/// Each thread owns a [`uuid::ContextV7`] (RFC 9562 §6.2 method 1: a 42-bit counter right after
/// the 48-bit millisecond timestamp, reseeded at random on each new millisecond, the other 32
/// bits random per id). An id takes no lock and touches no shared cache line: the clock, the
/// thread's counter and the thread's random generator. (`Uuid::now_v7` takes one process-wide
/// mutex per id.) It is per thread rather than per producer because ids are made where
/// messages are built ([`Message::new`](super::Message::new)), before any producer sees them.
///
/// What it guarantees:
/// * **Order within a thread**: ids made later on the same thread compare greater, even when the
///   clock steps back or more ids are made in a millisecond than the counter holds (the
///   timestamp then runs ahead of the clock until the clock catches up).
/// * **Order across threads and processes**: by millisecond; ids made in the same millisecond
///   on different threads are in no particular order.
/// * **Uniqueness across threads and processes**: two threads' ids in one millisecond differ
///   unless their random 41-bit counter seeds and their 32 random bits per id all agree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A fresh id: UUIDv7 from this thread's generator, unique, ordered by creation time.
    /// Takes no lock.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v7(uuid::Timestamp::now(
            ThreadLocalContext::new(&V7),
        )))
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// The id's 128 bits (big-endian: the timestamp is the high 48 bits).
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    /// The id as header text (lower-case hyphenated, 36 characters), written on the stack.
    pub fn text(&self) -> IdText {
        let mut bytes = [0u8; IdText::LEN];
        self.0.hyphenated().encode_lower(&mut bytes);
        IdText(bytes)
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
        f.write_str(&self.text())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.text())
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

/// A [`MessageId`]'s header text: the lower-case hyphenated UUID, 36 ASCII bytes held inline
/// (no allocation). Dereferences to `str`; compares, hashes and orders as that `str`.
#[derive(Clone, Copy)]
pub struct IdText([u8; IdText::LEN]);

impl IdText {
    /// Its length in bytes (always 36).
    pub const LEN: usize = uuid::fmt::Hyphenated::LENGTH;

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and hyphens are ever written here, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Deref for IdText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for IdText {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for IdText {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for IdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for IdText {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for IdText {}

impl PartialOrd for IdText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdText {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl Hash for IdText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq<str> for IdText {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for IdText {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for IdText {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<IdText> for str {
    fn eq(&self, other: &IdText) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<IdText> for &str {
    fn eq(&self, other: &IdText) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<IdText> for String {
    fn eq(&self, other: &IdText) -> bool {
        self == other.as_str()
    }
}

impl From<IdText> for String {
    fn from(text: IdText) -> Self {
        text.as_str().to_owned()
    }
}
