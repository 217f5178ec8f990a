//! Concurrent processing with `Ordering`: per partition, handlers of one partition never overlap
//! and see the log order while partitions run concurrently; per key the same per record key;
//! unordered (the negative control) shows overlap within a partition.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_core::pipeline::{handler_fn, HandlerBuilder, Pipeline, PipelineConfig};
use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message, MessageId};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const RECORDS: usize = 200;
const KEYS: usize = 10;

/// Where a message sits in the log, and its key.
#[derive(Clone, Debug)]
struct Place {
    partition: i32,
    offset: i64,
    key: String,
}

/// What the handler saw.
#[derive(Default)]
struct Observed {
    /// (partition, offset, key) in the order handling started.
    order: Vec<(i32, i64, String)>,
    in_flight_per_partition: HashMap<i32, usize>,
    in_flight_per_key: HashMap<String, usize>,
    /// Two deliveries of one partition were handled at the same time.
    partition_overlap: bool,
    /// Two deliveries of one key were handled at the same time.
    key_overlap: bool,
    /// At least two partitions were in flight at the same time.
    cross_partition: bool,
}

/// Produces `RECORDS` keyed records to a new 2-partition topic and returns its spec and where
/// each message landed.
async fn keyed_topic(bootstrap: &str, prefix: &str) -> (TopicSpec, HashMap<MessageId, Place>) {
    let topic = unique_name(prefix);
    let spec = TopicSpec::new(&topic).partitions(2);
    let t = KafkaTransport::builder(bootstrap)
        .confirm_timeout(Duration::from_secs(10))
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    for i in 0..RECORDS {
        let m = Message::new(format!("m{i}"))
            .with_destination(&topic)
            .with_routing_key(format!("key-{}", i % KEYS));
        producer.send_confirmed(m).await.unwrap();
    }
    producer.close().await;
    t.close().await;
    let records = common::read_all(bootstrap, &topic, RECORDS, Duration::from_secs(20)).await;
    assert_eq!(records.len(), RECORDS);
    let places: HashMap<MessageId, Place> = records
        .iter()
        .map(|r| {
            (
                r.message.id(),
                Place {
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key.clone().unwrap(),
                },
            )
        })
        .collect();
    let partitions: std::collections::HashSet<i32> = places.values().map(|p| p.partition).collect();
    assert_eq!(
        partitions.len(),
        2,
        "the keys must spread over both partitions"
    );
    (spec, places)
}

/// Consumes everything with a pipeline of concurrency 8 whose handler sleeps a varying time.
async fn consume(
    bootstrap: &str,
    spec: TopicSpec,
    places: HashMap<MessageId, Place>,
    ordering: Ordering,
) -> Observed {
    // Kafka has no broker dead letter: poison records would go to a topic.
    let dlq = format!("{}.dlq", spec.name);
    let dlq_transport = KafkaTransport::builder(bootstrap)
        .topic(TopicSpec::new(&dlq))
        .build()
        .await
        .unwrap();
    let dead_letter = dlq_transport.dead_letter(dlq);
    let source = KafkaConsumer::builder(bootstrap, &unique_name("rk-ord-g"))
        .subscribe(spec)
        .ordering(ordering)
        .build()
        .await
        .unwrap();
    let observed = Arc::new(Mutex::new(Observed::default()));
    let places = Arc::new(places);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let handled = Arc::new(Mutex::new(0usize));
    let handler = {
        let observed = observed.clone();
        handler_fn(move |m: Message| {
            let observed = observed.clone();
            let places = places.clone();
            let done_tx = done_tx.clone();
            let handled = handled.clone();
            async move {
                let place = places.get(&m.id()).cloned().unwrap();
                {
                    let mut o = observed.lock().unwrap();
                    o.order
                        .push((place.partition, place.offset, place.key.clone()));
                    let p = o
                        .in_flight_per_partition
                        .entry(place.partition)
                        .or_default();
                    *p += 1;
                    let p = *p;
                    let k = o.in_flight_per_key.entry(place.key.clone()).or_default();
                    *k += 1;
                    let k = *k;
                    o.partition_overlap |= p > 1;
                    o.key_overlap |= k > 1;
                    let busy = o.in_flight_per_partition.values().filter(|n| **n > 0);
                    o.cross_partition |= busy.count() > 1;
                }
                // 1 to 7 ms, varying from record to record.
                let ms = 1 + (place.offset as u64 * 7 + place.partition as u64 * 3) % 7;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                {
                    let mut o = observed.lock().unwrap();
                    *o.in_flight_per_partition.get_mut(&place.partition).unwrap() -= 1;
                    *o.in_flight_per_key.get_mut(&place.key).unwrap() -= 1;
                }
                let mut n = handled.lock().unwrap();
                *n += 1;
                if *n == RECORDS {
                    if let Some(tx) = done_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                Ok(())
            }
        })
    };
    let pipeline = Pipeline::new(source, HandlerBuilder::new(handler).build(), dead_letter)
        .with_config(PipelineConfig {
            concurrency: 8,
            ..PipelineConfig::default()
        });
    let stats = tokio::time::timeout(
        Duration::from_secs(25),
        pipeline.run_until(async {
            let _ = done_rx.await;
        }),
    )
    .await
    .expect("pipeline did not finish")
    .unwrap();
    assert_eq!(stats.succeeded, RECORDS as u64);
    Arc::try_unwrap(observed)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap()
}

/// Per group (partition or key), the offsets in handling order.
fn offsets_by<K: std::hash::Hash + Eq>(
    order: &[(i32, i64, String)],
    group: impl Fn(&(i32, i64, String)) -> K,
) -> HashMap<K, Vec<i64>> {
    let mut out: HashMap<K, Vec<i64>> = HashMap::new();
    for entry in order {
        out.entry(group(entry)).or_default().push(entry.1);
    }
    out
}

async fn next(source: &mut KafkaConsumer) -> reliable_core::Delivery {
    tokio::time::timeout(Duration::from_secs(30), source.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

fn strictly_increasing(offsets: &[i64]) -> bool {
    offsets.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_partition_keeps_log_order_and_runs_partitions_concurrently() {
    let cluster = require!(kafka(3));
    let (spec, places) = keyed_topic(&cluster.bootstrap, "rk-ord-p").await;
    let o = consume(&cluster.bootstrap, spec, places, Ordering::PerPartition).await;
    assert_eq!(o.order.len(), RECORDS);
    for (partition, offsets) in offsets_by(&o.order, |e| e.0) {
        assert!(
            strictly_increasing(&offsets),
            "partition {partition} handled out of order: {offsets:?}"
        );
    }
    assert!(
        !o.partition_overlap,
        "two deliveries of one partition overlapped"
    );
    assert!(o.cross_partition, "partitions never ran concurrently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_keeps_key_order_and_overlaps_within_a_partition() {
    let cluster = require!(kafka(3));
    let (spec, places) = keyed_topic(&cluster.bootstrap, "rk-ord-k").await;
    let o = consume(&cluster.bootstrap, spec, places, Ordering::PerKey).await;
    assert_eq!(o.order.len(), RECORDS);
    for (key, offsets) in offsets_by(&o.order, |e| e.2.clone()) {
        assert!(
            strictly_increasing(&offsets),
            "key {key} handled out of order: {offsets:?}"
        );
    }
    assert!(!o.key_overlap, "two deliveries of one key overlapped");
    assert!(
        o.partition_overlap,
        "different keys of one partition never ran concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_overlaps_within_a_partition() {
    let cluster = require!(kafka(3));
    let (spec, places) = keyed_topic(&cluster.bootstrap, "rk-ord-u").await;
    let o = consume(&cluster.bootstrap, spec, places, Ordering::Unordered).await;
    assert_eq!(o.order.len(), RECORDS);
    assert!(
        o.partition_overlap,
        "the negative control must see two deliveries of one partition at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_partition_holds_the_next_record_until_settled_and_requeues_in_place() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-ord-nack");
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(&cluster.bootstrap)
        .confirm_timeout(Duration::from_secs(10))
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    for i in 0..3 {
        producer
            .send_confirmed(Message::new(format!("n{i}")).with_destination(&topic))
            .await
            .unwrap();
    }
    producer.close().await;
    t.close().await;

    let group = unique_name("rk-ord-nack-g");
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .subscribe(spec)
        .ordering(Ordering::PerPartition)
        .commit_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let d0 = next(&mut source).await;
    assert_eq!(d0.position().unwrap().offset, 0);
    // Offset 1 is held while 0 is unsettled; the cancelled `next()` loses nothing.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), source.next())
            .await
            .is_err(),
        "offset 1 was handed out while offset 0 was in flight"
    );
    // nack(true) hands 0 out again, before 1, and nothing is committed.
    d0.nack(true).await.unwrap();
    let again = next(&mut source).await;
    assert_eq!(again.position().unwrap().offset, 0);
    assert!(again.redelivered());
    source.commit_now().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0).unwrap_or(0),
        0
    );
    again.ack().await.unwrap();
    for expected in 1..3 {
        let d = next(&mut source).await;
        assert_eq!(d.position().unwrap().offset, expected);
        assert!(!d.redelivered());
        d.ack().await.unwrap();
    }
    source.close().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(3)
    );
}
