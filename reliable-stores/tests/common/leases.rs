//! Loss-matrix row L11 against each real store: a dedupe lease must outlive a handler slower
//! than it, a failed `complete` must not turn into a second effect, and a late `release` of a
//! lease that was taken over must not free the new holder's reservation.
//!
//! Every check wants a store whose lease is [`LEASE`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError,
};
use reliable_core::message::IdempotencyKey;
use reliable_core::pipeline::{handler_fn, DedupeLayer, Handler, HandlerBuilder, HandlerError};
use reliable_core::Message;

use super::{key, new};

/// The lease of the stores these checks run on.
pub const LEASE: Duration = Duration::from_secs(1);

/// A handler that applies its effect (counted) after `work`.
fn slow_effect(effects: Arc<AtomicUsize>, work: Duration) -> impl Handler + 'static {
    handler_fn(move |_msg: Message| {
        let effects = effects.clone();
        async move {
            tokio::time::sleep(work).await;
            effects.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
}

/// Two copies of one message through `handler`, the second `gap` after the first; both `Ok`.
async fn two_copies(handler: &(impl Handler + ?Sized), name: &str, gap: Duration) {
    let msg = Message::new("order").with_key(key(name));
    let copy = msg.clone();
    let (a, b) = tokio::join!(handler.handle(&msg), async {
        tokio::time::sleep(gap).await;
        handler.handle(&copy).await
    });
    assert!(a.is_ok(), "first copy: {a:?}");
    assert!(b.is_ok(), "second copy: {b:?}");
}

/// Two copies, a 1 s lease, a 1.5 s handler, the second copy arriving at 1.1 s: the effect
/// runs once.
pub async fn a_slow_handler_keeps_its_lease(store: Arc<dyn IdempotencyStore>) {
    let effects = Arc::new(AtomicUsize::new(0));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(1500)))
        .layer(DedupeLayer::new(store).with_in_progress_wait(Duration::from_secs(10)))
        .build();
    // The second copy asks just after a lease that was never renewed would have ended.
    two_copies(&handler, "slow", LEASE + Duration::from_millis(100)).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the second copy took over a lease whose handler was still running"
    );
}

/// `store` with its first `complete` failing (the write never reached the store).
struct FirstCompleteFails {
    inner: Arc<dyn IdempotencyStore>,
    calls: AtomicUsize,
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
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
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

/// The first copy's `complete` fails once while a second copy waits on the key: the second
/// copy must find the key completed (complete retried), not free after the lease.
pub async fn a_failed_complete_is_retried(store: Arc<dyn IdempotencyStore>) {
    let effects = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(FirstCompleteFails {
        inner: store,
        calls: AtomicUsize::new(0),
    });
    let layer = DedupeLayer::new(store.clone()).with_in_progress_wait(Duration::from_secs(10));
    let handler = HandlerBuilder::new(slow_effect(effects.clone(), Duration::from_millis(100)))
        .layer(layer.clone())
        .build();
    two_copies(&handler, "complete-fails", Duration::from_millis(20)).await;
    assert!(store.calls.load(Ordering::SeqCst) >= 2, "complete retried");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the waiting copy ran the effect again"
    );
    assert_eq!(layer.duplicates(), 1);
}

/// One store instance, two holders one after the other (the first's lease ran out): the first
/// holder's late `release` must leave the second's reservation alone.
pub async fn a_late_release_keeps_the_new_holder(store: &dyn IdempotencyStore) {
    let k = key("late-release");
    let first = new(store, &k).await;
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    new(store, &k).await; // the first lease ran out
                          // The first holder fails now and releases.
    store.release(&k, first).await.unwrap();
    assert_eq!(
        store.reserve(&k).await.unwrap(),
        Reservation::InProgress,
        "the first holder's release freed the second holder's reservation"
    );
}

/// What `renew` and `complete` answer, held and taken over: renewals keep a key past its lease;
/// a lease that ran out unclaimed is renewed (taken again); a lease taken over is lost and its
/// late completion is recorded as superseded; a completion is recorded once, under its token.
pub async fn tokens_fence_renew_and_complete(store: &dyn IdempotencyStore) {
    assert_eq!(store.lease_duration(), Some(LEASE));
    let k = key("tokens");
    let first = new(store, &k).await;
    for _ in 0..3 {
        tokio::time::sleep(LEASE / 2).await;
        assert_eq!(store.renew(&k, first).await.unwrap(), Renewal::Renewed);
    }
    assert_eq!(
        store.reserve(&k).await.unwrap(),
        Reservation::InProgress,
        "renewed past its first lease"
    );
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    assert_eq!(
        store.renew(&k, first).await.unwrap(),
        Renewal::Renewed,
        "run out unclaimed: taken again"
    );
    assert_eq!(store.reserve(&k).await.unwrap(), Reservation::InProgress);
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    let second = new(store, &k).await;
    assert_eq!(store.renew(&k, first).await.unwrap(), Renewal::Lost);
    assert_eq!(
        store.reserve(&k).await.unwrap(),
        Reservation::InProgress,
        "a lost renewal leaves the new holder alone"
    );
    assert_eq!(
        store.complete(&k, first).await.unwrap(),
        Completion::Superseded,
        "the late holder's effect ran: recorded, as superseded"
    );
    assert_eq!(store.reserve(&k).await.unwrap(), Reservation::Duplicate);
    assert_eq!(store.renew(&k, second).await.unwrap(), Renewal::Lost);
    assert_eq!(
        store.complete(&k, second).await.unwrap(),
        Completion::Superseded
    );
    assert_eq!(
        store.complete(&k, first).await.unwrap(),
        Completion::Recorded,
        "a retry of the completion that landed"
    );
    assert_eq!(store.renew(&k, first).await.unwrap(), Renewal::Renewed);
    assert_eq!(
        store.reserve(&k).await.unwrap(),
        Reservation::Duplicate,
        "renewing never reopens a completed key"
    );

    // Completing after the lease ran out unclaimed is recorded as the holder's own.
    let late = key("late-complete");
    let token = new(store, &late).await;
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    assert_eq!(
        store.complete(&late, token).await.unwrap(),
        Completion::Recorded
    );
    assert_eq!(store.reserve(&late).await.unwrap(), Reservation::Duplicate);
}
