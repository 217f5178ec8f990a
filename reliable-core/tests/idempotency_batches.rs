//! The batch calls of [`IdempotencyStore`] answer exactly what the single calls, made one after
//! the other, answer: a property over random sequences of batches, on the in-memory store and
//! on the trait's default (looping) implementation; and a failed default batch holds no key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use reliable_core::idempotency::{
    Completion, IdempotencyStore, InMemoryIdempotencyStore, InMemoryStoreConfig, LeaseToken,
    Renewal, Reservation, StoreError,
};
use reliable_core::message::IdempotencyKey;

/// A store that only has the single calls (the trait's default batches), delegating to an
/// in-memory store; its `reserve` fails from the `fail_at`-th call on.
struct SinglesOnly {
    inner: InMemoryIdempotencyStore,
    reserves: AtomicUsize,
    fail_at: usize,
}

impl SinglesOnly {
    fn new(fail_at: usize) -> Self {
        Self {
            inner: InMemoryIdempotencyStore::default(),
            reserves: AtomicUsize::new(0),
            fail_at,
        }
    }
}

#[async_trait]
impl IdempotencyStore for SinglesOnly {
    fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease_duration()
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        if self.reserves.fetch_add(1, Ordering::SeqCst) + 1 >= self.fail_at {
            return Err(StoreError::Unavailable {
                reason: "test: the store went away".into(),
            });
        }
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
        self.inner.complete(key, token).await
    }
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

fn key(side: char, i: usize) -> IdempotencyKey {
    IdempotencyKey::new(format!("{side}{i}")).expect("a valid key")
}

/// One step of a run: the same on both sides.
#[derive(Clone, Debug)]
enum Step {
    /// A `reserve_many` of these keys (indices, repeats allowed).
    Reserve(Vec<usize>),
    /// A `complete_many` of these keys, each under the token of the n-th reservation so far
    /// (`None`: a token no reservation was given).
    Complete(Vec<(usize, Option<usize>)>),
    /// A single `release` of a key under the n-th reservation's token.
    Release(usize, usize),
}

const KEYS: usize = 4;

fn step() -> impl Strategy<Value = Step> {
    let k = 0..KEYS;
    prop_oneof![
        2 => prop::collection::vec(k.clone(), 1..7).prop_map(Step::Reserve),
        2 => prop::collection::vec((k.clone(), prop::option::weighted(0.8, 0..64usize)), 1..7)
            .prop_map(Step::Complete),
        1 => (k, 0..64usize).prop_map(|(k, t)| Step::Release(k, t)),
    ]
}

/// The tokens one side's reservations were given, in order.
#[derive(Default)]
struct Tokens(Vec<LeaseToken>);

impl Tokens {
    fn pick(&self, n: Option<usize>) -> LeaseToken {
        match n {
            Some(n) if !self.0.is_empty() => self.0[n % self.0.len()],
            _ => LeaseToken::generate(),
        }
    }
}

/// Runs `steps` on `store`: side `b` through the batch calls, side `s` through the single
/// calls one after the other; fails on the first answer that differs.
async fn run(store: &dyn IdempotencyStore, steps: &[Step]) -> Result<(), TestCaseError> {
    let (mut tb, mut ts) = (Tokens::default(), Tokens::default());
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Reserve(picks) => {
                let keys: Vec<_> = picks.iter().map(|i| key('b', *i)).collect();
                let batch = store.reserve_many(&keys).await.expect("in memory");
                let mut singles = Vec::new();
                for i in picks {
                    singles.push(store.reserve(&key('s', *i)).await.expect("in memory"));
                }
                prop_assert_eq!(batch.len(), singles.len());
                for (b, s) in batch.iter().zip(&singles) {
                    match (b, s) {
                        (Reservation::New(x), Reservation::New(y)) => {
                            tb.0.push(*x);
                            ts.0.push(*y);
                        }
                        _ => prop_assert_eq!(b, s, "step {}: {:?} vs {:?}", n, batch, singles),
                    }
                }
            }
            Step::Complete(picks) => {
                let pairs: Vec<_> = picks
                    .iter()
                    .map(|(i, t)| (key('b', *i), tb.pick(*t)))
                    .collect();
                let batch = store.complete_many(&pairs).await.expect("in memory");
                let mut singles = Vec::new();
                for (i, t) in picks {
                    let s = store.complete(&key('s', *i), ts.pick(*t)).await;
                    singles.push(s.expect("in memory"));
                }
                prop_assert_eq!(&batch, &singles, "step {}", n);
            }
            Step::Release(i, t) => {
                store
                    .release(&key('b', *i), tb.pick(Some(*t)))
                    .await
                    .expect("in memory");
                store
                    .release(&key('s', *i), ts.pick(Some(*t)))
                    .await
                    .expect("in memory");
            }
        }
    }
    Ok(())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The in-memory store's one-lock batches.
    #[test]
    fn in_memory_batches_answer_what_the_single_calls_answer(
        steps in prop::collection::vec(step(), 1..40)
    ) {
        let store = InMemoryIdempotencyStore::default();
        block_on(run(&store, &steps))?;
    }

    /// The trait's default batches (a loop over the single calls), reached through `Arc`.
    #[test]
    fn default_batches_answer_what_the_single_calls_answer(
        steps in prop::collection::vec(step(), 1..40)
    ) {
        let store = Arc::new(SinglesOnly::new(usize::MAX));
        block_on(run(&store, &steps))?;
    }
}

/// A default batch that fails part-way releases what it reserved: the keys are free at once,
/// not only after their leases.
#[tokio::test]
async fn a_failed_default_batch_holds_no_key() {
    let store = SinglesOnly::new(3);
    let keys = [key('f', 0), key('f', 1), key('f', 2)];
    let error = store
        .reserve_many(&keys)
        .await
        .expect_err("the third fails");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    for k in &keys[..2] {
        assert!(store.inner.reserve(k).await.unwrap().is_new(), "{k} freed");
    }
}

/// The in-memory store refuses a batch that does not fit, and holds none of its keys after.
#[tokio::test]
async fn a_batch_that_does_not_fit_the_in_memory_store_holds_no_key() {
    let store = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        capacity: 2,
        ..InMemoryStoreConfig::default()
    });
    let keys = [key('c', 0), key('c', 1), key('c', 2)];
    assert_eq!(
        store.reserve_many(&keys).await,
        Err(StoreError::Full { capacity: 2 })
    );
    assert!(
        store.is_empty(),
        "the failed batch left {} keys",
        store.len()
    );
    let answers = store.reserve_many(&keys[..2]).await.unwrap();
    assert!(answers.iter().all(Reservation::is_new), "{answers:?}");
}
