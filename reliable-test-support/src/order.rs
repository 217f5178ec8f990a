//! Send-order checks shared by the tests and the benchmark: numbered payloads, and the count of
//! first copies that arrive behind a later message of their scope (a queue, a record key).

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

/// Payload size of every [`numbered_payload`], in bytes.
pub const PAYLOAD_BYTES: usize = 100;

/// A 100-byte payload that starts with `seq` (right-aligned in 20 characters).
pub fn numbered_payload(seq: u64) -> Vec<u8> {
    let mut payload = format!("{seq:>20}").into_bytes();
    payload.resize(PAYLOAD_BYTES, b'.');
    payload
}

/// The sequence number a [`numbered_payload`] carries; `None` for any other payload.
pub fn sequence(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..20)?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The order of what a broker handed back, per scope.
#[derive(Debug, PartialEq, Eq)]
pub struct Order<K> {
    /// Messages read, copies included.
    pub stored: u64,
    /// Distinct (scope, sequence number) pairs.
    pub distinct: u64,
    /// First copies that arrived behind a later sequence number of their scope.
    pub out_of_order: u64,
    /// The first such inversion: (scope, sequence number, the later one it arrived behind).
    pub first_inversion: Option<(K, u64, u64)>,
    /// The most copies of one message.
    pub most_copies: u64,
}

impl<K> Order<K> {
    /// Copies beyond the first.
    pub fn duplicates(&self) -> u64 {
        self.stored - self.distinct
    }

    /// Copies per distinct message.
    pub fn copies_per_message(&self) -> f64 {
        self.stored as f64 / self.distinct.max(1) as f64
    }
}

/// Counts first copies that arrive behind a later sequence number of the same scope;
/// `arrivals` is in the broker's order per scope (queue order, log order per partition). Later
/// copies (duplicates) are counted apart and never judged.
pub fn check<K: Hash + Eq + Clone + Debug>(
    arrivals: impl IntoIterator<Item = (K, u64)>,
) -> Order<K> {
    let mut copies: HashMap<(K, u64), u64> = HashMap::new();
    let mut highest: HashMap<K, u64> = HashMap::new();
    let mut order = Order {
        stored: 0,
        distinct: 0,
        out_of_order: 0,
        first_inversion: None,
        most_copies: 0,
    };
    for (scope, seq) in arrivals {
        order.stored += 1;
        let n = copies.entry((scope.clone(), seq)).or_default();
        *n += 1;
        order.most_copies = order.most_copies.max(*n);
        let first = *n == 1;
        let top = highest.entry(scope.clone()).or_insert(seq);
        if first {
            order.distinct += 1;
            if *top > seq {
                order.out_of_order += 1;
                order.first_inversion.get_or_insert((scope, seq, *top));
            }
        }
        *top = (*top).max(seq);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_first_copies_count_and_duplicates_do_not() {
        let order = check([1, 3, 2, 3, 4, 1].map(|s| ((), s)));
        assert_eq!(order.out_of_order, 1);
        assert_eq!(order.first_inversion, Some(((), 2, 3)));
        assert_eq!(order.duplicates(), 2);
        assert_eq!(order.most_copies, 2);
    }

    #[test]
    fn scopes_are_judged_apart() {
        let order = check([("a", 2), ("b", 1), ("a", 3), ("b", 2)]);
        assert_eq!(order.out_of_order, 0);
        let order = check([("a", 2), ("a", 1), ("b", 5)]);
        assert_eq!(order.first_inversion, Some(("a", 1, 2)));
    }

    #[test]
    fn a_numbered_payload_carries_its_sequence() {
        let p = numbered_payload(42);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        assert_eq!(sequence(&p), Some(42));
        assert_eq!(sequence(b"short"), None);
    }
}
