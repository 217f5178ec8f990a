//! The faults: broker and process kills through `scripts/brokers`, node kills and partitions
//! of the 3-node RabbitMQ cluster through `scripts/rabbit-cluster`, a silent network through
//! the run's TCP proxy, and the record of each.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use reliable_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_test_support::proxy::Proxy;
use tokio::time::Instant;

use super::children::Children;
use super::{round1, FaultRecord, Planned, RunArgs, Views};
use crate::plan::{Scenario, Sizes};
use crate::poison::{CRASH_EVERY, FAIL_EVERY};
use crate::HarnessError;

/// Runs `scripts/brokers ARGS` and returns its standard output.
pub(super) async fn brokers(script: &Path, args: &[&str]) -> Result<String, HarnessError> {
    let mut command = Command::new(script);
    command.args(args).stderr(Stdio::inherit());
    let what = format!("{} {}", script.display(), args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?
        .map_err(|e| HarnessError::Script {
            command: what.clone(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(HarnessError::Script {
            command: what,
            detail: output.status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Brokers in the project's Kafka cluster (`scripts/brokers up`).
const KAFKA_BROKERS: u32 = 3;

/// How long a partitioned Kafka leader stays reachable by clients, cut off from the other
/// brokers only: longer than the broker session timeout (3 s), so the controller fences it
/// and elects another leader while it still takes writes.
const LEADER_ALONE: Duration = Duration::from_secs(5);

/// How long the followers are frozen before the leader is killed: below the cluster's broker
/// session timeout (3 s), so they are not fenced for the pause itself.
const FOLLOWER_PAUSE: Duration = Duration::from_millis(1000);

/// Where a fault strikes: the run's processes, its proxy (silent-network runs) and what the
/// journals say so far.
pub(super) struct Targets<'a> {
    /// The producer and consumer processes.
    pub(super) children: &'a mut Children,
    /// The proxy between the producer and RabbitMQ, in silent-network runs.
    pub(super) link: Option<&'a Proxy>,
    /// The journals.
    pub(super) views: &'a mut Views,
    /// The fault's number in its run, from 0.
    pub(super) index: u32,
}

/// Injects the scenario's fault and waits until the component is back.
pub(super) async fn inject(
    args: &RunArgs,
    sizes: &Sizes,
    p: &Planned,
    targets: Targets<'_>,
    started: Instant,
) -> Result<FaultRecord, HarnessError> {
    let Targets {
        children,
        link,
        views,
        index,
    } = targets;
    let confirmed = views.producer.confirmed.len() as u64;
    let at = started.elapsed();
    let kill = Instant::now();
    let script = &args.brokers_script;
    let mut in_flight = None;
    let action = match p.scenario {
        Scenario::AmqpBrokerKill => {
            brokers(script, &["rabbit-kill"]).await?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(script, &["rabbit-restart"]).await?;
            "kill -9 RabbitMQ, restart".to_owned()
        }
        Scenario::KafkaLeaderKill => {
            let leader = brokers(script, &["kafka-leader", &p.dest, "0"]).await?;
            let id: u32 = leader.parse().map_err(|_| HarnessError::Script {
                command: "kafka-leader".into(),
                detail: format!("not a broker id: {leader:?}"),
            })?;
            // The leader dies before its followers caught up: freeze them, let the leader take
            // writes alone for a moment, kill it, then let them run again. acks=1 writes of
            // that moment were confirmed by the leader only; acks=all writes were not confirmed.
            let followers: Vec<String> = (1..=KAFKA_BROKERS)
                .filter(|&b| b != id)
                .map(|b| b.to_string())
                .collect();
            for f in &followers {
                brokers(script, &["kafka-pause", f]).await?;
            }
            tokio::time::sleep(FOLLOWER_PAUSE).await;
            let killed = brokers(script, &["kafka-kill", &id.to_string()]).await;
            for f in &followers {
                brokers(script, &["kafka-resume", f]).await?;
            }
            killed?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(script, &["kafka-restart", &id.to_string()]).await?;
            wait_in_sync(args, &p.dest).await?;
            format!(
                "followers frozen {} ms, kill -9 Kafka broker {id} (leader of partition 0), restart",
                FOLLOWER_PAUSE.as_millis()
            )
        }
        Scenario::KafkaProducerKill => {
            // The cluster is slow to acknowledge (the followers of partition 0's leader are
            // frozen), so the producer holds unconfirmed messages when it dies.
            let leader = brokers(script, &["kafka-leader", &p.dest, "0"]).await?;
            let followers: Vec<String> = (1..=KAFKA_BROKERS)
                .map(|b| b.to_string())
                .filter(|b| *b != leader)
                .collect();
            for f in &followers {
                brokers(script, &["kafka-pause", f]).await?;
            }
            tokio::time::sleep(FOLLOWER_PAUSE).await;
            children.kill_producer();
            for f in &followers {
                brokers(script, &["kafka-resume", f]).await?;
            }
            tokio::time::sleep(sizes.downtime).await;
            children.start_producer()?;
            format!(
                "followers frozen {} ms, SIGKILL the producer process, restart",
                FOLLOWER_PAUSE.as_millis()
            )
        }
        Scenario::AmqpSilentNetwork => {
            let proxy = link.ok_or_else(|| {
                HarnessError::Setup("a silent-network run without its proxy".to_owned())
            })?;
            views.refresh()?;
            let resolved_at_cut = views.producer.resolved();
            proxy.blackhole();
            tokio::time::sleep(sizes.blackhole).await;
            views.refresh()?;
            // Unconfirmed at some moment of the blackhole: in flight when it began, or
            // accepted while it lasted.
            in_flight =
                Some((views.producer.accepted.len() as u64).saturating_sub(resolved_at_cut));
            proxy.restore();
            format!(
                "the producer's link to RabbitMQ silent for {} s (a TCP proxy stops carrying \
                 bytes: no FIN, no RST), then restored",
                sizes.blackhole.as_secs()
            )
        }
        Scenario::AmqpBadPublish => "bad publishes mixed into the whole stream: 1 in 10 \
                                     unroutable, 1 in 50 to a missing exchange (404), 15 in 100 \
                                     first attempts cut short after 0-400 µs"
            .to_owned(),
        Scenario::AmqpPoison | Scenario::KafkaPoison => format!(
            "poison messages through the whole stream: 1 in {CRASH_EVERY} aborts the consumer \
             process (restarted at once), 1 in {FAIL_EVERY} fails its handler permanently"
        ),
        Scenario::AmqpNodeKill => {
            let cluster = &args.cluster_script;
            let node = brokers(cluster, &["leader", &p.dest]).await?;
            brokers(cluster, &["kill", &node]).await?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(cluster, &["restart", &node]).await?;
            wait_members(cluster, &p.dest).await?;
            format!("kill -9 RabbitMQ node {node} (leading the queue), restart")
        }
        Scenario::AmqpPartition => {
            let cluster = &args.cluster_script;
            let node = brokers(cluster, &["leader", &p.dest]).await?;
            brokers(cluster, &["partition", &node]).await?;
            tokio::time::sleep(sizes.blackhole).await;
            brokers(cluster, &["heal", &node]).await?;
            wait_members(cluster, &p.dest).await?;
            format!(
                "RabbitMQ node {node} (leading the queue) cut off from the other nodes and every \
                 client for {} s (link down: no FIN, no RST), healed",
                sizes.blackhole.as_secs()
            )
        }
        Scenario::AmqpClientPartition | Scenario::KafkaClientPartition => {
            views.refresh()?;
            let resolved_at_cut = views.producer.resolved();
            cut_off_producer(script, children, sizes.blackhole).await?;
            views.refresh()?;
            in_flight =
                Some((views.producer.accepted.len() as u64).saturating_sub(resolved_at_cut));
            brokers(script, &["client-heal"]).await?;
            format!(
                "the producer process cut off from every broker for {} s (its packets \
                 dropped: no FIN, no RST; its open connections reset halfway, as a NAT or \
                 firewall that forgot them answers), then let through",
                sizes.blackhole.as_secs()
            )
        }
        Scenario::KafkaPartition => {
            let leader = brokers(script, &["kafka-leader", &p.dest, "0"]).await?;
            // First the replicas only: the leader still takes (and, with acks=1, confirms)
            // writes that no follower copies, until the controller fences it.
            brokers(script, &["kafka-partition", &leader, "--brokers-only"]).await?;
            tokio::time::sleep(LEADER_ALONE).await;
            brokers(script, &["kafka-partition", &leader]).await?;
            tokio::time::sleep(sizes.blackhole).await;
            brokers(script, &["kafka-heal", &leader]).await?;
            wait_in_sync(args, &p.dest).await?;
            format!(
                "Kafka broker {leader} (leader of partition 0) cut off from the other brokers \
                 for {} s while clients still reached it, then from the clients too for {} s \
                 (packets dropped: no FIN, no RST), healed",
                LEADER_ALONE.as_secs(),
                sizes.blackhole.as_secs()
            )
        }
        Scenario::AmqpNemesis | Scenario::KafkaNemesis => {
            super::nemesis::strike(args, sizes, p, children, index).await?
        }
        Scenario::AmqpConsumerKill | Scenario::KafkaConsumerKill => {
            children.kill_consumer();
            children.consumer_kills += 1;
            tokio::time::sleep(sizes.downtime).await;
            children.start_consumer()?;
            "SIGKILL the consumer process, restart".to_owned()
        }
    };
    Ok(FaultRecord {
        action,
        at_s: round1(at.as_secs_f64()),
        confirmed_before: confirmed,
        recovery_s: round1(kill.elapsed().as_secs_f64()),
        in_flight,
    })
}

/// Cuts the producer process off from every broker for `outage` (everything it sends dropped:
/// no FIN, no RST) and, halfway, resets its connections, as a NAT or firewall that forgot them
/// answers: what was written into them and not delivered is gone. The producer stays cut off:
/// the caller lets it through (`client-heal`) once it has looked at the run.
pub(super) async fn cut_off_producer(
    script: &Path,
    children: &Children,
    outage: Duration,
) -> Result<(), HarnessError> {
    let pid = children
        .producer_pid()
        .ok_or_else(|| HarnessError::Setup("no producer process to cut off".to_owned()))?
        .to_string();
    brokers(script, &["client-partition", &pid]).await?;
    tokio::time::sleep(outage / 2).await;
    brokers(script, &["client-reset", &pid]).await?;
    tokio::time::sleep(outage / 2).await;
    Ok(())
}

/// Waits until every node of the RabbitMQ cluster runs again and `queue` answers with a
/// leader, so the next fault starts from a whole cluster.
pub(super) async fn wait_members(cluster: &Path, queue: &str) -> Result<(), HarnessError> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let whole = brokers(cluster, &["status"]).await.is_ok()
            && brokers(cluster, &["leader", queue]).await.is_ok();
        if whole {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Script {
                command: format!("wait for the cluster and {queue}"),
                detail: "the cluster was not whole again after 180 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every partition of `topic` has all its replicas in sync again, so the next
/// fault starts from a fully replicated topic.
pub(super) async fn wait_in_sync(args: &RunArgs, topic: &str) -> Result<(), HarnessError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
        .create()
        .map_err(|e| HarnessError::Setup(format!("metadata client: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let topic = topic.to_owned();
    let consumer = std::sync::Arc::new(consumer);
    loop {
        let c = consumer.clone();
        let t = topic.clone();
        let in_sync = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.isr().len() == p.replicas().len())
                    })
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?;
        if in_sync {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Script {
                command: format!("wait for {topic} in sync"),
                detail: "replicas not back in sync after 180 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
