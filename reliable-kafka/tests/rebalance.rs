//! On partition revoke the consumer commits what is finished for the revoked partitions, and
//! never past unfinished work (L5, invariant 5).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reliable_core::producer::Producer;
use reliable_core::{AckError, Delivery, DeliverySource, Message};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_commits_finished_work_and_stops_at_the_gap() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-rebal");
    let spec = TopicSpec::new(&topic).partitions(2);
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .default_topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    for i in 0..12 {
        producer
            .send_confirmed(Message::new(format!("r{i}")).with_routing_key(format!("key-{i}")))
            .await
            .unwrap();
    }
    producer.close().await;
    transport.close().await;

    let group = unique_name("rk-rebal-g");
    let consumer = |spec: TopicSpec| {
        KafkaConsumer::builder(&cluster.bootstrap, &group)
            .ordering(Ordering::Unordered)
            .subscribe(spec)
            .commit_interval(Duration::from_secs(3600)) // only the revoke commits
            .revoke_drain_timeout(Duration::from_millis(500))
    };
    let mut a = consumer(spec.clone()).build().await.unwrap();
    let mut by_partition: BTreeMap<i32, Vec<Delivery>> = BTreeMap::new();
    for _ in 0..12 {
        let d = tokio::time::timeout(Duration::from_secs(30), a.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        by_partition
            .entry(d.position().unwrap().partition.partition)
            .or_default()
            .push(d);
    }
    assert_eq!(
        by_partition.len(),
        2,
        "the keys must spread over both partitions"
    );
    let counts: BTreeMap<i32, i64> = by_partition
        .iter()
        .map(|(p, v)| (*p, v.len() as i64))
        .collect();
    // Partition 0: everything finished. Partition 1: offset 0 stays unfinished (the gap).
    for d in by_partition.remove(&0).unwrap() {
        d.ack().await.unwrap();
    }
    let mut p1 = by_partition.remove(&1).unwrap().into_iter();
    let gap = p1.next().unwrap();
    assert_eq!(gap.position().unwrap().offset, 0);
    for d in p1 {
        d.ack().await.unwrap();
    }

    // A keeps polling (rebalance callbacks run there) while B joins the group.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let a_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return a,
                n = a.next() => {
                    // Whatever A gets after the rebalance is finished at once.
                    if let Ok(Some(d)) = n {
                        let _ = d.ack().await;
                    }
                }
            }
        }
    });
    let mut b = consumer(spec).build().await.unwrap();
    let b_task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Ok(Some(d))) =
                tokio::time::timeout(Duration::from_millis(200), b.next()).await
            {
                d.ack().await.unwrap();
            }
        }
    });

    // The revoke commit shows up while nobody commits periodically.
    let deadline = Instant::now() + Duration::from_secs(40);
    let committed = loop {
        let c0 = common::committed_offset(&cluster.bootstrap, &group, &topic, 0);
        let c1 = common::committed_offset(&cluster.bootstrap, &group, &topic, 1);
        if c0.is_some() || Instant::now() > deadline {
            break (c0, c1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        committed.0,
        Some(counts[&0]),
        "finished partition 0 committed on revoke"
    );
    assert_eq!(
        committed.1,
        Some(0),
        "partition 1 committed only up to its unfinished offset"
    );
    // The unfinished delivery's partition was revoked: settling it later is stale.
    assert!(matches!(gap.ack().await, Err(AckError::Stale { .. })));

    let _ = stop_tx.send(());
    let mut a = a_task.await.unwrap();
    a.close().await.unwrap();
    b_task.abort();
}
