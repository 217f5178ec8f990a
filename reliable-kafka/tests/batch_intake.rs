//! Batch intake (`DeliverySource::next_batch`): an ordered consumer hands out the records of a
//! partition in one batch as one sequence in log order, keeps the partition busy until that
//! run is settled, and hands a run's requeues out again in order; an unordered consumer hands
//! out what is ready in batches.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reliable_core::producer::Producer;
use reliable_core::{Delivery, DeliverySource, Message};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const RECORDS: usize = 120;

async fn filled_topic(bootstrap: &str, prefix: &str) -> TopicSpec {
    let topic = unique_name(prefix);
    let spec = TopicSpec::new(&topic).partitions(2);
    let t = KafkaTransport::builder(bootstrap)
        .confirm_timeout(Duration::from_secs(10))
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    let mut handles = Vec::new();
    for i in 0..RECORDS {
        let m = Message::new(format!("b{i}"))
            .with_destination(&topic)
            .with_routing_key(format!("key-{}", i % 7));
        handles.push(producer.send(m).await.unwrap());
    }
    for h in handles {
        h.await.unwrap();
    }
    producer.close().await;
    t.close().await;
    spec
}

async fn batch(source: &mut KafkaConsumer, max: usize) -> Vec<Delivery> {
    tokio::time::timeout(Duration::from_secs(30), source.next_batch(max))
        .await
        .unwrap()
        .unwrap()
}

fn partition_of(d: &Delivery) -> i32 {
    d.position().unwrap().partition.partition
}

/// The deliveries of `batch` per partition, in batch order.
fn runs(batch: &[Delivery]) -> HashMap<i32, Vec<&Delivery>> {
    let mut runs: HashMap<i32, Vec<&Delivery>> = HashMap::new();
    for d in batch {
        runs.entry(partition_of(d)).or_default().push(d);
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_batches_hand_out_each_partition_as_one_sequence_in_log_order() {
    let cluster = require!(kafka(3));
    let spec = filled_topic(&cluster.bootstrap, "rk-batch-o").await;
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-batch-o-g"))
        .subscribe(spec)
        .ordering(Ordering::PerPartition)
        .build()
        .await
        .unwrap();
    let mut seen: HashMap<i32, Vec<i64>> = HashMap::new();
    let mut sequences = HashSet::new();
    let mut longest = 0;
    let mut taken = 0;
    while taken < RECORDS {
        let deliveries = batch(&mut source, 64).await;
        assert!(!deliveries.is_empty() && deliveries.len() <= 64);
        for (partition, run) in runs(&deliveries) {
            let sequence = run[0]
                .sequence()
                .expect("an ordered delivery has a sequence");
            assert!(
                run.iter().all(|d| d.sequence() == Some(sequence)),
                "partition {partition}'s records in one batch are not one sequence"
            );
            assert!(
                sequences.insert(sequence),
                "a sequence was used for two runs"
            );
            longest = longest.max(run.len());
        }
        for d in deliveries {
            seen.entry(partition_of(&d))
                .or_default()
                .push(d.position().unwrap().offset);
            taken += 1;
            d.ack().await.unwrap();
        }
    }
    assert!(
        longest > 1,
        "no batch held more than one record of a partition"
    );
    for (partition, offsets) in seen {
        assert!(
            offsets.windows(2).all(|w| w[0] + 1 == w[1]),
            "partition {partition} out of log order: {offsets:?}"
        );
    }
    source.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stays_busy_until_settled_and_its_requeues_come_back_in_order() {
    let cluster = require!(kafka(3));
    let spec = filled_topic(&cluster.bootstrap, "rk-batch-rq").await;
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-batch-rq-g"))
        .subscribe(spec)
        .ordering(Ordering::PerPartition)
        .build()
        .await
        .unwrap();
    // A run of at least 3 records; everything else is acked.
    let mut run: Vec<Delivery> = Vec::new();
    while run.len() < 3 {
        let mut deliveries = batch(&mut source, 64).await;
        let longest = runs(&deliveries)
            .into_iter()
            .max_by_key(|(_, r)| r.len())
            .map(|(p, r)| (p, r.len()));
        let keep = longest
            .filter(|&(_, n)| n >= 3 && run.is_empty())
            .map(|(p, _)| p);
        for d in std::mem::take(&mut deliveries) {
            if Some(partition_of(&d)) == keep {
                run.push(d);
            } else {
                d.ack().await.unwrap();
            }
        }
    }
    let partition = partition_of(&run[0]);
    let offsets: Vec<i64> = run.iter().map(|d| d.position().unwrap().offset).collect();
    let mut run = run.into_iter();
    run.next().unwrap().ack().await.unwrap();
    // Part of the run is still unsettled: nothing of its partition is handed out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(deliveries)) = tokio::time::timeout_at(deadline, source.next_batch(64)).await {
        for d in deliveries {
            assert_ne!(
                partition_of(&d),
                partition,
                "a record of a busy run's partition was handed out"
            );
            d.ack().await.unwrap();
        }
    }
    // The rest is handed back in run order and comes out again in that order, first.
    for d in run {
        d.nack(true).await.unwrap();
    }
    let mut again = Vec::new();
    while again.len() < offsets.len() - 1 {
        for d in batch(&mut source, 64).await {
            if partition_of(&d) == partition && again.len() < offsets.len() - 1 {
                assert!(
                    d.redelivered() || d.position().unwrap().offset > offsets[offsets.len() - 1]
                );
                again.push(d.position().unwrap().offset);
            }
            d.ack().await.unwrap();
        }
    }
    assert_eq!(again, offsets[1..].to_vec());
    source.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_batches_take_what_is_ready_and_lose_nothing() {
    let cluster = require!(kafka(3));
    let spec = filled_topic(&cluster.bootstrap, "rk-batch-u").await;
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-batch-u-g"))
        .subscribe(spec)
        .ordering(Ordering::Unordered)
        .build()
        .await
        .unwrap();
    let mut seen: HashSet<(i32, i64)> = HashSet::new();
    let mut largest = 0;
    while seen.len() < RECORDS {
        let deliveries = batch(&mut source, 32).await;
        assert!(!deliveries.is_empty() && deliveries.len() <= 32);
        largest = largest.max(deliveries.len());
        for d in deliveries {
            assert!(
                seen.insert((partition_of(&d), d.position().unwrap().offset)),
                "a record was handed out twice"
            );
            d.ack().await.unwrap();
        }
    }
    assert!(largest > 1, "no batch held more than one record");
    source.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_record_is_decoded_with_its_headers_and_a_position_key() {
    use reliable_kafka::rdkafka::message::{Header, OwnedHeaders};
    use reliable_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    use reliable_kafka::rdkafka::ClientConfig;

    let cluster = require!(kafka(3));
    let spec = filled_topic(&cluster.bootstrap, "rk-batch-f").await;
    let topic = spec.name.clone();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("acks", "all")
        .create()
        .unwrap();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some("t-1"),
        })
        .insert(Header {
            key: "binary",
            value: Some(&[0xff_u8, 0xfe][..]),
        });
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("order-7")
                .payload("foreign payload")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let (partition, offset) = (delivered.partition, delivered.offset);
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-batch-f-g"))
        .subscribe(spec)
        .ordering(Ordering::Unordered)
        .build()
        .await
        .unwrap();
    let mut found = None;
    while found.is_none() {
        for d in batch(&mut source, 64).await {
            let p = d.position().unwrap();
            if p.partition.partition == partition && p.offset == offset {
                found = Some(d.message().clone());
            }
            d.ack().await.unwrap();
        }
    }
    let m = found.unwrap();
    assert_eq!(m.payload().as_ref(), b"foreign payload");
    assert_eq!(m.header("trace"), Some("t-1"));
    assert_eq!(m.header("binary"), Some("\u{fffd}\u{fffd}"));
    assert_eq!(m.destination(), Some(topic.as_str()));
    assert_eq!(m.routing_key(), Some("order-7"));
    assert_eq!(
        m.idempotency_key().as_str(),
        format!("kafka:{topic}/{partition}/{offset}")
    );
    source.close().await.unwrap();
}
