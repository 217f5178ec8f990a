//! The ack coalescer: one per consumer channel, it turns the acks of many deliveries into few
//! `basic.ack` frames with `multiple=true`, without ever acknowledging a delivery whose handler
//! has not finished (invariant 4, loss-matrix row L4).
//!
//! # Design
//!
//! An AMQP `basic.ack` with `multiple=true` and delivery tag `T` settles **every** unacked
//! delivery of the channel up to `T`. One frame can thus replace many, but sent carelessly it
//! would also settle a delivery still being processed, which the broker then never redelivers
//! if the consumer dies: a lost message. The coalescer therefore keeps, per channel:
//!
//! * **Slots by delivery tag.** The consumer registers each delivery's tag before handing the
//!   delivery out, so the coalescer knows every tag the broker holds unacked on the channel.
//!   A slot is *open* (not settled), *acked* (its ack was asked for and waits to be written),
//!   or *settling* (a nack or reject was asked for). A slot is removed once the frame that
//!   settles it was written; a delivery dropped without being settled keeps its open slot
//!   until the channel goes, so no ack ever covers it (the broker redelivers it when the
//!   channel closes).
//! * **The contiguous run.** The acked slots at the front of the map, up to the first slot that
//!   is not acked, are the only ones a `multiple=true` ack may cover: below its tag every
//!   delivery the broker still holds is one whose ack was asked for.
//! * **Nacks and rejects first, in order.** They are written one by one, each `multiple=false`,
//!   in the order they were asked for, before any ack is computed; while one waits, its slot
//!   (settling, not acked) ends the run, so no multiple ack can cover it before it is written.
//!   Once written the broker has settled it, so a later multiple ack above it is harmless.
//! * **When the run goes out.** One driver task per channel writes the frames. By default
//!   (`max_delay` zero) it writes the run whenever it is free: acks asked for while a frame is
//!   being written share the next frame, and no ack waits for company. With a `max_delay`, it
//!   flushes the run as soon as it holds `max_batch` acks, and otherwise at most `max_delay`
//!   after the oldest ack waiting was asked for. An ack stuck behind an open slot (a slower handler
//!   before it) cannot join a run: once it has waited `max_delay` it is written alone
//!   (`multiple=false`), so no ack waits longer than that for a slow neighbour.
//! * **Acks resolve when written.** Each [`Acker::ack`] waits until the frame that covers it
//!   was written to the connection (lapin resolves a `basic.ack` then), and answers that
//!   frame's result: a channel that died answers [`AckError::ConnectionLost`], as an
//!   individual ack does. After a failed write every waiting and later settle on the channel
//!   fails the same way (the broker redelivers those messages).
//! * **Close and drop flush.** Closing the consumer (or dropping it, or losing its stream)
//!   writes every ack asked for so far — the run as one frame, the rest one by one — before
//!   the channel closes; acks asked for afterwards answer `ConnectionLost`, as they would on
//!   a closed channel.
//!
//! [`AckCoalescing::Off`] turns all of this off: every delivery then settles through lapin's
//! own acker, one `basic.ack` (`multiple=false`) per delivery.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use reliable_core::{AckError, Acker};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::acker::SETTLE_TIMEOUT;
use crate::connect::retryable;

/// How a consumer acknowledges its deliveries on the wire. The default is
/// [`AckCoalescing::DEFAULT`]: coalesced, each run written as soon as the writer is free.
///
/// ```
/// use std::time::Duration;
/// use reliable_amqp::consumer::AckCoalescing;
///
/// assert_eq!(AckCoalescing::default(), AckCoalescing::DEFAULT);
/// let slower = AckCoalescing::Multiple { max_delay: Duration::from_millis(5), max_batch: 256 };
/// # let _ = slower;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCoalescing {
    /// One `basic.ack` per delivery, written when the pipeline settles it.
    Off,
    /// Acks coalesced into `basic.ack` frames with `multiple=true`, each covering the highest
    /// run of deliveries that are all acked (see the [module docs](self)). Nacks and rejects
    /// are always written alone, first and in order.
    Multiple {
        /// The longest an ack waits to be written; also how long an ack stuck behind an
        /// unsettled delivery waits before it is written alone. Zero: written as soon as the
        /// channel's writer is free (the default).
        max_delay: Duration,
        /// A run of this many acks is written at once, without waiting. Zero counts as 1.
        max_batch: u16,
    },
}

impl AckCoalescing {
    /// The default: coalesced without waiting. The run of acks goes out as soon as the
    /// channel's writer is free, so acks asked for while a frame is being written share the
    /// next one; an ack behind an unsettled delivery goes out alone at once. No ack waits for
    /// company, so a pipeline whose concurrency is smaller than a batch never stalls on a
    /// timer.
    pub const DEFAULT: Self = Self::Multiple {
        max_delay: Duration::ZERO,
        max_batch: 64,
    };

    /// The limits of a coalescing setting, or `None` for [`Off`](Self::Off).
    pub(super) fn limits(self) -> Option<Limits> {
        match self {
            Self::Off => None,
            Self::Multiple {
                max_delay,
                max_batch,
            } => Some(Limits {
                max_delay,
                max_batch: usize::from(max_batch.max(1)),
            }),
        }
    }
}

impl Default for AckCoalescing {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The coalescer's limits (see [`AckCoalescing::Multiple`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    max_delay: Duration,
    max_batch: usize,
}

/// What the driver writes: the channel, or a recorder in the unit tests.
#[async_trait]
pub(super) trait Wire: Send + Sync + 'static {
    /// `basic.ack` of `tag` (and, with `multiple`, of every unacked delivery below it).
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), AckError>;
    /// `basic.nack` of `tag` alone.
    async fn nack(&self, tag: u64, requeue: bool) -> Result<(), AckError>;
    /// `basic.reject` of `tag`, without requeue.
    async fn reject(&self, tag: u64) -> Result<(), AckError>;
}

/// Runs one settle frame on the channel, bounded by [`SETTLE_TIMEOUT`].
async fn settle(
    operation: &str,
    call: impl std::future::Future<Output = lapin::Result<()>>,
) -> Result<(), AckError> {
    match tokio::time::timeout(SETTLE_TIMEOUT, call).await {
        Err(_) => Err(AckError::ConnectionLost {
            reason: format!("{operation}: no progress within {SETTLE_TIMEOUT:?}"),
        }),
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) if retryable(&error) => Err(AckError::ConnectionLost {
            reason: format!("{operation}: {error}"),
        }),
        Ok(Err(error)) => Err(AckError::Other {
            reason: format!("{operation}: {error}"),
        }),
    }
}

#[async_trait]
impl Wire for lapin::Channel {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), AckError> {
        settle(
            "basic.ack",
            self.basic_ack(tag, BasicAckOptions { multiple }),
        )
        .await
    }

    async fn nack(&self, tag: u64, requeue: bool) -> Result<(), AckError> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        settle("basic.nack", self.basic_nack(tag, options)).await
    }

    async fn reject(&self, tag: u64) -> Result<(), AckError> {
        let options = BasicRejectOptions { requeue: false };
        settle("basic.reject", self.basic_reject(tag, options)).await
    }
}

/// Where a settle's result goes.
type Done = oneshot::Sender<Result<(), AckError>>;

/// A delivery the broker holds unacked on the channel, by what was asked of it.
enum Slot {
    /// Not settled yet: no ack may cover it.
    Open,
    /// Its ack was asked for at `since` and waits to be written.
    Acked { since: Instant, done: Done },
    /// A nack or reject was asked for and waits in [`State::settles`].
    Settling,
}

/// A nack or reject to write.
struct Settle {
    tag: u64,
    /// `Some(requeue)` for a nack, `None` for a reject.
    nack: Option<bool>,
    done: Done,
}

/// The coalescer's state, shared by the consumer, the ackers and the driver.
#[derive(Default)]
struct State {
    slots: BTreeMap<u64, Slot>,
    /// Nacks and rejects in the order they were asked for.
    settles: VecDeque<Settle>,
    /// How many slots are [`Slot::Acked`].
    acked: usize,
    /// When the oldest ack waiting was asked for (a bound, refreshed at each flush).
    oldest: Option<Instant>,
    /// Flush everything, then stop (the consumer closed or went away).
    closing: bool,
    /// Why nothing more can be written, once the channel failed or the coalescer stopped.
    gone: Option<String>,
    /// Told when the closing flush is done.
    closed: Vec<oneshot::Sender<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    limits: Limits,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The coalescer of one channel, held by the consumer. Dropping it flushes what was settled
/// and stops the driver.
pub(super) struct Coalescer {
    shared: Arc<Shared>,
}

impl Coalescer {
    /// Starts the driver of a channel on the current Tokio runtime.
    pub(super) fn start(wire: Arc<dyn Wire>, limits: Limits) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            limits,
        });
        tokio::spawn(drive(shared.clone(), wire));
        Self { shared }
    }

    /// Registers a delivery the broker handed out on the channel; its acker settles it here.
    /// Must be called before the delivery is handed on, in delivery order.
    pub(super) fn register(&self, tag: u64) -> CoalescedAcker {
        self.shared.lock().slots.insert(tag, Slot::Open);
        CoalescedAcker {
            shared: self.shared.clone(),
            tag,
            used: AtomicBool::new(false),
        }
    }

    /// Writes every ack asked for so far and stops the driver; returns once that is done
    /// (at most [`SETTLE_TIMEOUT`] per remaining frame).
    pub(super) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if state.gone.is_some() {
                return;
            }
            state.closing = true;
            state.closed.push(tx);
        }
        self.shared.wake.notify_one();
        let _ = tokio::time::timeout(SETTLE_TIMEOUT.saturating_mul(2), rx).await;
    }
}

impl Drop for Coalescer {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

/// Settles one delivery through its channel's [`Coalescer`].
pub(super) struct CoalescedAcker {
    shared: Arc<Shared>,
    tag: u64,
    used: AtomicBool,
}

impl CoalescedAcker {
    /// Hands the coalescer one settle of this delivery and waits for the frame that carries
    /// it to be written.
    async fn request(&self, operation: &str, nack: Option<Option<bool>>) -> Result<(), AckError> {
        if self.used.swap(true, Ordering::SeqCst) {
            return Err(AckError::Stale {
                reason: format!("{operation}: the delivery was already settled"),
            });
        }
        let (done, answer) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.gone {
                return Err(AckError::ConnectionLost {
                    reason: format!("{operation}: {reason}"),
                });
            }
            let Some(slot) = state.slots.get_mut(&self.tag) else {
                return Err(AckError::Stale {
                    reason: format!("{operation}: the delivery is not outstanding"),
                });
            };
            let notify = match nack {
                None => {
                    *slot = Slot::Acked {
                        since: Instant::now(),
                        done,
                    };
                    state.acked += 1;
                    if state.oldest.is_none() {
                        state.oldest = Some(Instant::now());
                    }
                    // The driver sleeps until the oldest ack's deadline: wake it for the
                    // first ack (to arm it), whenever a full batch may be ready, and for every
                    // ack when acks do not wait.
                    self.shared.limits.max_delay.is_zero()
                        || state.acked == 1
                        || state.acked.is_multiple_of(self.shared.limits.max_batch)
                }
                Some(requeue) => {
                    *slot = Slot::Settling;
                    state.settles.push_back(Settle {
                        tag: self.tag,
                        nack: requeue,
                        done,
                    });
                    true
                }
            };
            drop(state);
            if notify {
                self.shared.wake.notify_one();
            }
        }
        let limit = SETTLE_TIMEOUT.saturating_mul(2) + self.shared.limits.max_delay;
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AckError::ConnectionLost {
                reason: format!("{operation}: the channel's ack writer stopped"),
            }),
            Err(_) => Err(AckError::ConnectionLost {
                reason: format!("{operation}: not written within {limit:?}"),
            }),
        }
    }
}

#[async_trait]
impl Acker for CoalescedAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.request("basic.ack", None).await
    }

    /// Written alone (`multiple=false`), before any ack asked for after it.
    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        self.request("basic.nack", Some(Some(requeue))).await
    }

    /// Written alone, before any ack asked for after it.
    async fn reject(&self) -> Result<(), AckError> {
        self.request("basic.reject", Some(None)).await
    }
}

/// The frames one pass of the driver writes.
#[derive(Default)]
struct Plan {
    /// The highest tag of the run, how many acks it holds, and their waiters.
    run: Option<(u64, usize, Vec<Done>)>,
    /// Acks behind an open slot that waited long enough: written alone.
    alone: Vec<(u64, Done)>,
}

impl State {
    /// Takes out of the slots the acks to write now: the run when it is full, when its oldest
    /// ack is due, or when closing; and the acks behind an open slot that are due.
    fn plan(&mut self, now: Instant, limits: Limits) -> Plan {
        let mut plan = Plan::default();
        if self.acked == 0 {
            self.oldest = None;
            return plan;
        }
        let due = self.closing || self.oldest.is_some_and(|t| now >= t + limits.max_delay);
        let full = self
            .slots
            .values()
            .take_while(|slot| matches!(slot, Slot::Acked { .. }))
            .take(limits.max_batch)
            .count()
            >= limits.max_batch;
        if !due && !full {
            return plan;
        }
        // The whole run, up to the first slot that is not acked.
        let mut waiters = Vec::new();
        let mut highest = 0;
        while let Some(entry) = self.slots.first_entry() {
            if !matches!(entry.get(), Slot::Acked { .. }) {
                break;
            }
            let (tag, slot) = entry.remove_entry();
            if let Slot::Acked { done, .. } = slot {
                highest = tag;
                waiters.push(done);
            }
        }
        self.acked -= waiters.len();
        if !waiters.is_empty() {
            plan.run = Some((highest, waiters.len(), waiters));
        }
        if due {
            let stuck: Vec<u64> = self
                .slots
                .iter()
                .filter(|(_, slot)| match slot {
                    Slot::Acked { since, .. } => self.closing || now >= *since + limits.max_delay,
                    Slot::Open | Slot::Settling => false,
                })
                .map(|(tag, _)| *tag)
                .collect();
            for tag in stuck {
                if let Some(Slot::Acked { done, .. }) = self.slots.remove(&tag) {
                    self.acked -= 1;
                    plan.alone.push((tag, done));
                }
            }
        }
        self.oldest = self
            .slots
            .values()
            .filter_map(|slot| match slot {
                Slot::Acked { since, .. } => Some(*since),
                Slot::Open | Slot::Settling => None,
            })
            .min();
        plan
    }

    /// After a failed write, or once closed: nothing more can be written on the channel. Every
    /// waiting settle fails with `reason`, and so does every later one.
    fn fail_all(&mut self, reason: &str) {
        self.gone = Some(reason.to_owned());
        let lost = || {
            Err(AckError::ConnectionLost {
                reason: reason.to_owned(),
            })
        };
        for (_, slot) in std::mem::take(&mut self.slots) {
            if let Slot::Acked { done, .. } = slot {
                let _ = done.send(lost());
            }
        }
        for settle in self.settles.drain(..) {
            let _ = settle.done.send(lost());
        }
        self.acked = 0;
        self.oldest = None;
    }
}

/// Hands `result` to every waiter; a lost connection stops the channel's coalescer.
fn answer(shared: &Shared, result: &Result<(), AckError>, waiters: impl IntoIterator<Item = Done>) {
    for done in waiters {
        let _ = done.send(result.clone());
    }
    if let Err(AckError::ConnectionLost { reason }) = result {
        shared.lock().fail_all(reason);
    }
}

/// The driver of one channel: writes nacks and rejects first, then the due acks; sleeps until
/// the oldest ack is due or it is woken; stops after the closing flush.
async fn drive(shared: Arc<Shared>, wire: Arc<dyn Wire>) {
    loop {
        // Nacks and rejects, one at a time, in order.
        loop {
            let next = {
                let mut state = shared.lock();
                if state.gone.is_some() {
                    break;
                }
                state.settles.pop_front()
            };
            let Some(settle) = next else { break };
            let result = match settle.nack {
                Some(requeue) => wire.nack(settle.tag, requeue).await,
                None => wire.reject(settle.tag).await,
            };
            shared.lock().slots.remove(&settle.tag);
            answer(&shared, &result, [settle.done]);
        }
        let (plan, deadline, closing, gone) = {
            let mut state = shared.lock();
            let plan = if state.gone.is_some() {
                Plan::default()
            } else {
                state.plan(Instant::now(), shared.limits)
            };
            let deadline = state.oldest.map(|t| t + shared.limits.max_delay);
            (plan, deadline, state.closing, state.gone.is_some())
        };
        let wrote = plan.run.is_some() || !plan.alone.is_empty();
        if let Some((tag, count, waiters)) = plan.run {
            let result = wire.ack(tag, count > 1).await;
            answer(&shared, &result, waiters);
        }
        for (tag, done) in plan.alone {
            let result = wire.ack(tag, false).await;
            answer(&shared, &result, [done]);
        }
        if wrote {
            // Settles may have come in meanwhile: look again before sleeping.
            continue;
        }
        let pending = {
            let state = shared.lock();
            !state.settles.is_empty() && state.gone.is_none()
        };
        if pending {
            continue;
        }
        if closing || gone {
            let mut state = shared.lock();
            let reason = state
                .gone
                .clone()
                .unwrap_or_else(|| "the consumer closed its channel".to_owned());
            // Anything asked for after the closing flush can no longer be written.
            state.fail_all(&reason);
            for tx in state.closed.drain(..) {
                let _ = tx.send(());
            }
            return;
        }
        match deadline {
            Some(deadline) => {
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests;
