//! What every durable [`AttemptCounter`] must answer (loss-matrix row L10), run against each
//! real store: counts survive a new instance (a restarted consumer), instances over the same
//! backend count one key together, `clear` starts over, and a count nobody settles expires.

use std::sync::Arc;
use std::time::Duration;

use reliable_core::attempts::AttemptCounter;
use reliable_core::message::IdempotencyKey;

/// Records two deliveries of a fresh key on `before` (the process that then "crashes");
/// returns the key.
pub async fn before_restart(before: &dyn AttemptCounter) -> IdempotencyKey {
    let k = super::key("attempts");
    assert_eq!(before.record_attempt(&k).await.unwrap(), 1);
    assert_eq!(before.record_attempt(&k).await.unwrap(), 2);
    k
}

/// On two instances opened after `before_restart`'s was dropped: the count goes on from 2,
/// concurrent records on both get distinct numbers, and `clear` (on either) starts over.
pub async fn after_restart(
    a: Arc<dyn AttemptCounter>,
    b: Arc<dyn AttemptCounter>,
    k: &IdempotencyKey,
) {
    assert_eq!(
        a.record_attempt(k).await.unwrap(),
        3,
        "the count survived the restart"
    );
    assert_eq!(
        b.record_attempt(k).await.unwrap(),
        4,
        "the other instance counts the same key"
    );
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let counter = if i % 2 == 0 { a.clone() } else { b.clone() };
            let k = k.clone();
            tokio::spawn(async move { counter.record_attempt(&k).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (5..15).collect::<Vec<u32>>(),
        "no record lost or counted twice"
    );
    b.clear(k).await.unwrap();
    b.clear(k).await.unwrap(); // idempotent
    assert_eq!(a.record_attempt(k).await.unwrap(), 1, "clear starts over");
    let other = super::key("attempts-other");
    assert_eq!(
        a.record_attempt(&other).await.unwrap(),
        1,
        "keys count apart"
    );
}

/// A count nobody clears is gone once `ttl` has passed (after `purge`, for stores that purge
/// rather than expire): the next record answers 1.
pub async fn expires<F, Fut>(counter: &dyn AttemptCounter, ttl: Duration, purge: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let k = super::key("attempts-ttl");
    assert_eq!(counter.record_attempt(&k).await.unwrap(), 1);
    assert_eq!(counter.record_attempt(&k).await.unwrap(), 2);
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    purge().await;
    assert_eq!(
        counter.record_attempt(&k).await.unwrap(),
        1,
        "the count expired with the TTL"
    );
}
