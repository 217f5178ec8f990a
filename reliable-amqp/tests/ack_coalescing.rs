//! Coalesced acks against the project's real RabbitMQ (`scripts/brokers up`): a
//! `multiple=true` ack never settles a delivery that was nacked or is still unsettled, and
//! closing a consumer writes every ack it was asked for.

mod common;

use std::time::Duration;

use futures::future::join_all;
use reliable_amqp::consumer::AckCoalescing;
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::{Delivery, DeliverySource, Message, Transport};
use reliable_test_support::{require, unique_name};

use common::next;

/// Whether a delivery arrives within `wait`.
async fn anything_within(consumer: &mut AmqpConsumer, wait: Duration) -> Option<u32> {
    match tokio::time::timeout(wait, consumer.next()).await {
        Ok(Ok(Some(d))) => Some(number(&d)),
        _ => None,
    }
}

/// The message number `i` of a delivery whose payload is `m{i}`.
fn number(d: &Delivery) -> u32 {
    let text = String::from_utf8_lossy(d.message().payload()).into_owned();
    text.trim_start_matches('m').parse().expect("m<number>")
}

/// A fresh quorum queue holding messages `m0..m{n-1}`, published in order.
async fn queue_with(url: &str, n: u32) -> (reliable_amqp::lapin::Connection, String) {
    let (conn, ch) = common::open(url).await;
    let queue = unique_name("amqp-coalesce");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(url, AmqpSettings::safe())
        .await
        .unwrap();
    for i in 0..n {
        let m = Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue);
        publisher.publish(&m).await.unwrap();
    }
    assert_eq!(common::wait_for_count(&conn, &queue, n).await, n);
    (conn, queue)
}

async fn consumer(url: &str, queue: &str, acks: AckCoalescing) -> AmqpConsumer {
    AmqpConsumer::connect(url, queue, AmqpSettings::safe())
        .await
        .unwrap()
        .with_ack_coalescing(acks)
}

/// Takes `n` deliveries, in order.
async fn take(consumer: &mut AmqpConsumer, n: u32) -> Vec<Delivery> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(consumer).await);
    }
    out
}

/// (a) A nack in the middle of a run of acks, all asked for within one flush window: the
/// nacked message comes back, and none of the acked ones do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_in_a_run_of_acks_is_redelivered_and_the_acked_ones_are_not() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, queue) = queue_with(&url, 20).await;
    let window = AckCoalescing::Multiple {
        max_delay: Duration::from_millis(200),
        max_batch: 1000,
    };
    let mut c = consumer(&url, &queue, window).await;
    let deliveries = take(&mut c, 20).await;
    let nacked = number(&deliveries[10]);
    // Acks before it, the nack, acks after it: asked for in that order, all at once.
    let settles = deliveries.into_iter().map(|d| async move {
        if number(&d) == nacked {
            d.nack(true).await
        } else {
            d.ack().await
        }
    });
    let results = join_all(settles).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let again = next(&mut c).await;
    assert_eq!(number(&again), nacked, "the nacked message comes back");
    assert!(again.redelivered());
    again.ack().await.unwrap();
    assert_eq!(
        anything_within(&mut c, Duration::from_secs(1)).await,
        None,
        "no acked message comes back"
    );
    c.close().await.unwrap();
    let mut fresh = consumer(&url, &queue, AckCoalescing::Off).await;
    assert_eq!(
        anything_within(&mut fresh, Duration::from_secs(1)).await,
        None
    );
    fresh.close().await.unwrap();
    assert_eq!(common::count(&conn, &queue).await, 0);
    common::delete(&conn, &[&queue]).await;
}

/// (b) Acks that only the close writes (the delay is an hour, the batch larger than the
/// messages): after the consumer closed, a new consumer gets none of them back, and every
/// ack resolved Ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_writes_every_ack_and_a_new_consumer_gets_none_back() {
    let url = require!(reliable_test_support::amqp_url());
    let n = 50;
    let (conn, queue) = queue_with(&url, n).await;
    let held_back = AckCoalescing::Multiple {
        max_delay: Duration::from_secs(3600),
        max_batch: 10_000,
    };
    let mut c = consumer(&url, &queue, held_back).await;
    let acks: Vec<_> = take(&mut c, n)
        .await
        .into_iter()
        .map(|d| tokio::spawn(d.ack()))
        .collect();
    // Every ack is asked for, none is due: only the close can write them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        acks.iter().all(|a| !a.is_finished()),
        "an ack went out early"
    );
    c.close().await.unwrap();
    for a in acks {
        assert_eq!(a.await.unwrap(), Ok(()), "the close wrote it");
    }

    let mut fresh = consumer(&url, &queue, AckCoalescing::Off).await;
    assert_eq!(
        anything_within(&mut fresh, Duration::from_secs(2)).await,
        None,
        "an acked message came back"
    );
    fresh.close().await.unwrap();
    assert_eq!(common::count(&conn, &queue).await, 0);
    common::delete(&conn, &[&queue]).await;
}

/// (c) One delivery held unsettled while every later one is acked (and every earlier one):
/// no multiple ack may cover it, so when its channel closes it is the one message that comes
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiple_ack_never_covers_a_delivery_still_unsettled() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, queue) = queue_with(&url, 12).await;
    let mut c = consumer(&url, &queue, AckCoalescing::DEFAULT).await;
    let mut deliveries = take(&mut c, 12).await;
    let held = deliveries.remove(4);
    let held_number = number(&held);
    // Acked one after the other, later ones first: every ack above the held delivery waits
    // for a flush and must not take the held one with it.
    let results = join_all(deliveries.into_iter().rev().map(Delivery::ack)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.close().await.unwrap();
    drop(held);

    let mut fresh = consumer(&url, &queue, AckCoalescing::Off).await;
    let back = next(&mut fresh).await;
    assert_eq!(
        number(&back),
        held_number,
        "only the held message comes back"
    );
    assert!(back.redelivered());
    back.ack().await.unwrap();
    assert_eq!(
        anything_within(&mut fresh, Duration::from_secs(1)).await,
        None,
        "an acked message came back"
    );
    fresh.close().await.unwrap();
    common::delete(&conn, &[&queue]).await;
}

/// Acks with coalescing off: one `basic.ack` per delivery, as before the coalescer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_coalescing_off_every_ack_still_lands() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, queue) = queue_with(&url, 10).await;
    let mut c = consumer(&url, &queue, AckCoalescing::Off).await;
    assert_eq!(c.ack_coalescing(), AckCoalescing::Off);
    let results = join_all(take(&mut c, 10).await.into_iter().map(Delivery::ack)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    c.close().await.unwrap();
    assert_eq!(common::wait_for_count(&conn, &queue, 0).await, 0);
    common::delete(&conn, &[&queue]).await;
}
