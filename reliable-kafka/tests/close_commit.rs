//! `close()` and the periodic commit (issue 14, item 6): the last commit that reaches the group
//! is the final watermark, never an older position from a periodic commit still running when
//! the consumer closed. The periodic interval is 1 ms, so a periodic commit is nearly always in
//! flight when `close` is called.

mod common;

use std::time::Duration;

use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const RECORDS: i64 = 200;
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_the_final_watermark_committed_under_a_racing_periodic_commit() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-close-commit");
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(&cluster.bootstrap)
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    let mut sends = Vec::new();
    for i in 0..RECORDS {
        sends.push(
            producer
                .send(Message::new(format!("c{i}")).with_destination(&topic))
                .await
                .unwrap(),
        );
    }
    for s in sends {
        s.await.unwrap();
    }
    producer.close().await;
    t.close().await;

    for round in 0..ROUNDS {
        let group = unique_name("rk-close-commit-g");
        let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
            .ordering(Ordering::Unordered)
            .subscribe(spec.clone())
            .commit_interval(Duration::from_millis(1))
            .build()
            .await
            .unwrap();
        // Settle each record as it arrives: the watermark moves all the time, and the
        // periodic task commits it every millisecond.
        for _ in 0..RECORDS {
            let d = tokio::time::timeout(Duration::from_secs(30), source.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            d.ack().await.unwrap();
        }
        source.close().await.unwrap();
        let after_close = common::committed_offset(&cluster.bootstrap, &group, &topic, 0);
        // Anything the periodic task still had in flight has landed by now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = common::committed_offset(&cluster.bootstrap, &group, &topic, 0);
        assert_eq!(
            after_close,
            Some(RECORDS),
            "round {round}: close committed the final watermark"
        );
        assert_eq!(
            later,
            Some(RECORDS),
            "round {round}: an older periodic commit landed after close's final commit"
        );
    }
}

/// Many commits in flight at once (on-demand ones, racing each other and the periodic one):
/// once they and `close` are done, the group holds the final watermark, not an older position
/// from a commit that reached the coordinator last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_leave_the_final_watermark_committed() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-commit-race");
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(&cluster.bootstrap)
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    let mut sends = Vec::new();
    for i in 0..RECORDS {
        sends.push(
            producer
                .send(Message::new(format!("r{i}")).with_destination(&topic))
                .await
                .unwrap(),
        );
    }
    for s in sends {
        s.await.unwrap();
    }
    producer.close().await;
    t.close().await;

    for round in 0..ROUNDS {
        let group = unique_name("rk-commit-race-g");
        let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
            .ordering(Ordering::Unordered)
            .subscribe(spec.clone())
            .commit_interval(Duration::from_millis(1))
            .build()
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..RECORDS {
            held.push(
                tokio::time::timeout(Duration::from_secs(30), source.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap(),
            );
        }
        let source = std::sync::Arc::new(source);
        let mut commits = Vec::new();
        for d in held {
            d.ack().await.unwrap();
            let s = source.clone();
            commits.push(tokio::spawn(async move { s.commit_now().await }));
        }
        for c in commits {
            c.await.unwrap().unwrap();
        }
        let mut source = std::sync::Arc::try_unwrap(source).unwrap();
        source.close().await.unwrap();
        assert_eq!(
            common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
            Some(RECORDS),
            "round {round}: the final watermark is what stays committed"
        );
    }
}
