//! The producer's driver: one task per producer that hands messages to the transport in send
//! order, waits for their confirms, resends and settles them (loss-matrix rows L1, L7;
//! invariants 1, 2, 3 and 6).
//!
//! [`Producer::send`](super::Producer::send) puts each message on the driver's queue before it
//! returns, so the queue holds messages in send order. The driver runs one
//! [`Transport::submit`] at a time, in that order, and waits for the submission (the client has
//! the message) before it starts the next; the attempts (the waits for confirms) run
//! concurrently. A retryable failure parks the message for its backoff and resends it through
//! the same single submission slot; under [`SendOrder::Preserved`] the [lanes](super::lanes)
//! decide when.
//!
//! A transport that answers by callback ([`Attempt::Callback`]) reports to one
//! [`Answers`] queue per producer, which the driver takes in bulk; such attempts need no future
//! and no timer of their own: all of them get the same confirm timeout, so their expiries grow
//! with submission order and one FIFO sweep finds them. An answer counts only for the attempt
//! it names (the message's ticket and attempt number) while that attempt is in flight: a late
//! confirm of an attempt that already timed out and was resent is ignored.
//!
//! Every message is settled in bounded time: a submission, and then its attempt, each get the
//! confirm timeout (cut to what is left of the deadline for future attempts), and a message not
//! confirmed by its deadline is handed back: waiting (not yet submitted, parked or held) or in a
//! callback attempt. Deadlines grow with send order, so one FIFO sweep finds the expired ones.
//!
//! Window space comes back in bulk: a settled message adds to a count that is released into
//! the window once per driver turn, not once per message.
//!
//! [`Transport::submit`]: crate::Transport::submit

mod settle;
mod sweep;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::message::Message;
use crate::transport::{Answer, Answers, Attempt, PublishError, Submission, Token};

use super::batch::BatchReply;
use super::handle::{Claim, Outcome};
use super::lanes::Lanes;
use super::stats::{ResendCause, Unconfirmed};
use super::{Inner, SendError, SendOrder};
use sweep::{bounded, step_end};

/// What the producer's handles ask of the driver, in the order they ask.
pub(super) enum Command {
    /// Deliver a message.
    Send(Job),
    /// List the messages unconfirmed for at least `older_than`.
    Unconfirmed {
        older_than: Duration,
        reply: oneshot::Sender<Vec<Unconfirmed>>,
    },
}

/// A message accepted by `send`, on its way to the driver.
pub(super) struct Job {
    pub(super) ticket: u64,
    pub(super) msg: Message,
    pub(super) first_sent: Instant,
    /// Its outbox entry (feature `outbox`).
    pub(super) claim: Option<Claim>,
    pub(super) reply: Reply,
}

/// Where a message's outcome goes: its own [`SendHandle`](super::SendHandle), or its batch's
/// [`BatchHandle`](super::BatchHandle).
pub(super) enum Reply {
    One(oneshot::Sender<Outcome>),
    Batch(BatchReply),
}

/// Where a message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Not submitted yet (queued, or held by its lane).
    Waiting,
    /// Its submission or attempt runs.
    InFlight,
    /// Failed retryably: waiting for its backoff, then for its turn.
    Parked,
}

/// A message the driver owns until it is settled.
struct Tracked {
    msg: Arc<Message>,
    lane: u64,
    first_sent: Instant,
    /// When the latest attempt was submitted.
    last_sent: Instant,
    /// `None`: a deadline too far away to represent is no deadline.
    deadline: Option<Instant>,
    attempts: u32,
    stage: Stage,
    /// Whether the attempt in flight answers through the [`Answers`] queue.
    callback: bool,
    /// Why the pending resend is needed.
    cause: Option<ResendCause>,
    delays: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    claim: Option<Claim>,
    reply: Reply,
}

impl Tracked {
    /// The message's span, made where it is needed rather than kept per message (a span
    /// costs nothing to make while its level is disabled, and 40 bytes to keep).
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "reliable.publish",
            message_id = %self.msg.id(),
            idempotency_key = %self.msg.idempotency_key(),
            attempt = self.attempts,
        )
    }
}

type Submitting = BoxFuture<'static, (u64, Result<Attempt, PublishError>)>;
type Deciding = BoxFuture<'static, (u64, Result<(), PublishError>)>;

enum Event {
    /// Answers by callback were moved into `Driver::taken`.
    Answered,
    Submitted(u64, Result<Attempt, PublishError>),
    Decided(u64, Result<(), PublishError>),
    Accepted(Option<Command>),
    Tick,
}

/// The driver's state; [`Driver::run`] is its task.
pub(super) struct Driver {
    inner: Arc<Inner>,
    queue: mpsc::UnboundedReceiver<Command>,
    /// `false` once every producer handle is gone: the driver ends when nothing is left.
    open: bool,
    tracked: HashMap<u64, Tracked, rustc_hash::FxBuildHasher>,
    /// Never submitted, in send order (lane releases go to the front).
    fresh: VecDeque<u64>,
    /// Every accepted ticket in send order, for the deadline sweep (settled ones are skipped).
    by_deadline: VecDeque<u64>,
    /// Parked messages by the end of their backoff.
    backoff: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Parked messages whose backoff is over, waiting for their turn.
    due: BTreeSet<u64>,
    lanes: Lanes,
    /// The one submission running, if any.
    submitting: Option<Submitting>,
    attempts: FuturesUnordered<Deciding>,
    /// Where callback attempts answer, and the answers taken from it this turn.
    answers: Arc<Answers>,
    taken: Vec<Answer>,
    /// Callback attempts in submission order with the end of their confirm timeout.
    expiring: VecDeque<(Instant, Token)>,
    /// Window slots of settled messages, released once per turn.
    released: usize,
    timer: Pin<Box<Sleep>>,
    /// When the timer is set to fire; `None` when nothing waits for it.
    timer_at: Option<Instant>,
}

impl Driver {
    pub(super) fn new(inner: Arc<Inner>, queue: mpsc::UnboundedReceiver<Command>) -> Self {
        Self {
            inner,
            queue,
            open: true,
            tracked: HashMap::default(),
            fresh: VecDeque::new(),
            by_deadline: VecDeque::new(),
            backoff: BinaryHeap::new(),
            due: BTreeSet::new(),
            lanes: Lanes::default(),
            submitting: None,
            attempts: FuturesUnordered::new(),
            answers: Arc::new(Answers::default()),
            taken: Vec::new(),
            expiring: VecDeque::new(),
            released: 0,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
        }
    }

    /// Runs until every producer handle is gone and every message is settled.
    pub(super) async fn run(mut self) {
        loop {
            self.start_next();
            self.release();
            if !self.open && self.tracked.is_empty() {
                return;
            }
            self.arm_timer();
            match poll_fn(|cx| self.poll_event(cx)).await {
                Event::Answered => self.answered(),
                Event::Submitted(ticket, result) => self.submitted(ticket, result, Instant::now()),
                Event::Decided(ticket, result) => self.decided(ticket, result),
                Event::Accepted(Some(command)) => {
                    self.command(command);
                    while let Ok(command) = self.queue.try_recv() {
                        self.command(command);
                    }
                }
                Event::Accepted(None) => self.open = false,
                Event::Tick => self.tick(),
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        self.answers.take(cx, &mut self.taken);
        if !self.taken.is_empty() {
            return Poll::Ready(Event::Answered);
        }
        if let Some(submission) = &mut self.submitting {
            if let Poll::Ready((ticket, result)) = submission.as_mut().poll(cx) {
                self.submitting = None;
                return Poll::Ready(Event::Submitted(ticket, result));
            }
        }
        if !self.attempts.is_empty() {
            if let Poll::Ready(Some((ticket, result))) = self.attempts.poll_next_unpin(cx) {
                return Poll::Ready(Event::Decided(ticket, result));
            }
        }
        if self.open {
            if let Poll::Ready(job) = self.queue.poll_recv(cx) {
                return Poll::Ready(Event::Accepted(job));
            }
        }
        if self.timer_at.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            self.timer_at = None;
            return Poll::Ready(Event::Tick);
        }
        Poll::Pending
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Send(job) => self.accept(job),
            Command::Unconfirmed { older_than, reply } => {
                let _ = reply.send(self.unconfirmed(older_than));
            }
        }
    }

    /// The messages unconfirmed for at least `older_than`, oldest first.
    fn unconfirmed(&self, older_than: Duration) -> Vec<Unconfirmed> {
        let now = Instant::now();
        let mut out: Vec<Unconfirmed> = self
            .tracked
            .values()
            .filter(|t| now.saturating_duration_since(t.first_sent) >= older_than)
            .map(|t| Unconfirmed {
                id: t.msg.id(),
                idempotency_key: t.msg.idempotency_key().clone(),
                attempts: t.attempts.max(1),
                first_sent: t.first_sent,
                last_sent: t.last_sent,
            })
            .collect();
        out.sort_by_key(|u| (u.first_sent, u.id));
        out
    }

    fn accept(&mut self, job: Job) {
        // Published and in flight from here until `settle`: every tracked message settles once.
        self.inner.counters.metrics.accepted();
        let lane = self.inner.transport.lane(&job.msg);
        let deadline = job.first_sent.checked_add(self.inner.config.deadline);
        self.fresh.push_back(job.ticket);
        self.by_deadline.push_back(job.ticket);
        self.tracked.insert(
            job.ticket,
            Tracked {
                msg: Arc::new(job.msg),
                lane,
                first_sent: job.first_sent,
                last_sent: job.first_sent,
                deadline,
                attempts: 0,
                stage: Stage::Waiting,
                callback: false,
                cause: None,
                delays: None,
                claim: job.claim,
                reply: job.reply,
            },
        );
    }

    /// Starts submissions while none is running: a resend whose turn has come, else the next
    /// message in send order. A submission decided at once lets the next one start.
    fn start_next(&mut self) {
        while self.submitting.is_none() {
            let Some(ticket) = self.next_turn() else {
                return;
            };
            self.submit(ticket);
        }
    }

    /// The ticket whose submission comes next, if any may start.
    fn next_turn(&mut self) -> Option<u64> {
        let preserved = self.inner.config.order == SendOrder::Preserved;
        let resend = self.due.iter().copied().find(|ticket| {
            !preserved
                || self
                    .tracked
                    .get(ticket)
                    .is_some_and(|t| self.lanes.may_resend(t.lane, *ticket))
        });
        if let Some(ticket) = resend {
            self.due.remove(&ticket);
            if let Some(t) = self.tracked.get(&ticket) {
                if preserved {
                    self.lanes.resending(t.lane, ticket);
                }
                if let Some(cause) = t.cause {
                    self.inner
                        .counters
                        .resent(cause)
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.counters.metrics.resent(cause);
                }
            }
            return Some(ticket);
        }
        while let Some(ticket) = self.fresh.pop_front() {
            let Some(t) = self.tracked.get(&ticket) else {
                continue; // settled while it waited (deadline)
            };
            if preserved && !self.lanes.admit(t.lane, ticket) {
                continue; // held until its lane has recovered
            }
            return Some(ticket);
        }
        None
    }

    /// Submits `ticket`'s message: its next attempt starts.
    fn submit(&mut self, ticket: u64) {
        let Some(t) = self.tracked.get_mut(&ticket) else {
            return;
        };
        let now = Instant::now();
        t.attempts += 1;
        t.stage = Stage::InFlight;
        t.last_sent = now;
        self.inner.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let token = Token {
            ticket,
            attempt: t.attempts,
        };
        let done = self.answers.completion(token);
        let submission = {
            let _entered = t.span().entered();
            Arc::clone(&self.inner.transport).submit(t.msg.clone(), done)
        };
        match submission {
            Submission::Now(result) => self.submitted(ticket, result, now),
            Submission::Later(submission) => {
                let ends = step_end(self.inner.config.confirm_timeout, t.deadline, now);
                let submission = bounded(ticket, ends, submission).instrument(t.span());
                self.submitting = Some(Box::pin(submission));
            }
        }
    }

    /// The submission of `ticket` (started at `now` or earlier) resolved.
    fn submitted(&mut self, ticket: u64, result: Result<Attempt, PublishError>, now: Instant) {
        let attempt = match result {
            Ok(attempt) => attempt,
            Err(e) => return self.decided(ticket, Err(e)),
        };
        let Some(t) = self.tracked.get_mut(&ticket) else {
            return;
        };
        match attempt {
            Attempt::Callback => {
                t.callback = true;
                if let Some(ends) = now.checked_add(self.inner.config.confirm_timeout) {
                    let token = Token {
                        ticket,
                        attempt: t.attempts,
                    };
                    self.expiring.push_back((ends, token));
                }
            }
            Attempt::Future(attempt) => {
                t.callback = false;
                let ends = step_end(self.inner.config.confirm_timeout, t.deadline, now);
                let deciding = bounded(ticket, ends, attempt).instrument(t.span());
                self.attempts.push(Box::pin(deciding));
            }
        }
    }

    /// Whether `token` names the callback attempt in flight.
    fn current(&self, token: Token) -> bool {
        self.tracked.get(&token.ticket).is_some_and(|t| {
            t.stage == Stage::InFlight && t.callback && t.attempts == token.attempt
        })
    }

    /// Decides the callback attempts whose answers were taken; answers to attempts no longer
    /// in flight are ignored.
    fn answered(&mut self) {
        let mut taken = std::mem::take(&mut self.taken);
        for (token, result) in taken.drain(..) {
            if self.current(token) {
                self.decided(token.ticket, result);
            }
        }
        self.taken = taken;
    }

    /// Gives the window the slots of the messages settled this turn, in one step.
    fn release(&mut self) {
        if self.released > 0 {
            self.inner.window.add_permits(self.released);
            self.released = 0;
        }
    }
}

impl Drop for Driver {
    /// A driver dropped with messages left (its runtime shut down) gives their window slots
    /// back; their handles resolve to `Aborted` as their replies drop.
    fn drop(&mut self) {
        self.released += self.tracked.len();
        self.release();
    }
}
