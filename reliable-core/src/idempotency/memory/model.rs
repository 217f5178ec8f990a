//! A property: random runs of every call, with time passing and a store small enough to fill,
//! answer exactly what the plainest form of the store answers (a map from key text to entry,
//! scanned when full), and hold as many keys.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::MessageId;

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap_or_else(|_| IdempotencyKey::from(MessageId::new()))
}

/// The store's semantics in their plainest form: one map from key text to entry (so keys are
/// equal exactly when their texts are), expired entries dropped and the oldest completed keys
/// evicted by scanning it when full. Every answer (and the number of keys held) must match it,
/// call for call. Keys completed at the same instant are evicted in completion order.
struct Model {
    config: InMemoryStoreConfig,
    map: HashMap<String, (Entry, u64)>,
    writes: u64,
}

impl Model {
    fn live(&self, e: Entry, now: Instant) -> bool {
        match e {
            Entry::Reserved { until, .. } => now < until,
            Entry::Done { at, .. } => now.saturating_duration_since(at) < self.config.ttl,
        }
    }

    fn live_entry(&self, key: &str, now: Instant) -> Option<Entry> {
        self.map
            .get(key)
            .map(|(e, _)| *e)
            .filter(|e| self.live(*e, now))
    }

    fn put(&mut self, key: &str, entry: Entry, now: Instant) -> Result<(), StoreError> {
        if !self.map.contains_key(key) {
            let capacity = self.config.capacity.max(1);
            if self.map.len() >= capacity {
                let map = std::mem::take(&mut self.map);
                self.map = map
                    .into_iter()
                    .filter(|(_, (e, _))| self.live(*e, now))
                    .collect();
            }
            if self.map.len() >= capacity {
                let mut done: Vec<_> = self
                    .map
                    .iter()
                    .filter_map(|(k, (e, n))| match e {
                        Entry::Done { at, .. } => Some(((*at, *n), k.clone())),
                        Entry::Reserved { .. } => None,
                    })
                    .collect();
                if done.is_empty() {
                    return Err(StoreError::Full { capacity });
                }
                done.sort();
                for (_, k) in done.into_iter().take((capacity / 10).max(1)) {
                    self.map.remove(&k);
                }
            }
        }
        self.writes += 1;
        self.map.insert(key.to_owned(), (entry, self.writes));
        Ok(())
    }

    fn reserve(&mut self, key: &str, now: Instant) -> Result<Reservation, StoreError> {
        match self.live_entry(key, now) {
            Some(Entry::Done { .. }) => return Ok(Reservation::Duplicate),
            Some(Entry::Reserved { .. }) => return Ok(Reservation::InProgress),
            None => {}
        }
        let token = LeaseToken::generate();
        let until = now + self.config.lease;
        self.put(key, Entry::Reserved { until, token }, now)?;
        Ok(Reservation::New(token))
    }

    fn reserve_many(
        &mut self,
        keys: &[&str],
        now: Instant,
    ) -> Result<Vec<Reservation>, StoreError> {
        let mut answers = Vec::new();
        for key in keys {
            match self.reserve(key, now) {
                Ok(answer) => answers.push(answer),
                Err(error) => {
                    for (key, answer) in keys.iter().zip(&answers) {
                        if answer.is_new() {
                            self.map.remove(*key);
                        }
                    }
                    return Err(error);
                }
            }
        }
        Ok(answers)
    }

    fn complete(
        &mut self,
        key: &str,
        token: LeaseToken,
        now: Instant,
    ) -> Result<Completion, StoreError> {
        let answer = match self.live_entry(key, now) {
            Some(Entry::Done { token: t, .. }) => {
                return Ok(if t == token {
                    Completion::Recorded
                } else {
                    Completion::Superseded
                })
            }
            Some(Entry::Reserved { token: t, .. }) if t != token => Completion::Superseded,
            Some(Entry::Reserved { .. }) | None => Completion::Recorded,
        };
        self.put(key, Entry::Done { at: now, token }, now)?;
        Ok(answer)
    }

    fn renew(&mut self, key: &str, token: LeaseToken, now: Instant) -> Result<Renewal, StoreError> {
        let ours = match self.map.get(key).map(|(e, _)| *e) {
            Some(Entry::Reserved { token: t, .. }) => t == token,
            Some(e @ Entry::Done { token: t, .. }) if self.live(e, now) => {
                return Ok(if t == token {
                    Renewal::Renewed
                } else {
                    Renewal::Lost
                })
            }
            Some(Entry::Done { .. }) | None => true,
        };
        if !ours && self.live_entry(key, now).is_some() {
            return Ok(Renewal::Lost);
        }
        let until = now + self.config.lease;
        self.put(key, Entry::Reserved { until, token }, now)?;
        Ok(Renewal::Renewed)
    }

    fn release(&mut self, key: &str, token: LeaseToken) {
        if let Some((Entry::Reserved { token: t, .. }, _)) = self.map.get(key) {
            if *t == token {
                self.map.remove(key);
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// Reserve these keys: one `reserve_many`, or single calls.
    Reserve(Vec<usize>, bool),
    /// Complete these keys under the n-th reservation's token (`None`: a token never given),
    /// in one `complete_many` or single calls.
    Complete(Vec<(usize, Option<usize>)>, bool),
    Renew(usize, Option<usize>),
    Release(usize, Option<usize>),
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let k = 0..KEYS;
    let t = prop::option::weighted(0.9, 0..64usize);
    prop_oneof![
        3 => (prop::collection::vec(k.clone(), 1..5), any::<bool>()).prop_map(|(k, b)| Step::Reserve(k, b)),
        3 => (prop::collection::vec((k.clone(), t.clone()), 1..5), any::<bool>())
            .prop_map(|(k, b)| Step::Complete(k, b)),
        1 => (k.clone(), t.clone()).prop_map(|(k, t)| Step::Renew(k, t)),
        1 => (k, t).prop_map(|(k, t)| Step::Release(k, t)),
        2 => (0..2_500u64).prop_map(Step::Advance),
    ]
}

/// The keys of a run: an id, a business key with its text, that text in upper case, two other
/// ids and three plain business keys.
const KEYS: usize = 8;

fn keys() -> Vec<IdempotencyKey> {
    let id = MessageId::new();
    let mut keys = vec![
        IdempotencyKey::from(id),
        key(&id.to_string()),
        key(&id.to_string().to_uppercase()),
        IdempotencyKey::from(MessageId::new()),
        key(&MessageId::new().to_string()),
    ];
    keys.extend(["a", "b", "c"].map(key));
    keys
}

/// The n-th reservation's tokens on both sides, or one never given.
fn pick(tokens: &[(LeaseToken, LeaseToken)], n: Option<usize>) -> (LeaseToken, LeaseToken) {
    match n {
        Some(n) if !tokens.is_empty() => tokens[n % tokens.len()],
        _ => {
            let t = LeaseToken::generate();
            (t, t)
        }
    }
}

async fn run(capacity: usize, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let config = InMemoryStoreConfig {
        ttl: Duration::from_secs(5),
        lease: Duration::from_secs(2),
        capacity,
    };
    let store = InMemoryIdempotencyStore::new(config.clone());
    let mut model = Model {
        config,
        map: HashMap::new(),
        writes: 0,
    };
    let keys = keys();
    let mut tokens: Vec<(LeaseToken, LeaseToken)> = Vec::new();
    for (n, step) in steps.into_iter().enumerate() {
        let now = Instant::now();
        match step {
            Step::Reserve(picks, batch) => {
                let ks: Vec<_> = picks.iter().map(|i| keys[*i].clone()).collect();
                let texts: Vec<_> = ks.iter().map(IdempotencyKey::as_str).collect();
                // Per key: each single call's answer, or the batch's answers (all or none).
                let (got, want): (Vec<_>, Vec<_>) = if batch {
                    let split = |answers: Result<Vec<_>, StoreError>| match answers {
                        Ok(answers) => answers.into_iter().map(Ok).collect(),
                        Err(e) => vec![Err(e)],
                    };
                    (
                        split(store.reserve_many(&ks).await),
                        split(model.reserve_many(&texts, now)),
                    )
                } else {
                    let mut got = Vec::new();
                    for k in &ks {
                        got.push(store.reserve(k).await);
                    }
                    (got, texts.iter().map(|k| model.reserve(k, now)).collect())
                };
                prop_assert_eq!(got.len(), want.len(), "step {}", n);
                for (g, w) in got.iter().zip(&want) {
                    match (g, w) {
                        (Ok(Reservation::New(g)), Ok(Reservation::New(w))) => {
                            tokens.push((*g, *w));
                        }
                        _ => prop_assert_eq!(g, w, "step {}", n),
                    }
                }
            }
            Step::Complete(picks, batch) => {
                let pairs: Vec<_> = picks
                    .iter()
                    .map(|(k, t)| (&keys[*k], pick(&tokens, *t)))
                    .collect();
                if batch {
                    let ours: Vec<_> = pairs.iter().map(|(k, (t, _))| ((*k).clone(), *t)).collect();
                    let want: Result<Vec<_>, _> = pairs
                        .iter()
                        .map(|(k, (_, t))| model.complete(k.as_str(), *t, now))
                        .collect();
                    prop_assert_eq!(store.complete_many(&ours).await, want, "step {}", n);
                } else {
                    for (k, (ours, theirs)) in &pairs {
                        let got = store.complete(k, *ours).await;
                        prop_assert_eq!(
                            got,
                            model.complete(k.as_str(), *theirs, now),
                            "step {}",
                            n
                        );
                    }
                }
            }
            Step::Renew(k, t) => {
                let (ours, theirs) = pick(&tokens, t);
                let got = store.renew(&keys[k], ours).await;
                prop_assert_eq!(
                    got,
                    model.renew(keys[k].as_str(), theirs, now),
                    "step {}",
                    n
                );
            }
            Step::Release(k, t) => {
                let (ours, theirs) = pick(&tokens, t);
                store.release(&keys[k], ours).await.expect("in memory");
                model.release(keys[k].as_str(), theirs);
            }
            Step::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
        }
        prop_assert_eq!(store.len(), model.map.len(), "keys held after step {}", n);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random runs of every call, with time passing and a store small enough to fill, answer
    /// as the model does.
    #[test]
    fn answers_as_the_plain_map_did(
        capacity in 1..6usize,
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(run(capacity, steps))?;
    }
}
