//! The unfinished offsets of one partition: a bitset window while they lie close together, a
//! sparse ordered set when they do not.
//!
//! The window is a base offset plus a ring of 64-bit words; bit `i` of word `k` is set when
//! offset `base + 64k + i` is tracked and not finished. Finished offsets and untracked gaps
//! (compaction, transaction markers) are the same zero bit, so a gap never holds the watermark
//! back. Once the oldest unfinished offset is finished, every leading all-zero word is dropped
//! in one go, so the first word always holds the oldest unfinished offset and finding it is one
//! `trailing_zeros`.
//!
//! Memory: the window holds one bit per offset from the word of the oldest unfinished offset up
//! to the newest tracked one. That span is not bounded by the consumer's `max_held` (it bounds
//! how many records are unsettled, not how far apart they are: one stuck record with millions
//! finished after it is a wide span with two unfinished offsets), so the window is capped at
//! [`DENSE_SPAN_LIMIT`] offsets (128 KiB). Tracking past the cap turns the partition into a
//! sparse `BTreeSet` of its unfinished offsets (what the tracker always kept before, so memory
//! is then proportional to the unfinished count again), and it turns back into a window once
//! the span has shrunk to a quarter of the cap.

use std::collections::{BTreeSet, VecDeque};

/// Widest span of offsets (newest tracked minus the start of the oldest unfinished one's word)
/// kept as a bitset: 2^20 offsets, 16 384 words, 128 KiB per partition at most. Wider spans
/// use the sparse set. At 300k records/s on one partition this is a few seconds of one record
/// stuck while the rest finish; smaller spans, the normal case, stay in the window.
pub(super) const DENSE_SPAN_LIMIT: u64 = 1 << 20;

/// [`DENSE_SPAN_LIMIT`] in words.
const MAX_WORDS: usize = (DENSE_SPAN_LIMIT / 64) as usize;

/// A sparse set turns back into a window once its span is at most this. Well below the limit,
/// so a span hovering around the limit does not convert back and forth on every record.
const REDENSIFY_SPAN: i128 = (DENSE_SPAN_LIMIT / 4) as i128;

/// Capacity (in words, 8 KiB) a window keeps when it shrinks; below this it never gives
/// memory back, above it it keeps at most four times what it uses.
const KEEP_WORDS: usize = 1024;

/// The unfinished offsets of one partition.
#[derive(Debug)]
pub(super) enum Pending {
    /// Span within [`DENSE_SPAN_LIMIT`]: a bitset.
    Dense(Window),
    /// Span past [`DENSE_SPAN_LIMIT`]: one entry per unfinished offset.
    Sparse(BTreeSet<i64>),
}

impl Default for Pending {
    fn default() -> Self {
        Pending::Dense(Window::default())
    }
}

impl Pending {
    /// Adds `offset`. The caller adds offsets in increasing order (re-adding the highest one is
    /// a no-op); an offset below the window's base only costs the switch to the sparse set.
    pub(super) fn insert(&mut self, offset: i64) {
        match self {
            Pending::Dense(window) => {
                if window.insert(offset).is_err() {
                    let mut set: BTreeSet<i64> = window.iter().collect();
                    set.insert(offset);
                    *self = Pending::Sparse(set);
                }
            }
            Pending::Sparse(set) => {
                set.insert(offset);
            }
        }
    }

    /// Removes `offset`; false when it was not there.
    pub(super) fn remove(&mut self, offset: i64) -> bool {
        match self {
            Pending::Dense(window) => window.remove(offset),
            Pending::Sparse(set) => {
                let was_first = set.first() == Some(&offset);
                if !set.remove(&offset) {
                    return false;
                }
                // The span only shrinks when the oldest one goes.
                if was_first {
                    if let Some(window) = Window::from_sparse(set) {
                        *self = Pending::Dense(window);
                    }
                }
                true
            }
        }
    }

    /// Whether `offset` is unfinished.
    pub(super) fn contains(&self, offset: i64) -> bool {
        match self {
            Pending::Dense(window) => window.contains(offset),
            Pending::Sparse(set) => set.contains(&offset),
        }
    }

    /// The oldest unfinished offset.
    pub(super) fn first(&self) -> Option<i64> {
        match self {
            Pending::Dense(window) => window.first(),
            Pending::Sparse(set) => set.first().copied(),
        }
    }

    /// How many offsets are unfinished.
    pub(super) fn len(&self) -> usize {
        match self {
            Pending::Dense(window) => window.len,
            Pending::Sparse(set) => set.len(),
        }
    }

    /// The unfinished offsets, lowest first.
    pub(super) fn to_vec(&self) -> Vec<i64> {
        match self {
            Pending::Dense(window) => window.iter().collect(),
            Pending::Sparse(set) => set.iter().copied().collect(),
        }
    }

    /// Whether this partition fell back to the sparse set (for tests).
    #[cfg(test)]
    pub(super) fn is_sparse(&self) -> bool {
        matches!(self, Pending::Sparse(_))
    }
}

/// Adding the offset would make the window wider than [`DENSE_SPAN_LIMIT`].
#[derive(Debug)]
struct TooWide;

/// The bitset form of [`Pending`].
///
/// Invariants: `len` is the number of set bits; `words` is empty exactly when `len` is 0; when
/// not empty its front word is not zero (it holds the oldest unfinished offset).
#[derive(Debug, Default)]
pub(super) struct Window {
    /// The offset of bit 0 of the front word.
    base: i64,
    /// One bit per offset from `base` on; set = tracked and unfinished.
    words: VecDeque<u64>,
    /// How many bits are set.
    len: usize,
}

impl Window {
    /// The word and bit of `offset`; `None` below the base (or beyond `usize`).
    fn slot(&self, offset: i64) -> Option<(usize, u32)> {
        let index = i128::from(offset) - i128::from(self.base);
        if index < 0 {
            return None;
        }
        let word = usize::try_from(index / 64).ok()?;
        Some((word, (index % 64) as u32))
    }

    /// The offset of bit `bit` of word `word`. Only called for set bits, which stand for real
    /// offsets, so the sum fits an `i64` (saturating rather than trusting it).
    fn offset_at(&self, word: usize, bit: u32) -> i64 {
        let offset = i128::from(self.base) + (word as i128) * 64 + i128::from(bit);
        i64::try_from(offset).unwrap_or(i64::MAX)
    }

    /// Sets the bit of `offset`, growing the window towards it; [`TooWide`] (and no change) if
    /// that would pass [`DENSE_SPAN_LIMIT`].
    fn insert(&mut self, offset: i64) -> Result<(), TooWide> {
        if self.len == 0 {
            // Nothing unfinished: restart the window at this offset, whatever the gap.
            self.words.clear();
            self.words.push_back(1);
            self.base = offset;
            self.len = 1;
            return Ok(());
        }
        let (word, bit) = self.slot(offset).ok_or(TooWide)?;
        if word >= MAX_WORDS {
            return Err(TooWide);
        }
        if word >= self.words.len() {
            // The words in between are untracked gaps: zero, like finished offsets.
            self.words.resize(word + 1, 0);
        }
        let Some(w) = self.words.get_mut(word) else {
            return Err(TooWide);
        };
        let mask = 1u64 << bit;
        if *w & mask == 0 {
            *w |= mask;
            self.len += 1;
        }
        Ok(())
    }

    /// Clears the bit of `offset`; false when it was not set (untracked, or finished already).
    fn remove(&mut self, offset: i64) -> bool {
        let Some((word, bit)) = self.slot(offset) else {
            return false;
        };
        let Some(w) = self.words.get_mut(word) else {
            return false;
        };
        let mask = 1u64 << bit;
        if *w & mask == 0 {
            return false;
        }
        *w &= !mask;
        let front_emptied = word == 0 && *w == 0;
        self.len -= 1;
        if self.len == 0 {
            self.words.clear();
            self.shrink();
        } else if front_emptied {
            self.advance();
        }
        true
    }

    /// Moves the base past every leading all-zero word at once (finished offsets and gaps).
    /// Only called with `len > 0`, so a non-zero word remains; each word is dropped once, so
    /// this is amortized O(1) per offset.
    fn advance(&mut self) {
        let zeros = self.words.iter().take_while(|&&w| w == 0).count();
        self.words.drain(..zeros);
        // `zeros * 64` is below the span cap, and base plus it stays at or below the oldest
        // unfinished offset, so neither overflows.
        self.base = self.base.saturating_add(zeros as i64 * 64);
        self.shrink();
    }

    /// Gives memory back after the window narrowed a lot, keeping some slack (and at least
    /// [`KEEP_WORDS`]) so a window that grows again does not reallocate every time.
    fn shrink(&mut self) {
        let used = self.words.len();
        if self.words.capacity() > KEEP_WORDS && self.words.capacity() > 4 * used {
            self.words.shrink_to((2 * used).max(KEEP_WORDS));
        }
    }

    fn contains(&self, offset: i64) -> bool {
        self.slot(offset)
            .and_then(|(word, bit)| self.words.get(word).map(|w| w & (1u64 << bit) != 0))
            .unwrap_or(false)
    }

    fn first(&self) -> Option<i64> {
        let front = *self.words.front()?;
        Some(self.offset_at(0, front.trailing_zeros()))
    }

    /// The set offsets, lowest first.
    fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(k, &w)| SetBits(w).map(move |bit| self.offset_at(k, bit)))
    }

    /// A window holding `set`, when its span is narrow enough to be worth one
    /// ([`REDENSIFY_SPAN`]); an empty set gives an empty window.
    fn from_sparse(set: &BTreeSet<i64>) -> Option<Window> {
        let (Some(&first), Some(&last)) = (set.first(), set.last()) else {
            return Some(Window::default());
        };
        if i128::from(last) - i128::from(first) > REDENSIFY_SPAN {
            return None;
        }
        let mut window = Window::default();
        for &offset in set {
            window.insert(offset).ok()?;
        }
        Some(window)
    }
}

/// The positions of the set bits of a word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_skips_finished_words_and_gaps_at_once() {
        let mut p = Pending::default();
        p.insert(0);
        p.insert(500); // words 1..7 are a gap
        p.insert(1_000);
        assert!(p.remove(0));
        assert_eq!(p.first(), Some(500));
        assert!(p.remove(500));
        assert_eq!(p.first(), Some(1_000));
        let Pending::Dense(w) = &p else {
            panic!("a narrow span stays a window")
        };
        assert_eq!(w.words.len(), 1, "finished words were dropped");
        assert!(p.remove(1_000));
        assert_eq!((p.first(), p.len()), (None, 0));
    }

    #[test]
    fn a_wide_span_goes_sparse_and_comes_back() {
        let limit = DENSE_SPAN_LIMIT as i64;
        let mut p = Pending::default();
        p.insert(7);
        p.insert(8);
        p.insert(7 + limit - 1);
        assert!(!p.is_sparse(), "just within the limit");
        p.insert(7 + limit + 64);
        assert!(p.is_sparse(), "past the limit");
        assert_eq!(p.to_vec(), vec![7, 8, 7 + limit - 1, 7 + limit + 64]);
        assert!(!p.remove(9));
        assert!(p.remove(8));
        assert!(
            p.is_sparse(),
            "removing a later one does not shrink the span"
        );
        assert!(p.remove(7));
        assert!(!p.is_sparse(), "the span is now 65 offsets");
        assert_eq!(p.to_vec(), vec![7 + limit - 1, 7 + limit + 64]);
        assert_eq!(p.first(), Some(7 + limit - 1));
        assert!(p.contains(7 + limit + 64));
    }

    #[test]
    fn extreme_offsets_never_overflow() {
        let mut p = Pending::default();
        p.insert(i64::MIN);
        p.insert(i64::MAX);
        assert!(p.is_sparse());
        assert!(p.remove(i64::MIN));
        assert!(!p.is_sparse());
        assert_eq!(p.first(), Some(i64::MAX));
        p.insert(i64::MAX);
        assert_eq!(p.len(), 1);
        assert!(p.remove(i64::MAX));
        assert!(!p.contains(i64::MAX));
        p.insert(i64::MAX - 1);
        p.insert(i64::MAX);
        assert_eq!(p.to_vec(), vec![i64::MAX - 1, i64::MAX]);
        assert!(p.remove(i64::MAX - 1));
        assert_eq!(p.first(), Some(i64::MAX));
    }

    #[test]
    fn an_idle_window_gives_memory_back() {
        let mut p = Pending::default();
        for offset in 0..(64 * 10_000) {
            p.insert(offset);
        }
        for offset in 0..(64 * 10_000) {
            assert!(p.remove(offset));
        }
        let Pending::Dense(w) = &p else {
            panic!("stays a window")
        };
        assert!(w.words.capacity() <= KEEP_WORDS, "{}", w.words.capacity());
    }
}
