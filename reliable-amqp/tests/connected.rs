//! The publisher's `connected` in the producer's health (issue 17, "Shutdown and health"),
//! over a link the test cuts: a TCP proxy ([`reliable_test_support::proxy::Proxy`]) between
//! the publisher and RabbitMQ.
//!
//! Expected: `Some(true)` while the channel is open; `Some(false)` once the link is cut; then
//! `Some(true)` again without any publish (reading `false` starts the re-open an idle
//! publisher would otherwise leave to its next publish) over a new connection through the
//! proxy; `Some(false)` for as long as the broker cannot be reached (negative control: the
//! re-open cannot make it read `true` then) and after `close`.
//!
//! `cargo test -p reliable-amqp --test connected` (about 10 s).

mod common;

use std::time::Duration;

use reliable_amqp::settings::{AmqpSettings, ReconnectPolicy};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::AmqpPublisher;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, Transport};
use reliable_test_support::proxy::Proxy;
use reliable_test_support::{amqp_socket_addr, require, unique_name};
use tokio::time::Instant;

/// Polls the publisher every 10 ms until it reads `want`, at most `within`.
async fn reads(publisher: &AmqpPublisher, want: bool, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if publisher.connected() == Some(want) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_reads_connected_then_not_after_a_cut_then_connected_again() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("connected");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();

    let proxy = Proxy::start(amqp_socket_addr(&url).unwrap()).await.unwrap();
    let settings = AmqpSettings::safe()
        .with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: 3,
        })
        .unwrap();
    let publisher = AmqpPublisher::connect(&proxy.url_for(&url), settings)
        .await
        .unwrap();
    let producer = Producer::new(publisher.clone(), ProducerConfig::default());
    assert_eq!(producer.health().await.connected, Some(true));
    producer
        .send_confirmed(Message::new("before").with_routing_key(&queue))
        .await
        .unwrap();

    // The link is reset: lapin sees the connection fail, the publisher reads `false`.
    let accepted = proxy.stats().accepted;
    proxy.cut();
    assert!(
        reads(&publisher, false, Duration::from_secs(10)).await,
        "still connected after the cut"
    );
    // No publish: reading `false` started the re-open, over a new connection.
    assert!(
        reads(&publisher, true, Duration::from_secs(20)).await,
        "never reconnected"
    );
    assert!(proxy.stats().accepted > accepted, "{:?}", proxy.stats());
    assert_eq!(producer.health().await.connected, Some(true));
    producer
        .send_confirmed(Message::new("after").with_routing_key(&queue))
        .await
        .unwrap();
    assert_eq!(common::wait_for_count(&conn, &queue, 2).await, 2);

    // The broker stays unreachable (the proxy is gone: connections refused): `false`, and no
    // re-open can turn it `true`.
    proxy.cut();
    drop(proxy);
    assert!(
        reads(&publisher, false, Duration::from_secs(10)).await,
        "still connected with the broker unreachable"
    );
    assert!(
        !reads(&publisher, true, Duration::from_secs(2)).await,
        "read connected with nothing to connect to"
    );
    assert_eq!(producer.health().await.connected, Some(false));

    publisher.close().await;
    assert_eq!(publisher.connected(), Some(false));
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}
