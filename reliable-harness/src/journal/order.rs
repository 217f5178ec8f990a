//! The order check: did each message's first copy reach the consumer in the order its producer
//! sent it, within the broker's ordering scope (per record key on Kafka, per producer on
//! RabbitMQ)?
//!
//! The consumer's delivery source journals where each delivery sat in the broker's order before
//! any handler runs (the pipeline runs handlers concurrently, so effect and delivery lines are
//! in the handlers' order, not the broker's):
//!
//! * `P <seq> <partition> <offset> [<key>]`: a Kafka record's log position and record key;
//! * `R <seq> [redelivered]`: a RabbitMQ delivery taken from the queue, flagged when the broker
//!   says it delivered the message before; the journal's line order is the arrival order.
//!
//! Within a scope the copies are taken in the broker's order (Kafka: by offset, whatever order
//! the consumer read them in, so a restarted consumer re-reading offsets changes nothing). A
//! copy is a *first copy* when its message was not seen earlier in that order and, on RabbitMQ,
//! the broker does not flag it redelivered (its first delivery went to a consumer that died
//! before journaling it). A first copy is *out of order* when a message with a higher sequence
//! number already arrived in its scope. Later copies (redeliveries, resends) are not judged:
//! they are the duplicated deliveries the total-queue check counts.
//!
//! The harness has one producer per run (a restarted producer continues its predecessor's
//! sequence and replays its outbox first), so sequence numbers are the send order.

use std::collections::{BTreeMap, HashSet};

/// Where copies are ordered: one RabbitMQ queue (the run's one producer), or one record key in
/// one Kafka partition (a key always maps to one partition, and only a partition has an order).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Queue,
    Key {
        partition: i32,
        key: Option<Box<str>>,
    },
}

/// One copy of a message seen at the consumer's delivery source.
#[derive(Clone, Copy, Debug)]
struct Copy {
    /// The Kafka offset, or the RabbitMQ arrival number (journal order).
    position: i64,
    seq: u64,
    /// The broker flagged it delivered before (RabbitMQ).
    redelivered: bool,
}

/// The journal line of a Kafka delivery's log position (`key` without newlines).
pub fn log_line(seq: u64, partition: i32, offset: i64, key: Option<&str>) -> String {
    match key {
        Some(key) => format!(
            "P {seq} {partition} {offset} {}",
            key.replace(['\n', '\r'], " ")
        ),
        None => format!("P {seq} {partition} {offset}"),
    }
}

/// The journal line of a RabbitMQ delivery taken from the queue.
pub fn queue_line(seq: u64, redelivered: bool) -> String {
    if redelivered {
        format!("R {seq} redelivered")
    } else {
        format!("R {seq}")
    }
}

/// The broker's order of every copy the consumer's delivery source saw, per scope.
#[derive(Debug, Default)]
pub struct OrderView {
    scopes: BTreeMap<Scope, Vec<Copy>>,
    /// RabbitMQ deliveries so far: the arrival number of the next one.
    arrivals: i64,
}

/// What the order check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderCounts {
    /// First copies judged.
    pub checked: u64,
    /// First copies that arrived after a later message of their scope.
    pub out_of_order: u64,
    /// Up to 10 of them, lowest sequence numbers first.
    pub sample: Vec<u64>,
}

impl OrderView {
    /// Applies the rest of a `P` line (after the tag); `None` when it does not parse.
    pub fn apply_log(&mut self, rest: &str) -> Option<()> {
        let mut parts = rest.splitn(4, ' ');
        let seq = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let position = parts.next()?.parse().ok()?;
        let key = parts.next().map(Box::from);
        self.push(
            Scope::Key { partition, key },
            Copy {
                position,
                seq,
                redelivered: false,
            },
        );
        Some(())
    }

    /// Applies the rest of an `R` line (after the tag); `None` when it does not parse.
    pub fn apply_queue(&mut self, rest: &str) -> Option<()> {
        let (seq, redelivered) = match rest.split_once(' ') {
            Some((seq, "redelivered")) => (seq, true),
            Some(_) => return None,
            None => (rest, false),
        };
        let seq = seq.parse().ok()?;
        let position = self.arrivals;
        self.arrivals += 1;
        self.push(
            Scope::Queue,
            Copy {
                position,
                seq,
                redelivered,
            },
        );
        Some(())
    }

    fn push(&mut self, scope: Scope, copy: Copy) {
        self.scopes.entry(scope).or_default().push(copy);
    }

    /// Runs the order check: one sort per scope and one pass, so a long run costs little.
    pub fn check(&self) -> OrderCounts {
        let mut counts = OrderCounts::default();
        let mut seen = HashSet::new();
        let mut late = Vec::new();
        for copies in self.scopes.values() {
            let mut copies = copies.clone();
            // Stable: copies at one Kafka offset (a re-read) keep their journal order.
            copies.sort_by_key(|c| c.position);
            // Every copy of a message follows its first copy, so the highest sequence number
            // among all copies so far is the highest among first copies so far.
            let mut highest: Option<u64> = None;
            for c in copies {
                let first = seen.insert(c.seq) && !c.redelivered;
                if first {
                    counts.checked += 1;
                    if highest.is_some_and(|h| h > c.seq) {
                        late.push(c.seq);
                    }
                }
                highest = highest.max(Some(c.seq));
            }
        }
        counts.out_of_order = late.len() as u64;
        late.sort_unstable();
        late.truncate(10);
        counts.sample = late;
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lines: &[&str]) -> OrderCounts {
        let mut view = OrderView::default();
        for line in lines {
            let parsed = match line.split_once(' ') {
                Some(("P", rest)) => view.apply_log(rest),
                Some(("R", rest)) => view.apply_queue(rest),
                _ => None,
            };
            assert!(parsed.is_some(), "{line}");
        }
        view.check()
    }

    #[test]
    fn a_clean_run_is_in_order_on_both_brokers() {
        let c = order(&["R 0", "R 1", "R 2", "R 3"]);
        assert_eq!((c.checked, c.out_of_order), (4, 0));
        // Two keys on two partitions, read interleaved and out of offset order across them.
        let c = order(&["P 1 1 0 k1", "P 0 0 0 k0", "P 2 0 1 k0", "P 3 1 1 k1"]);
        assert_eq!((c.checked, c.out_of_order), (4, 0));
    }

    #[test]
    fn a_first_copy_after_a_later_message_of_its_scope_is_out_of_order() {
        let c = order(&["R 0", "R 2", "R 1", "R 3"]);
        assert_eq!((c.checked, c.out_of_order, c.sample), (4, 1, vec![1]));
        // Kafka: by offset, not by the order the consumer read them in.
        let c = order(&["P 0 0 0 k", "P 1 0 2 k", "P 2 0 1 k"]);
        assert_eq!((c.out_of_order, c.sample), (1, vec![1]));
        // Another key (or partition) is another scope: no order between them.
        let c = order(&["P 5 0 0 a", "P 1 0 1 b", "P 3 1 0 a", "P 0 1 1 c"]);
        assert_eq!(c.out_of_order, 0);
    }

    #[test]
    fn a_redelivered_copy_behind_later_messages_is_not_an_inversion() {
        // RabbitMQ: the consumer died after taking 0 and 1; both come back after 2 and 3.
        let c = order(&[
            "R 0",
            "R 1",
            "R 2",
            "R 3",
            "R 0 redelivered",
            "R 1 redelivered",
            "R 4",
        ]);
        assert_eq!((c.checked, c.out_of_order), (5, 0));
        // The first delivery of 1 went to a consumer that died before journaling it: the
        // broker's flag says this copy is not the first.
        let c = order(&["R 0", "R 2", "R 1 redelivered", "R 3"]);
        assert_eq!((c.checked, c.out_of_order), (3, 0));
        // Kafka: a restarted consumer re-reads offsets 1 and 2 after offset 3.
        let c = order(&[
            "P 0 0 0 k",
            "P 1 0 1 k",
            "P 2 0 2 k",
            "P 3 0 3 k",
            "P 1 0 1 k",
        ]);
        assert_eq!((c.checked, c.out_of_order), (4, 0));
    }

    #[test]
    fn a_duplicate_is_a_later_copy_and_a_late_first_copy_is_still_caught() {
        // A resend of 1 written to the log again after 2: a later copy, not an inversion.
        let c = order(&["P 0 0 0 k", "P 1 0 1 k", "P 2 0 2 k", "P 1 0 3 k"]);
        assert_eq!((c.checked, c.out_of_order), (3, 0));
        // A resend whose first copy never arrived is the first copy, and late.
        let c = order(&["R 0", "R 2", "R 1", "R 1"]);
        assert_eq!((c.checked, c.out_of_order), (3, 1));
    }

    #[test]
    fn journal_lines_round_trip_and_bad_ones_are_refused() {
        let mut view = OrderView::default();
        let rest = |l: String| l[2..].to_owned();
        assert!(view
            .apply_log(&rest(log_line(7, 2, 40, Some("a key"))))
            .is_some());
        assert!(view.apply_log(&rest(log_line(8, 2, 41, None))).is_some());
        assert!(view.apply_queue(&rest(queue_line(9, true))).is_some());
        assert!(view.apply_queue("9 again").is_none());
        assert!(view.apply_log("7 2").is_none());
        assert_eq!(
            view.check().checked,
            2,
            "7 and 8; 9 was flagged redelivered"
        );
    }
}
