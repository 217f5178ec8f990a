//! `nack(true)` in `Ordering::Unordered` (issue 14, item 4): several requeues of one partition
//! close together must each come back, and once they are finished the committed offset passes
//! all of them (invariant 5 without a frozen watermark). Later records already handed out are
//! not handed out a second time.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reliable_core::producer::Producer;
use reliable_core::{Delivery, DeliverySource, Message};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const RECORDS: i64 = 20;

/// A one-partition topic holding records at offsets `0..RECORDS`.
async fn topic(bootstrap: &str, prefix: &str) -> (String, TopicSpec) {
    let topic = unique_name(prefix);
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(bootstrap)
        .confirm_timeout(Duration::from_secs(10))
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    for i in 0..RECORDS {
        producer
            .send_confirmed(Message::new(format!("q{i}")).with_destination(&topic))
            .await
            .unwrap();
    }
    producer.close().await;
    t.close().await;
    (topic, spec)
}

async fn next(source: &mut KafkaConsumer, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, source.next()).await {
        Ok(next) => next.unwrap(),
        Err(_) => None,
    }
}

/// Every delivery that arrives within `window`, by offset (several per offset if repeated).
async fn drain(source: &mut KafkaConsumer, window: Duration) -> BTreeMap<i64, Vec<Delivery>> {
    let deadline = Instant::now() + window;
    let mut out: BTreeMap<i64, Vec<Delivery>> = BTreeMap::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        let Some(d) = next(source, left).await else {
            return out;
        };
        out.entry(d.position().unwrap().offset).or_default().push(d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requeues_close_together_both_come_back_and_the_commit_passes_them() {
    let cluster = require!(kafka(3));
    let (topic, spec) = topic(&cluster.bootstrap, "rk-requeue").await;
    let group = unique_name("rk-requeue-g");
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .ordering(Ordering::Unordered)
        .subscribe(spec)
        .commit_interval(Duration::from_secs(3600)) // only commit_now and close commit
        .build()
        .await
        .unwrap();
    let mut first = BTreeMap::new();
    while first.len() < RECORDS as usize {
        let d = next(&mut source, Duration::from_secs(30))
            .await
            .expect("every record is delivered once");
        first.insert(d.position().unwrap().offset, d);
    }
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        (0..RECORDS).collect::<Vec<_>>()
    );
    let five = first.remove(&5).unwrap();
    let ten = first.remove(&10).unwrap();
    for (_, d) in first {
        d.ack().await.unwrap();
    }
    // Two handlers give up at the same moment (a dependency is down).
    let (a, b) = tokio::join!(five.nack(true), ten.nack(true));
    a.unwrap();
    b.unwrap();

    let again = drain(&mut source, Duration::from_secs(10)).await;
    let offsets: Vec<i64> = again.keys().copied().collect();
    assert_eq!(
        offsets,
        [5, 10],
        "both requeued offsets come back, and nothing else"
    );
    for (offset, ds) in &again {
        assert_eq!(ds.len(), 1, "offset {offset} redelivered once");
        assert!(ds[0].redelivered(), "offset {offset} is marked redelivered");
    }
    for (_, ds) in again {
        for d in ds {
            d.ack().await.unwrap();
        }
    }
    source.commit_now().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(RECORDS),
        "the committed offset passes both requeued offsets once they are finished"
    );
    source.close().await.unwrap();
}

/// A requeue of an early offset while later records are already handed out (and more are
/// prefetched) brings back only that offset: no later record is handed out twice, and the
/// watermark ends at the end of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_never_hands_out_later_records_twice() {
    let cluster = require!(kafka(3));
    let (topic, spec) = topic(&cluster.bootstrap, "rk-requeue-once").await;
    let group = unique_name("rk-requeue-once-g");
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .ordering(Ordering::Unordered)
        .subscribe(spec)
        .commit_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let mut early = Vec::new();
    for _ in 0..8 {
        early.push(next(&mut source, Duration::from_secs(30)).await.unwrap());
    }
    let three = early.remove(3);
    assert_eq!(three.position().unwrap().offset, 3);
    for d in early {
        d.ack().await.unwrap();
    }
    three.nack(true).await.unwrap();
    let rest = drain(&mut source, Duration::from_secs(10)).await;
    let expected: Vec<i64> = std::iter::once(3).chain(8..RECORDS).collect();
    assert_eq!(rest.keys().copied().collect::<Vec<_>>(), expected);
    for (offset, ds) in rest {
        assert_eq!(ds.len(), 1, "offset {offset} handed out once");
        assert_eq!(ds[0].redelivered(), offset == 3);
        for d in ds {
            d.ack().await.unwrap();
        }
    }
    source.close().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(RECORDS)
    );
}
