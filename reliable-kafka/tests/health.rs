//! Kafka in the health snapshots (issue 17, "Metrics" and "Shutdown and health"):
//!
//! * the consumer's lag: records of an owned partition beyond the group's committed offset,
//!   the same in [`KafkaConsumer::lag`], the pipeline's
//!   [`PipelineHealth::lag`](reliable_core::pipeline::PipelineHealth::lag) and the
//!   `reliable_commit_lag{topic, partition}` gauge scraped from a Prometheus recorder; checked
//!   against the group's committed offset read back from the broker by another client, while
//!   a handler holds the partition, then 0 once everything is committed, then the series at 0
//!   once the partition is revoked (the consumer closed);
//! * the producer's `connected`: `true` against the live cluster, `false` against an address
//!   nothing listens on.
//!
//! `cargo test -p reliable-kafka --test health` (about 15 s).

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use reliable_core::pipeline::{handler_fn, HandlerBuilder, Pipeline, PipelineState};
use reliable_core::producer::Producer;
use reliable_core::{Message, TopicPartition, Transport};
use reliable_kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};
use tokio::time::Instant;

/// Records produced.
const N: usize = 20;
/// Records the handler lets through before it holds the partition.
const K: usize = 8;

/// The process-wide Prometheus recorder, installed once.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder")
    })
}

/// The scraped value of `reliable_commit_lag{topic, partition}`, if the series exists.
fn scraped_lag(topic: &str, partition: i32) -> Option<f64> {
    let text = recorder().render();
    let topic_label = format!("topic=\"{topic}\"");
    let partition_label = format!("partition=\"{partition}\"");
    text.lines()
        .filter(|l| l.starts_with("reliable_commit_lag{"))
        .filter(|l| l.contains(&topic_label) && l.contains(&partition_label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The group's committed offset of `topic`[0], read from the broker by a client of its own.
fn group_committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    match committed.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Polls `check` every 50 ms until it returns `Some`, at most `within`.
async fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_the_records_beyond_the_group_commit_in_view_health_and_gauge() {
    let cluster = require!(kafka(3));
    recorder();
    let topic = unique_name("rk-lag");
    let dlq = format!("{topic}.dlq");
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .topic(TopicSpec::new(&topic))
        .topic(TopicSpec::new(&dlq))
        .build()
        .await
        .unwrap();
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    for i in 0..N {
        producer
            .send_confirmed(Message::new(format!("r{i}")).with_destination(&topic))
            .await
            .unwrap();
    }

    let group = unique_name("rk-lag-g");
    let consumer = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .subscribe(TopicSpec::new(&topic))
        .commit_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let lag = consumer.lag();
    assert_eq!(lag.total(), None, "nothing assigned yet");

    // The handler takes K records, then holds the (K+1)-th until released: the partition is
    // handled in order, so the commit stops at offset K.
    let seen = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let handler = {
        let seen = seen.clone();
        handler_fn(move |_msg: Message| {
            let n = seen.fetch_add(1, AtomicOrdering::SeqCst) + 1;
            let mut released = released.clone();
            async move {
                if n == K + 1 {
                    let _ = released.wait_for(|r| *r).await;
                }
                Ok(())
            }
        })
    };
    let pipeline = Pipeline::new(
        consumer,
        HandlerBuilder::new(handler).build(),
        transport.dead_letter(&dlq),
    );
    let probe = pipeline.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline.run_until(async move {
        let _ = stopped.await;
    }));

    let expected = (N - K) as u64;
    let tp = TopicPartition::new(topic.as_str(), 0);
    let held = eventually(Duration::from_secs(30), || {
        let view = lag.partitions();
        let p = view.iter().find(|p| p.partition == tp)?;
        (p.committed == Some(K as i64) && p.lag == Some(expected)).then(|| p.clone())
    })
    .await;
    let held =
        held.unwrap_or_else(|| panic!("lag never reached {expected}: {:?}", lag.partitions()));
    assert_eq!(held.end_offset, Some(N as i64));
    assert_eq!(
        seen.load(AtomicOrdering::SeqCst),
        K + 1,
        "the handler holds record K"
    );

    // The group's commit as the broker has it, read by another client: the lag is measured
    // from there, not from what was handed out (K + 1) or fetched (N).
    let committed = group_committed(&cluster.bootstrap, &group, &topic);
    assert_eq!(committed, Some(K as i64));
    let health = probe.health();
    assert_eq!(health.state, PipelineState::Running);
    assert_eq!(health.lag, Some(N as u64 - K as u64));
    assert!(health.in_progress >= 1, "{health:?}");
    let gauge = eventually(Duration::from_secs(5), || {
        scraped_lag(&topic, 0).filter(|v| *v == expected as f64)
    })
    .await;
    assert_eq!(
        gauge,
        Some(expected as f64),
        "scraped: {:?}",
        scraped_lag(&topic, 0)
    );
    // Negative control: the scrape names the partition it reads; another topic has no series.
    assert_eq!(scraped_lag(&format!("{topic}-other"), 0), None);

    // Released: everything is handled and committed, and the lag falls to 0.
    release.send(true).unwrap();
    let caught_up = eventually(Duration::from_secs(30), || {
        (lag.total() == Some(0) && probe.health().lag == Some(0)).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "lag stayed at {:?}", lag.partitions());
    assert_eq!(seen.load(AtomicOrdering::SeqCst), N);
    assert_eq!(
        group_committed(&cluster.bootstrap, &group, &topic),
        Some(N as i64)
    );
    let zero = eventually(Duration::from_secs(5), || {
        scraped_lag(&topic, 0).filter(|v| *v == 0.0)
    })
    .await;
    assert_eq!(zero, Some(0.0));

    // More records while the consumer runs: the end of the log follows, and once they are
    // committed the lag is 0 again.
    for i in 0..3 {
        producer
            .send_confirmed(Message::new(format!("late{i}")).with_destination(&topic))
            .await
            .unwrap();
    }
    let end = (N + 3) as i64;
    let caught_up = eventually(Duration::from_secs(30), || {
        let view = lag.partitions();
        let p = view.iter().find(|p| p.partition == tp)?;
        (p.end_offset == Some(end) && p.committed == Some(end) && p.lag == Some(0)).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "late records: {:?}", lag.partitions());
    assert_eq!(seen.load(AtomicOrdering::SeqCst), N + 3);

    // Revoke: the consumer closes and leaves the group; the partition leaves the view and
    // its series is 0.
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert!(lag.partitions().is_empty(), "{:?}", lag.partitions());
    assert_eq!(lag.total(), None);
    assert_eq!(probe.health().lag, None);
    assert_eq!(scraped_lag(&topic, 0), Some(0.0));
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_transport_is_connected_to_the_cluster_and_not_to_nothing() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-connected");
    let live = KafkaTransport::builder(&cluster.bootstrap)
        .topic(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap();
    let up = eventually(Duration::from_secs(10), || live.connected().filter(|c| *c)).await;
    assert_eq!(up, Some(true), "never connected: {:?}", live.connected());
    let producer = Producer::new(live.clone(), live.recommended_producer_config());
    assert_eq!(producer.health().await.connected, Some(true));
    producer
        .send_confirmed(Message::new("x").with_destination(&topic))
        .await
        .unwrap();
    assert_eq!(producer.health().await.connected, Some(true));
    producer.close().await;

    // Nothing listens on port 1: the bootstrap connection is refused, no broker is ever up.
    let nowhere = KafkaTransport::builder("127.0.0.1:1")
        .skip_topic_check()
        .build()
        .await
        .unwrap();
    let down = eventually(Duration::from_secs(10), || {
        nowhere.connected().filter(|c| !*c)
    })
    .await;
    assert_eq!(down, Some(false), "{:?}", nowhere.connected());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let producer = Producer::new(nowhere.clone(), nowhere.recommended_producer_config());
    assert_eq!(producer.health().await.connected, Some(false));
}
