//! The total-queue check over both journals.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use super::{ConsumerView, ProducerView};

/// The verdict figures of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Messages the producer sent (sequence numbers `0..attempted`).
    pub attempted: u64,
    /// Sends that resolved `Ok` (for a no-confirm producer: the publish call returned).
    pub confirmed: u64,
    /// Sends handed back with an error.
    pub failed: u64,
    /// Sends that neither resolved nor failed (the producer never finished them).
    pub unresolved: u64,
    /// Deliveries seen by the consumer, duplicates included.
    pub deliveries: u64,
    /// Deliveries beyond the first of each message.
    pub duplicated_deliveries: u64,
    /// Distinct messages whose effect was applied.
    pub applied: u64,
    /// Effects beyond the first of each message (must be 0 with dedupe).
    pub duplicate_effects: u64,
    /// Accepted or confirmed by the producer, not handed back, never applied.
    pub lost: u64,
    /// Applied, never sent (or a payload the harness did not write).
    pub unexpected: u64,
    /// Applied although the send was not confirmed (handed back or unresolved): not loss.
    pub recovered: u64,
    /// Journal lines that did not parse.
    pub malformed: u64,
    /// Up to 10 lost sequence numbers, for the investigation.
    pub lost_sample: Vec<u64>,
    /// Of the lost: good messages handed back with an error (runs with messages the broker
    /// must refuse only).
    pub good_refused: u64,
    /// Of the lost: messages the broker must refuse, reported confirmed.
    pub bad_confirmed: u64,
    /// First copies the order check judged (see [`order`](super::order)): 0 means the
    /// consumer journaled no order, and the check saw nothing.
    pub order_checked: u64,
    /// First copies that reached the consumer after a later message of their ordering scope
    /// (per record key on Kafka, per producer on RabbitMQ). Later copies are not judged: they
    /// are in `duplicated_deliveries`.
    pub out_of_order: u64,
    /// Up to 10 out-of-order sequence numbers, for the investigation.
    pub out_of_order_sample: Vec<u64>,
}

/// Runs the total-queue check over both journals. `must_refuse`, for runs that mix in
/// messages the broker must refuse, says which: then a good message handed back is lost too.
/// Without it, a hand-back is the SDK's honest answer to a fault, not loss.
pub fn check(
    producer: &ProducerView,
    consumer: &ConsumerView,
    must_refuse: Option<&dyn Fn(u64) -> bool>,
) -> Counts {
    check_with(producer, consumer, must_refuse, &|_| false)
}

/// [`check`], where a message `accounted(seq)` says is accounted for elsewhere (in the dead
/// letter with its origin, in the poison scenarios) is not lost although never applied.
pub fn check_with(
    producer: &ProducerView,
    consumer: &ConsumerView,
    must_refuse: Option<&dyn Fn(u64) -> bool>,
    accounted: &dyn Fn(u64) -> bool,
) -> Counts {
    let refusing = must_refuse.is_some();
    let must_refuse = |s: u64| must_refuse.is_some_and(|f| f(s));
    let attempted = producer.done.map_or_else(
        || {
            // The producer never finished: count what it wrote about.
            let max = producer
                .confirmed
                .iter()
                .chain(producer.failed.keys())
                .max();
            max.map_or(0, |m| m + 1)
        },
        |(a, _)| a,
    );
    let confirmed = producer.confirmed.len() as u64;
    let failed = producer
        .failed
        .keys()
        .filter(|s| !producer.confirmed.contains(s))
        .count() as u64;
    let (mut good_refused, mut bad_confirmed) = (0, 0);
    let lost: Vec<u64> = producer
        .accepted
        .union(&producer.confirmed)
        .chain(producer.failed.keys())
        .copied()
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .filter(|s| {
            let confirmed = producer.confirmed.contains(s);
            let failed = producer.failed.contains_key(s);
            if must_refuse(*s) {
                bad_confirmed += u64::from(confirmed);
                return confirmed;
            }
            if consumer.effects.contains_key(s) || accounted(*s) {
                return false;
            }
            let refused = refusing && failed && !confirmed;
            good_refused += u64::from(refused);
            confirmed || !failed || refused
        })
        .collect();
    let unexpected = consumer
        .effects
        .keys()
        .filter(|&&s| s >= attempted || must_refuse(s))
        .count() as u64
        + consumer.foreign;
    let recovered = consumer
        .effects
        .keys()
        .filter(|&&s| s < attempted && !producer.confirmed.contains(&s))
        .count() as u64;
    let order = consumer.order.check();
    let extra = |m: &HashMap<u64, u32>| m.values().map(|&n| u64::from(n.saturating_sub(1))).sum();
    Counts {
        attempted,
        confirmed,
        failed,
        unresolved: attempted.saturating_sub(confirmed + failed),
        deliveries: consumer.deliveries_total,
        duplicated_deliveries: extra(&consumer.delivered),
        applied: consumer.effects.len() as u64,
        duplicate_effects: extra(&consumer.effects),
        lost: lost.len() as u64,
        unexpected,
        recovered,
        malformed: producer.malformed + consumer.malformed,
        lost_sample: lost.into_iter().take(10).collect(),
        good_refused,
        bad_confirmed,
        order_checked: order.checked,
        out_of_order: order.out_of_order,
        out_of_order_sample: order.sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(producer: &[&str], consumer: &[&str]) -> Counts {
        let mut p = ProducerView::default();
        producer.iter().for_each(|l| p.apply(l));
        let mut c = ConsumerView::default();
        consumer.iter().for_each(|l| c.apply(l));
        check(&p, &c, None)
    }

    #[test]
    fn a_clean_run_has_nothing_to_report() {
        let c = views(
            &["C 0", "C 1", "C 2", "DONE 3 0"],
            &[
                "START 1", "R 0", "R 1", "D 0", "R 2", "D 1", "E 1", "E 0", "D 2", "E 2",
            ],
        );
        assert_eq!((c.attempted, c.confirmed, c.unresolved), (3, 3, 0));
        assert_eq!((c.lost, c.unexpected, c.duplicate_effects), (0, 0, 0));
        assert_eq!(c.applied, 3);
        assert_eq!(
            (c.order_checked, c.out_of_order),
            (3, 0),
            "handlers finishing out of order are not the broker's order"
        );
    }

    #[test]
    fn order_judges_first_copies_and_counts_duplicates_apart() {
        // Kafka: 1 was written after 2 (offset 2) and resent after 3 (offset 4); a restarted
        // consumer re-read offset 0.
        let c = views(
            &["C 0", "C 1", "C 2", "C 3", "DONE 4 1"],
            &[
                "P 0 0 0 k",
                "D 0",
                "P 2 0 1 k",
                "D 2",
                "P 1 0 2 k",
                "D 1",
                "P 3 0 3 k",
                "D 3",
                "P 1 0 4 k",
                "D 1",
                "START 2",
                "P 0 0 0 k",
                "D 0",
            ],
        );
        assert_eq!(
            (c.order_checked, c.out_of_order, c.out_of_order_sample),
            (4, 1, vec![1])
        );
        assert_eq!(c.duplicated_deliveries, 2, "the resent 1 and the re-read 0");
        assert_eq!(c.malformed, 0);
    }

    #[test]
    fn confirmed_but_never_applied_is_lost_and_sampled() {
        let c = views(&["C 0", "C 1", "C 2", "DONE 3 0"], &["D 1", "E 1"]);
        assert_eq!(c.lost, 2);
        assert_eq!(c.lost_sample, vec![0, 2]);
    }

    #[test]
    fn redelivery_is_a_duplicated_delivery_and_a_second_effect_is_a_duplicate_effect() {
        let c = views(
            &["C 0", "C 1", "DONE 2 1"],
            &["D 0", "E 0", "D 0", "D 1", "E 1", "D 1", "E 1"],
        );
        assert_eq!(c.duplicated_deliveries, 2);
        assert_eq!(c.duplicate_effects, 1);
        assert_eq!(c.lost, 0);
    }

    #[test]
    fn applied_but_never_sent_is_unexpected_and_unconfirmed_but_applied_is_recovered() {
        let c = views(
            &["C 0", "F 1 timeout", "DONE 3 0"],
            &["E 0", "E 1", "E 7", "X garbage"],
        );
        assert_eq!(
            c.unexpected, 2,
            "seq 7 was never sent, plus one foreign payload"
        );
        assert_eq!(c.recovered, 1);
        assert_eq!(c.failed, 1);
        assert_eq!(c.unresolved, 1, "seq 2 neither confirmed nor failed");
    }

    #[test]
    fn accepted_but_never_resolved_nor_applied_is_lost_and_handed_back_is_not() {
        let c = views(
            &["A 0", "A 1", "A 2", "A 3", "C 0", "F 3 refused", "DONE 4 0"],
            &["E 0", "E 2"],
        );
        assert_eq!(
            c.lost, 1,
            "seq 1: accepted, pending when the producer died, never applied"
        );
        assert_eq!(c.lost_sample, vec![1]);
        assert_eq!(c.unresolved, 2);
        let mut p = ProducerView::default();
        ["A 0", "A 5", "C 3"].iter().for_each(|l| p.apply(l));
        assert_eq!(p.next_seq(), 6);
        assert_eq!(ProducerView::default().next_seq(), 0);
    }

    #[test]
    fn with_messages_the_broker_must_refuse_a_refused_one_confirmed_is_lost_and_so_is_a_good_one_handed_back(
    ) {
        let mut p = ProducerView::default();
        [
            "A 0",
            "A 1",
            "A 2",
            "A 3",
            "A 4",
            "A 5",
            "C 0",
            "F 1 unroutable",
            "C 2",
            "F 3 refused",
            "C 4",
            "F 5 unroutable",
            "DONE 6 0",
        ]
        .iter()
        .for_each(|l| p.apply(l));
        let mut c = ConsumerView::default();
        ["E 0", "E 4", "E 5"].iter().for_each(|l| c.apply(l));
        // 1 and 5 must be refused; 2 is confirmed although it must be refused; 3 is good.
        let counts = check(&p, &c, Some(&|s| s % 2 == 1 || s == 2));
        assert_eq!(counts.bad_confirmed, 1, "seq 2");
        assert_eq!(counts.good_refused, 0);
        assert_eq!(counts.unexpected, 1, "seq 5 must never reach the queue");
        let counts = check(&p, &c, Some(&|s| s == 1 || s == 5));
        assert_eq!(counts.bad_confirmed, 0);
        assert_eq!(counts.good_refused, 1, "seq 3 was good and handed back");
        assert_eq!(counts.lost, 2, "seq 2 (confirmed, never applied) and seq 3");
        assert_eq!(counts.lost_sample, vec![2, 3]);
        // Without refused messages a hand-back is not loss.
        assert_eq!(check(&p, &c, None).good_refused, 0);
        assert_eq!(check(&p, &c, None).lost, 1, "only seq 2");
    }

    #[test]
    fn malformed_lines_are_counted_not_trusted() {
        let c = views(&["C x", "DONE 1 0", "C 0"], &["E", "Q 1", "E 0"]);
        assert_eq!(c.malformed, 3);
        assert_eq!(c.lost, 0);
    }
}
