//! Batch intake of the AMQP consumer (`DeliverySource::next_batch`) against the project's real
//! RabbitMQ (`scripts/brokers up`): a batch takes what lapin has buffered without waiting,
//! never more than asked, every message exactly once; and a channel lost while a batch fills
//! hands out the deliveries already taken before it reports the loss, the unacked ones coming
//! back redelivered.
//!
//! `cargo test -p reliable-amqp --test consumer_batches -- --nocapture`

mod common;

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::{ConsumeError, Delivery, DeliverySource, Message, MessageId, Transport};
use reliable_test_support::proxy::Proxy;
use reliable_test_support::{amqp_socket_addr, require, unique_name};

/// The longest one `next_batch` call may take in these tests.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries asked for per batch.
const MAX: usize = 64;
/// The consumer's prefetch: more than a batch, so several batches' worth can be buffered.
const PREFETCH: u16 = 200;

fn settings() -> AmqpSettings {
    AmqpSettings::safe().with_prefetch(PREFETCH).unwrap()
}

/// One `next_batch(max)` call, bounded in time.
async fn batch(consumer: &mut AmqpConsumer, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
    tokio::time::timeout(BATCH_TIMEOUT, consumer.next_batch(max))
        .await
        .expect("next_batch answers within 10 s")
}

/// Publishes `n` confirmed messages to `queue`; returns their ids.
async fn publish(url: &str, queue: &str, n: usize) -> HashSet<MessageId> {
    let publisher = AmqpPublisher::connect(url, AmqpSettings::safe())
        .await
        .unwrap();
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("m{i}").into_bytes()).with_routing_key(queue))
        .collect();
    let results = join_all(messages.iter().map(|m| publisher.publish(m))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    messages.iter().map(Message::id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_take_what_is_buffered_never_more_than_max_and_each_message_once() {
    const N: usize = 500;
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-batches");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let sent = publish(&url, &queue, N).await;
    assert_eq!(
        common::wait_for_count(&conn, &queue, N as u32).await,
        N as u32
    );

    let mut consumer = AmqpConsumer::connect(&url, &queue, settings())
        .await
        .unwrap();
    // Let the broker fill the prefetch window, so the first batch has company waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut seen = HashSet::new();
    let mut sizes = Vec::new();
    while seen.len() < N {
        // The first two calls ask for 0 (taken as 1) and 1 though many are buffered.
        let max = [0, 1].get(sizes.len()).copied().unwrap_or(MAX);
        let deliveries = batch(&mut consumer, max).await.expect("consumer ok");
        assert!(
            !deliveries.is_empty(),
            "an open source never returns an empty batch"
        );
        assert!(
            deliveries.len() <= max.max(1),
            "batch of {} for max {max}",
            deliveries.len()
        );
        sizes.push(deliveries.len());
        for d in &deliveries {
            let id = d.message().id();
            assert!(sent.contains(&id), "{id} was not sent");
            assert!(seen.insert(id), "{id} delivered twice");
            assert!(!d.redelivered(), "{id} flagged redelivered");
            assert_eq!(d.delivery_count(), Some(1), "quorum queue: first delivery");
            assert_eq!(d.origin(), Some(queue.as_str()));
        }
        // Settled concurrently, as the pipeline does with the deliveries of a batch.
        let acks = join_all(deliveries.into_iter().map(Delivery::ack)).await;
        assert!(acks.iter().all(Result::is_ok), "{acks:?}");
    }
    let summary = format!(
        "{} batches, {} of more than one, largest {}; first sizes {:?}",
        sizes.len(),
        sizes.iter().filter(|&&n| n > 1).count(),
        sizes.iter().max().unwrap_or(&0),
        &sizes[..sizes.len().min(16)]
    );
    eprintln!("{summary}");
    assert_eq!(seen, sent, "every message arrives exactly once");
    assert!(
        sizes.iter().any(|&n| n > 1),
        "no batch held more than one delivery: {summary}"
    );

    consumer.close().await.unwrap();
    assert!(
        batch(&mut consumer, MAX).await.unwrap().is_empty(),
        "a closed source ends with an empty batch"
    );
    assert_eq!(
        common::wait_for_count(&conn, &queue, 0).await,
        0,
        "all acked: nothing goes back to the queue"
    );
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_while_a_batch_fills_hands_out_what_was_taken_then_reports_the_loss() {
    const N: usize = 40;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let url = require!(reliable_test_support::amqp_url());
    let proxy = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-batch-loss");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let sent = publish(&url, &queue, N).await;

    // The consumer talks to the broker through the proxy, so the test can cut its link.
    let mut consumer = AmqpConsumer::connect(&proxy.url_for(&url), &queue, settings())
        .await
        .unwrap();
    // Every message is with the consumer (none ready in the queue) and parsed by lapin...
    assert_eq!(common::wait_for_count(&conn, &queue, 0).await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...when the link is reset: lapin queues the error behind the buffered deliveries.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let taken = batch(&mut consumer, MAX)
        .await
        .expect("the buffered deliveries come first");
    assert_eq!(
        taken.len(),
        N,
        "one batch holds every buffered delivery (N < MAX)"
    );
    let taken_ids: HashSet<_> = taken.iter().map(|d| d.message().id()).collect();
    assert_eq!(taken_ids, sent);
    match batch(&mut consumer, MAX).await {
        Err(ConsumeError::ConnectionLost { reason }) => eprintln!("loss reported: {reason}"),
        other => panic!("expected ConnectionLost after the taken deliveries, got {other:?}"),
    }
    // A delivery of the lost channel cannot be acked: the broker has it back.
    let mut taken = taken.into_iter();
    let stale = taken.next().unwrap();
    assert!(stale.ack().await.is_err(), "an ack on a lost channel fails");
    drop(taken); // the rest are never settled on the lost channel

    // The consumer consumes again on a new connection; every message comes back redelivered.
    let mut again = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while again.len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {N} came back",
            again.len()
        );
        let deliveries = match batch(&mut consumer, MAX).await {
            Ok(deliveries) => deliveries,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        assert!(!deliveries.is_empty() && deliveries.len() <= MAX);
        for d in &deliveries {
            assert!(
                d.redelivered(),
                "{} must come back redelivered",
                d.message().id()
            );
            again.insert(d.message().id());
        }
        let acks = join_all(deliveries.into_iter().map(Delivery::ack)).await;
        assert!(acks.iter().all(Result::is_ok), "{acks:?}");
    }
    assert_eq!(again, sent, "every unacked message came back");
    consumer.close().await.unwrap();
    assert_eq!(
        common::wait_for_count(&conn, &queue, 0).await,
        0,
        "all acked"
    );
    common::delete(&conn, &[&queue]).await;
}
