//! The Kafka checks against the project's live 3-broker cluster: deliberately unsafe topics are
//! each named with the right check; a safe topic (RF 3, min.insync.replicas 2) has none; a
//! consumer group's lag and missing commits are reported. Needs `scripts/brokers up`; under
//! `CI` a missing broker or variable fails the test.

mod common;

use std::time::Duration;

use common::{checks_on, create_topic, delete_topics, options};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use reliable_doctor::Severity;
use reliable_test_support::{require, unique_name};

#[tokio::test]
async fn unsafe_topics_are_named_and_a_safe_one_is_not() {
    common::require_env_in_ci(&["RELIABLE_KAFKA_BOOTSTRAP"]);
    let cluster = require!(reliable_test_support::kafka(3));
    let bootstrap = cluster.bootstrap.clone();
    let prefix = format!("{}-", unique_name("doctor"));
    let rf1 = format!("{prefix}rf1");
    let min1 = format!("{prefix}rf3-min-insync-1");
    let unclean = format!("{prefix}unclean");
    let safe = format!("{prefix}safe");
    let admin = common::admin(&bootstrap);
    create_topic(&admin, &bootstrap, &rf1, 1, &[]).await;
    create_topic(
        &admin,
        &bootstrap,
        &min1,
        3,
        &[("min.insync.replicas", "1")],
    )
    .await;
    create_topic(
        &admin,
        &bootstrap,
        &unclean,
        3,
        &[
            ("min.insync.replicas", "2"),
            ("unclean.leader.election.enable", "true"),
        ],
    )
    .await;
    create_topic(
        &admin,
        &bootstrap,
        &safe,
        3,
        &[("min.insync.replicas", "2")],
    )
    .await;

    // A group that read 1 of 3 records of the safe topic, and one that never committed.
    let group = format!("{prefix}group");
    let idle_group = format!("{prefix}idle-group");
    let committed = produce_and_commit(&bootstrap, &safe, &group).await;

    let mut opts = options(&prefix);
    opts.kafka_bootstrap = Some(bootstrap.clone());
    opts.groups = vec![group.clone(), idle_group.clone()];
    let report = reliable_doctor::audit(&opts).await;
    let mut safe_only = options(&safe);
    safe_only.kafka_bootstrap = Some(bootstrap.clone());
    let safe_report = reliable_doctor::audit(&safe_only).await;

    delete_topics(&admin, &[&rf1, &min1, &unclean, &safe]).await;
    // The group's committed offsets go too (errors ignored: cleanup).
    let _ = admin
        .delete_groups(&[&group], &rdkafka::admin::AdminOptions::new())
        .await;

    committed.expect("producing and committing on the safe topic");
    let report = report.expect("audit of the live cluster");
    let found = &report.findings;
    assert_eq!(report.audited.topics, 4, "{report:#?}");
    assert_eq!(report.audited.groups, 2, "{report:#?}");
    let rf1_checks = checks_on(found, &rf1);
    assert!(
        rf1_checks.contains(&"kafka-replication-below-3"),
        "{report:#?}"
    );
    assert_eq!(checks_on(found, &min1), ["kafka-min-insync-below-2"]);
    assert_eq!(
        checks_on(found, &unclean),
        ["kafka-unclean-election-enabled"]
    );
    assert!(checks_on(found, &safe).is_empty(), "{report:#?}");
    assert!(
        checks_on(found, &format!("{safe}/0")).is_empty(),
        "{report:#?}"
    );
    // RF 1 against the cluster's min.insync.replicas 2: its one replica is too few in sync.
    assert_eq!(
        checks_on(found, &format!("{rf1}/0")),
        ["kafka-isr-below-min-insync"]
    );
    let lag = found
        .iter()
        .find(|f| f.object == format!("{group}/{safe}/0"))
        .unwrap_or_else(|| panic!("no lag finding: {report:#?}"));
    assert_eq!(lag.check, "kafka-group-lag");
    assert_eq!(lag.severity, Severity::Info);
    assert!(lag.meaning.starts_with("lag 2:"), "{}", lag.meaning);
    assert_eq!(
        checks_on(found, &idle_group),
        ["kafka-group-no-committed-offsets"]
    );
    assert_eq!(report.exit_code(), 1);

    let safe_report = safe_report.expect("audit of the safe topic");
    assert_eq!(safe_report.audited.topics, 1);
    assert!(safe_report.findings.is_empty(), "{safe_report:#?}");
    assert_eq!(safe_report.exit_code(), 0);
}

/// Writes 3 records to partition 0 of `topic` and commits offset 1 for `group` (a read of the
/// first record), without joining the group.
async fn produce_and_commit(bootstrap: &str, topic: &str, group: &str) -> Result<(), String> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create()
        .map_err(|e| e.to_string())?;
    for i in 0..3 {
        let body = format!("record {i}");
        producer
            .send(
                FutureRecord::<(), _>::to(topic).payload(&body).partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e.to_string())?;
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, 0, Offset::Offset(1))
        .map_err(|e| e.to_string())?;
    consumer
        .commit(&offsets, CommitMode::Sync)
        .map_err(|e| e.to_string())
}
