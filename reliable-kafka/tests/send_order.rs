//! Issue 18, Kafka without faults: one task sends 20,000 100-byte messages, 16 record keys
//! round-robin with a per-key sequence number in the payload, at full speed through the core's
//! producer over a [`KafkaTransport`] with its recommended config; an independent rdkafka
//! consumer then reads the topic back. Kafka keeps order per partition and one key lands in one
//! partition, so no first copy of a key may sit behind a later message of that key.
//!
//! Control: the old hand-off, one task per message calling `publish` (under the same
//! 1024-message window), which is what the core did before the producer submitted in send
//! order; the records then reach librdkafka in whatever order the tasks run, and keys come back
//! out of order.
//!
//! `cargo test -p reliable-kafka --test send_order -- --nocapture --test-threads 1`

mod order;

use std::sync::Arc;
use std::time::Instant;

use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Transport;
use reliable_kafka::{KafkaTransport, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};
use tokio::sync::Semaphore;

/// Messages per run.
const MESSAGES: u64 = 20_000;
/// Record keys, used round-robin.
const KEYS: u64 = 16;
/// Partitions of each run's topic: several keys share a partition.
const PARTITIONS: i32 = 3;

/// The `i`-th message of a run: key `i % KEYS`, its per-key sequence number `i / KEYS`.
fn nth(i: u64) -> (String, u64) {
    (order::key_name(i % KEYS), i / KEYS)
}

async fn transport(bootstrap: &str, topic: &str) -> KafkaTransport {
    KafkaTransport::builder(bootstrap)
        .topic(TopicSpec::new(topic).partitions(PARTITIONS))
        .build()
        .await
        .expect("transport")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_at_full_speed_finds_every_key_in_send_order() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-send-order");
    let transport = transport(&cluster.bootstrap, &topic).await;
    let config = transport.recommended_producer_config();
    let producer = Producer::new(transport.clone(), config.clone());

    let started = Instant::now();
    let mut handles = Vec::with_capacity(MESSAGES as usize);
    for i in 0..MESSAGES {
        let handle = producer
            .send(order::numbered(&topic, i % KEYS, i / KEYS))
            .await
            .expect("producer open");
        handles.push((nth(i), handle));
    }
    let (confirmed, failed) = order::settle(handles).await;
    let elapsed = started.elapsed();
    let stats = producer.stats();
    producer.close().await;
    transport.close().await;

    let records = order::read_back(&cluster.bootstrap, &topic, PARTITIONS).await;
    let found = order::check(&records);
    let lost = order::lost(&confirmed, &records);
    eprintln!(
        "producer ({:?} order, message.timeout.ms={}, core confirm timeout {:?}), full speed: \
         {MESSAGES} sent in {:.1} s ({:.0} msg/s), {} confirmed, {} handed back, {lost} lost; \
         {} records, {} distinct, {} first copies out of order per key (first: {:?}), {} \
         duplicates; resent {}",
        config.order,
        transport
            .client_config()
            .get("message.timeout.ms")
            .unwrap_or("?"),
        config.confirm_timeout,
        elapsed.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64(),
        confirmed.len(),
        failed.len(),
        found.stored,
        found.distinct,
        found.out_of_order,
        found.first_inversion,
        found.duplicates(),
        stats.resent.total(),
    );
    assert!(
        failed.is_empty(),
        "handed back: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert_eq!(lost, 0, "confirmed messages missing from the topic");
    assert_eq!(
        found.out_of_order, 0,
        "first copies out of order per key; the first: {:?}",
        found.first_inversion
    );
}

/// The control: without the producer's ordered hand-off, the same sender reorders keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_task_per_message_reorders_keys() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-send-order-ctl");
    let transport = Arc::new(transport(&cluster.bootstrap, &topic).await);
    let window = Arc::new(Semaphore::new(ProducerConfig::default().max_in_flight));

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(MESSAGES as usize);
    for i in 0..MESSAGES {
        let permit = window.clone().acquire_owned().await.expect("window open");
        let msg = order::numbered(&topic, i % KEYS, i / KEYS);
        let transport = transport.clone();
        let task = tokio::spawn(async move {
            let result = transport.publish(&msg).await;
            drop(permit);
            result
        });
        tasks.push((nth(i), task));
    }
    let mut failed = 0usize;
    for (_, task) in tasks {
        if !matches!(task.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let elapsed = started.elapsed();
    transport.close().await;

    let records = order::read_back(&cluster.bootstrap, &topic, PARTITIONS).await;
    let found = order::check(&records);
    eprintln!(
        "control (a task per message), full speed: {MESSAGES} sent in {:.1} s ({:.0} msg/s), \
         {failed} failed; {} records, {} distinct, {} first copies out of order per key \
         ({:.1} %; first: {:?}), {} duplicates",
        elapsed.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64(),
        found.stored,
        found.distinct,
        found.out_of_order,
        100.0 * found.out_of_order as f64 / found.distinct.max(1) as f64,
        found.first_inversion,
        found.duplicates(),
    );
    assert!(
        found.out_of_order > 0,
        "the control kept every key in order: the test no longer tells the hand-offs apart"
    );
}
