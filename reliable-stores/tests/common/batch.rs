//! What every store's batch calls (`reserve_many`, `complete_many`) must answer, run against
//! each real store: per key exactly what the single calls made one after the other answer.

use std::sync::Arc;

use reliable_core::idempotency::{Completion, IdempotencyStore, LeaseToken, Reservation};
use reliable_core::message::IdempotencyKey;

/// Hand-picked cases: a key twice in one batch, keys held and done, completions under the
/// holder's token, a stranger's token and twice in one batch, and empty batches.
pub async fn cases(store: &dyn IdempotencyStore) {
    assert_eq!(store.reserve_many(&[]).await.unwrap(), vec![]);
    assert_eq!(store.complete_many(&[]).await.unwrap(), vec![]);

    let (a, b, held, done) = (
        super::key("batch-a"),
        super::key("batch-b"),
        super::key("batch-held"),
        super::key("batch-done"),
    );
    let holder = super::new(store, &held).await;
    let t = super::new(store, &done).await;
    store.complete(&done, t).await.unwrap();

    let answers = store
        .reserve_many(&[
            a.clone(),
            held.clone(),
            a.clone(),
            done.clone(),
            b.clone(),
            done.clone(),
            a.clone(),
        ])
        .await
        .unwrap();
    let (ta, tb) = match (answers[0], answers[4]) {
        (Reservation::New(ta), Reservation::New(tb)) => (ta, tb),
        other => panic!("a and b are free: {other:?} in {answers:?}"),
    };
    assert_ne!(ta, tb, "a token per reservation");
    assert_eq!(
        answers,
        vec![
            Reservation::New(ta),
            Reservation::InProgress,
            Reservation::InProgress, // a's second copy: a is held by its first
            Reservation::Duplicate,
            Reservation::New(tb),
            Reservation::Duplicate,
            Reservation::InProgress,
        ]
    );
    assert_eq!(store.reserve(&a).await.unwrap(), Reservation::InProgress);

    let stranger = LeaseToken::generate();
    let answers = store
        .complete_many(&[
            (a.clone(), ta),
            (a.clone(), ta),       // a retry within the batch
            (a.clone(), stranger), // done under ta already
            (held.clone(), stranger),
            (b.clone(), tb),
            (done.clone(), t),
        ])
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![
            Completion::Recorded,
            Completion::Recorded,
            Completion::Superseded,
            Completion::Superseded, // held under `holder`: recorded all the same
            Completion::Recorded,
            Completion::Recorded,
        ]
    );
    for k in [&a, &b, &held, &done] {
        assert_eq!(store.reserve(k).await.unwrap(), Reservation::Duplicate);
    }
    // The holder whose key was completed by a stranger: its own completion says so.
    assert_eq!(
        store.complete(&held, holder).await.unwrap(),
        Completion::Superseded
    );
    // Completing the whole batch again (a retry after a lost answer) lands the same way.
    assert_eq!(
        store
            .complete_many(&[(a.clone(), ta), (b.clone(), tb)])
            .await
            .unwrap(),
        vec![Completion::Recorded, Completion::Recorded]
    );
}

/// A small deterministic generator (xorshift64*): the same seed gives the same run.
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed` (0 is replaced, xorshift needs a set bit).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x % n as u64) as usize
    }
}

/// Which token a completion or release names.
#[derive(Clone, Copy, Debug)]
enum Pick {
    /// The token of the `i`-th reservation made so far (modulo their number).
    Issued(usize),
    /// A token no reservation was given.
    Stranger,
}

/// One side of the comparison: a set of keys, and the tokens its reservations were given.
struct Side {
    keys: Vec<IdempotencyKey>,
    tokens: Vec<LeaseToken>,
}

impl Side {
    fn token(&self, pick: Pick) -> LeaseToken {
        match pick {
            Pick::Issued(i) if !self.tokens.is_empty() => self.tokens[i % self.tokens.len()],
            _ => LeaseToken::generate(),
        }
    }
}

/// Runs `steps` random steps with `seed` on two sets of `keys` keys of `store`: each batch goes
/// to one set as one `reserve_many` / `complete_many` call, and to the other as the same single
/// calls one after the other; the answers must be the same (tokens compared by the reservation
/// they name). Releases and single completions in between vary the states the batches meet.
pub async fn matches_singles(
    store: Arc<dyn IdempotencyStore>,
    seed: u64,
    steps: usize,
    keys: usize,
) {
    let mut rng = Rng::new(seed);
    let name = |side: &str, i: usize| super::key(&format!("prop-{seed}-{side}{i}"));
    let mut batched = Side {
        keys: (0..keys).map(|i| name("b", i)).collect(),
        tokens: Vec::new(),
    };
    let mut single = Side {
        keys: (0..keys).map(|i| name("s", i)).collect(),
        tokens: Vec::new(),
    };
    let mut log: Vec<String> = Vec::new();
    for step in 0..steps {
        let len = 1 + rng.below(6);
        match rng.below(5) {
            0 | 1 => {
                let picks: Vec<usize> = (0..len).map(|_| rng.below(keys)).collect();
                log.push(format!("{step}: reserve_many {picks:?}"));
                let b_keys: Vec<IdempotencyKey> =
                    picks.iter().map(|i| batched.keys[*i].clone()).collect();
                let b = store.reserve_many(&b_keys).await.unwrap();
                let mut s = Vec::with_capacity(len);
                for i in &picks {
                    s.push(store.reserve(&single.keys[*i]).await.unwrap());
                }
                assert_eq!(b.len(), s.len(), "one answer per key; {log:#?}");
                for (x, y) in b.iter().zip(&s) {
                    match (x, y) {
                        (Reservation::New(tb), Reservation::New(ts)) => {
                            batched.tokens.push(*tb);
                            single.tokens.push(*ts);
                        }
                        _ => assert_eq!(x, y, "batch {b:?} singles {s:?}; {log:#?}"),
                    }
                }
            }
            2 | 3 => {
                let picks: Vec<(usize, Pick)> = (0..len)
                    .map(|_| {
                        let pick = if rng.below(4) == 0 {
                            Pick::Stranger
                        } else {
                            Pick::Issued(rng.below(64))
                        };
                        (rng.below(keys), pick)
                    })
                    .collect();
                log.push(format!("{step}: complete_many {picks:?}"));
                let b_pairs: Vec<(IdempotencyKey, LeaseToken)> = picks
                    .iter()
                    .map(|(i, p)| (batched.keys[*i].clone(), batched.token(*p)))
                    .collect();
                let b = store.complete_many(&b_pairs).await.unwrap();
                let mut s = Vec::with_capacity(len);
                for (i, p) in &picks {
                    s.push(
                        store
                            .complete(&single.keys[*i], single.token(*p))
                            .await
                            .unwrap(),
                    );
                }
                assert_eq!(b, s, "{log:#?}");
            }
            _ => {
                // Free a key again (or not, under a stranger's token), so batches meet free,
                // held and done keys alike.
                let (i, pick) = (rng.below(keys), Pick::Issued(rng.below(64)));
                log.push(format!("{step}: release {i} {pick:?}"));
                store
                    .release(&batched.keys[i], batched.token(pick))
                    .await
                    .unwrap();
                store
                    .release(&single.keys[i], single.token(pick))
                    .await
                    .unwrap();
            }
        }
    }
    // The two sets end in the same states.
    let b = store.reserve_many(&batched.keys).await.unwrap();
    let mut s = Vec::new();
    for k in &single.keys {
        s.push(store.reserve(k).await.unwrap());
    }
    let shape = |r: &Reservation| std::mem::discriminant(r);
    assert_eq!(
        b.iter().map(shape).collect::<Vec<_>>(),
        s.iter().map(shape).collect::<Vec<_>>(),
        "{log:#?}"
    );
}

/// Tasks over two instances reserve overlapping batches, in different orders, at once: every
/// key has exactly one winner, no batch fails (two batches sharing keys must not deadlock),
/// and the winners' completions all land as their own.
pub async fn race(a: Arc<dyn IdempotencyStore>, b: Arc<dyn IdempotencyStore>) {
    let keys: Vec<IdempotencyKey> = (0..24).map(|i| super::key(&format!("brace{i}"))).collect();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        let mut mine = keys.clone();
        let mut rng = Rng::new(t + 1);
        for i in (1..mine.len()).rev() {
            mine.swap(i, rng.below(i + 1));
        }
        tasks.push(tokio::spawn(async move {
            let answers = store.reserve_many(&mine).await.unwrap();
            let won: Vec<(IdempotencyKey, LeaseToken)> = mine
                .into_iter()
                .zip(answers)
                .filter_map(|(k, r)| r.token().map(|t| (k, t)))
                .collect();
            let completions = store.complete_many(&won).await.unwrap();
            assert!(
                completions.iter().all(|c| *c == Completion::Recorded),
                "{completions:?}"
            );
            won.into_iter()
                .map(|(k, _)| k.as_str().to_owned())
                .collect::<Vec<_>>()
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    winners.sort();
    let before = winners.len();
    winners.dedup();
    assert_eq!(before, winners.len(), "a key won twice");
    assert_eq!(winners.len(), keys.len(), "a key nobody won");
}
