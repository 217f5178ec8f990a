//! Messages from producers that are not this SDK (issue 14, item 6; loss-matrix rows L8 and
//! L10), against the real RabbitMQ: without the SDK's identity headers or an AMQP `message-id`
//! a delivery still gets an idempotency key that is the same on every redelivery, so a dedupe
//! layer and an attempt counter work for it; a business header can be the key instead.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliable_amqp::consumer::KeyExtractor;
use reliable_amqp::lapin::options::BasicPublishOptions;
use reliable_amqp::lapin::types::{AMQPValue, FieldTable};
use reliable_amqp::lapin::{BasicProperties, Channel};
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::AmqpConsumer;
use reliable_core::idempotency::InMemoryIdempotencyStore;
use reliable_core::pipeline::{handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, Pipeline};
use reliable_core::{DeliverySource, Message};
use reliable_test_support::{require, unique_name};

use common::next;

/// Publishes `body` to `queue` as a plain lapin client would: persistent, no `message-id`,
/// no SDK headers; `headers` become AMQP headers. Waits for the broker's confirm.
async fn publish_raw(ch: &Channel, queue: &str, body: &[u8], headers: &[(&str, &str)]) {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert((*name).into(), AMQPValue::LongString((*value).into()));
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        properties,
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
}

/// A fresh quorum queue (its redeliveries carry `x-delivery-count`, which must not change the
/// key) and a channel in confirm mode.
async fn queue(url: &str, prefix: &str) -> (reliable_amqp::lapin::Connection, Channel, QueueSpec) {
    let (conn, ch) = common::open(url).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let queue = unique_name(prefix);
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(
        format!("{queue}.dlx"),
        format!("{queue}.dlq"),
    ));
    topology::declare_queue(&ch, &spec).await.expect("declare");
    (conn, ch, spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_message_id_keeps_its_key_across_a_redelivery() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch, spec) = queue(&url, "amqp-foreign-redeliver").await;
    let queue = spec.name().to_owned();
    publish_raw(&ch, &queue, b"pay order 42", &[]).await;
    let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .expect("consumer");
    let first = next(&mut consumer).await;
    let key = first.message().idempotency_key();
    first.nack(true).await.expect("requeue");
    let again = next(&mut consumer).await;
    assert!(again.redelivered(), "the second delivery is the redelivery");
    assert_eq!(
        again.message().idempotency_key(),
        key,
        "a redelivery keeps the key"
    );
    assert!(
        key.as_str().starts_with("sha256:"),
        "the default key: {key}"
    );
    again.ack().await.expect("ack");
    let _ = consumer.close().await;
    common::delete(&conn, &[&queue, &format!("{queue}.dlq")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_delivered_twice_is_applied_once() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch, spec) = queue(&url, "amqp-foreign-dedupe").await;
    let queue = spec.name().to_owned();
    // A plain client's resend: the same message reaches the queue twice.
    publish_raw(&ch, &queue, b"pay order 43", &[]).await;
    publish_raw(&ch, &queue, b"pay order 43", &[]).await;
    let effects = Arc::new(AtomicU32::new(0));
    let counted = effects.clone();
    let handler = HandlerBuilder::new(handler_fn(move |_msg: Message| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }))
    .layer(DedupeLayer::new(Arc::new(
        InMemoryIdempotencyStore::default(),
    )))
    .build();
    let source = AmqpConsumer::connect_checked(&url, &spec, AmqpSettings::safe())
        .await
        .expect("consumer");
    let pipeline = Pipeline::new(source, handler, DeadLetter::BrokerReject);
    let stats = pipeline.stats();
    let done = async move {
        for _ in 0..200 {
            if stats.snapshot().succeeded == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stats = pipeline.run_until(done).await.expect("pipeline run");
    assert_eq!(stats.succeeded, 2, "both deliveries acked");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    common::delete(&conn, &[&queue, &format!("{queue}.dlq")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_header_can_key_foreign_messages() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch, spec) = queue(&url, "amqp-foreign-header").await;
    let queue = spec.name().to_owned();
    publish_raw(&ch, &queue, b"same body", &[("order-id", "A-1")]).await;
    publish_raw(&ch, &queue, b"same body", &[("order-id", "A-2")]).await;
    publish_raw(&ch, &queue, b"a corrected body", &[("order-id", "A-1")]).await;
    publish_raw(&ch, &queue, b"no header", &[]).await;
    let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .expect("consumer")
        .with_key_extractor(KeyExtractor::header("order-id"));
    let mut keys = Vec::new();
    for _ in 0..4 {
        let d = next(&mut consumer).await;
        keys.push(d.message().idempotency_key().as_str().to_owned());
        d.ack().await.expect("ack");
    }
    assert_eq!(&keys[..3], ["A-1", "A-2", "A-1"], "{keys:?}");
    assert!(
        keys[3].starts_with("sha256:"),
        "no header: the default key, {keys:?}"
    );
    let _ = consumer.close().await;
    common::delete(&conn, &[&queue, &format!("{queue}.dlq")]).await;
}
