//! Loss-matrix row L12: a silent network. The link to RabbitMQ stops carrying bytes without
//! closing (no FIN, no RST) while the producer publishes at a steady rate, for clearly longer
//! than the confirm timeout, then carries them again.
//!
//! The link is a TCP proxy the test controls ([`reliable_test_support::proxy::Proxy`]): its
//! blackhole stops copying bytes but keeps both sockets open, so what the client writes waits
//! in the kernels' buffers and arrives when the link heals, as TCP retransmission would
//! deliver it. An independent client then reads the queue back and counts the copies of each
//! message.
//!
//! Expected: nothing confirmed is missing, and the extra copies are a small fraction of the
//! messages in flight during the blackhole (a confirm timeout must not resend into the same
//! dead connection; the resend goes out on a fresh one).
//!
//! `cargo test -p reliable-amqp --test silent_network -- --nocapture` (about 25 s).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::AmqpPublisher;
use reliable_core::producer::{Producer, ProducerConfig, SendHandle};
use reliable_core::Message;
use reliable_test_support::proxy::Proxy;
use reliable_test_support::{amqp_socket_addr, require, unique_name};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Messages per second, steady.
const RATE: u64 = 200;
/// Publishing before the blackhole, and after the restore.
const BEFORE: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(3);
/// How long the link carries nothing: several confirm timeouts, and shorter than two
/// heartbeats (10 s at the presets' 5 s), so no side declares the connection dead on its own.
const BLACKHOLE: Duration = Duration::from_secs(7);
/// The producer's attempt timeout.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Extra copies allowed, as a fraction of the messages in flight during the blackhole.
const MAX_EXTRA_FRACTION: f64 = 0.10;

/// One sent message: its payload (the sequence number) and its handle.
type Sent = Vec<(u64, String, SendHandle)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_loses_nothing_and_costs_few_extra_copies() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let url = require!(reliable_test_support::amqp_url());
    let proxy = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-silent-network");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();

    let publisher = AmqpPublisher::connect(&proxy.url_for(&url), AmqpSettings::safe())
        .await
        .unwrap();
    let producer = Producer::new(
        publisher,
        ProducerConfig {
            confirm_timeout: CONFIRM_TIMEOUT,
            deadline: Duration::from_secs(60),
            max_attempts: 1000,
            ..ProducerConfig::default()
        },
    );

    // The sender: one message every 1/RATE s, for the whole run.
    let total = RATE * (BEFORE + BLACKHOLE + AFTER).as_secs();
    let sent: Arc<Mutex<Sent>> = Arc::new(Mutex::new(Vec::new()));
    let sender = {
        let (producer, sent, queue) = (producer.clone(), sent.clone(), queue.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for seq in 0..total {
                tick.tick().await;
                let msg = Message::new(seq.to_string().into_bytes()).with_routing_key(&queue);
                let id = msg.id_text().to_string();
                let handle = producer.send(msg).await.expect("producer open");
                sent.lock().await.push((seq, id, handle));
            }
        })
    };

    tokio::time::sleep(BEFORE).await;
    let in_flight_at_cut = producer.stats().in_flight;
    let sent_at_cut = sent.lock().await.len();
    proxy.blackhole();
    let blackholed = Instant::now();
    tokio::time::sleep(BLACKHOLE).await;
    let during = producer.stats();
    let sent_during = sent.lock().await.len() - sent_at_cut;
    let link_at_restore = proxy.stats();
    proxy.restore();
    eprintln!(
        "blackhole {:.1} s: {in_flight_at_cut} in flight at the cut, {sent_during} sent during it; \
         at the restore {} in flight, {} resent so far ({:?})",
        blackholed.elapsed().as_secs_f64(),
        during.in_flight,
        during.resent.total(),
        during.resent
    );

    sender.await.unwrap();
    let sent = std::mem::take(&mut *sent.lock().await);
    let mut confirmed = HashMap::new();
    let mut failed = Vec::new();
    for (seq, id, handle) in sent {
        match tokio::time::timeout(Duration::from_secs(90), handle).await {
            Ok(Ok(_)) => {
                confirmed.insert(id, seq);
            }
            Ok(Err(e)) => failed.push(format!("{seq}: {e}")),
            Err(_) => failed.push(format!("{seq}: unresolved after 90 s")),
        }
    }
    let stats = producer.stats();
    producer.close().await;
    let link = proxy.stats();
    eprintln!(
        "the link carried {} bytes to the broker ({} of them after the restore) on {} \
         connection(s)",
        link.to_upstream,
        link.to_upstream - link_at_restore.to_upstream,
        link.accepted
    );

    // Late copies (resends still travelling on an abandoned connection) land within moments
    // of the restore: wait until the queue length stands still.
    let mut last = common::count(&conn, &queue).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = common::count(&conn, &queue).await;
        if now == last {
            break;
        }
        last = now;
    }
    let copies = common::read_back(&conn, &queue, last).await;

    let lost: Vec<u64> = confirmed
        .iter()
        .filter(|(id, _)| !copies.contains_key(*id))
        .map(|(_, seq)| *seq)
        .collect();
    let stored: u64 = copies.values().sum();
    let distinct = copies.len() as u64;
    let extra = stored - distinct;
    // Every message unconfirmed at some moment of the blackhole.
    let affected = in_flight_at_cut + sent_during as u64;
    let fraction = extra as f64 / affected.max(1) as f64;
    let most = copies.values().max().copied().unwrap_or(0);
    eprintln!(
        "silent network: {total} sent, {} confirmed, {} failed, {} lost; {stored} stored for \
         {distinct} distinct messages: {:.3} copies per message, {extra} extra copies \
         ({:.1} % of the {affected} in flight during the blackhole: {in_flight_at_cut} at the \
         cut + {sent_during} sent during it), at most {most} copies of one message; resent \
         {} ({:?})",
        confirmed.len(),
        failed.len(),
        lost.len(),
        stored as f64 / distinct.max(1) as f64,
        fraction * 100.0,
        stats.resent.total(),
        stats.resent,
    );
    common::delete(&conn, &[&queue]).await;
    assert!(
        failed.is_empty(),
        "handed back: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(lost.is_empty(), "confirmed but not in the queue: {lost:?}");
    assert!(
        fraction < MAX_EXTRA_FRACTION,
        "{extra} extra copies for {affected} messages in flight during the blackhole \
         ({:.1} %, allowed {:.0} %): resends went into the dead connection",
        fraction * 100.0,
        MAX_EXTRA_FRACTION * 100.0
    );
}

/// An idle connection through the proxy carries heartbeat frames both ways within a few
/// seconds: the broker accepted the presets' short heartbeat (with RabbitMQ's default 60 s
/// nothing would pass in that time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publisher_connection_exchanges_short_heartbeats() {
    let url = require!(reliable_test_support::amqp_url());
    let proxy = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    let publisher = AmqpPublisher::connect(&proxy.url_for(&url), AmqpSettings::safe())
        .await
        .unwrap();
    // Let the handshake's last frames pass, then watch an idle link for longer than one
    // heartbeat interval.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proxy.stats();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = proxy.stats();
    drop(publisher);
    let (up, down) = (
        after.to_upstream - before.to_upstream,
        after.from_upstream - before.from_upstream,
    );
    eprintln!("idle 6 s: {up} bytes to the broker, {down} bytes from it");
    // A heartbeat frame is 8 bytes.
    assert!(up >= 8, "the client sent no heartbeat in 6 s");
    assert!(down >= 8, "the broker sent no heartbeat in 6 s");
}
