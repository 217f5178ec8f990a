//! Kafka, the client's link reset: while one task streams keyed messages through the core
//! producer, every TCP connection of this process to the brokers is destroyed under librdkafka
//! (`ss -K`: its next read or write fails, as after a reset) three times. With the defaults
//! (librdkafka's idempotent producer owns retries for the whole deadline) every confirmed
//! message is in the topic and no first copy of a key sits behind a later message of that key.
//!
//! Control, in the same test (the resets hit every connection of the process, so the two runs
//! take turns): the same stream with idempotence turned off (explicitly accepted as unsafe),
//! whose retries after a reset may reorder a partition's batches, and which may also duplicate.
//! The control's figures are printed; it must not pass the safe run's checks unnoticed, so the
//! test fails when the control shows neither an inversion nor a duplicate.
//!
//! `cargo test -p reliable-kafka --test link_reset -- --nocapture`

mod order;

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use reliable_core::producer::Producer;
use reliable_kafka::config::Safety;
use reliable_kafka::{KafkaTransport, TopicSpec};
use reliable_test_support::links::reset_own_connections;
use reliable_test_support::{kafka, require, unique_name};

/// Messages per run.
const MESSAGES: u64 = 30_000;
/// Record keys, used round-robin.
const KEYS: u64 = 16;
/// Partitions of each run's topic.
const PARTITIONS: i32 = 3;
/// Resets per run, and the pause before each.
const RESETS: usize = 3;
const RESET_EVERY: Duration = Duration::from_millis(700);

/// What one run found.
struct Run {
    confirmed: usize,
    handed_back: usize,
    lost: usize,
    reset: usize,
    found: order::Order<String>,
}

/// Streams the messages through a producer over `transport` while the resets run.
async fn stream(
    cluster_ports: Vec<u16>,
    transport: KafkaTransport,
    topic: &str,
    bootstrap: &str,
) -> Run {
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let resets = tokio::spawn(async move {
        let mut destroyed = 0;
        for _ in 0..RESETS {
            tokio::time::sleep(RESET_EVERY).await;
            let ports = cluster_ports.clone();
            destroyed += tokio::task::spawn_blocking(move || reset_own_connections(&ports))
                .await
                .expect("reset task")
                .expect("ss -K (run as root)");
        }
        destroyed
    });
    let mut handles = Vec::with_capacity(MESSAGES as usize);
    for i in 0..MESSAGES {
        let handle = producer
            .send(order::numbered(topic, i % KEYS, i / KEYS))
            .await
            .expect("producer open");
        handles.push(((order::key_name(i % KEYS), i / KEYS), handle));
    }
    let (confirmed, failed) = order::settle(handles).await;
    let reset = resets.await.expect("resets");
    producer.close().await;
    transport.close().await;
    let records = order::read_back(bootstrap, topic, PARTITIONS).await;
    Run {
        confirmed: confirmed.len(),
        handed_back: failed.len(),
        lost: order::lost(&confirmed, &records),
        reset,
        found: order::check(&records),
    }
}

fn report(what: &str, run: &Run, took: Duration) {
    eprintln!(
        "{what}: {MESSAGES} sent in {:.1} s, {} connections reset; {} confirmed, {} handed back, \
         {} lost; {} first copies out of order per key (first: {:?}), {} duplicates",
        took.as_secs_f64(),
        run.reset,
        run.confirmed,
        run.handed_back,
        run.lost,
        run.found.out_of_order,
        run.found.first_inversion,
        run.found.duplicates(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_resets_lose_nothing_and_keep_every_key_in_order() {
    let cluster = require!(kafka(3));
    let ports: Vec<u16> = cluster
        .bootstrap
        .split(',')
        .filter_map(|hp| hp.rsplit(':').next()?.parse().ok())
        .collect();

    let topic = unique_name("rk-link-reset");
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .topic(TopicSpec::new(&topic).partitions(PARTITIONS))
        .build()
        .await
        .expect("transport");
    let started = Instant::now();
    let safe = stream(ports.clone(), transport, &topic, &cluster.bootstrap).await;
    report("safe (defaults)", &safe, started.elapsed());

    let control_topic = unique_name("rk-link-reset-ctl");
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("enable.idempotence", "false");
    let control = KafkaTransport::builder_from_config(config)
        .safety(Safety::strict().accept_data_loss_for("enable.idempotence"))
        .topic(TopicSpec::new(&control_topic).partitions(PARTITIONS))
        .build()
        .await
        .expect("control transport");
    let started = Instant::now();
    let ctl = stream(ports, control, &control_topic, &cluster.bootstrap).await;
    report("control (idempotence off)", &ctl, started.elapsed());

    assert!(safe.reset > 0, "no connection was reset");
    assert_eq!(safe.handed_back, 0, "messages handed back");
    assert_eq!(safe.lost, 0, "confirmed messages missing from the topic");
    assert_eq!(
        safe.found.out_of_order, 0,
        "first copies out of order per key; the first: {:?}",
        safe.found.first_inversion
    );
    assert!(
        ctl.found.out_of_order + ctl.found.duplicates() > 0,
        "the control showed neither an inversion nor a duplicate: the resets did not bite"
    );
}
