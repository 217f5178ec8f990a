//! What the journals say: the producer's and the consumer's view, built line by line.

use std::collections::{BTreeSet, HashMap};

use super::order::OrderView;

/// What the producer journal says so far.
#[derive(Debug, Default)]
pub struct ProducerView {
    /// Sequence numbers the producer accepted (its `send` returned).
    pub accepted: BTreeSet<u64>,
    /// Sequence numbers whose send resolved `Ok`.
    pub confirmed: BTreeSet<u64>,
    /// Sequence numbers handed back with an error, with the first error seen.
    pub failed: HashMap<u64, String>,
    /// `(attempted, resent)` once the producer finished.
    pub done: Option<(u64, u64)>,
    /// Lines that did not parse.
    pub malformed: u64,
}

impl ProducerView {
    /// The next sequence number a (restarted) producer sends.
    pub fn next_seq(&self) -> u64 {
        self.accepted
            .iter()
            .chain(&self.confirmed)
            .chain(self.failed.keys())
            .max()
            .map_or(0, |m| m + 1)
    }

    /// Messages whose send resolved, confirmed or handed back.
    pub fn resolved(&self) -> u64 {
        let failed_only = self
            .failed
            .keys()
            .filter(|s| !self.confirmed.contains(s))
            .count();
        (self.confirmed.len() + failed_only) as u64
    }

    /// Applies one journal line.
    pub fn apply(&mut self, line: &str) {
        let mut parts = line.splitn(3, ' ');
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some("C"), Some(seq), None) => seq.parse().map(|s| {
                self.confirmed.insert(s);
            }),
            (Some("A"), Some(seq), None) => seq.parse().map(|s| {
                self.accepted.insert(s);
            }),
            (Some("F"), Some(seq), reason) => seq.parse().map(|s| {
                self.failed
                    .entry(s)
                    .or_insert_with(|| reason.unwrap_or("").to_owned());
            }),
            (Some("DONE"), Some(attempted), Some(resent)) => {
                match (attempted.parse(), resent.parse()) {
                    (Ok(a), Ok(r)) => {
                        self.done = Some((a, r));
                        Ok(())
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            _ => {
                self.malformed += 1;
                return;
            }
        };
        if parsed.is_err() {
            self.malformed += 1;
        }
    }
}

/// What the consumer journal says so far.
#[derive(Debug, Default)]
pub struct ConsumerView {
    /// Deliveries seen per sequence number.
    pub delivered: HashMap<u64, u32>,
    /// Effects applied per sequence number.
    pub effects: HashMap<u64, u32>,
    /// All deliveries seen.
    pub deliveries_total: u64,
    /// All effects applied.
    pub effects_total: u64,
    /// Payloads the harness never produced.
    pub foreign: u64,
    /// Consumer process starts.
    pub starts: u32,
    /// Where the deliveries sat in the broker's order (`P` and `R` lines).
    pub order: OrderView,
    /// Lines that did not parse.
    pub malformed: u64,
}

impl ConsumerView {
    /// Applies one journal line.
    pub fn apply(&mut self, line: &str) {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "START" => self.starts += 1,
            "X" => self.foreign += 1,
            "P" | "R" => {
                let parsed = if tag == "P" {
                    self.order.apply_log(rest)
                } else {
                    self.order.apply_queue(rest)
                };
                self.malformed += u64::from(parsed.is_none());
            }
            "D" | "E" => match rest.parse::<u64>() {
                Ok(seq) if tag == "D" => {
                    *self.delivered.entry(seq).or_default() += 1;
                    self.deliveries_total += 1;
                }
                Ok(seq) => {
                    *self.effects.entry(seq).or_default() += 1;
                    self.effects_total += 1;
                }
                Err(_) => self.malformed += 1,
            },
            _ => self.malformed += 1,
        }
    }
}
