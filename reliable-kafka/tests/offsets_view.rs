//! `KafkaConsumer::offsets` (issue 14, item 6): a read-only view of the consumer's offsets. A
//! caller can watch the watermark and the unfinished offsets per partition but cannot finish,
//! commit or revoke an offset through it (`OffsetsView` has no such method: a compile-time
//! guarantee), so it cannot commit past unfinished work.

mod common;

use std::time::Duration;

use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message, TopicPartition};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_view_follows_deliveries_settles_and_commits() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-view");
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(&cluster.bootstrap)
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    for i in 0..3 {
        producer
            .send_confirmed(Message::new(format!("v{i}")).with_destination(&topic))
            .await
            .unwrap();
    }
    producer.close().await;
    t.close().await;

    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-view-g"))
        .ordering(Ordering::Unordered)
        .subscribe(spec)
        .commit_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let tp = TopicPartition::new(topic.as_str(), 0);
    assert!(source.offsets().partitions().is_empty());
    let mut ds = Vec::new();
    for _ in 0..3 {
        ds.push(
            tokio::time::timeout(Duration::from_secs(30), source.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(source.offsets().unfinished(&tp), vec![0, 1, 2]);
    assert_eq!(source.offsets().committable(&tp), Some(0));
    let mut ds = ds.into_iter();
    let zero = ds.next().unwrap();
    for d in ds {
        d.ack().await.unwrap();
    }
    assert_eq!(source.offsets().unfinished(&tp), vec![0]);
    assert_eq!(source.offsets().committable(&tp), Some(0));
    source.commit_now().await.unwrap();
    assert_eq!(source.offsets().committed(&tp), Some(0));
    zero.ack().await.unwrap();
    source.commit_now().await.unwrap();
    let view = source.offsets().partitions();
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].partition, tp);
    assert_eq!(view[0].committable, Some(3));
    assert_eq!(view[0].unfinished, 0);
    assert_eq!(view[0].committed, Some(3));
    source.close().await.unwrap();
}
