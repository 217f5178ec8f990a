//! Dedupe leases (loss-matrix row L11) over the in-memory store, in paused time: a lease that
//! would end under a running handler, a `complete` that fails, a late `release` of a lease that
//! was taken over, and a copy that gives up waiting on a held key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::{
    Completion, IdempotencyStore, InMemoryIdempotencyStore, InMemoryStoreConfig, LeaseToken,
    Renewal, Reservation, StoreError,
};
use reliable_core::memory::InMemoryBroker;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, Handler, HandlerBuilder, HandlerError, Pipeline,
    PipelineConfig,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{IdempotencyKey, Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(1);

fn store(lease: Duration) -> Arc<InMemoryIdempotencyStore> {
    Arc::new(InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        lease,
        ..InMemoryStoreConfig::default()
    }))
}

/// A handler that applies its effect (counted) after `work`.
fn slow_effect(effects: Arc<AtomicUsize>, work: Duration) -> impl Handler + Clone + 'static {
    handler_fn(move |_msg: Message| {
        let effects = effects.clone();
        async move {
            tokio::time::sleep(work).await;
            effects.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
}

/// Two copies of one message through `handler`, the second starting `gap` after the first.
async fn two_copies(handler: &(impl Handler + ?Sized), gap: Duration) {
    let msg = Message::new("order-1");
    let copy = msg.clone();
    let (a, b) = tokio::join!(handler.handle(&msg), async {
        tokio::time::sleep(gap).await;
        handler.handle(&copy).await
    });
    assert!(a.is_ok(), "first copy: {a:?}");
    assert!(b.is_ok(), "second copy: {b:?}");
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_the_lease_keeps_its_key_and_the_effect_runs_once() {
    let effects = Arc::new(AtomicUsize::new(0));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(1500)))
        .layer(DedupeLayer::new(store(LEASE)).with_in_progress_wait(Duration::from_secs(10)))
        .build();
    // The second copy asks just after a lease that was never renewed would have ended.
    two_copies(&handler, LEASE + Duration::from_millis(100)).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the second copy must not take over a lease whose handler is still running"
    );
}

/// The in-memory store whose first `complete` fails (the write did not land).
struct FirstCompleteFails {
    inner: Arc<InMemoryIdempotencyStore>,
    failed: AtomicUsize,
}

#[async_trait::async_trait]
impl IdempotencyStore for FirstCompleteFails {
    fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease_duration()
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
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
        if self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(StoreError::Unavailable {
                reason: "connection reset".into(),
            });
        }
        self.inner.complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_complete_that_fails_once_is_retried_and_the_waiting_copy_is_skipped() {
    let effects = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(FirstCompleteFails {
        inner: store(LEASE),
        failed: AtomicUsize::new(0),
    });
    let layer = DedupeLayer::new(store.clone()).with_in_progress_wait(Duration::from_secs(10));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(100)))
        .layer(layer.clone())
        .build();
    two_copies(&handler, Duration::from_millis(20)).await;
    assert!(store.failed.load(Ordering::SeqCst) >= 2, "complete retried");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the copy waiting on the key must see it completed, not free"
    );
    assert_eq!(layer.duplicates(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_late_release_of_a_lease_taken_over_keeps_the_new_holder() -> Result<(), StoreError> {
    let s = store(LEASE);
    let key = IdempotencyKey::new("order-1").map_err(|e| StoreError::Unavailable {
        reason: e.to_string(),
    })?;
    let first = s.reserve(&key).await?;
    assert!(first.is_new(), "first holder: {first:?}");
    tokio::time::advance(Duration::from_millis(1200)).await;
    let second = s.reserve(&key).await?;
    assert!(second.is_new(), "second holder: {second:?}");
    // The first holder's handler fails now, long after its lease ended.
    if let Some(token) = first.token() {
        s.release(&key, token).await?;
    }
    assert_eq!(
        s.reserve(&key).await?,
        Reservation::InProgress,
        "the first holder's release must not free the second holder's reservation"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_copy_that_gives_up_on_a_held_key_is_requeued_not_dead_lettered() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    broker.declare_queue("dlq");
    let msg = Message::new("order-1").with_destination("q");
    // The original and a resend (same id and key) are both in the queue.
    broker.transport().publish(&msg).await?;
    broker.transport().publish(&msg).await?;

    let effects = Arc::new(AtomicUsize::new(0));
    // A lease longer than the wait: the second copy gives up while the first still runs.
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_secs(3)))
        .layer(
            DedupeLayer::new(store(Duration::from_secs(300)))
                .with_in_progress_wait(Duration::from_millis(500)),
        )
        .build();
    let dead_letter = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    );
    let stats = Pipeline::new(
        broker.consumer("q").end_when_drained(),
        handler,
        dead_letter,
    )
    .with_config(PipelineConfig {
        concurrency: 2,
        // One delivery per batch: the two copies run side by side as separate deliveries, as
        // on two consumers (copies within one batch: tests/pipeline_batches.rs).
        batch_size: 1,
        requeue_delay: Duration::from_millis(100),
        ..PipelineConfig::default()
    })
    .run()
    .await?;
    assert_eq!(
        stats.dead_lettered, 0,
        "a healthy message was dead-lettered: {stats:?}"
    );
    assert!(stats.requeued >= 1, "{stats:?}");
    assert_eq!(stats.succeeded, 2, "{stats:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(broker.acked_count("q"), 2);
    Ok(())
}

/// The in-memory store with `complete` failing its first `complete_failures` calls and
/// `renew` failing its first `renew_failures` calls.
struct Scripted {
    inner: Arc<InMemoryIdempotencyStore>,
    complete_failures: usize,
    renew_failures: usize,
    completes: AtomicUsize,
    renews: AtomicUsize,
}

impl Scripted {
    fn new(lease: Duration, complete_failures: usize, renew_failures: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: store(lease),
            complete_failures,
            renew_failures,
            completes: AtomicUsize::new(0),
            renews: AtomicUsize::new(0),
        })
    }
}

fn down() -> StoreError {
    StoreError::Unavailable {
        reason: "connection refused".into(),
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for Scripted {
    fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease_duration()
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        self.inner.reserve(key).await
    }
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        if self.renews.fetch_add(1, Ordering::SeqCst) < self.renew_failures {
            return Err(down());
        }
        self.inner.renew(key, token).await
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        if self.completes.fetch_add(1, Ordering::SeqCst) < self.complete_failures {
            return Err(down());
        }
        self.inner.complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_complete_failing_for_longer_than_the_lease_keeps_the_lease_until_it_lands() {
    let effects = Arc::new(AtomicUsize::new(0));
    // About 3 s of failed completions (backoff from 50 ms) against a 1 s lease.
    let store = Scripted::new(LEASE, 6, 0);
    let layer = DedupeLayer::new(store.clone()).with_in_progress_wait(Duration::from_secs(30));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(100)))
        .layer(layer.clone())
        .build();
    two_copies(&handler, Duration::from_millis(20)).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the waiting copy took the key over while complete was being retried"
    );
    assert_eq!(store.completes.load(Ordering::SeqCst), 7);
    assert!(
        store.renews.load(Ordering::SeqCst) >= 3,
        "renewed meanwhile"
    );
    assert_eq!(layer.duplicates(), 1);
    assert_eq!((layer.leases_lost(), layer.unrecorded()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_complete_that_never_lands_is_acked_counted_and_its_lease_still_holds_a_while() {
    let effects = Arc::new(AtomicUsize::new(0));
    let store = Scripted::new(Duration::from_secs(10), usize::MAX, 0);
    let layer = DedupeLayer::new(store.clone()).with_complete_retry_for(Duration::from_secs(2));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(10)))
        .layer(layer.clone())
        .build();
    let msg = Message::new("order-1");
    let started = tokio::time::Instant::now();
    let outcome = handler.handle(&msg).await;
    assert!(
        outcome.is_ok(),
        "the effect ran: acknowledge, a requeue would only run it again: {outcome:?}"
    );
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "gave up in bounded time: {took:?}"
    );
    assert!(store.completes.load(Ordering::SeqCst) >= 3, "retried");
    assert_eq!(layer.unrecorded(), 1);
    assert_eq!(
        store.reserve(&msg.idempotency_key()).await,
        Ok(Reservation::InProgress),
        "the unrecorded key stays held until its lease ends"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_are_retried_before_the_lease_runs_out() {
    let effects = Arc::new(AtomicUsize::new(0));
    // The first three renewals fail; retried quickly, the fourth lands within the lease
    // (retried only at the renewal interval, it would land at 1.33 s, after the lease).
    let store = Scripted::new(LEASE, 0, 3);
    let layer = DedupeLayer::new(store.clone()).with_in_progress_wait(Duration::from_secs(10));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(2500)))
        .layer(layer.clone())
        .build();
    two_copies(&handler, LEASE + Duration::from_millis(100)).await;
    assert!(store.renews.load(Ordering::SeqCst) >= 4);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(layer.leases_lost(), 0);
}

/// A store that loses every lease at its first renewal (as if another worker had taken it).
struct LosesLeases(Arc<InMemoryIdempotencyStore>);

#[async_trait::async_trait]
impl IdempotencyStore for LosesLeases {
    fn lease_duration(&self) -> Option<Duration> {
        self.0.lease_duration()
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        self.0.reserve(key).await
    }
    async fn renew(&self, _: &IdempotencyKey, _: LeaseToken) -> Result<Renewal, StoreError> {
        Ok(Renewal::Lost)
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        self.0.complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_lets_the_handler_finish_records_the_key_and_is_counted() {
    let effects = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(LosesLeases(store(LEASE)));
    let layer = DedupeLayer::new(store.clone());
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(1500)))
        .layer(layer.clone())
        .build();
    let msg = Message::new("order-1");
    assert!(handler.handle(&msg).await.is_ok());
    assert_eq!(effects.load(Ordering::SeqCst), 1, "not cancelled half-way");
    assert_eq!(layer.leases_lost(), 1);
    assert_eq!(
        store.reserve(&msg.idempotency_key()).await,
        Ok(Reservation::Duplicate),
        "the effect ran, so the key is recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn giving_up_on_a_held_key_is_an_unavailable_error_that_names_the_key() {
    let effects = Arc::new(AtomicUsize::new(0));
    let s = store(Duration::from_secs(300));
    let msg = Message::new("order-1");
    assert!(s.reserve(&msg.idempotency_key()).await.map(|r| r.is_new()) == Ok(true));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::ZERO))
        .layer(DedupeLayer::new(s).with_in_progress_wait(Duration::from_secs(1)))
        .build();
    let err = match handler.handle(&msg).await {
        Err(e) => e,
        Ok(()) => panic!("ran while another worker held the key"),
    };
    assert_eq!(err.kind(), reliable_core::pipeline::ErrorKind::Unavailable);
    let text = err.to_string();
    assert!(text.contains(msg.idempotency_key().as_str()), "{text}");
    assert!(text.contains("requeued"), "{text}");
    assert_eq!(effects.load(Ordering::SeqCst), 0);
}
