//! The [`Table`] behind [`InMemoryIdempotencyStore`](super::InMemoryIdempotencyStore): its
//! entries by key, and in order of expiry, so that every call costs O(1) however many keys are
//! held.
//!
//! * **Keys.** A key whose text is a message id's (a canonical UUID: lower-case, hyphenated) is
//!   held as its 128 bits, hashed with one multiplication; any other key as its text. Two keys
//!   are one entry exactly when their texts are equal: the canonical text and the 128 bits map
//!   one to one, and a text held as text is never a canonical UUID.
//! * **Order.** The entries sit in a slab, each on one of two doubly linked chains: reservations
//!   in order of their lease's end, completed keys in order of completion. Every write stamps
//!   the entry with the current time (a reservation ends one fixed lease after it) and moves it
//!   to the back of its chain, and time never runs backwards here ([`Table::now`]), so each
//!   chain's front is its first to expire. Expired entries are found from the fronts and the
//!   oldest completed keys are evicted from the front, without scanning.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use tokio::time::Instant;

use super::Entry;
use crate::idempotency::LeaseToken;
use crate::message::IdempotencyKey;

/// A key as the table looks it up: a canonical UUID's bits, or any other text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Key<'a> {
    /// The key's text is a canonical UUID (always so for a key made from a message id).
    Id(u128),
    /// Any other text.
    Text(&'a str),
}

impl<'a> Key<'a> {
    /// How the table holds `key`.
    pub(super) fn of(key: &'a IdempotencyKey) -> Self {
        // An id's text is read as bytes, skipping the UTF-8 check of `as_str`.
        let bits = match key.as_id_text() {
            Some(id) => canonical_uuid(id.as_ref()),
            None => canonical_uuid(key.as_str().as_bytes()),
        };
        match bits {
            Some(bits) => Self::Id(bits),
            None => Self::Text(key.as_str()),
        }
    }
}

/// Marks an invalid digit in [`HEX`].
const NOT_HEX: u8 = 0xF0;

/// The value of each lower-case hexadecimal digit; [`NOT_HEX`] for every other byte
/// (upper-case digits included: an id's text is lower-case, and keys compare as text).
const HEX: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Where the 32 digits of a hyphenated UUID are: every position but 8, 13, 18 and 23.
const DIGITS: [usize; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 19, 20, 21, 22, 24, 25, 26, 27, 28, 29,
    30, 31, 32, 33, 34, 35,
];

/// The 128 bits of `text` when it is a UUID in canonical form: 36 bytes, lower-case
/// hexadecimal digits with hyphens at 8, 13, 18 and 23, as [`MessageId`](crate::MessageId)
/// writes it. One text per value, so equal values mean equal texts.
pub(super) fn canonical_uuid(text: &[u8]) -> Option<u128> {
    let text: &[u8; 36] = text.try_into().ok()?;
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let (mut high, mut low, mut bad) = (0u64, 0u64, 0u8);
    for &at in &DIGITS[..16] {
        let digit = HEX[usize::from(text[at])];
        bad |= digit;
        high = high << 4 | u64::from(digit);
    }
    for &at in &DIGITS[16..] {
        let digit = HEX[usize::from(text[at])];
        bad |= digit;
        low = low << 4 | u64::from(digit);
    }
    (bad & NOT_HEX == 0).then_some(u128::from(high) << 64 | u128::from(low))
}

/// Hashes the 128 bits of an id key with one folded multiplication under a random seed per
/// table: as cheap as FxHash, but keys sent by whoever publishes to the consumer's queue cannot
/// be chosen offline to collide (FxHash of a `u128` is invertible, seed-free).
#[derive(Clone, Copy)]
struct IdHashing([u64; 2]);

impl IdHashing {
    fn random() -> Self {
        let state = RandomState::new();
        Self([state.hash_one(0u8), state.hash_one(1u8)])
    }
}

impl BuildHasher for IdHashing {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            seed: self.0,
            hash: 0,
        }
    }
}

struct IdHasher {
    seed: [u64; 2],
    hash: u64,
}

/// The high and low halves of the full product `a * b` folded together, so that every bit of
/// either input counts in the low bits (the bucket) and the high bits (the tag) of the hash.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for IdHasher {
    fn write_u128(&mut self, value: u128) {
        let [s0, s1] = self.seed;
        self.hash = folded_multiply((value as u64) ^ s0, ((value >> 64) as u64) ^ s1 ^ self.hash);
    }

    /// Not used by the table (it only hashes `u128`); folds in 8 bytes at a time.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let [s0, s1] = self.seed;
            self.hash = folded_multiply(u64::from_le_bytes(word) ^ s0, self.hash ^ s1);
        }
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Ends a chain, and stands for "no slot".
const NIL: usize = usize::MAX;

/// The key a slot holds, to find its index entry again when the slot is dropped.
enum Held {
    Id(u128),
    Text(Arc<str>),
    /// A free slot.
    Vacant,
}

struct Slot {
    key: Held,
    entry: Entry,
    /// Neighbours on the slot's chain (on the free list, `next` only).
    prev: usize,
    next: usize,
}

/// A doubly linked chain of slots, oldest first.
#[derive(Clone, Copy)]
struct Chain {
    head: usize,
    tail: usize,
}

impl Chain {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
    };
}

/// The entries of one store, with the clock and token source its calls share. Lives under the
/// store's mutex.
pub(super) struct Table {
    ids: HashMap<u128, usize, IdHashing>,
    /// Business keys: SipHash with a random key, since their text comes from the messages.
    texts: HashMap<Arc<str>, usize, RandomState>,
    slots: Vec<Slot>,
    /// Head of the free slots, chained through `next`.
    free: usize,
    reserved: Chain,
    done: Chain,
    /// The latest time handed out by [`now`](Self::now).
    clock: Option<Instant>,
    /// The first token of this table, a UUIDv7; see [`token`](Self::token).
    token_base: u128,
    tokens: u64,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            ids: HashMap::with_hasher(IdHashing::random()),
            texts: HashMap::default(),
            slots: Vec::new(),
            free: NIL,
            reserved: Chain::EMPTY,
            done: Chain::EMPTY,
            clock: None,
            token_base: LeaseToken::generate().as_u128(),
            tokens: 0,
        }
    }
}

/// A summary: the entries themselves can number millions.
impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The 62 random bits at the end of a UUIDv7 (after the variant bits).
const RAND_B: u128 = (1 << 62) - 1;

impl Table {
    /// The current time, never earlier than a time handed out before, so that writes reach
    /// the chains in time order even if the clock steps back.
    pub(super) fn now(&mut self) -> Instant {
        let now = match (Instant::now(), self.clock) {
            (now, Some(latest)) if latest > now => latest,
            (now, _) => now,
        };
        self.clock = Some(now);
        now
    }

    /// A token no other reservation of this table had: this table's first token (a UUIDv7,
    /// made with [`LeaseToken::generate`]) with its 62 random bits mixed with a count of the
    /// tokens made (an odd multiplier permutes the 62-bit values, so 2^62 tokens in a row are
    /// distinct). Still a UUIDv7, and cheaper than generating one, which reads the system clock
    /// and takes the `uuid` crate's process-wide lock.
    pub(super) fn token(&mut self) -> LeaseToken {
        self.tokens = self.tokens.wrapping_add(1);
        let mixed = u128::from(self.tokens.wrapping_mul(0x9E37_79B9_7F4A_7C15)) & RAND_B;
        LeaseToken::from_u128(self.token_base ^ mixed)
    }

    /// Keys held (reserved or completed, expired ones possibly included).
    pub(super) fn len(&self) -> usize {
        self.ids.len() + self.texts.len()
    }

    /// The slot of `key`, if held.
    pub(super) fn find(&self, key: Key<'_>) -> Option<usize> {
        match key {
            Key::Id(bits) => self.ids.get(&bits).copied(),
            Key::Text(text) => self.texts.get(text).copied(),
        }
    }

    /// The entry in `slot` (from [`find`](Self::find)).
    pub(super) fn entry(&self, slot: usize) -> Entry {
        self.slots[slot].entry
    }

    /// Replaces the entry in `slot`, moving it to the back of its (new) chain. `entry` must be
    /// stamped with [`now`](Self::now).
    pub(super) fn set(&mut self, slot: usize, entry: Entry) {
        self.unlink(slot);
        self.slots[slot].entry = entry;
        self.push_back(slot);
    }

    /// Adds `key` (not held: [`find`](Self::find) said `None`) with `entry`, stamped with
    /// [`now`](Self::now). `original` is the key `key` was made from: a business key's shared
    /// text is kept as is.
    pub(super) fn insert(&mut self, key: Key<'_>, original: &IdempotencyKey, entry: Entry) {
        let held = match key {
            Key::Id(bits) => Held::Id(bits),
            Key::Text(text) => Held::Text(
                original
                    .as_shared()
                    .map_or_else(|| Arc::from(text), Arc::clone),
            ),
        };
        let slot = match self.free {
            NIL => {
                self.slots.push(Slot {
                    key: Held::Vacant,
                    entry,
                    prev: NIL,
                    next: NIL,
                });
                self.slots.len() - 1
            }
            free => {
                self.free = self.slots[free].next;
                free
            }
        };
        match &held {
            Held::Id(bits) => self.ids.insert(*bits, slot),
            Held::Text(text) => self.texts.insert(Arc::clone(text), slot),
            Held::Vacant => None,
        };
        let target = &mut self.slots[slot];
        target.key = held;
        target.entry = entry;
        self.push_back(slot);
    }

    /// Drops the entry in `slot`.
    pub(super) fn remove(&mut self, slot: usize) {
        self.unlink(slot);
        let target = &mut self.slots[slot];
        match std::mem::replace(&mut target.key, Held::Vacant) {
            Held::Id(bits) => {
                self.ids.remove(&bits);
            }
            Held::Text(text) => {
                self.texts.remove(&text);
            }
            Held::Vacant => {}
        }
        target.next = self.free;
        self.free = slot;
    }

    /// Drops every entry that `live` says has expired, from the front of each chain (in time
    /// order, they are all there). Each entry is dropped once, so this is O(1) amortised.
    pub(super) fn drop_expired(&mut self, live: impl Fn(Entry) -> bool) {
        for chain in [Chained::Reserved, Chained::Done] {
            loop {
                let head = self.chain(chain).head;
                if head == NIL || live(self.slots[head].entry) {
                    break;
                }
                self.remove(head);
            }
        }
    }

    /// Drops up to `n` of the oldest completed keys; answers how many it dropped.
    pub(super) fn evict_oldest_done(&mut self, n: usize) -> usize {
        let mut evicted = 0;
        while evicted < n && self.done.head != NIL {
            self.remove(self.done.head);
            evicted += 1;
        }
        evicted
    }

    fn chain(&mut self, chain: Chained) -> &mut Chain {
        match chain {
            Chained::Reserved => &mut self.reserved,
            Chained::Done => &mut self.done,
        }
    }

    fn push_back(&mut self, slot: usize) {
        let chain = Chained::of(self.slots[slot].entry);
        let tail = self.chain(chain).tail;
        self.slots[slot].prev = tail;
        self.slots[slot].next = NIL;
        match tail {
            NIL => self.chain(chain).head = slot,
            tail => self.slots[tail].next = slot,
        }
        self.chain(chain).tail = slot;
    }

    fn unlink(&mut self, slot: usize) {
        let chain = Chained::of(self.slots[slot].entry);
        let Slot { prev, next, .. } = self.slots[slot];
        match prev {
            NIL => self.chain(chain).head = next,
            prev => self.slots[prev].next = next,
        }
        match next {
            NIL => self.chain(chain).tail = prev,
            next => self.slots[next].prev = prev,
        }
    }
}

/// Which chain an entry is on.
#[derive(Clone, Copy)]
enum Chained {
    Reserved,
    Done,
}

impl Chained {
    fn of(entry: Entry) -> Self {
        match entry {
            Entry::Reserved { .. } => Self::Reserved,
            Entry::Done { .. } => Self::Done,
        }
    }
}
