//! Loss-matrix rows L6 and L7 at start-up: unsafe topics and unsafe client settings are
//! refused with errors naming each setting, on the real 3-broker cluster.

mod common;

use std::time::Duration;

use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::topic::{ensure_topic, TopicError, TopicSpec};
use reliable_kafka::{Error, KafkaConsumer, KafkaTransport};
use reliable_test_support::{kafka, require, unique_name};

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

fn problems(err: TopicError) -> Vec<&'static str> {
    match err {
        TopicError::Unsafe { problems, .. } => problems.iter().map(|p| p.setting).collect(),
        other => panic!("expected an unsafe-topic error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_topic_is_created_and_then_verified() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-safe");
    let spec = TopicSpec::new(&topic).partitions(2);
    let first = ensure_topic(&client(&cluster.bootstrap), &spec)
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.partitions, 2);
    assert_eq!(first.replication_factor, 3);
    assert_eq!(first.min_insync_replicas, 2);
    let again = ensure_topic(&client(&cluster.bootstrap), &spec)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.replication_factor, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf1_topic_fails_the_check_naming_the_replication_factor() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-rf1");
    common::create_raw_topic(&cluster.bootstrap, &topic, 1, 1, &[]).await;
    let err = ensure_topic(&client(&cluster.bootstrap), &TopicSpec::new(&topic))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`replication.factor` is 1"), "{text}");
    assert!(problems(err).contains(&"replication.factor"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_isr_1_and_unclean_election_fail_the_check_each_named() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-isr1");
    common::create_raw_topic(
        &cluster.bootstrap,
        &topic,
        1,
        3,
        &[
            ("min.insync.replicas", "1"),
            ("unclean.leader.election.enable", "true"),
        ],
    )
    .await;
    let err = ensure_topic(&client(&cluster.bootstrap), &TopicSpec::new(&topic))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`min.insync.replicas` is 1"), "{text}");
    assert_eq!(
        problems(err),
        ["min.insync.replicas", "unclean.leader.election.enable"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builders_run_the_topic_check_at_start_up() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-builder-rf1");
    common::create_raw_topic(&cluster.bootstrap, &topic, 1, 1, &[]).await;
    let err = KafkaTransport::builder(&cluster.bootstrap)
        .default_topic(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Topic(TopicError::Unsafe { .. })),
        "{err}"
    );
    let err = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-g"))
        .subscribe(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Topic(TopicError::Unsafe { .. })),
        "{err}"
    );
    // The explicit opt-out lets it through.
    KafkaTransport::builder(&cluster.bootstrap)
        .default_topic(TopicSpec::new(&topic))
        .skip_topic_check()
        .build()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_producer_and_consumer_overrides_are_typed_errors() {
    let cluster = require!(kafka(3));
    let mut producer = client(&cluster.bootstrap);
    producer
        .set("acks", "1")
        .set("sasl.password", "s3cret-value");
    let err = KafkaTransport::builder_from_config(producer)
        .confirm_timeout(Duration::from_secs(5))
        .skip_topic_check()
        .build()
        .await
        .unwrap_err();
    let Error::UnsafeConfig(unsafe_config) = &err else {
        panic!("expected UnsafeConfig, got {err}");
    };
    assert_eq!(unsafe_config.violations.len(), 1);
    assert_eq!(unsafe_config.violations[0].setting, "acks");
    assert_eq!(unsafe_config.violations[0].value, "1");
    assert!(!format!("{err} {err:?}").contains("s3cret-value"));

    let mut consumer = client(&cluster.bootstrap);
    consumer
        .set("group.id", unique_name("rk-g"))
        .set("enable.auto.commit", "true");
    let err = KafkaConsumer::builder_from_config(consumer)
        .subscribe(TopicSpec::new("unused"))
        .skip_topic_check()
        .build()
        .await
        .unwrap_err();
    let Error::UnsafeConfig(unsafe_config) = &err else {
        panic!("expected UnsafeConfig, got {err}");
    };
    assert_eq!(unsafe_config.violations[0].setting, "enable.auto.commit");
}
