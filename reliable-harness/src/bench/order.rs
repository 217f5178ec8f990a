//! What ordered resends cost: the SDK producer with `SendOrder::Preserved` against
//! `SendOrder::Relaxed`, one task sending at full speed into the in-memory broker while faults
//! force resends.
//!
//! Both cases get the same fault schedule, keyed to the sequence number: twice in every 10,000
//! messages, a burst of three refusals at hand-off (a full client queue) or a silent link that
//! swallows every publish until the connection is declared lost 20 ms later (every undecided
//! attempt fails and is resent). Each confirm takes 1 ms (the broker's delay), so the window
//! matters as it does on a real broker. Rounds run in ABBA order after a discarded warm-up
//! round; the figure is the median of the per-round paired ratios Preserved / Relaxed. The
//! in-memory broker isolates the producer's own cost: on a real broker the recovery also waits
//! for reconnects, which both cases pay alike.

use std::time::Duration;

use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::producer::{Producer, ProducerConfig, SendOrder};
use reliable_core::{Message, PublishError};
use reliable_test_support::order::{check, numbered_payload, sequence};

use super::{paired_ratio, through_producer, BenchArgs, Report, Round, Tally};
use crate::HarnessError;

const GROUP: &str = "Send order under faults (in-memory broker, 1 ms confirms)";
const QUEUE: &str = "bench-order";
const CONFIRM_DELAY: Duration = Duration::from_millis(1);

/// Runs both cases and records them with the paired ratio.
pub async fn run(args: &BenchArgs, report: &mut Report) -> Result<(), HarnessError> {
    let messages = args.order_messages;
    let mut tallies = [Tally::default(), Tally::default()];
    let mut late = [0u64, 0u64];
    for round in Round::all(args.rounds) {
        for order in round.in_turn(&[SendOrder::Preserved, SendOrder::Relaxed]) {
            let (sample, inversions) = one(order, messages).await?;
            let i = usize::from(order == SendOrder::Relaxed);
            if !round.is_warm_up() {
                late[i] += inversions;
            }
            tallies[i].add(round, sample);
        }
    }
    let [mut preserved, mut relaxed] = tallies;
    report.push(preserved.result(GROUP, "SDK, SendOrder::Preserved", None));
    report.push(relaxed.result(GROUP, "SDK, SendOrder::Relaxed", None));
    if let Some(ratio) = paired_ratio(preserved.rounds(), relaxed.rounds()) {
        report.notes.push(format!(
            "send order under faults: Preserved / Relaxed throughput, median of {} paired rounds (ABBA, warm-up discarded): {ratio:.2}; first copies out of order over all rounds: Preserved {}, Relaxed {}",
            preserved.rounds().len(),
            late[0],
            late[1]
        ));
    }
    Ok(())
}

/// One round of one case: its sample and the first copies that landed out of order.
async fn one(order: SendOrder, messages: u64) -> Result<(super::Sample, u64), HarnessError> {
    let broker = InMemoryBroker::new();
    broker.declare_queue(QUEUE);
    let config = ProducerConfig {
        order,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(broker.transport(), config);
    let faults = broker.clone();
    let sample = through_producer(producer, messages, move |seq| {
        inject(&faults, seq);
        Message::new(numbered_payload(seq)).with_destination(QUEUE)
    })
    .await?;
    Ok((sample, out_of_order(&broker)))
}

/// The fault schedule (see the module docs); every other message is confirmed after
/// [`CONFIRM_DELAY`].
fn inject(broker: &InMemoryBroker, seq: u64) {
    if seq == u64::MAX {
        return; // the warm-up message
    }
    if seq % 10_000 == 2_500 {
        for _ in 0..3 {
            broker.inject_publish_fault(PublishFault::Fail(PublishError::Busy {
                reason: "injected full queue".into(),
            }));
        }
    } else if seq % 10_000 == 7_500 {
        broker.go_silent();
        let b = broker.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            b.lose_connection();
        });
    } else {
        broker.inject_publish_fault(PublishFault::Delay(CONFIRM_DELAY));
    }
}

/// First copies in the queue that sit behind a later sequence number (the warm-up message
/// apart).
fn out_of_order(broker: &InMemoryBroker) -> u64 {
    let arrivals = broker
        .messages(QUEUE)
        .iter()
        .filter_map(|m| sequence(m.payload()))
        .filter(|&seq| seq != u64::MAX)
        .map(|seq| ((), seq))
        .collect::<Vec<_>>();
    check(arrivals).out_of_order
}
