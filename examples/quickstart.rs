//! Quickstart: the whole reliable path on the in-memory broker, no servers needed.
//!
//! A producer publishes orders through injected faults (a lost confirm, a nack, a dropped
//! connection) and still gets every one confirmed; a consumer pipeline deduplicates the copies
//! those resends made, retries a flaky handler and dead-letters a poison message.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable::core::idempotency::InMemoryIdempotencyStore;
use reliable::core::memory::{DeliveryFault, InMemoryBroker, PublishFault};
use reliable::core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline, RetryLayer,
    RetryPolicy, TimeoutLayer,
};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // A broker with a work queue and a dead-letter queue.
    let broker = InMemoryBroker::new();
    broker.declare_queue("orders");
    broker.declare_queue("orders.dlq");

    // Faults a real broker produces: each resend below reuses the message id and key.
    broker.inject_publish_fault(PublishFault::DropConfirm); // stored, confirm lost -> timeout
    broker.inject_publish_fault(PublishFault::Nack);
    broker.inject_publish_fault(PublishFault::ConnectionLost { stored: true });

    let producer = Producer::new(
        broker.transport(),
        ProducerConfig {
            confirm_timeout: Duration::from_millis(200),
            ..ProducerConfig::default()
        },
    );
    let mut handles = Vec::new();
    for i in 1..=10 {
        let payload = if i == 7 {
            "poison".to_string()
        } else {
            format!("order-{i}")
        };
        let msg = Message::new(payload)
            .with_destination("orders")
            .with_idempotency_key(format!("order-{i}"))?;
        handles.push(producer.send(msg).await?);
    }
    for h in handles {
        let confirmed = h.await?; // Ok only after the broker confirmed
        if confirmed.attempts > 1 {
            println!(
                "{} confirmed after {} attempts",
                confirmed.id, confirmed.attempts
            );
        }
    }
    producer.flush().await;
    let p = producer.stats();
    println!(
        "producer: sent {} confirmed {} failed {} resent {:?} p50 {:?}",
        p.sent, p.confirmed, p.failed, p.resent, p.confirm_latency_p50
    );

    // The broker will also deliver one message twice and crash the consumer mid-handler once.
    broker.inject_delivery_fault("orders", DeliveryFault::Duplicate);
    broker.inject_delivery_fault("orders", DeliveryFault::CrashMidHandler);

    // The business effect: record each order once.
    let applied: Arc<Mutex<Vec<String>>> = Arc::default();
    let flaky_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (a, f) = (applied.clone(), flaky_once.clone());
    let handler = handler_fn(move |msg: Message| {
        let (applied, flaky) = (a.clone(), f.clone());
        async move {
            let body = String::from_utf8_lossy(msg.payload()).into_owned();
            if body == "poison" {
                return Err(HandlerError::permanent("cannot parse order"));
            }
            // order-3's database is flaky once.
            let first_try = flaky
                .lock()
                .map_err(|_| HandlerError::permanent("lock poisoned"))?
                .insert(body.clone());
            if body == "order-3" && first_try {
                return Err(HandlerError::transient("database timeout"));
            }
            applied
                .lock()
                .map_err(|_| HandlerError::permanent("lock poisoned"))?
                .push(body);
            Ok(())
        }
    });

    let dedupe = DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default()));
    let handler = HandlerBuilder::new(handler)
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(RetryLayer::new(RetryPolicy::default()))
        .layer(dedupe.clone())
        .build();
    let dead_letter = DeadLetter::publish(producer.clone(), "orders.dlq");
    let stats = Pipeline::new(
        broker.consumer("orders").end_when_drained(),
        handler,
        dead_letter,
    )
    .run()
    .await?;
    producer.close().await;

    let mut applied = applied.lock().map(|v| v.clone()).unwrap_or_default();
    applied.sort();
    println!(
        "consumer: received {} succeeded {} dead-lettered {} duplicates skipped {}",
        stats.received,
        stats.succeeded,
        stats.dead_lettered,
        dedupe.duplicates()
    );
    println!("applied once each: {applied:?}");
    println!("dead letters: {}", broker.messages("orders.dlq").len());

    if applied.len() != 9 || broker.messages("orders.dlq").len() != 1 {
        return Err("quickstart invariant broken: expected 9 effects and 1 dead letter".into());
    }
    println!("ok: nothing lost, nothing applied twice");
    Ok(())
}
