//! The nemesis: a seeded random schedule of faults for a whole run, in the manner of Jepsen's
//! nemesis. Each fault of a run is drawn from the run's seed and the fault's number alone, so
//! the safe run and its control meet the same schedule and `--seed` replays a failing run.
//! The first fault is always a consumer kill: the control (producer and consumer unsafe) then
//! loses messages whatever the rest of the schedule draws, so it always shows the run can see
//! loss.
//!
//! On RabbitMQ (the 3-node cluster) it mixes kill -9 of a node, a frozen node (SIGSTOP), a node
//! cut off by a partition; on Kafka a killed broker, a frozen broker, a broker cut off from the
//! other brokers and then from the clients; on both a killed consumer process and the producer
//! process cut off from every node (its connections reset halfway). Each fault ends with the
//! component back (the cluster whole, the topic's replicas in sync) before the next one.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::children::Children;
use super::inject::{brokers, cut_off_producer, wait_in_sync, wait_members};
use super::{Planned, RunArgs};
use crate::plan::{Broker, Sizes};
use crate::HarnessError;

/// Nodes (RabbitMQ) or brokers (Kafka) in the project's clusters.
const NODES: u64 = 3;

/// How long a frozen Kafka broker stays frozen: past the broker session timeout (3 s), so the
/// controller fences it and moves its leaderships.
const KAFKA_FREEZE: Duration = Duration::from_secs(5);

/// One fault of the nemesis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Strike {
    /// kill -9 node (broker) N, restart it.
    Kill(u64),
    /// Freeze node (broker) N with SIGSTOP, let it run again.
    Freeze(u64),
    /// Cut node (broker) N off, heal.
    Partition(u64),
    /// SIGKILL the consumer process, restart it.
    KillConsumer,
    /// Cut the producer process off from every node or broker, reset its connections
    /// halfway, let it through again.
    CutProducer,
}

/// Fault `i` of a run with `seed` (the same schedule on either broker).
pub(super) fn draw(seed: u64, i: u32) -> Strike {
    if i == 0 {
        return Strike::KillConsumer;
    }
    let mut rng =
        StdRng::seed_from_u64(seed ^ (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let node = rng.random_range(1..=NODES);
    match rng.random_range(0..5) {
        0 => Strike::Kill(node),
        1 => Strike::Freeze(node),
        2 => Strike::Partition(node),
        3 => Strike::KillConsumer,
        _ => Strike::CutProducer,
    }
}

/// Strikes fault `i` of run `p` and waits until the component is back; says what it did.
pub(super) async fn strike(
    args: &RunArgs,
    sizes: &Sizes,
    p: &Planned,
    children: &mut Children,
    i: u32,
) -> Result<String, HarnessError> {
    let seed = args.seed.unwrap_or_default();
    let broker = p.scenario.broker();
    let fault = draw(seed, i);
    let cluster = &args.cluster_script;
    let script = &args.brokers_script;
    let what = match (broker, fault) {
        (_, Strike::CutProducer) => {
            let outage = sizes.blackhole / 2;
            cut_off_producer(script, children, outage).await?;
            brokers(script, &["client-heal"]).await?;
            format!(
                "the producer process cut off from every broker for {} s, its connections \
                 reset halfway",
                outage.as_secs()
            )
        }
        (_, Strike::KillConsumer) => {
            children.kill_consumer();
            children.consumer_kills += 1;
            tokio::time::sleep(sizes.downtime).await;
            children.start_consumer()?;
            "SIGKILL the consumer process, restart".to_owned()
        }
        (Broker::Amqp, Strike::Kill(n)) => {
            let n = n.to_string();
            brokers(cluster, &["kill", &n]).await?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(cluster, &["restart", &n]).await?;
            format!("kill -9 RabbitMQ node {n}, restart")
        }
        (Broker::Amqp, Strike::Freeze(n)) => {
            let n = n.to_string();
            brokers(cluster, &["pause", &n]).await?;
            tokio::time::sleep(sizes.blackhole / 2).await;
            brokers(cluster, &["resume", &n]).await?;
            format!(
                "RabbitMQ node {n} frozen (SIGSTOP) for {} s",
                (sizes.blackhole / 2).as_secs()
            )
        }
        (Broker::Amqp, Strike::Partition(n)) => {
            let n = n.to_string();
            brokers(cluster, &["partition", &n]).await?;
            tokio::time::sleep(sizes.blackhole / 2).await;
            brokers(cluster, &["heal", &n]).await?;
            format!(
                "RabbitMQ node {n} cut off for {} s, healed",
                (sizes.blackhole / 2).as_secs()
            )
        }
        (Broker::Kafka, Strike::Kill(n)) => {
            let n = n.to_string();
            brokers(script, &["kafka-kill", &n]).await?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(script, &["kafka-restart", &n]).await?;
            format!("kill -9 Kafka broker {n}, restart")
        }
        (Broker::Kafka, Strike::Freeze(n)) => {
            let n = n.to_string();
            brokers(script, &["kafka-pause", &n]).await?;
            tokio::time::sleep(KAFKA_FREEZE).await;
            brokers(script, &["kafka-resume", &n]).await?;
            format!(
                "Kafka broker {n} frozen (SIGSTOP) for {} s",
                KAFKA_FREEZE.as_secs()
            )
        }
        (Broker::Kafka, Strike::Partition(n)) => {
            let n = n.to_string();
            brokers(script, &["kafka-partition", &n, "--brokers-only"]).await?;
            tokio::time::sleep(KAFKA_FREEZE).await;
            brokers(script, &["kafka-partition", &n]).await?;
            tokio::time::sleep(sizes.blackhole / 2).await;
            brokers(script, &["kafka-heal", &n]).await?;
            format!(
                "Kafka broker {n} cut off from the other brokers for {} s, then from the \
                 clients too for {} s, healed",
                KAFKA_FREEZE.as_secs(),
                (sizes.blackhole / 2).as_secs()
            )
        }
    };
    match broker {
        Broker::Amqp => wait_members(cluster, &p.dest).await?,
        Broker::Kafka => wait_in_sync(args, &p.dest).await?,
    }
    Ok(format!("nemesis (seed {seed}, fault {}): {what}", i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_schedule_and_seeds_differ() {
        let a: Vec<Strike> = (0..8).map(|i| draw(7, i)).collect();
        let again: Vec<Strike> = (0..8).map(|i| draw(7, i)).collect();
        assert_eq!(a, again);
        let b: Vec<Strike> = (0..8).map(|i| draw(8, i)).collect();
        assert_ne!(a, b);
        assert!([a[0], b[0]].iter().all(|&s| s == Strike::KillConsumer));
    }

    #[test]
    fn every_kind_of_fault_is_drawn() {
        let drawn: Vec<Strike> = (0..200).map(|i| draw(1, i)).collect();
        assert!(drawn.iter().any(|s| matches!(s, Strike::Kill(_))));
        assert!(drawn.iter().any(|s| matches!(s, Strike::Freeze(_))));
        assert!(drawn.iter().any(|s| matches!(s, Strike::Partition(_))));
        assert!(drawn.contains(&Strike::KillConsumer));
        assert!(drawn.contains(&Strike::CutProducer));
        assert!((0..200).all(|i| match draw(1, i) {
            Strike::Kill(n) | Strike::Freeze(n) | Strike::Partition(n) => (1..=NODES).contains(&n),
            _ => true,
        }));
    }
}
