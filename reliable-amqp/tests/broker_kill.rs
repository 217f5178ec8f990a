//! Loss-matrix rows L1 + L3: the broker is killed (-9) and restarted while publishing.
//!
//! Every publish that resolved `Ok` must be in the queue afterwards. In the same scenario a
//! negative control publishes without confirms and with transient messages: it must show
//! loss, which proves this test can see loss.
//!
//! Run on its own (it stops the shared broker for a few seconds):
//! `cargo test -p reliable-amqp --test broker_kill -- --nocapture`

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reliable_amqp::settings::{AmqpSettings, DataLoss};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::backoff::BackoffPolicy;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{DeliverySource, Message, MessageId};
use reliable_test_support::{require, unique_name};
use tokio::task::JoinHandle;

const MESSAGES: usize = 3000;
const PACE: Duration = Duration::from_millis(1);
const CONSUMED: usize = 150;

fn brokers(command: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/brokers");
    let status = Command::new(script)
        .arg(command)
        .status()
        .expect("run scripts/brokers");
    assert!(status.success(), "scripts/brokers {command} failed");
}

/// Kills the broker when dropped unless disarmed, so a failing test still restarts it.
struct RestartGuard(bool);
impl Drop for RestartGuard {
    fn drop(&mut self) {
        if self.0 {
            brokers("rabbit-restart");
        }
    }
}

fn producer_config() -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(90),
        max_attempts: 1000,
        max_in_flight: 512,
        backoff: BackoffPolicy::default(),
        ..ProducerConfig::default()
    }
}

/// Sends `MESSAGES` paced messages to `queue`; returns the ids whose send resolved Ok.
fn stream(producer: Producer, queue: String) -> JoinHandle<(Vec<MessageId>, usize)> {
    let sends = common::paced_sends(producer, queue, MESSAGES, PACE);
    tokio::spawn(async move {
        let mut ok = Vec::new();
        let mut failed = 0;
        for h in sends.await.expect("sender") {
            match h.await {
                Ok(c) => ok.push(c.id),
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    })
}

/// A consumer whose 20 ms handler runs across the outage: it must come back on its own and
/// ack every message. Returns (distinct ids acked, consumer errors seen, redeliveries seen).
fn consume_across_outage(
    url: String,
    queue: String,
    total: usize,
) -> JoinHandle<(usize, usize, usize)> {
    tokio::spawn(async move {
        let mut consumer = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
            .await
            .expect("consumer");
        let mut acked = HashSet::new();
        let (mut errors, mut redelivered) = (0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while acked.len() < total && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Ok(Some(d))) => {
                    redelivered += usize::from(d.redelivered());
                    tokio::time::sleep(Duration::from_millis(20)).await; // the handler
                    let id = d.message().id();
                    if d.ack().await.is_ok() {
                        acked.insert(id);
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    assert!(e.is_retryable(), "{e}");
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => {}
            }
        }
        let _ = consumer.close().await;
        (acked.len(), errors, redelivered)
    })
}

/// Drains `queue` with a consumer, returning the distinct message ids found.
async fn drain(url: &str, queue: &str, expected: u32) -> HashSet<MessageId> {
    let mut consumer = AmqpConsumer::connect(url, queue, AmqpSettings::high_throughput())
        .await
        .expect("consumer");
    let mut ids = HashSet::new();
    let mut taken = 0;
    while taken < expected {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Ok(Some(d))) => {
                ids.insert(d.message().id());
                taken += 1;
                d.ack().await.expect("ack");
            }
            _ => break,
        }
    }
    consumer.close().await.expect("close");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_publish_survives_a_kill_9_and_restart_and_the_control_shows_loss() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let safe_queue = unique_name("amqp-kill-safe");
    let lossy_queue = unique_name("amqp-kill-lossy");
    let consumed_queue = unique_name("amqp-kill-consumed");
    topology::declare_queue(&ch, &QueueSpec::quorum(&consumed_queue))
        .await
        .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&safe_queue))
        .await
        .unwrap();
    // The control's queue survives the restart, so what is missing is lost messages.
    topology::declare_queue(&ch, &QueueSpec::classic_durable(&lossy_queue))
        .await
        .unwrap();
    drop(ch);
    drop(conn);
    // Queues declared moments before a kill -9 can be missing or empty after the restart on
    // RabbitMQ 3.10 (README, "Known broker limitation"); a clean restart writes their
    // definitions, as a long-lived queue's are, so what the test counts is lost messages.
    tokio::task::spawn_blocking(|| {
        brokers("rabbit-stop");
        brokers("rabbit-restart");
    })
    .await
    .unwrap();

    let safe = Producer::new(
        AmqpPublisher::connect(&url, AmqpSettings::safe())
            .await
            .unwrap(),
        producer_config(),
    );
    let lossy_settings = AmqpSettings::classic_durable()
        .unsafe_allow_data_loss(DataLoss::NoPublisherConfirms)
        .unsafe_allow_data_loss(DataLoss::TransientMessages);
    let lossy = Producer::new(
        AmqpPublisher::connect(&url, lossy_settings).await.unwrap(),
        producer_config(),
    );

    // Fill the consumer's queue first, then let it work through the outage.
    let filler = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    for i in 0..CONSUMED {
        let msg = Message::new(format!("c{i}").into_bytes()).with_routing_key(&consumed_queue);
        reliable_core::Transport::publish(&filler, &msg)
            .await
            .unwrap();
    }
    drop(filler);
    let consumer_task = consume_across_outage(url.clone(), consumed_queue.clone(), CONSUMED);

    let safe_task = stream(safe.clone(), safe_queue.clone());
    let lossy_task = stream(lossy.clone(), lossy_queue.clone());

    // Mid-stream: kill -9, then start it again (the script waits until it is ready).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent_before_kill = safe.stats().sent;
    let mut guard = RestartGuard(true);
    tokio::task::spawn_blocking(|| brokers("rabbit-kill"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(|| brokers("rabbit-restart"))
        .await
        .unwrap();
    guard.0 = false;

    let (safe_ok, safe_failed) = tokio::time::timeout(Duration::from_secs(120), safe_task)
        .await
        .expect("safe stream settles in bounded time")
        .unwrap();
    let (lossy_ok, lossy_failed) = tokio::time::timeout(Duration::from_secs(120), lossy_task)
        .await
        .expect("lossy stream settles in bounded time")
        .unwrap();
    let (acked, consumer_errors, redeliveries) =
        tokio::time::timeout(Duration::from_secs(120), consumer_task)
            .await
            .expect("consumer settles in bounded time")
            .unwrap();
    let stats = safe.stats();
    safe.close().await;
    lossy.close().await;

    let (conn, _ch) = common::open(&url).await;
    let safe_count = common::count(&conn, &safe_queue).await;
    let lossy_count = common::count(&conn, &lossy_queue).await;
    let found = drain(&url, &safe_queue, safe_count).await;
    let missing: Vec<_> = safe_ok.iter().filter(|id| !found.contains(id)).collect();
    let lossy_lost = lossy_ok.len().saturating_sub(lossy_count as usize);

    println!(
        "kill -9 test: safe: sent {MESSAGES}, sent before kill {sent_before_kill}, confirmed {}, \
         handed back {safe_failed}, in queue after restart {safe_count} ({} distinct ids), \
         confirmed but missing {}; resends after connection loss {}, after timeout {}",
        safe_ok.len(),
        found.len(),
        missing.len(),
        stats.resent.connection_lost,
        stats.resent.timeout,
    );
    println!(
        "kill -9 test: control (no confirms, transient): resolved Ok {}, failed {lossy_failed}, \
         in queue after restart {lossy_count}, lost {lossy_lost}",
        lossy_ok.len()
    );
    println!(
        "kill -9 test: consumer: {CONSUMED} messages, acked {acked} distinct, consumer errors \
         {consumer_errors} (then consumed again), redelivered {redeliveries}"
    );

    assert_eq!(
        acked, CONSUMED,
        "the consumer came back and acked everything"
    );
    assert!(consumer_errors > 0, "the consumer saw the outage");
    assert!(
        sent_before_kill > 0 && (sent_before_kill as usize) < MESSAGES,
        "the kill was mid-stream"
    );
    assert!(
        stats.resent.total() > 0,
        "the outage made the producer resend"
    );
    assert!(missing.is_empty(), "confirmed messages lost: {missing:?}");
    assert_eq!(safe_ok.len() + safe_failed, MESSAGES);
    assert!(lossy_lost > 0, "the negative control must show loss");
    common::delete(&conn, &[&safe_queue, &lossy_queue, &consumed_queue]).await;
}
