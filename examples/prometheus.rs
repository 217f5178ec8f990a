//! Prometheus metrics: the producer and the consumer pipeline on the in-memory broker, with
//! their metrics served by `metrics-exporter-prometheus` while traffic runs (a nack now and
//! then, a poison message every 25th, a duplicate delivery), then one scrape printed.
//!
//! ```text
//! cargo run -p reliable --example prometheus --features metrics   # 127.0.0.1:9898, 10 s
//! cargo run -p reliable --example prometheus --features metrics -- 127.0.0.1:9000 60
//! curl -s http://127.0.0.1:9898/metrics | grep ^reliable_       # while it runs
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use reliable::core::idempotency::InMemoryIdempotencyStore;
use reliable::core::memory::{DeliveryFault, InMemoryBroker, PublishFault};
use reliable::core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline, RetryLayer,
    RetryPolicy,
};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;

/// Histogram buckets for the `_seconds` metrics: 100 µs to 10 s.
const BUCKETS: [f64; 11] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:9898").parse()?;
    let seconds: u64 = args.next().as_deref().unwrap_or("10").parse()?;
    if addr.port() == 0 {
        // The exporter does not report the port the system would pick.
        return Err("pass a fixed port, e.g. 127.0.0.1:9898".into());
    }

    // Install the recorder first: producers and pipelines register their metrics when built.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .install()?;
    println!("serving http://{addr}/metrics for {seconds} s");

    let broker = InMemoryBroker::new();
    broker.declare_queue("orders");
    broker.declare_queue("orders.dlq");
    let producer = Producer::new(broker.transport(), ProducerConfig::default());

    let handler = HandlerBuilder::new(handler_fn(|msg: Message| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if msg.payload().starts_with(b"poison") {
            return Err(HandlerError::permanent("poison order"));
        }
        Ok(())
    }))
    .layer(RetryLayer::new(RetryPolicy::default()))
    .layer(DedupeLayer::new(Arc::new(
        InMemoryIdempotencyStore::default(),
    )))
    .build();
    let dead_letter = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "orders.dlq",
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let pipeline = Pipeline::new(broker.consumer("orders"), handler, dead_letter);
    let consumer = tokio::spawn(pipeline.run_until(async {
        let _ = stopped.await;
    }));

    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while tokio::time::Instant::now() < end {
        if n % 50 == 10 {
            broker.inject_publish_fault(PublishFault::Nack); // resent, cause="nack"
        }
        if n.is_multiple_of(100) {
            broker.inject_delivery_fault("orders", DeliveryFault::Duplicate); // a dedupe hit
        }
        let payload = if n % 25 == 24 { "poison" } else { "order" };
        let msg = Message::new(format!("{payload} {n}")).with_destination("orders");
        producer.send_confirmed(msg).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the pipeline finish what it took, then stop it.
    while broker.queue_len("orders") + broker.unacked_len("orders") > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    let stats = consumer.await??;
    println!("sent {n}; pipeline: {stats:?}");

    let url = format!("http://{addr}/metrics");
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .and_then(|mut response| response.body_mut().read_to_string())
    })
    .await??;
    for line in text.lines().filter(|l| l.starts_with("reliable_")) {
        if !line.contains("_bucket{") {
            println!("{line}");
        }
    }
    Ok(())
}
