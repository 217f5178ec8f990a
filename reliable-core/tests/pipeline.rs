//! Consumer pipeline behaviour over the in-memory broker, in paused time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_core::backoff::BackoffPolicy;
use reliable_core::idempotency::{
    Completion, IdempotencyStore, InMemoryIdempotencyStore, LeaseToken, Renewal, Reservation,
    StoreError,
};
use reliable_core::memory::{DeliveryFault, InMemoryBroker};
use reliable_core::message::headers;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, Handler, HandlerBuilder, HandlerError, Pipeline,
    PipelineConfig, PipelineError, RetryLayer, RetryPolicy, TimeoutLayer,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{IdempotencyKey, Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Counts the effect applied per payload, failing as scripted first.
#[derive(Clone, Default)]
struct Recorder {
    effects: Arc<Mutex<HashMap<String, usize>>>,
    calls: Arc<AtomicUsize>,
}

impl Recorder {
    fn effects(&self, payload: &str) -> usize {
        self.effects
            .lock()
            .map(|m| m.get(payload).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// A handler that fails per its payload: `"permanent"`, `"transient-N"` (N failures), or
    /// succeeds after sleeping 10 ms.
    fn handler(&self) -> impl Handler + Clone + 'static {
        let rec = self.clone();
        let failures = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        handler_fn(move |msg: Message| {
            let rec = rec.clone();
            let failures = failures.clone();
            async move {
                rec.calls.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(msg.payload()).into_owned();
                tokio::time::sleep(Duration::from_millis(10)).await;
                if text == "permanent" {
                    return Err(HandlerError::permanent("bad payload"));
                }
                if text == "panic" {
                    panic!("handler bug");
                }
                if let Some(n) = text.strip_prefix("transient-") {
                    let n: usize = n.parse().map_err(HandlerError::permanent)?;
                    let mut f = failures
                        .lock()
                        .map_err(|_| HandlerError::permanent("poison"))?;
                    let seen = f.entry(text.clone()).or_default();
                    if *seen < n {
                        *seen += 1;
                        return Err(HandlerError::transient("flaky dependency"));
                    }
                }
                let mut e = rec
                    .effects
                    .lock()
                    .map_err(|_| HandlerError::permanent("poison"))?;
                *e.entry(text).or_default() += 1;
                Ok(())
            }
        })
    }
}

fn retry() -> RetryLayer {
    RetryLayer::new(RetryPolicy {
        max_attempts: 3,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            factor: 2.0,
            jitter: true,
        },
    })
}

fn broker() -> InMemoryBroker {
    let b = InMemoryBroker::new();
    b.declare_queue("q");
    b.declare_queue("dlq");
    b
}

fn dead_letter(broker: &InMemoryBroker) -> DeadLetter {
    DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    )
}

async fn publish(
    broker: &InMemoryBroker,
    payloads: &[&str],
) -> Result<Vec<Message>, Box<dyn std::error::Error>> {
    let t = broker.transport();
    let mut out = Vec::new();
    for p in payloads {
        let m = Message::new(p.to_string()).with_destination("q");
        t.publish(&m).await?;
        out.push(m);
    }
    Ok(out)
}

#[tokio::test(start_paused = true)]
async fn outcomes_are_acked_retried_or_dead_lettered() -> TestResult {
    let broker = broker();
    let msgs = publish(
        &broker,
        &["ok", "transient-2", "transient-9", "permanent", "panic"],
    )
    .await?;
    let rec = Recorder::default();
    let handler = HandlerBuilder::new(rec.handler()).layer(retry()).build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .run()
    .await?;
    assert_eq!(stats.received, 5);
    assert_eq!(stats.succeeded, 2);
    assert_eq!(stats.dead_lettered, 3);
    assert_eq!(rec.effects("ok"), 1);
    assert_eq!(rec.effects("transient-2"), 1);
    assert_eq!(broker.acked_count("q"), 5);
    let dlq = broker.messages("dlq");
    let mut dead: Vec<_> = dlq.iter().map(|m| m.id()).collect();
    dead.sort();
    let mut expected = vec![msgs[2].id(), msgs[3].id(), msgs[4].id()];
    expected.sort();
    assert_eq!(dead, expected, "dead letters keep the original ids");
    let reason = dlq
        .iter()
        .find(|m| m.id() == msgs[3].id())
        .and_then(|m| m.header(headers::DEAD_LETTER_REASON))
        .ok_or("no dead-letter reason")?;
    assert!(reason.contains("bad payload"), "{reason}");
    // transient-9: 3 attempts (max), permanent: 1, panic: 1, ok: 1, transient-2: 3.
    assert_eq!(rec.calls.load(Ordering::SeqCst), 9);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn failed_dead_letter_publish_requeues_instead_of_acking() -> TestResult {
    let broker = broker();
    publish(&broker, &["permanent"]).await?;
    let rec = Recorder::default();
    let dl = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "missing-dlq",
    );
    let pipeline = Pipeline::new(broker.consumer("q"), rec.handler(), dl);
    let stats = pipeline.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline.run_until(async {
        let _ = rx.await;
    }));
    while stats.snapshot().requeued == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = tx.send(());
    let final_stats = run.await??;
    assert!(final_stats.requeued >= 1);
    assert_eq!(final_stats.dead_lettered, 0);
    assert_eq!(
        broker.acked_count("q"),
        0,
        "never acked without a confirmed dead letter"
    );
    assert_eq!(broker.queue_len("q") + broker.unacked_len("q"), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn duplicates_and_consumer_crashes_apply_the_effect_once() -> TestResult {
    let broker = broker();
    broker.inject_delivery_fault("q", DeliveryFault::Duplicate);
    broker.inject_delivery_fault("q", DeliveryFault::CrashMidHandler);
    broker.inject_delivery_fault("q", DeliveryFault::Duplicate);
    publish(&broker, &["a", "b", "c"]).await?;
    let rec = Recorder::default();
    let dedupe = DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default()));
    let handler = HandlerBuilder::new(rec.handler())
        .layer(retry())
        .layer(dedupe.clone())
        .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .with_config(PipelineConfig {
        concurrency: 1,
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    for p in ["a", "b", "c"] {
        assert_eq!(rec.effects(p), 1, "effect of {p}");
    }
    assert!(stats.received >= 6, "{stats:?}");
    assert!(dedupe.duplicates() >= 3, "{}", dedupe.duplicates());
    assert_eq!(stats.settle_failures, 1, "the crashed session's ack fails");
    assert_eq!(broker.queue_len("q") + broker.unacked_len("q"), 0);
    assert!(broker.messages("dlq").is_empty());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_handlers_before_closing() -> TestResult {
    let broker = broker();
    publish(&broker, &["a", "b", "c", "d"]).await?;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s, f) = (started.clone(), finished.clone());
    let handler = handler_fn(move |_msg: Message| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let pipeline = Pipeline::new(broker.consumer("q"), handler, dead_letter(&broker)).with_config(
        PipelineConfig {
            concurrency: 2,
            ..PipelineConfig::default()
        },
    );
    let stats = pipeline
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await?;
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "concurrency bounds the handlers"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "in-flight handlers drained"
    );
    assert_eq!(stats.succeeded, 2);
    assert_eq!(broker.acked_count("q"), 2);
    assert_eq!(
        broker.queue_len("q"),
        2,
        "untaken deliveries stay in the queue"
    );
    assert_eq!(broker.unacked_len("q"), 0);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_times_out_and_is_retried() -> TestResult {
    let broker = broker();
    publish(&broker, &["slow"]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = HandlerBuilder::new(handler_fn(move |_m: Message| {
        let c = c.clone();
        async move {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(())
        }
    }))
    .layer(TimeoutLayer::new(Duration::from_secs(1)))
    .layer(retry())
    .build();
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .run()
    .await?;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(stats.succeeded, 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn broker_reject_dead_letters_through_the_broker() -> TestResult {
    let broker = broker();
    publish(&broker, &["permanent"]).await?;
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        Recorder::default().handler(),
        DeadLetter::BrokerReject,
    )
    .run()
    .await?;
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(broker.rejected("q").len(), 1);
    assert_eq!(broker.acked_count("q"), 0);
    Ok(())
}

/// A source like Kafka's: a reject can only drop the message.
struct NoDeadLetterSource<S>(S);

#[async_trait::async_trait]
impl<S: reliable_core::DeliverySource> reliable_core::DeliverySource for NoDeadLetterSource<S> {
    async fn next(
        &mut self,
    ) -> Result<Option<reliable_core::Delivery>, reliable_core::ConsumeError> {
        self.0.next().await
    }
    async fn close(&mut self) -> Result<(), reliable_core::ConsumeError> {
        self.0.close().await
    }
    fn rejects_to_dead_letter(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn broker_reject_is_refused_where_a_reject_would_drop_the_message() -> TestResult {
    let broker = broker();
    publish(&broker, &["permanent"]).await?;
    let refused = Pipeline::new(
        NoDeadLetterSource(broker.consumer("q").end_when_drained()),
        Recorder::default().handler(),
        DeadLetter::BrokerReject,
    )
    .run()
    .await;
    assert!(
        matches!(refused, Err(PipelineError::NoBrokerDeadLetter)),
        "{refused:?}"
    );
    assert!(refused
        .unwrap_err()
        .to_string()
        .contains("DeadLetter::publish"));
    assert!(
        broker.rejected("q").is_empty(),
        "nothing was taken, so nothing was dropped"
    );
    // The same source with a publishing dead letter runs, and the message reaches the DLQ.
    let stats = Pipeline::new(
        NoDeadLetterSource(broker.consumer("q").end_when_drained()),
        Recorder::default().handler(),
        dead_letter(&broker),
    )
    .run()
    .await?;
    assert_eq!(stats.dead_lettered, 1);
    assert!(broker.rejected("q").is_empty());
    Ok(())
}

/// An idempotency store that can be taken down.
#[derive(Default)]
struct FlakyStore {
    down: std::sync::atomic::AtomicBool,
    inner: InMemoryIdempotencyStore,
}

#[async_trait::async_trait]
impl IdempotencyStore for FlakyStore {
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                reason: "connection refused".into(),
            });
        }
        self.inner.reserve(key).await
    }
    fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease_duration()
    }
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        self.inner.renew(key, token).await
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        self.inner.complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_store_neither_acks_nor_dead_letters_and_the_message_is_retried_later(
) -> TestResult {
    let broker = broker();
    publish(&broker, &["a", "b"]).await?;
    let store = Arc::new(FlakyStore::default());
    store.down.store(true, Ordering::SeqCst);
    let rec = Recorder::default();
    let handler = HandlerBuilder::new(rec.handler())
        .layer(retry())
        .layer(DedupeLayer::new(store.clone()))
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // A hold of 1 s: the outage outlasts it, so the message is nacked with requeue and comes
    // back (holding within the window is `requeue_hold.rs`).
    let pipeline = Pipeline::new(broker.consumer("q"), handler, dead_letter(&broker)).with_config(
        PipelineConfig {
            requeue_delay: Duration::from_secs(1),
            ..PipelineConfig::default()
        },
    );
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run_until(async {
        let _ = stopped.await;
    }));

    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        broker.acked_count("q"),
        0,
        "nothing acked while the store is down"
    );
    assert!(broker.messages("dlq").is_empty(), "nothing dead-lettered");
    assert_eq!(rec.effects("a") + rec.effects("b"), 0);
    assert!(
        stats.snapshot().requeued >= 4,
        "requeued and tried again: {:?}",
        stats.snapshot()
    );

    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!((rec.effects("a"), rec.effects("b")), (1, 1));
    assert_eq!(broker.acked_count("q"), 2);
    assert!(broker.messages("dlq").is_empty());
    let _ = stop.send(());
    run.await??;
    Ok(())
}
