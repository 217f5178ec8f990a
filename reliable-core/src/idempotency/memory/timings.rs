//! Timings of the store's hot path: figures printed, nothing asserted on them, not run by
//! default. Run in release, alone:
//!
//! ```text
//! cargo test --release -p reliable-core --lib idempotency::memory::timings -- --ignored --nocapture --test-threads 1
//! ```
//!
//! Each line is the wall time per key of a reserve and a complete (single calls, or
//! `reserve_many` + `complete_many` per batch of 64), on one thread, without contention.

use std::time::Instant as Clock;

use super::*;
use crate::MessageId;

const N: usize = 1_000_000;
const BATCH: usize = 64;

fn ids(n: usize) -> Vec<IdempotencyKey> {
    (0..n)
        .map(|_| IdempotencyKey::from(MessageId::new()))
        .collect()
}

fn report(case: &str, n: usize, started: Clock) {
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("{case:<52} {ns:>9.1} ns/key");
}

fn sized(capacity: usize, ttl: Duration) -> InMemoryIdempotencyStore {
    InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        capacity,
        ttl,
        ..InMemoryStoreConfig::default()
    })
}

/// Reserves and completes each of `keys`, one call each, or a batch call per `BATCH` keys.
async fn run(store: &InMemoryIdempotencyStore, keys: &[IdempotencyKey], batched: bool) {
    if !batched {
        for k in keys {
            let Ok(Reservation::New(token)) = store.reserve(k).await else {
                panic!("{k} not new")
            };
            assert_eq!(store.complete(k, token).await, Ok(Completion::Recorded));
        }
        return;
    }
    for chunk in keys.chunks(BATCH) {
        let answers = store.reserve_many(chunk).await.expect("reserved");
        let pairs: Vec<_> = chunk
            .iter()
            .zip(&answers)
            .map(|(k, a)| (k.clone(), a.token().expect("new")))
            .collect();
        store.complete_many(&pairs).await.expect("completed");
    }
}

fn how(batched: bool) -> &'static str {
    if batched {
        "batches of 64"
    } else {
        "single calls"
    }
}

#[tokio::test]
#[ignore = "timing figures; run in release"]
async fn growing() {
    for batched in [false, true] {
        let keys = ids(N);
        let store = InMemoryIdempotencyStore::default();
        let started = Clock::now();
        run(&store, &keys, batched).await;
        report(
            &format!("1M ids into an empty store, {}", how(batched)),
            N,
            started,
        );
        if !batched {
            let started = Clock::now();
            for k in &keys {
                assert_eq!(store.reserve(k).await, Ok(Reservation::Duplicate));
            }
            report("reserve of each (a duplicate)", N, started);
        }
    }
    let texts: Vec<_> = (0..N)
        .map(|i| IdempotencyKey::new(format!("order-{i}")).expect("key"))
        .collect();
    let started = Clock::now();
    run(&InMemoryIdempotencyStore::default(), &texts, false).await;
    report(
        "1M business keys into an empty store, single calls",
        N,
        started,
    );
}

/// A store at its capacity whose keys run out by TTL: rounds of `capacity` new keys, time
/// moved past the TTL between rounds (the store's steady state under constant load).
#[tokio::test(start_paused = true)]
#[ignore = "timing figures; run in release"]
async fn steady() {
    for capacity in [10_000, N] {
        for batched in [false, true] {
            let store = sized(capacity, Duration::from_secs(1));
            let rounds = (2 * N / capacity).max(2);
            let keys = ids(capacity * rounds);
            let (first, rest) = keys.split_at(capacity);
            run(&store, first, batched).await;
            let started = Clock::now();
            for round in rest.chunks(capacity) {
                tokio::time::advance(Duration::from_secs(2)).await;
                run(&store, round, batched).await;
            }
            let case = format!("full ({capacity}), TTL expiry, {}", how(batched));
            report(&case, rest.len(), started);
        }
    }
}

/// A store at its capacity evicting its oldest completed keys (TTL far off).
#[tokio::test]
#[ignore = "timing figures; run in release"]
async fn evicting() {
    let store = sized(100_000, DEFAULT_TTL);
    let keys = ids(N);
    let started = Clock::now();
    run(&store, &keys, false).await;
    report("1M ids through capacity 100k (evicting)", N, started);
}

/// A full store whose completed keys run out one at a time (a store sized to its TTL): each
/// new key finds one expired entry to drop.
#[tokio::test(start_paused = true)]
#[ignore = "timing figures; run in release"]
async fn expiring_one_by_one() {
    let capacity = 100_000;
    let store = sized(capacity, Duration::from_millis(capacity as u64));
    let keys = ids(capacity + 20_000);
    let (fill, rest) = keys.split_at(capacity);
    for k in fill {
        run(&store, std::slice::from_ref(k), false).await;
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let started = Clock::now();
    for k in rest {
        run(&store, std::slice::from_ref(k), false).await;
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    report(
        "full (100k), one key expiring per new key",
        rest.len(),
        started,
    );
    assert_eq!(store.len(), capacity);
}
