//! Issue 18, RabbitMQ without faults: one task sends numbered messages at full speed through
//! the core's producer over an [`AmqpPublisher`] to one quorum queue; an independent lapin
//! consumer then reads the queue back in order. RabbitMQ keeps publish order per channel, so
//! no first copy may sit behind a later message.
//!
//! Control: the old hand-off, one task per message calling `publish`, which is what the core
//! did before the producer submitted in send order; the publishes then reach lapin in whatever
//! order the tasks run, and the queue shows inversions.
//!
//! `cargo test -p reliable-amqp --test send_order -- --nocapture --test-threads 1`

mod common;
mod order;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::AmqpPublisher;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Transport;
use reliable_test_support::{require, unique_name};

/// Messages per run.
const MESSAGES: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_at_full_speed_finds_its_messages_in_send_order() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-send-order");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let producer = Producer::new(publisher, ProducerConfig::default());

    let started = Instant::now();
    let mut handles = Vec::with_capacity(MESSAGES as usize);
    for seq in 0..MESSAGES {
        let handle = producer
            .send(order::numbered(&queue, seq))
            .await
            .expect("producer open");
        handles.push((seq, handle));
    }
    let (confirmed, failed) = order::settle(handles).await;
    let elapsed = started.elapsed();
    let stats = producer.stats();
    producer.close().await;

    let seqs = order::read_back(&conn, &queue).await;
    let found = order::check(&seqs);
    let lost = order::lost(&confirmed, &seqs);
    eprintln!(
        "producer, full speed: {MESSAGES} sent in {:.1} s ({:.0} msg/s), {} confirmed, {} \
         handed back, {} lost; {} stored, {} distinct, {} first copies out of order (first: \
         {:?}), {} duplicates, {:.4} copies per message; resent {}",
        elapsed.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64(),
        confirmed.len(),
        failed.len(),
        lost.len(),
        found.stored,
        found.distinct,
        found.out_of_order,
        found.first_inversion,
        found.duplicates(),
        found.copies_per_message(),
        stats.resent.total(),
    );
    common::delete(&conn, &[&queue]).await;
    assert!(
        failed.is_empty(),
        "handed back: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(lost.is_empty(), "confirmed but not in the queue: {lost:?}");
    assert_eq!(
        found.out_of_order, 0,
        "first copies behind a later message (first: {:?})",
        found.first_inversion
    );
}

/// The control: the task-per-message hand-off the core used before issue 18 reorders
/// publishes at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_one_task_per_message_reorders_the_queue() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-send-order-control");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = Arc::new(
        AmqpPublisher::connect(&url, AmqpSettings::safe())
            .await
            .unwrap(),
    );

    let started = Instant::now();
    let tasks: Vec<_> = (0..MESSAGES)
        .map(|seq| {
            let publisher = publisher.clone();
            let msg = order::numbered(&queue, seq);
            tokio::spawn(async move { publisher.publish(&msg).await })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(120), task).await,
            Ok(Ok(Ok(())))
        ) {
            failed += 1;
        }
    }
    let elapsed = started.elapsed();
    publisher.close().await;

    let seqs = order::read_back(&conn, &queue).await;
    let found = order::check(&seqs);
    eprintln!(
        "control, a task per message: {MESSAGES} sent in {:.1} s, {failed} not confirmed; {} \
         stored, {} first copies out of order ({:.1} %, first: {:?}), {} duplicates",
        elapsed.as_secs_f64(),
        found.stored,
        found.out_of_order,
        100.0 * found.out_of_order as f64 / found.distinct.max(1) as f64,
        found.first_inversion,
        found.duplicates(),
    );
    common::delete(&conn, &[&queue]).await;
    assert_eq!(failed, 0, "publishes not confirmed");
    assert!(
        found.out_of_order > 0,
        "the control kept the order: this test cannot tell an ordered hand-off from the old one"
    );
}
