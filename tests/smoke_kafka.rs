//! Harness smoke test: the project's 3-broker Kafka takes a message on a topic created with
//! replication factor 3 and min.insync.replicas 2, hands it back to a consumer, and its metadata
//! shows three in-sync replicas. The SDK's own Kafka tests live in reliable-kafka.

use std::time::Duration;

use rdkafka::admin::AdminOptions;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use reliable_test_support::{kafka, require, unique_name};

#[tokio::test]
async fn message_on_a_replicated_topic_is_consumed_back_with_three_in_sync_replicas() {
    let cluster = require!(kafka(3));
    let topic = unique_name("smoke-kafka");

    let admin = cluster.create_replicated_topic(&topic).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let payload = format!("smoke {topic}");
    let delivered = producer
        .send(
            FutureRecord::to(&topic).key("k").payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .expect("delivery report under acks=all");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("group.id", &topic)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("message without error");
    assert_eq!(message.payload(), Some(payload.as_bytes()));
    assert_eq!(
        (message.partition(), message.offset()),
        (delivered.partition, delivered.offset)
    );

    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .expect("metadata");
    let partition_meta = &metadata.topics()[0].partitions()[0];
    assert_eq!(partition_meta.replicas().len(), 3, "replication factor");
    assert_eq!(
        partition_meta.isr().len(),
        3,
        "in-sync replicas: {:?}",
        partition_meta.isr()
    );

    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .expect("delete topic");
}
