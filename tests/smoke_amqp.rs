//! Harness smoke test: the project's RabbitMQ takes a persistent message published in confirm
//! mode and hands it back to a consumer. Proves the broker script and test support work; the
//! SDK's own RabbitMQ tests live in reliable-amqp.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reliable_test_support::{amqp_url, require, unique_name};

#[tokio::test]
async fn persistent_message_published_with_confirm_is_consumed_back() {
    let url = require!(amqp_url());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("open channel");
    let queue = unique_name("smoke-amqp");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare a durable quorum queue");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");

    let payload = format!("smoke {queue}");
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(queue.as_str().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm");
    assert!(
        confirmation.is_ack(),
        "broker did not ack: {confirmation:?}"
    );
    assert!(
        confirmation.take_message().is_none(),
        "message was returned as unroutable"
    );

    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "smoke".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer stream open")
        .expect("delivery without error");
    assert_eq!(delivery.data, payload.as_bytes());
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(queue.as_str())
    );
    delivery.ack(BasicAckOptions::default()).await.expect("ack");

    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    conn.close(200, "done".into()).await.expect("close");
}
