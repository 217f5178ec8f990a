//! Loss-matrix row L13: a node of a RabbitMQ cluster is lost while a publisher or a consumer
//! talks to it.
//!
//! The "cluster" is two TCP proxies ([`reliable_test_support::proxy::Proxy`]) in front of the
//! one RabbitMQ node the project's script starts: each proxy stands for a node. A node is lost
//! in one of two ways ([`lose`]): it dies (every connection through its proxy is reset and the
//! proxy is dropped, so new connections to its address are refused, as by a host whose broker
//! died), or it goes silent behind a partition (its proxy blackholes every connection, old
//! and new, without closing any).
//!
//! Expected: the client moves to the other node on its own; every publish resolves `Ok`
//! within its deadline and is in the queue (extra copies only from resends, counted); a
//! consumer resumes through the other node and acks every message at least once; a list of
//! only dead nodes fails in bounded time with an error naming every node (without
//! credentials).
//!
//! `cargo test -p reliable-amqp --test cluster_failover -- --nocapture` (about 60 s; the silent
//! cases wait for the heartbeat to declare a connection dead).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reliable_amqp::settings::{AmqpSettings, ReconnectPolicy};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpError, AmqpPublisher};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{DeliverySource, Message, MessageId};
use reliable_test_support::proxy::Proxy;
use reliable_test_support::{amqp_socket_addr, require, unique_name};
use tokio::time::Instant;

/// Messages the publisher streams across the loss of its node.
const MESSAGES: usize = 2000;
/// Pause between two sends.
const PACE: Duration = Duration::from_millis(1);
/// The producer's deadline: every publish must resolve `Ok` within it.
const DEADLINE: Duration = Duration::from_secs(30);
/// Messages the consumer works through across the loss of its node.
const CONSUMED: usize = 300;
/// The consumer's prefetch.
const PREFETCH: u16 = 20;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Two proxies ("nodes") in front of the broker of `url`, and the node list through them.
async fn two_nodes(url: &str) -> (Proxy, Proxy, [String; 2]) {
    let upstream = amqp_socket_addr(url).unwrap();
    let a = Proxy::start(upstream).await.unwrap();
    let b = Proxy::start(upstream).await.unwrap();
    let urls = [a.url_for(url), b.url_for(url)];
    (a, b, urls)
}

/// How a node is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    /// The node dies: its connections are reset and its address refuses new ones.
    Refused,
    /// A partition: its connections stop carrying bytes without closing (no FIN, no RST) and
    /// new ones are accepted but never answered.
    Silent,
}

/// Loses the node behind `proxy` for good, as `how` says. Returns the proxy while it must
/// live on to keep the node silent.
async fn lose(proxy: Proxy, how: Loss) -> Option<Proxy> {
    match how {
        Loss::Refused => {
            proxy.cut();
            let until = Instant::now() + Duration::from_secs(5);
            while proxy.stats().open > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(proxy);
            None
        }
        Loss::Silent => {
            proxy.blackhole();
            Some(proxy)
        }
    }
}

/// `url` (credentials, vhost and all) with its host and port replaced by a port of 127.0.0.1
/// that nothing listens on: a node whose connections are refused.
fn dead_node(url: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (scheme, rest) = url.split_once("://").unwrap();
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// Where a node URL points, as errors and logs name it: `host:port/vhost`.
fn target(url: &str) -> &str {
    let rest = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    rest.split_once("://").map_or(rest, |(_, rest)| rest)
}

/// A URL with credentials that must never show.
const SECRET_URL: &str = "amqp://alice:Xq7-secret@127.0.0.1:5672/%2f";

fn few_attempts(max_attempts: usize) -> AmqpSettings {
    AmqpSettings::safe()
        .with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_attempts,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_moves_to_another_node_when_its_node_dies_and_loses_nothing() {
    publish_across_a_node_loss(Loss::Refused).await;
}

/// The silent node is not tried again: the confirms that did not come make its link suspect,
/// and the next connection goes to the other node at once (a try would cost an open timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_moves_to_another_node_when_its_node_goes_silent_and_loses_nothing() {
    publish_across_a_node_loss(Loss::Silent).await;
}

/// Streams [`MESSAGES`] through a producer over a publisher of two nodes, loses the first
/// node mid-stream (`how`), and checks that every message is confirmed within its deadline,
/// in the queue, and copied only by resends.
async fn publish_across_a_node_loss(how: Loss) {
    init_tracing();
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-cluster-publish");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let (a, b, nodes) = two_nodes(&url).await;

    let publisher = AmqpPublisher::connect_cluster(&nodes, AmqpSettings::safe())
        .await
        .unwrap();
    assert!(a.stats().open >= 1, "connected through the first node");
    assert_eq!(b.stats().accepted, 0, "the second node is not tried first");
    let producer = Producer::new(
        publisher,
        ProducerConfig {
            confirm_timeout: Duration::from_secs(3),
            deadline: DEADLINE,
            max_attempts: 1000,
            max_in_flight: 512,
            ..ProducerConfig::default()
        },
    );

    let sender = common::paced_sends(producer.clone(), queue.clone(), MESSAGES, PACE);

    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent_before_loss = producer.stats().sent;
    let lost_at = Instant::now();
    let a = lose(a, how).await;

    let handles = sender.await.unwrap();
    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for handle in handles {
        match tokio::time::timeout(DEADLINE + Duration::from_secs(10), handle).await {
            Ok(Ok(c)) => {
                confirmed.insert(c.id);
            }
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => failed.push("unresolved past its deadline".to_owned()),
        }
    }
    let settled_after = lost_at.elapsed();
    let stats = producer.stats();
    producer.close().await;
    let through_b = b.stats();
    let tried_a = a.as_ref().map(|a| a.stats().accepted);
    // The silent node heals only now, for good: what it held is dropped with it (never
    // acknowledged, so never the broker's).
    drop(a);

    // Resends may still be in flight to the queue: wait until its length stands still.
    let mut last = common::count(&conn, &queue).await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = common::count(&conn, &queue).await;
        if now == last {
            break;
        }
        last = now;
    }
    let copies = common::read_back(&conn, &queue, last).await;
    let stored: u64 = copies.values().sum();
    let extra = stored - copies.len() as u64;
    let missing = confirmed
        .iter()
        .filter(|id| !copies.contains_key(&id.to_string()))
        .count();
    eprintln!(
        "node loss ({how:?}) while publishing: {MESSAGES} sent ({sent_before_loss} before the \
         loss), {} confirmed, {} handed back, {missing} confirmed but missing; {stored} stored for \
         {} distinct messages ({extra} extra copies); resent {} ({:?}); all settled {:.1} s \
         after the loss; {} connection(s) through the second node",
        confirmed.len(),
        failed.len(),
        copies.len(),
        stats.resent.total(),
        stats.resent,
        settled_after.as_secs_f64(),
        through_b.accepted,
    );
    common::delete(&conn, &[&queue]).await;
    assert!(
        sent_before_loss > 0 && (sent_before_loss as usize) < MESSAGES,
        "the node was lost mid-stream"
    );
    assert!(
        failed.is_empty(),
        "handed back: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert_eq!(confirmed.len(), MESSAGES);
    assert_eq!(missing, 0, "confirmed but not in the queue");
    assert!(
        through_b.accepted >= 1,
        "the publisher moved to the other node"
    );
    // A silent node swallows the publishes in flight, so some are always resent; a node that
    // dies may find every publish confirmed at that instant, and then nothing needs a resend.
    if how == Loss::Silent {
        assert!(
            stats.resent.total() > 0,
            "the silent node made the producer resend"
        );
    }
    assert!(
        extra <= stats.resent.total(),
        "{extra} extra copies but only {} resends",
        stats.resent.total()
    );
    if let Some(accepted) = tried_a {
        assert_eq!(accepted, 1, "the silent node was tried again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_on_another_node_when_its_node_dies() {
    consume_across_a_node_loss(Loss::Refused).await;
}

/// The heartbeat declares the silent node's connection dead; the consumer resumes through the
/// other node without trying the silent one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_on_another_node_when_its_node_goes_silent() {
    consume_across_a_node_loss(Loss::Silent).await;
}

/// Consumes [`CONSUMED`] messages through a consumer of two nodes, loses the first node
/// (`how`) while deliveries are unacked, and checks that consumption resumes through the
/// other node and every message is acked at least once, with nothing left in the queue.
async fn consume_across_a_node_loss(how: Loss) {
    init_tracing();
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-cluster-consume");
    let spec = QueueSpec::quorum(&queue);
    topology::declare_queue(&ch, &spec).await.unwrap();
    let filler = Producer::new(
        AmqpPublisher::connect(&url, AmqpSettings::safe())
            .await
            .unwrap(),
        ProducerConfig::default(),
    );
    let mut fill = Vec::new();
    for i in 0..CONSUMED {
        let msg = Message::new(format!("c{i}").into_bytes()).with_routing_key(&queue);
        fill.push(filler.send(msg).await.unwrap());
    }
    for handle in fill {
        handle.await.expect("filled");
    }
    filler.close().await;

    let (a, b, nodes) = two_nodes(&url).await;
    // A small prefetch, so most messages are still in the queue when the node is lost.
    let settings = AmqpSettings::safe().with_prefetch(PREFETCH).unwrap();
    let mut consumer = AmqpConsumer::connect_cluster_checked(&nodes, &spec, settings)
        .await
        .unwrap();
    assert_eq!(b.stats().accepted, 0, "the second node is not tried first");

    let mut a = Some(a);
    let mut silent = None;
    // Successful acks per message.
    let mut acks: HashMap<MessageId, usize> = HashMap::new();
    let mut tally = Tally::default();
    let until = Instant::now() + Duration::from_secs(90);
    while acks.len() < CONSUMED && Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Ok(Some(delivery))) => {
                if acks.len() == CONSUMED / 3 {
                    // Lose the node while this delivery (and the prefetched ones) are unacked.
                    if let Some(a) = a.take() {
                        silent = lose(a, how).await;
                    }
                }
                tally.handle(delivery, &mut acks).await;
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => tally.lost(&e).await,
            Err(_) => {}
        }
    }
    // Acks written into a silent link never reached the broker, whose side of that
    // connection may still hold their deliveries: heal the partition (the proxy goes, the
    // broker closes the connection and puts them back) and take what comes again.
    let tried_a = silent.as_ref().map(|a| a.stats().accepted);
    drop(silent);
    loop {
        match tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            Ok(Ok(Some(delivery))) => tally.handle(delivery, &mut acks).await,
            Ok(Err(e)) => tally.lost(&e).await,
            Ok(Ok(None)) | Err(_) => break,
        }
    }
    consumer.close().await.unwrap();
    let left = common::wait_for_count(&conn, &queue, 0).await;
    let again = acks.values().filter(|n| **n > 1).count();
    eprintln!(
        "node loss ({how:?}) while consuming: {CONSUMED} messages, {} acked ({again} of them \
         twice or more), {} acks failed with the node, {} consumer error(s), {} redelivered, \
         {left} left in the queue, {} connection(s) through the second node",
        acks.len(),
        tally.failed_acks,
        tally.errors,
        tally.redelivered,
        b.stats().accepted,
    );
    common::delete(&conn, &[&queue]).await;
    assert!(a.is_none(), "the node was lost mid-way");
    assert_eq!(acks.len(), CONSUMED, "every message acked at least once");
    assert_eq!(left, 0, "nothing left in the queue");
    assert!(tally.errors >= 1, "the consumer saw the loss");
    assert!(
        tally.redelivered >= 1,
        "unacked deliveries came back redelivered"
    );
    assert!(
        b.stats().accepted >= 1,
        "the consumer moved to the other node"
    );
    if let Some(accepted) = tried_a {
        assert_eq!(accepted, 1, "the silent node was tried again");
    }
}

/// What a consumer saw.
#[derive(Default)]
struct Tally {
    errors: usize,
    redelivered: usize,
    failed_acks: usize,
}

impl Tally {
    /// Handles `delivery` (2 ms of work) and acks it, counting the ack in `acks` when it
    /// went out.
    async fn handle(
        &mut self,
        delivery: reliable_core::Delivery,
        acks: &mut HashMap<MessageId, usize>,
    ) {
        self.redelivered += usize::from(delivery.redelivered());
        tokio::time::sleep(Duration::from_millis(2)).await;
        let id = delivery.message().id();
        match delivery.ack().await {
            Ok(()) => *acks.entry(id).or_default() += 1,
            Err(_) => self.failed_acks += 1,
        }
    }

    /// The consumer lost its channel: a retryable error, and the next call consumes again.
    async fn lost(&mut self, error: &reliable_core::ConsumeError) {
        assert!(error.is_retryable(), "{error}");
        self.errors += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_node_is_skipped_at_once() {
    init_tracing();
    let url = require!(reliable_test_support::amqp_url());
    let live = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    let nodes = [dead_node(&url), live.url_for(&url)];
    let started = Instant::now();
    let publisher = AmqpPublisher::connect_cluster(&nodes, AmqpSettings::safe())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(live.stats().open >= 1, "connected through the live node");
    assert!(
        took < Duration::from_secs(2),
        "a refused node cost {took:?}"
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_dead_nodes_fail_in_bounded_time_naming_every_node() {
    init_tracing();
    let nodes = [dead_node(SECRET_URL), dead_node(SECRET_URL)];
    let started = Instant::now();
    let error = AmqpPublisher::connect_cluster(&nodes, few_attempts(3))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let text = format!("{error} / {error:?}");
    eprintln!("{took:?}: {text}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(matches!(error, AmqpError::Connect { .. }), "{text}");
    for node in &nodes {
        let target = target(node);
        assert!(text.contains(target), "{target} not named: {text}");
    }
    assert!(
        !text.contains("Xq7") && !text.contains("alice"),
        "credentials shown: {text}"
    );

    let started = Instant::now();
    let error = AmqpConsumer::connect_cluster(&nodes, "q", few_attempts(3))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let text = format!("{error} / {error:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(matches!(error, AmqpError::Connect { .. }), "{text}");
    for node in &nodes {
        let target = target(node);
        assert!(text.contains(target), "{target} not named: {text}");
    }
    assert!(!text.contains("Xq7"), "credentials shown: {text}");
}

/// A node that accepts TCP but never answers (a partition, or a broker hung at start) costs
/// one open timeout per round, and the next node is tried after it in the same round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_costs_one_open_timeout_per_round() {
    init_tracing();
    let url = require!(reliable_test_support::amqp_url());
    let silent = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    silent.blackhole();
    let nodes = [silent.url_for(&url), dead_node(&url)];
    let started = Instant::now();
    let error = AmqpPublisher::connect_cluster(&nodes, few_attempts(1))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let text = format!("{error}");
    eprintln!("{took:?}: {text}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "one round of one silent and one refused node took {took:?}"
    );
    assert!(matches!(error, AmqpError::Connect { .. }), "{text}");
    assert!(text.contains(target(&nodes[0])), "{text}");
    assert!(text.contains(target(&nodes[1])), "{text}");
    assert!(text.contains("no answer"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_a_cluster_publisher_and_consumer_shows_no_credentials() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-cluster-debug");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let (a, b, nodes) = two_nodes(&url).await;
    let userinfo = reliable_core::redact::userinfo(&url).unwrap_or_default();
    let publisher = AmqpPublisher::connect_cluster(&nodes, AmqpSettings::safe())
        .await
        .unwrap();
    let consumer = AmqpConsumer::connect_cluster(&nodes, &queue, AmqpSettings::safe())
        .await
        .unwrap();
    for debug in [format!("{publisher:?}"), format!("{consumer:?}")] {
        assert!(
            userinfo.is_empty() || !debug.contains(userinfo),
            "credentials shown: {debug}"
        );
        assert!(debug.contains(&a.addr().to_string()), "{debug}");
        assert!(debug.contains(&b.addr().to_string()), "{debug}");
    }
    publisher.close().await;
    drop(consumer);
    common::delete(&conn, &[&queue]).await;
}
