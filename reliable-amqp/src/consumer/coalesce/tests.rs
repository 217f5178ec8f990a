//! The coalescer against a recording wire that models the broker's view of the channel: every
//! frame is checked as RabbitMQ would apply it, and a multiple ack that covers a delivery whose
//! ack was not asked for is a loss.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::{AckError, Acker};

use super::{AckCoalescing, Coalescer, Wire};

/// A frame as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64 },
    Reject { tag: u64 },
}

/// The broker's view of the channel, and what the application asked for.
#[derive(Default)]
struct Model {
    /// Delivered and not settled at the broker.
    outstanding: BTreeSet<u64>,
    /// Deliveries whose ack the application asked for.
    asked_ack: HashSet<u64>,
    /// Deliveries whose nack or reject the application asked for.
    asked_nack: HashSet<u64>,
    /// Settled at the broker by an ack / by a nack or reject.
    acked: HashSet<u64>,
    nacked: HashSet<u64>,
    frames: Vec<Frame>,
    violations: Vec<String>,
    /// Fail every write from now on, as a dead channel does.
    dead: bool,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Model>>);

impl Recorder {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.0.lock().unwrap()
    }

    fn write(&self, frame: Frame) -> Result<(), AckError> {
        let mut m = self.model();
        if m.dead {
            return Err(AckError::ConnectionLost {
                reason: "test: channel closed".into(),
            });
        }
        m.frames.push(frame);
        let (tag, covered): (u64, Vec<u64>) = match frame {
            Frame::Ack {
                tag,
                multiple: true,
            } => (tag, m.outstanding.range(..=tag).copied().collect()),
            Frame::Ack { tag, .. } | Frame::Nack { tag } | Frame::Reject { tag } => {
                (tag, vec![tag])
            }
        };
        if !m.outstanding.contains(&tag) {
            // RabbitMQ closes the channel: PRECONDITION_FAILED - unknown delivery tag.
            m.violations
                .push(format!("{frame:?}: unknown delivery tag {tag}"));
        }
        for t in covered {
            m.outstanding.remove(&t);
            match frame {
                Frame::Ack { .. } => {
                    if !m.asked_ack.contains(&t) {
                        m.violations.push(format!(
                            "{frame:?} acked {t}, whose ack was never asked for"
                        ));
                    }
                    m.acked.insert(t);
                }
                Frame::Nack { .. } | Frame::Reject { .. } => {
                    if !m.asked_nack.contains(&t) {
                        m.violations
                            .push(format!("{frame:?} of {t} never asked for"));
                    }
                    m.nacked.insert(t);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Wire for Recorder {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), AckError> {
        tokio::task::yield_now().await;
        self.write(Frame::Ack { tag, multiple })
    }
    async fn nack(&self, tag: u64, _requeue: bool) -> Result<(), AckError> {
        tokio::task::yield_now().await;
        self.write(Frame::Nack { tag })
    }
    async fn reject(&self, tag: u64) -> Result<(), AckError> {
        tokio::task::yield_now().await;
        self.write(Frame::Reject { tag })
    }
}

fn limits(max_delay_ms: u64, max_batch: u16) -> super::Limits {
    AckCoalescing::Multiple {
        max_delay: Duration::from_millis(max_delay_ms),
        max_batch,
    }
    .limits()
    .unwrap()
}

/// A coalescer over a recorder, with `n` deliveries (tags 1..=n) registered.
fn setup(n: u64, max_delay_ms: u64, max_batch: u16) -> (Recorder, Coalescer, Vec<Arc<dyn Acker>>) {
    let wire = Recorder::default();
    let coalescer = Coalescer::start(Arc::new(wire.clone()), limits(max_delay_ms, max_batch));
    let ackers = (1..=n)
        .map(|tag| {
            wire.model().outstanding.insert(tag);
            Arc::new(coalescer.register(tag)) as Arc<dyn Acker>
        })
        .collect();
    (wire, coalescer, ackers)
}

/// Acks delivery `tag` (1-based) in a task; the task checks that once the ack resolves, a
/// written frame settled it.
fn ack(
    wire: &Recorder,
    ackers: &[Arc<dyn Acker>],
    tag: u64,
) -> tokio::task::JoinHandle<Result<(), AckError>> {
    wire.model().asked_ack.insert(tag);
    let acker = ackers[usize::try_from(tag - 1).unwrap()].clone();
    let wire = wire.clone();
    tokio::spawn(async move {
        let result = acker.ack().await;
        if result.is_ok() {
            assert!(
                wire.model().acked.contains(&tag),
                "ack of {tag} resolved before it was written"
            );
        }
        result
    })
}

fn nack(
    wire: &Recorder,
    ackers: &[Arc<dyn Acker>],
    tag: u64,
) -> tokio::task::JoinHandle<Result<(), AckError>> {
    wire.model().asked_nack.insert(tag);
    let acker = ackers[usize::try_from(tag - 1).unwrap()].clone();
    let wire = wire.clone();
    tokio::spawn(async move {
        let result = acker.nack(true).await;
        if result.is_ok() {
            assert!(
                wire.model().nacked.contains(&tag),
                "nack of {tag} resolved before it was written"
            );
        }
        result
    })
}

async fn all_ok(tasks: Vec<tokio::task::JoinHandle<Result<(), AckError>>>) {
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(()));
    }
}

#[tokio::test]
async fn a_run_of_acks_goes_out_as_one_multiple_ack() {
    let (wire, _c, ackers) = setup(10, 3_600_000, 10);
    let tasks = (1..=10).map(|t| ack(&wire, &ackers, t)).collect();
    all_ok(tasks).await;
    let m = wire.model();
    assert_eq!(
        m.frames,
        vec![Frame::Ack {
            tag: 10,
            multiple: true
        }]
    );
    assert!(m.violations.is_empty(), "{:?}", m.violations);
}

#[tokio::test]
async fn a_full_batch_goes_out_without_waiting_for_the_delay() {
    let (wire, _c, ackers) = setup(8, 3_600_000, 4);
    let start = tokio::time::Instant::now();
    let tasks = (1..=8).map(|t| ack(&wire, &ackers, t)).collect();
    all_ok(tasks).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        start.elapsed()
    );
    assert!(wire.model().violations.is_empty());
}

#[tokio::test]
async fn acks_behind_an_unsettled_delivery_go_out_alone_and_never_cover_it() {
    let (wire, _c, ackers) = setup(5, 1, 64);
    let tasks = (2..=5).map(|t| ack(&wire, &ackers, t)).collect();
    all_ok(tasks).await;
    {
        let m = wire.model();
        assert!(m.violations.is_empty(), "{:?}", m.violations);
        assert!(m.outstanding.contains(&1), "1 was never settled");
        assert!(
            m.frames.iter().all(|f| matches!(
                f,
                Frame::Ack {
                    multiple: false,
                    ..
                }
            )),
            "{:?}",
            m.frames
        );
    }
    all_ok(vec![ack(&wire, &ackers, 1)]).await;
    assert!(wire.model().outstanding.is_empty());
}

#[tokio::test]
async fn a_nack_goes_out_first_and_alone_and_no_ack_covers_it_before() {
    let (wire, _c, ackers) = setup(6, 1, 64);
    let mut tasks: Vec<_> = (1..=2).map(|t| ack(&wire, &ackers, t)).collect();
    tasks.push(nack(&wire, &ackers, 3));
    tasks.extend((4..=6).map(|t| ack(&wire, &ackers, t)));
    all_ok(tasks).await;
    let m = wire.model();
    assert!(m.violations.is_empty(), "{:?}", m.violations);
    assert_eq!(m.frames[0], Frame::Nack { tag: 3 }, "{:?}", m.frames);
    assert!(m.outstanding.is_empty());
    assert!(m.nacked.contains(&3) && !m.acked.contains(&3));
}

#[tokio::test]
async fn nacks_and_rejects_go_out_in_the_order_asked() {
    let (wire, _c, ackers) = setup(4, 1, 64);
    for t in [3, 1, 4, 2] {
        wire.model().asked_nack.insert(t);
    }
    let (a3, a1, a4, a2) = (
        ackers[2].clone(),
        ackers[0].clone(),
        ackers[3].clone(),
        ackers[1].clone(),
    );
    let (r3, r1, r4, r2) = tokio::join!(a3.nack(false), a1.reject(), a4.nack(true), a2.reject());
    assert_eq!((r3, r1, r4, r2), (Ok(()), Ok(()), Ok(()), Ok(())));
    let m = wire.model();
    assert_eq!(
        m.frames,
        vec![
            Frame::Nack { tag: 3 },
            Frame::Reject { tag: 1 },
            Frame::Nack { tag: 4 },
            Frame::Reject { tag: 2 }
        ]
    );
}

#[tokio::test]
async fn closing_writes_every_ack_asked_for_and_later_ones_fail() {
    let (wire, coalescer, ackers) = setup(5, 3_600_000, 64);
    let tasks: Vec<_> = [1, 2, 4]
        .into_iter()
        .map(|t| ack(&wire, &ackers, t))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(wire.model().frames.is_empty(), "nothing due yet");
    coalescer.close().await;
    all_ok(tasks).await;
    {
        let m = wire.model();
        assert!(m.violations.is_empty(), "{:?}", m.violations);
        assert_eq!(m.outstanding, BTreeSet::from([3, 5]));
    }
    let late = ackers[4].ack().await;
    assert!(
        matches!(late, Err(AckError::ConnectionLost { .. })),
        "{late:?}"
    );
}

#[tokio::test]
async fn dropping_the_coalescer_flushes_what_was_acked() {
    let (wire, coalescer, ackers) = setup(3, 3_600_000, 64);
    let tasks: Vec<_> = (1..=3).map(|t| ack(&wire, &ackers, t)).collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(coalescer);
    all_ok(tasks).await;
    assert!(wire.model().outstanding.is_empty());
}

#[tokio::test]
async fn a_dead_channel_fails_waiting_and_later_settles_as_connection_lost() {
    let (wire, _c, ackers) = setup(3, 1, 64);
    wire.model().dead = true;
    let first = ack(&wire, &ackers, 1).await.unwrap();
    assert!(
        matches!(first, Err(AckError::ConnectionLost { .. })),
        "{first:?}"
    );
    let later = ackers[1].nack(true).await;
    assert!(
        matches!(later, Err(AckError::ConnectionLost { .. })),
        "{later:?}"
    );
}

#[tokio::test]
async fn a_second_settle_of_one_delivery_is_stale() {
    let (wire, _c, ackers) = setup(1, 1, 64);
    all_ok(vec![ack(&wire, &ackers, 1)]).await;
    let again = ackers[0].ack().await;
    assert!(matches!(again, Err(AckError::Stale { .. })), "{again:?}");
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Random settle orders, kinds and timings: no frame ever settles a delivery the application
/// did not settle that way, every settle resolves once written, and the held deliveries stay
/// outstanding.
#[tokio::test]
async fn random_settles_never_cover_an_unsettled_delivery() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed);
        let n = 1 + rng.below(80);
        let (wire, coalescer, ackers) = setup(n, 1 + rng.below(3), 1 + rng.below(16) as u16);
        let mut tasks = Vec::new();
        let mut held = BTreeSet::new();
        for tag in 1..=n {
            let acker = ackers[usize::try_from(tag - 1).unwrap()].clone();
            let kind = rng.below(10);
            let wait = Duration::from_micros(rng.below(4000));
            match kind {
                0 => {
                    held.insert(tag);
                    continue;
                }
                1 | 2 => wire.model().asked_nack.insert(tag),
                _ => wire.model().asked_ack.insert(tag),
            };
            let w = wire.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let result = match kind {
                    1 => acker.nack(true).await,
                    2 => acker.reject().await,
                    _ => acker.ack().await,
                };
                let m = w.model();
                assert!(
                    !m.outstanding.contains(&tag),
                    "seed {seed}: {tag} resolved unwritten"
                );
                result
            }));
        }
        all_ok(tasks).await;
        coalescer.close().await;
        let m = wire.model();
        assert!(
            m.violations.is_empty(),
            "seed {seed}: {:?} in {:?}",
            m.violations,
            m.frames
        );
        assert_eq!(m.outstanding, held, "seed {seed}: {:?}", m.frames);
    }
}

/// The default writes an ack as soon as the writer is free: a pipeline that holds fewer
/// deliveries than a batch (each waiting for its ack before taking the next) never waits for a
/// timer, so sixteen acks in sequence take no time at all (paused clock).
#[tokio::test(start_paused = true)]
async fn by_default_acks_in_sequence_wait_for_no_timer() {
    let wire = Recorder::default();
    let limits = AckCoalescing::DEFAULT.limits().unwrap();
    let coalescer = Coalescer::start(Arc::new(wire.clone()), limits);
    let started = tokio::time::Instant::now();
    for tag in 1..=16 {
        wire.model().outstanding.insert(tag);
        wire.model().asked_ack.insert(tag);
        coalescer.register(tag).ack().await.unwrap();
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(wire.model().acked.len(), 16);
}
