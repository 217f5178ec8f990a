//! [`WireHeaders`]: the headers a message puts on the wire, with the id's text on the stack.

use std::collections::btree_map;
use std::iter::FusedIterator;

use super::{headers, Headers, IdText};

/// Every header a [`Message`](super::Message) puts on the wire, from
/// [`Message::wire_headers`](super::Message::wire_headers): the identity headers first (the
/// key only when it is not the message id), then the user headers.
///
/// It holds the message id's text inline (36 bytes on the stack), so writing headers allocates
/// nothing; iterate it by reference (`for (name, value) in &wire` or `wire.iter()`), the
/// yielded `&str`s borrow it.
#[derive(Clone, Copy, Debug)]
pub struct WireHeaders<'a> {
    id: IdText,
    key: Option<&'a str>,
    user: Option<&'a Headers>,
}

impl<'a> WireHeaders<'a> {
    pub(super) fn new(id: IdText, key: Option<&'a str>, user: Option<&'a Headers>) -> Self {
        Self { id, key, user }
    }

    /// The headers as `(name, value)` pairs, in wire order.
    pub fn iter(&self) -> WireIter<'_> {
        WireIter {
            id: Some(self.id.as_str()),
            key: self.key,
            user: self.user.map(|h| h.iter()),
        }
    }

    /// How many headers go on the wire (at least one: the message id).
    pub fn len(&self) -> usize {
        1 + usize::from(self.key.is_some()) + self.user.map_or(0, |h| h.len())
    }

    /// Always `false`: the message id header is always written.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `x-message-id` value.
    pub fn message_id(&self) -> &str {
        self.id.as_str()
    }
}

impl<'s> IntoIterator for &'s WireHeaders<'_> {
    type Item = (&'s str, &'s str);
    type IntoIter = WireIter<'s>;

    fn into_iter(self) -> WireIter<'s> {
        self.iter()
    }
}

/// The iterator of [`WireHeaders::iter`]: `(name, value)` pairs in wire order.
#[derive(Clone, Debug)]
pub struct WireIter<'s> {
    id: Option<&'s str>,
    key: Option<&'s str>,
    user: Option<btree_map::Iter<'s, String, String>>,
}

impl<'s> Iterator for WireIter<'s> {
    type Item = (&'s str, &'s str);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(id) = self.id.take() {
            return Some((headers::MESSAGE_ID, id));
        }
        if let Some(key) = self.key.take() {
            return Some((headers::IDEMPOTENCY_KEY, key));
        }
        self.user
            .as_mut()?
            .next()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.id.is_some())
            + usize::from(self.key.is_some())
            + self.user.as_ref().map_or(0, |u| u.len());
        (n, Some(n))
    }
}

impl ExactSizeIterator for WireIter<'_> {}

impl FusedIterator for WireIter<'_> {}
