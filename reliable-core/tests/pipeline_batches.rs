//! The pipeline's batch path over the in-memory broker: deliveries taken in batches and handled
//! in one task each, shutdown in the middle of a batch, and the batch handler API with batched
//! dedupe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::idempotency::{
    Completion, IdempotencyStore, InMemoryIdempotencyStore, LeaseToken, Renewal, Reservation,
    StoreError,
};
use reliable_core::memory::{InMemoryBroker, InMemoryConsumer};
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, Handler, HandlerBuilder, HandlerError, Pipeline,
    PipelineConfig,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{ConsumeError, Delivery, DeliverySource, IdempotencyKey, Message, Transport};

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

/// The in-memory store, counting the calls the dedupe layer makes.
#[derive(Default)]
struct Counting {
    inner: InMemoryIdempotencyStore,
    reserve: AtomicUsize,
    reserve_many: AtomicUsize,
    complete: AtomicUsize,
    complete_many: AtomicUsize,
    release: AtomicUsize,
}

#[async_trait]
impl IdempotencyStore for Counting {
    fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease_duration()
    }

    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        self.reserve.fetch_add(1, Ordering::SeqCst);
        self.inner.reserve(key).await
    }

    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        self.inner.renew(key, token).await
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        self.complete.fetch_add(1, Ordering::SeqCst);
        self.inner.complete(key, token).await
    }

    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.release.fetch_add(1, Ordering::SeqCst);
        self.inner.release(key, token).await
    }

    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        self.reserve_many.fetch_add(1, Ordering::SeqCst);
        self.inner.reserve_many(keys).await
    }

    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        self.complete_many.fetch_add(1, Ordering::SeqCst);
        self.inner.complete_many(completions).await
    }
}

fn counting_effect(effects: Effects) -> impl Handler + Clone + 'static {
    handler_fn(move |m: Message| {
        let effects = effects.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            effects.record(&m);
            Ok(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_batch_with_duplicates_applies_each_effect_once_with_one_reserve_and_one_complete(
) -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let t = broker.transport();
    let originals: Vec<Message> = (0..10)
        .map(|i| Message::new(format!("m{i}")).with_destination("q"))
        .collect();
    for m in &originals {
        t.publish(m).await?;
    }
    // Resends of three of them (same id and key) in the same batch.
    for m in &originals[..3] {
        t.publish(m).await?;
    }
    let store = Arc::new(Counting::default());
    let dedupe = DedupeLayer::new(store.clone());
    let effects = Effects::default();
    let handler = HandlerBuilder::new(counting_effect(effects.clone()))
        .layer(dedupe.clone())
        .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .with_config(PipelineConfig {
        concurrency: 64,
        batch_size: 64,
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    assert_eq!(stats.received, 13);
    assert_eq!(stats.succeeded, 13, "{stats:?}");
    assert_eq!(broker.acked_count("q"), 13);
    let effects = effects.snapshot();
    assert_eq!(effects.len(), 10);
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
    assert_eq!(dedupe.duplicates(), 3);
    assert_eq!(store.reserve_many.load(Ordering::SeqCst), 1);
    assert_eq!(store.complete_many.load(Ordering::SeqCst), 1);
    assert_eq!(store.complete.load(Ordering::SeqCst), 0);
    assert_eq!(store.release.load(Ordering::SeqCst), 0);

    // Delivered again later (a redelivery after a lost ack): all duplicates, no effect.
    for m in &originals {
        t.publish(m).await?;
    }
    let again = HandlerBuilder::new(counting_effect(Effects::default()))
        .layer(dedupe.clone())
        .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        again,
        dead_letter(&broker),
    )
    .run()
    .await?;
    assert_eq!(stats.succeeded, 10);
    assert_eq!(dedupe.duplicates(), 13);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_batch_with_a_permanent_failure_and_an_unavailable_one_settles_each_as_before(
) -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let payloads: Vec<String> = ["ok-1", "permanent", "unavailable-once", "ok-2", "ok-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    publish(&broker, "q", &payloads).await?;
    let effects = Effects::default();
    let seen = effects.clone();
    let unavailable_left = Arc::new(AtomicUsize::new(1));
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        let unavailable_left = unavailable_left.clone();
        async move {
            let text = String::from_utf8_lossy(m.payload()).into_owned();
            if text == "permanent" {
                return Err(HandlerError::permanent("bad payload"));
            }
            if text == "unavailable-once"
                && unavailable_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(HandlerError::unavailable("database down"));
            }
            seen.record(&m);
            Ok(())
        }
    });
    let store = Arc::new(Counting::default());
    let handler = HandlerBuilder::new(handler)
        .layer(DedupeLayer::new(store.clone()))
        .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .with_config(PipelineConfig {
        concurrency: 16,
        batch_size: 16,
        requeue_delay: Duration::from_secs(5),
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    // The permanent failure is dead-lettered; the unavailable one is held and retried in
    // place, then acked; the neighbours are acked; nothing is requeued.
    assert_eq!(stats.received, 5, "{stats:?}");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.held, 1, "{stats:?}");
    assert_eq!(stats.succeeded, 4, "{stats:?}");
    assert_eq!(stats.requeued, 0, "{stats:?}");
    assert_eq!(broker.acked_count("q"), 5);
    let dlq = broker.messages("dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload().as_ref(), b"permanent");
    let effects = effects.snapshot();
    for p in ["ok-1", "ok-2", "ok-3", "unavailable-once"] {
        assert_eq!(effects.get(p), Some(&1), "effect of {p}: {effects:?}");
    }
    assert!(!effects.contains_key("permanent"));
    // Both failures released their keys in the batch; the retried one completed on its own
    // (a batch of one).
    assert_eq!(store.reserve_many.load(Ordering::SeqCst), 1);
    assert_eq!(store.release.load(Ordering::SeqCst), 2);
    assert_eq!(store.complete_many.load(Ordering::SeqCst), 2);
    assert_eq!(store.complete.load(Ordering::SeqCst), 0);
    Ok(())
}

/// A batch handler that panics: the pipeline falls back to one message at a time, so the panic
/// fails no neighbour.
struct PanickingBatch(Effects);

#[async_trait]
impl Handler for PanickingBatch {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        if msg.payload().as_ref() == b"boom" {
            return Err(HandlerError::permanent("boom"));
        }
        self.0.record(msg);
        Ok(())
    }

    async fn handle_batch(&self, _msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        panic!("batch handler bug");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_batch_handler_fails_no_neighbour() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let payloads: Vec<String> = ["a", "boom", "b"].iter().map(|s| s.to_string()).collect();
    publish(&broker, "q", &payloads).await?;
    let effects = Effects::default();
    let store = Arc::new(Counting::default());
    let handler = HandlerBuilder::new(PanickingBatch(effects.clone()))
        .layer(DedupeLayer::new(store.clone()))
        .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .run()
    .await?;
    assert_eq!(stats.succeeded, 2, "{stats:?}");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    let effects = effects.snapshot();
    assert_eq!(effects.get("a"), Some(&1));
    assert_eq!(effects.get("b"), Some(&1));
    Ok(())
}
