//! Hold before requeue (issue 14, item 2): a delivery whose dependency (the idempotency store)
//! or whose dead-letter publish is unavailable is held and retried in place for
//! `PipelineConfig::requeue_delay` before it is nacked back, because on RabbitMQ every requeue
//! may count towards a quorum queue's delivery limit. In-memory broker, paused time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliable_core::memory::InMemoryBroker;
use reliable_core::pipeline::{handler_fn, DeadLetter, HandlerError, Pipeline, PipelineConfig};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A dependency of the handler (the idempotency store, a database) that can be taken down.
///
/// The handler reports it as `HandlerError::unavailable`, exactly as `DedupeLayer` reports an
/// unreachable idempotency store; the pipeline sees the same `ErrorKind::Unavailable`.
#[derive(Default)]
struct Dependency {
    down: AtomicBool,
}

fn broker() -> InMemoryBroker {
    let b = InMemoryBroker::new();
    b.declare_queue("q");
    b.declare_queue("dlq");
    b
}

async fn publish(broker: &InMemoryBroker, payload: &str) -> Result<Message, PublishFailed> {
    let m = Message::new(payload.to_owned()).with_destination("q");
    broker
        .transport()
        .publish(&m)
        .await
        .map_err(|e| PublishFailed(e.to_string()))?;
    Ok(m)
}

#[derive(Debug)]
struct PublishFailed(String);
impl std::fmt::Display for PublishFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for PublishFailed {}

/// The handler under test: applies its effect only while `dependency` is up.
fn dependent(
    dependency: Arc<Dependency>,
    effects: Arc<AtomicUsize>,
) -> impl reliable_core::pipeline::Handler {
    handler_fn(move |_msg: Message| {
        let (dependency, effects) = (dependency.clone(), effects.clone());
        async move {
            if dependency.down.load(Ordering::SeqCst) {
                return Err(HandlerError::unavailable(
                    "idempotency store: connection refused",
                ));
            }
            effects.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

fn dead_letter(broker: &InMemoryBroker, destination: &str) -> DeadLetter {
    DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        destination,
    )
}

#[test]
fn the_default_hold_outlasts_a_short_outage() {
    // RabbitMQ 4.0-4.2 count every requeue towards a quorum queue's delivery limit (default
    // 20): a 1 s hold would drop or dead-letter a healthy message after ~20 s of outage.
    assert!(
        PipelineConfig::default().requeue_delay >= Duration::from_secs(30),
        "{:?}",
        PipelineConfig::default().requeue_delay
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_down_for_less_than_the_hold_is_processed_in_place_without_a_nack() -> TestResult {
    let broker = broker();
    publish(&broker, "order-1").await?;
    let store = Arc::new(Dependency::default());
    store.down.store(true, Ordering::SeqCst);
    let effects = Arc::new(AtomicUsize::new(0));
    let comeback = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            store.down.store(false, Ordering::SeqCst);
        })
    };
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        dependent(store, effects.clone()),
        dead_letter(&broker, "dlq"),
    )
    .with_config(PipelineConfig {
        requeue_delay: Duration::from_secs(30),
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    comeback.await?;
    assert_eq!(stats.requeued, 0, "held in place, never nacked: {stats:?}");
    assert_eq!(stats.held, 1, "{stats:?}");
    assert_eq!(
        stats.received, 1,
        "delivered once, no redelivery: {stats:?}"
    );
    assert_eq!((stats.succeeded, stats.dead_lettered), (1, 0), "{stats:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(broker.acked_count("q"), 1);
    assert!(broker.messages("dlq").is_empty());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_store_down_for_longer_than_the_hold_is_nacked_with_requeue_never_acked_or_dead_lettered(
) -> TestResult {
    let broker = broker();
    publish(&broker, "order-1").await?;
    let store = Arc::new(Dependency::default());
    store.down.store(true, Ordering::SeqCst);
    let effects = Arc::new(AtomicUsize::new(0));
    let pipeline = Pipeline::new(
        broker.consumer("q"),
        dependent(store.clone(), effects.clone()),
        dead_letter(&broker, "dlq"),
    )
    .with_config(PipelineConfig {
        requeue_delay: Duration::from_secs(2),
        ..PipelineConfig::default()
    });
    let stats = pipeline.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline.run_until(async {
        let _ = stopped.await;
    }));

    tokio::time::sleep(Duration::from_secs(11)).await;
    let during = stats.snapshot();
    assert!(
        during.requeued >= 2,
        "nacked back after each hold: {during:?}"
    );
    assert_eq!(during.dead_lettered, 0, "{during:?}");
    assert_eq!(during.succeeded, 0, "{during:?}");
    assert_eq!(
        broker.acked_count("q"),
        0,
        "never acked while the store is down"
    );
    assert!(broker.messages("dlq").is_empty(), "never dead-lettered");
    assert_eq!(effects.load(Ordering::SeqCst), 0);

    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = stop.send(());
    let after = run.await??;
    assert_eq!((after.succeeded, after.dead_lettered), (1, 0), "{after:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(broker.acked_count("q"), 1);
    Ok(())
}

/// Handler calls after which the dead-letter test stops failing (see its handler).
const SPIN_GUARD: usize = 1_000;

#[tokio::test(start_paused = true)]
async fn a_dead_letter_publish_failing_for_less_than_the_hold_is_retried_in_place() -> TestResult {
    let broker = broker();
    let poison = publish(&broker, "poison").await?;
    // The dead-letter queue appears 5 s late: until then every dead-letter publish fails.
    let late = {
        let broker = broker.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            broker.declare_queue("late-dlq");
        })
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = handler_fn(move |_msg: Message| {
        let counted = counted.clone();
        async move {
            // A requeue spin never lets paused time advance (the queue would never appear):
            // give in after many calls so such a spin ends as a failed assertion, not a hang.
            if counted.fetch_add(1, Ordering::SeqCst) >= SPIN_GUARD {
                return Ok(());
            }
            Err(HandlerError::permanent("cannot parse"))
        }
    });
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter(&broker, "late-dlq"),
    )
    .with_config(PipelineConfig {
        requeue_delay: Duration::from_secs(30),
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    late.await?;
    assert_eq!(stats.requeued, 0, "held in place, never nacked: {stats:?}");
    assert_eq!((stats.dead_lettered, stats.held), (1, 1), "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(broker.acked_count("q"), 1);
    let dead: Vec<_> = broker
        .messages("late-dlq")
        .iter()
        .map(Message::id)
        .collect();
    assert_eq!(dead, vec![poison.id()]);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_hold_at_once_and_hands_the_message_back() -> TestResult {
    let broker = broker();
    publish(&broker, "order-1").await?;
    let store = Arc::new(Dependency::default());
    store.down.store(true, Ordering::SeqCst);
    let effects = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let stats = Pipeline::new(
        broker.consumer("q"),
        dependent(store, effects.clone()),
        dead_letter(&broker, "dlq"),
    )
    .with_config(PipelineConfig {
        requeue_delay: Duration::from_secs(60),
        ..PipelineConfig::default()
    })
    .run_until(tokio::time::sleep(Duration::from_secs(3)))
    .await?;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited for the hold: {:?}",
        started.elapsed()
    );
    assert_eq!(stats.requeued, 1, "{stats:?}");
    assert_eq!((stats.succeeded, stats.dead_lettered), (0, 0), "{stats:?}");
    assert_eq!(broker.acked_count("q"), 0);
    assert_eq!(
        (broker.queue_len("q"), broker.unacked_len("q")),
        (1, 0),
        "the message is back in the queue"
    );
    assert_eq!(effects.load(Ordering::SeqCst), 0);
    Ok(())
}
