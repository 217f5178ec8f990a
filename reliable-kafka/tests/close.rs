//! Shutting a Kafka producer down: `Producer::close` is bounded and leaves every message
//! confirmed (it flushes the transport through `Transport::close`), and dropping the transport
//! without a close neither blocks the async runtime nor loses what librdkafka still queues.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, MessageId, Transport};
use reliable_kafka::{KafkaTransport, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

async fn transport(bootstrap: &str, topic: &str) -> KafkaTransport {
    KafkaTransport::builder(bootstrap)
        .confirm_timeout(CONFIRM_TIMEOUT)
        .topic(TopicSpec::new(topic).partitions(3))
        .build()
        .await
        .unwrap()
}

fn message(topic: &str, i: usize, payload: &[u8]) -> Message {
    Message::new(payload.to_vec())
        .with_destination(topic)
        .with_routing_key(format!("key-{}", i % 16))
}

/// Hands `msg` to librdkafka and drops the publish future without waiting for the delivery
/// report, as the core producer does when an attempt times out: the message stays queued in
/// librdkafka.
async fn enqueue(t: &KafkaTransport, msg: &Message) {
    tokio::select! {
        biased;
        _ = t.publish(msg) => {}
        () = std::future::ready(()) => {}
    }
}

fn ids(records: &[common::Record]) -> HashSet<MessageId> {
    records.iter().map(|r| r.message.id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_close_confirms_everything_within_its_bound() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-close");
    let t = transport(&cluster.bootstrap, &topic).await;
    let config = ProducerConfig {
        deadline: Duration::from_secs(30),
        ..t.recommended_producer_config()
    };
    let bound = config.deadline + config.confirm_timeout;
    let producer = Producer::new(t.clone(), config);
    let mut sent = HashSet::new();
    let mut handles = Vec::new();
    for i in 0..300 {
        let m = message(&topic, i, b"through the producer");
        sent.insert(m.id());
        handles.push(producer.send(m).await.unwrap());
    }
    // Copies librdkafka still holds when the producer closes are flushed by the close too.
    for i in 0..100 {
        let m = message(&topic, i, b"left in librdkafka");
        sent.insert(m.id());
        enqueue(&t, &m).await;
    }
    let start = Instant::now();
    tokio::time::timeout(bound, producer.close())
        .await
        .expect("Producer::close exceeded its documented bound");
    let took = start.elapsed();
    for h in handles {
        h.await
            .expect("every message is confirmed by the time close returns");
    }
    assert!(took <= bound, "close took {took:?}, the bound is {bound:?}");
    let records = common::read_all(
        &cluster.bootstrap,
        &topic,
        sent.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ids(&records), sent);
    drop(t);
}

/// The transport's drop flushes librdkafka's queue off the runtime's thread: a timer on the
/// same current-thread runtime fires on time while the flush runs, and every message queued
/// before the drop reaches the topic.
#[tokio::test(flavor = "current_thread")]
async fn dropping_the_transport_does_not_block_a_current_thread_runtime() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-drop");
    let t = transport(&cluster.bootstrap, &topic).await;
    let payload = vec![b'x'; 1024];
    let mut sent = HashSet::new();
    for i in 0..20_000 {
        let m = message(&topic, i, &payload);
        sent.insert(m.id());
        enqueue(&t, &m).await;
    }
    let timer = tokio::spawn(async {
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        start.elapsed()
    });
    // Let the timer start before the drop.
    tokio::task::yield_now().await;
    let dropping = Instant::now();
    drop(t);
    let drop_took = dropping.elapsed();
    let timer_took = timer.await.unwrap();
    assert!(
        drop_took < Duration::from_millis(100),
        "dropping the transport blocked the runtime thread for {drop_took:?}"
    );
    assert!(
        timer_took < Duration::from_millis(300),
        "a 50 ms timer took {timer_took:?}: the drop blocked the runtime"
    );
    let records = common::read_all(
        &cluster.bootstrap,
        &topic,
        sent.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        records.len(),
        sent.len(),
        "every message queued before the drop is in the topic"
    );
    assert_eq!(ids(&records), sent);
}
