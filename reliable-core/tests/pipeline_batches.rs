//! The pipeline's batch path over the in-memory broker: deliveries taken in batches and handled
//! in one task each, shutdown in the middle of a batch, and the batch handler API with batched
//! dedupe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::memory::{InMemoryBroker, InMemoryConsumer};
use reliable_core::pipeline::{handler_fn, DeadLetter, Pipeline, PipelineConfig};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{ConsumeError, Delivery, DeliverySource, Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A source that records the size of every batch it hands out.
struct Sizes {
    inner: InMemoryConsumer,
    sizes: Arc<Mutex<Vec<usize>>>,
}

#[async_trait]
impl DeliverySource for Sizes {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        self.inner.next().await
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let batch = self.inner.next_batch(max).await?;
        if let Ok(mut sizes) = self.sizes.lock() {
            sizes.push(batch.len());
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.inner.close().await
    }
}

async fn publish(broker: &InMemoryBroker, queue: &str, payloads: &[String]) -> TestResult {
    let t = broker.transport();
    for p in payloads {
        t.publish(&Message::new(p.clone()).with_destination(queue))
            .await?;
    }
    Ok(())
}

fn dead_letter(broker: &InMemoryBroker) -> DeadLetter {
    broker.declare_queue("dlq");
    DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    )
}

/// Counts how often each payload's effect ran.
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<HashMap<String, usize>>>);

impl Effects {
    fn record(&self, msg: &Message) {
        let text = String::from_utf8_lossy(msg.payload()).into_owned();
        if let Ok(mut m) = self.0.lock() {
            *m.entry(text).or_default() += 1;
        }
    }

    fn snapshot(&self) -> HashMap<String, usize> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

#[tokio::test(start_paused = true)]
async fn deliveries_are_taken_in_batches_and_each_settled_once() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let payloads: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    publish(&broker, "q", &payloads).await?;
    let effects = Effects::default();
    let seen = effects.clone();
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            seen.record(&m);
            Ok(())
        }
    });
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let source = Sizes {
        inner: broker.consumer("q").end_when_drained(),
        sizes: sizes.clone(),
    };
    let stats = Pipeline::new(source, handler, dead_letter(&broker))
        .with_config(PipelineConfig {
            concurrency: 16,
            batch_size: 64,
            ..PipelineConfig::default()
        })
        .run()
        .await?;
    assert_eq!(stats.received, 200);
    assert_eq!(stats.succeeded, 200);
    assert_eq!(broker.acked_count("q"), 200);
    let effects = effects.snapshot();
    assert_eq!(effects.len(), 200);
    assert!(effects.values().all(|&n| n == 1));
    let sizes = sizes.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        sizes.iter().all(|&n| n <= 16),
        "a batch exceeded the concurrency: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > 1),
        "no batch held more than one delivery: {sizes:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_in_the_middle_of_a_batch_loses_nothing() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let payloads: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    publish(&broker, "q", &payloads).await?;
    let effects = Effects::default();
    let seen = effects.clone();
    let started = Arc::new(AtomicUsize::new(0));
    let counted = started.clone();
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            seen.record(&m);
            Ok(())
        }
    });
    let shutdown = async {
        // Mid-batch: handlers have started, none has finished.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stats = Pipeline::new(broker.consumer("q"), handler, dead_letter(&broker))
        .with_config(PipelineConfig {
            concurrency: 16,
            batch_size: 8,
            ..PipelineConfig::default()
        })
        .run_until(shutdown)
        .await?;
    let handled = effects.snapshot().values().sum::<usize>() as u64;
    assert!(started.load(Ordering::SeqCst) > 0);
    // Everything taken was handled and acked before the pipeline returned; the rest is still
    // in the queue.
    assert_eq!(stats.received, stats.succeeded);
    assert_eq!(handled, stats.succeeded);
    assert_eq!(broker.acked_count("q"), stats.succeeded);
    assert_eq!(broker.unacked_len("q"), 0);
    assert_eq!(broker.queue_len("q") as u64 + stats.succeeded, 100);
    Ok(())
}
