//! Consuming: acks, redelivery, dead-lettering, cancelled consumers, the core pipeline.

use std::collections::HashSet;
use std::time::Duration;

use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::message::headers;
use reliable_core::{DeliverySource, Message, Transport};
use reliable_test_support::{require, unique_name};

use crate::common::{self, next, NEXT_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_messages_are_acked_and_unacked_ones_come_back_redelivered() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-consume");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let sent: Vec<Message> = (0..5)
        .map(|i| Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue))
        .collect();
    for m in &sent {
        publisher.publish(m).await.unwrap();
    }

    // A consumer takes the first message and "dies" mid-handler: dropped without settling.
    let mut first = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    let d = next(&mut first).await;
    let unfinished = d.message().id();
    assert!(!d.redelivered());
    drop(d);
    first.close().await.unwrap();
    drop(first);

    // The next consumer gets everything; the unfinished one flagged redelivered.
    let mut second = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut redelivered = HashSet::new();
    while seen.len() < sent.len() {
        let d = next(&mut second).await;
        let msg = d.message();
        assert_eq!(msg.routing_key(), Some(queue.as_str()));
        seen.insert(msg.id());
        if d.redelivered() {
            redelivered.insert(msg.id());
        }
        d.ack().await.unwrap();
    }
    let expected: HashSet<_> = sent.iter().map(Message::id).collect();
    assert_eq!(seen, expected, "ids and keys survive the round trip");
    assert!(
        redelivered.contains(&unfinished),
        "the unacked message is redelivered"
    );
    second.close().await.unwrap();
    assert_eq!(
        common::wait_for_count(&conn, &queue, 0).await,
        0,
        "all acked"
    );
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_nacked_without_requeue_ends_in_the_dead_letter_queue() {
    const ATTEMPTS: usize = 3;
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-poison");
    let dlx = unique_name("amqp-poison-dlx");
    let dlq = unique_name("amqp-poison-dlq");
    topology::declare_dead_letter(&ch, &dlx, &dlq)
        .await
        .unwrap();
    topology::declare_queue(
        &ch,
        &QueueSpec::quorum(&queue).with_dead_letter_exchange(&dlx),
    )
    .await
    .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let poison = Message::new(&b"poison"[..]).with_routing_key(&queue);
    publisher.publish(&poison).await.unwrap();

    let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    for attempt in 1..=ATTEMPTS {
        let d = next(&mut consumer).await;
        assert_eq!(d.message().id(), poison.id());
        assert_eq!(d.redelivered(), attempt > 1);
        // The handler fails; requeue until the last attempt, then nack without requeue.
        d.nack(attempt < ATTEMPTS).await.unwrap();
    }
    let mut dead = AmqpConsumer::connect(&url, &dlq, AmqpSettings::safe())
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.message().id(), poison.id());
    assert_eq!(d.message().idempotency_key(), poison.idempotency_key());
    d.ack().await.unwrap();
    consumer.close().await.unwrap();
    dead.close().await.unwrap();
    assert_eq!(common::count(&conn, &queue).await, 0);
    common::delete(&conn, &[&queue, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_after_the_channel_closed_is_reported_not_ignored() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-twice");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    publisher
        .publish(&Message::new(&b"x"[..]).with_routing_key(&queue))
        .await
        .unwrap();
    let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    // Close the consumer's channel under the delivery: lapin's Acker answers Ok(false).
    consumer.close().await.unwrap();
    let err = d.ack().await.expect_err("the channel is gone");
    assert!(
        matches!(err, reliable_core::AckError::ConnectionLost { .. }),
        "{err:?}"
    );
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_consumer_reports_a_retryable_error_and_consumes_again() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-cancelled");
    let spec = QueueSpec::quorum(&queue);
    topology::declare_queue(&ch, &spec).await.unwrap();
    let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();

    // Deleting the queue makes the broker cancel the consumer: the stream ends.
    common::delete(&conn, &[&queue]).await;
    let ended = tokio::time::timeout(NEXT_TIMEOUT, consumer.next())
        .await
        .expect("the end is reported");
    match ended {
        Err(e) => assert!(e.is_retryable(), "{e}"),
        Ok(d) => panic!("expected a retryable error, got {d:?}"),
    }
    // Once the queue is back, the same consumer consumes again.
    topology::declare_queue(&ch, &spec).await.unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let msg = Message::new(&b"again"[..]).with_routing_key(&queue);
    publisher.publish(&msg).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.message().id(), msg.id());
    d.ack().await.unwrap();
    consumer.close().await.unwrap();
    common::delete(&conn, &[&queue]).await;
}

/// Runs `pipeline` until `done(stats)` holds (bounded), then shuts it down gracefully.
async fn run_pipeline_until<H>(
    pipeline: reliable_core::pipeline::Pipeline<AmqpConsumer, H>,
    done: impl Fn(&reliable_core::pipeline::PipelineStats) -> bool,
) -> reliable_core::pipeline::PipelineStats
where
    H: reliable_core::pipeline::Handler + 'static,
{
    let stats = pipeline.stats();
    let shutdown = async move {
        for _ in 0..200 {
            if done(&stats.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    pipeline.run_until(shutdown).await.expect("pipeline run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_through_the_core_pipeline_is_dead_lettered_after_n_attempts() {
    use reliable_core::pipeline::*;
    use reliable_core::producer::{Producer, ProducerConfig};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const ATTEMPTS: u32 = 3;
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-pipe-poison");
    let dlx = unique_name("amqp-pipe-dlx");
    let dlq = unique_name("amqp-pipe-dlq");
    topology::declare_dead_letter(&ch, &dlx, &dlq)
        .await
        .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let poison = Message::new(&b"poison"[..]).with_routing_key(&queue);
    let good = Message::new(&b"good"[..]).with_routing_key(&queue);
    publisher.publish(&poison).await.unwrap();
    publisher.publish(&good).await.unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let poison_id = poison.id();
    let handler = HandlerBuilder::new(handler_fn(move |msg: Message| {
        let counted = counted.clone();
        async move {
            if msg.id() == poison_id {
                counted.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::transient("cannot parse"));
            }
            Ok(())
        }
    }))
    .layer(RetryLayer::new(RetryPolicy {
        max_attempts: ATTEMPTS,
        backoff: reliable_core::backoff::BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            factor: 2.0,
            jitter: true,
        },
    }))
    .build();
    let dead_letter = DeadLetter::publish(
        Producer::new(publisher.clone(), ProducerConfig::default()),
        &dlx,
    );
    let source = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    let stats = run_pipeline_until(Pipeline::new(source, handler, dead_letter), |s| {
        s.dead_lettered == 1 && s.succeeded == 1
    })
    .await;

    assert_eq!((stats.succeeded, stats.dead_lettered), (1, 1), "{stats:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        ATTEMPTS,
        "N attempts, then dead letter"
    );
    let got = common::get_one(&ch, &dlq)
        .await
        .expect("the poison is in the DLQ");
    let props = &got.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.to_string()),
        Some(poison.id_text().to_string())
    );
    assert!(props
        .headers()
        .as_ref()
        .unwrap()
        .contains_key(headers::DEAD_LETTER_REASON));
    assert_eq!(
        common::wait_for_count(&conn, &queue, 0).await,
        0,
        "originals acked"
    );
    common::delete(&conn, &[&queue, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_changes_state_once() {
    use reliable_core::idempotency::InMemoryIdempotencyStore;
    use reliable_core::pipeline::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-dedupe");
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(
        format!("{queue}.dlx"),
        format!("{queue}.dlq"),
    ));
    topology::declare_queue(&ch, &spec).await.unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let msg = Message::new(&b"pay order 42"[..]).with_routing_key(&queue);
    // A resend: the same message (same id and key) reaches the queue twice.
    publisher.publish(&msg).await.unwrap();
    publisher.publish(&msg).await.unwrap();
    assert_eq!(common::wait_for_count(&conn, &queue, 2).await, 2);

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
        .unwrap();
    let stats = run_pipeline_until(
        Pipeline::new(source, handler, DeadLetter::BrokerReject),
        |s| s.succeeded == 2,
    )
    .await;
    assert_eq!(stats.succeeded, 2, "both deliveries acked");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    assert_eq!(common::wait_for_count(&conn, &queue, 0).await, 0);
    common::delete(&conn, &[&queue]).await;
}
