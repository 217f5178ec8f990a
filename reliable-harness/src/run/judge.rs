//! A finished run's checks: the total-queue check of the journals, and for the poison scenarios
//! the dead letters read back with an independent client.

use std::time::Duration;

use super::{FaultRecord, Planned, RunArgs};
use crate::journal::{check, check_with, ConsumerView, Counts, ProducerView};
use crate::plan::{Publish, Scenario, Sizes, Variant};
use crate::poison::{self, Fate, PoisonCounts};
use crate::report::Verdict;
use crate::HarnessError;

/// Checks run `p` from its journals (`views`: producer, consumer) and, in the poison scenarios,
/// its dead letters.
pub(super) async fn judge(
    args: &RunArgs,
    sizes: &Sizes,
    p: &Planned,
    views: (&ProducerView, &ConsumerView),
    faults: &[FaultRecord],
    producer_finished: bool,
) -> Result<(Counts, Verdict, Option<PoisonCounts>), HarnessError> {
    let (producer, consumer) = views;
    let scenario = p.scenario;
    let must_refuse = move |seq: u64| Publish::of(scenario, seq).refused();
    let refusing =
        (scenario == Scenario::AmqpBadPublish).then_some(&must_refuse as &dyn Fn(u64) -> bool);
    Ok(if scenario.poison() {
        let counts = check(producer, consumer, refusing);
        let expected = (0..counts.attempted)
            .filter(|&s| Fate::of(scenario, s) != Fate::Apply)
            .count();
        // The control's stream is stuck behind a looping message: what is there is there.
        let wait = match p.variant {
            Variant::Safe => Duration::from_secs(15),
            Variant::Control => Duration::from_secs(3),
        };
        let dead = poison::read(scenario.broker(), &args.brokers, &p.dest, expected, wait).await?;
        let accounted = |s: u64| dead.accounts_for(s);
        let counts = check_with(producer, consumer, refusing, &accounted);
        let pc = poison::check(scenario, counts.attempted, consumer, &dead);
        let verdict = Verdict::judge_poison(
            p.variant,
            sizes,
            &counts,
            faults.len() as u32,
            producer,
            producer_finished,
            &pc,
        );
        (counts, verdict, Some(pc))
    } else {
        let counts = check(producer, consumer, refusing);
        let verdict = Verdict::judge(
            p.variant,
            sizes,
            &counts,
            faults.len() as u32,
            producer,
            producer_finished,
        )
        .with_figures(figures(scenario, &counts, faults, producer));
        (counts, verdict, None)
    })
}

/// The figures of a run that decide nothing but are worth reading: the extra copies a silent
/// network, a node kill or a partition cost, and how the bad publishes were answered.
fn figures(
    scenario: Scenario,
    counts: &Counts,
    faults: &[FaultRecord],
    producer: &ProducerView,
) -> Vec<String> {
    match scenario {
        Scenario::AmqpSilentNetwork
        | Scenario::AmqpClientPartition
        | Scenario::KafkaClientPartition => {
            let in_flight: u64 = faults.iter().filter_map(|f| f.in_flight).sum();
            let extra = counts.duplicated_deliveries;
            vec![format!(
                "{extra} extra copies = {:.1} % of the {in_flight} messages in flight during \
                 the silence or the cut",
                100.0 * extra as f64 / in_flight.max(1) as f64
            )]
        }
        Scenario::AmqpBadPublish => {
            let refused = |kind: Publish| {
                producer
                    .failed
                    .keys()
                    .filter(|&&s| {
                        !producer.confirmed.contains(&s) && Publish::of(scenario, s) == kind
                    })
                    .count()
            };
            vec![format!(
                "refused: {} unroutable, {} to a missing exchange",
                refused(Publish::Unroutable),
                refused(Publish::MissingExchange)
            )]
        }
        Scenario::AmqpNodeKill
        | Scenario::AmqpPartition
        | Scenario::KafkaPartition
        | Scenario::AmqpNemesis
        | Scenario::KafkaNemesis => vec![format!(
            "{} extra copies delivered (resends, or redeliveries to a consumer cut off before its commit or ack)",
            counts.duplicated_deliveries
        )],
        _ => Vec::new(),
    }
}
