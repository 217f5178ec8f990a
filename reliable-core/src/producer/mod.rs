//! The reliable producer: confirm tracking, resend and a bounded in-flight window over any
//! [`Transport`] (loss-matrix rows L1, L2 and L7; invariants 1, 2, 3, 6 and 10).
//!
//! Every message given to [`Producer::send`] is held by the producer's driver until its fate
//! is final. Each attempt is bounded by [`ProducerConfig::confirm_timeout`]; a timeout, a nack, a
//! lost connection or a busy client triggers a resend of the *same* message (same id, same
//! idempotency key) after an exponential backoff with jitter. Unroutable, too-large and fatal
//! refusals are final at once. Every message is settled in bounded time: by
//! [`ProducerConfig::deadline`] at the latest, or after [`ProducerConfig::max_attempts`].
//!
//! The [`SendHandle`] resolves `Ok` only on a broker confirm; otherwise it resolves to a
//! [`SendError`] carrying the message back, so nothing is dropped in silence.
//!
//! # The window
//!
//! At most [`ProducerConfig::max_in_flight`] messages are unconfirmed at once; each holds one
//! slot of the window from its send until it is settled. [`Producer::send_batch`] takes all of
//! its slots in one step, so a batch never holds part of the window while it waits for the rest
//! (two such batches, or a batch and [`Producer::close`], would wait on each other forever);
//! each message still gives its slot back as soon as it is settled.
//!
//! # Order
//!
//! Messages reach the transport in the order they were sent: [`send`](Producer::send) puts
//! each one on the producer's queue before it returns, and one driver task per producer hands
//! them to [`Transport::submit`] one at a time, in that order, waiting for each hand-off before
//! the next; the waits for confirms then run concurrently. The transport keeps that order on the
//! wire per [lane](Transport::lane) (an AMQP channel, a Kafka key's partition).
//!
//! Resends follow [`ProducerConfig::order`]:
//!
//! * [`SendOrder::Preserved`] (default): once a message of a lane has to be resent, the lane's
//!   later messages not yet submitted wait; failed messages are resent in send order, each once
//!   every earlier message of the lane is decided, and the lane goes on only when the resends
//!   are confirmed (or handed back). After a connection loss, which fails every undecided
//!   attempt of a channel, the channel's messages therefore go out again in their original
//!   order before any newer one. What it cannot undo: a later message the broker already
//!   confirmed before an earlier one failed on its own (a single AMQP nack) stays ahead.
//! * [`SendOrder::Relaxed`]: each message is resent after its own backoff while later messages
//!   keep going, so a resent message lands behind newer ones: more throughput during faults.
//!
//! Order is per producer: messages sent concurrently from several tasks reach the transport in
//! the order their `send` calls put them on the queue.
//!
//! # Shutting down
//!
//! [`Producer::close`] is the one way to shut a producer down: it refuses new messages, waits
//! until every pending one is settled (bounded by their deadline), then closes the transport
//! ([`Transport::close`], bounded by the confirm timeout), e.g. flushing the Kafka client.
//!
//! Dropping the last clone of a [`Producer`] cancels nothing: the driver delivers every message
//! already accepted, keeping the producer's state and the transport alive until the last one is
//! settled; each [`SendHandle`] still resolves, `Ok` on the confirm or `Err` with the message.
//! The transport is not closed then, only dropped after the last delivery. Only a runtime
//! shutdown cuts deliveries short: their handles resolve to [`SendError::Aborted`], and with an
//! outbox (feature `outbox`) the messages stay in it for replay.
//!
//! ```
//! use reliable_core::memory::InMemoryBroker;
//! use reliable_core::producer::{Producer, ProducerConfig};
//! use reliable_core::Message;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = InMemoryBroker::new();
//! broker.declare_queue("orders");
//! let producer = Producer::new(broker.transport(), ProducerConfig::default());
//!
//! let handle = producer.send(Message::new("hello").with_destination("orders")).await?;
//! let confirmed = handle.await?;
//! assert_eq!(confirmed.attempts, 1);
//! producer.close().await;
//! # Ok(())
//! # }
//! ```

mod batch;
mod config;
mod driver;
mod error;
mod handle;
mod health;
mod lanes;
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OnceCell, Semaphore};
use tokio::time::Instant;

use crate::message::Message;
use crate::stats::LatencyHistogram;
use crate::transport::Transport;

pub use batch::{BatchHandle, BatchOutcome};
pub use config::{ProducerConfig, SendOrder};
pub use error::{BatchError, SendError};
pub use handle::{Confirmed, SendHandle};
pub use health::ProducerHealth;
pub use stats::{ProducerStats, ResendCause, ResendCounts, Unconfirmed};

use handle::Claim;
use stats::Counters;

/// Why a batch was not admitted (see [`Producer::admit`]).
enum Refusal {
    TooLarge { size: usize, window: usize },
    Closed,
    NotSpooled(String),
}

impl Refusal {
    /// The error handing every message of `msgs` back.
    fn hand_back(self, msgs: Vec<Message>) -> BatchError {
        match self {
            Self::TooLarge { size, window } => {
                BatchError::new(msgs, |message| SendError::BatchTooLarge {
                    message,
                    size,
                    window,
                })
            }
            Self::Closed => BatchError::new(msgs, |message| SendError::Closed { message }),
            Self::NotSpooled(reason) => {
                BatchError::new(msgs, |message| SendError::NotSpooled { message, reason })
            }
        }
    }
}

/// A reliable producer over a [`Transport`]. Cheap to clone; clones share the window, the
/// pending map and the stats.
///
/// Shut it down with [`close`](Self::close). Dropping the last clone instead leaves every
/// accepted message to be delivered and settled as usual (see the [module docs](self)).
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
    feed: Arc<Feed>,
}

/// The way into the producer's [driver](driver): started with the first message, ended (the
/// driver finishes what it holds, then stops) when the last producer handle is dropped.
#[derive(Default)]
struct Feed {
    queue: std::sync::OnceLock<mpsc::UnboundedSender<driver::Command>>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    config: ProducerConfig,
    window: Arc<Semaphore>,
    window_size: u32,
    in_flight: AtomicU64, // messages accepted and not yet settled
    next_ticket: AtomicU64,
    closed: AtomicBool,
    /// Set once the transport's close has run (or given up), so it runs once.
    transport_closed: OnceCell<()>,
    counters: Counters,
    latency: LatencyHistogram,
    #[cfg(feature = "outbox")]
    outbox: Option<crate::outbox::Outbox>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .field("in_flight", &self.inner.in_flight.load(Ordering::Relaxed))
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer publishing through `transport`. `max_attempts` below 1 counts as 1 and
    /// `max_in_flight` is clamped to `1..=u32::MAX >> 3`.
    pub fn new(transport: impl Transport + 'static, config: ProducerConfig) -> Self {
        Self::from_arc(Arc::new(transport), config)
    }

    /// A producer over a shared transport.
    pub fn from_arc(transport: Arc<dyn Transport>, mut config: ProducerConfig) -> Self {
        config.max_attempts = config.max_attempts.max(1);
        let window_size = u32::try_from(config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS))
            .unwrap_or(u32::MAX >> 3)
            .min(u32::MAX >> 3);
        config.max_in_flight = window_size as usize;
        Self {
            inner: Arc::new(Inner {
                counters: Counters::new(transport.metrics_label()), // before `transport` moves
                transport,
                window: Arc::new(Semaphore::new(window_size as usize)),
                window_size,
                config,
                in_flight: AtomicU64::new(0),
                next_ticket: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                transport_closed: OnceCell::new(),
                latency: LatencyHistogram::new(),
                #[cfg(feature = "outbox")]
                outbox: None,
            }),
            feed: Arc::default(),
        }
    }

    /// A producer that commits every message to `outbox` before its first send and removes it
    /// on confirm, or when its [`SendHandle`] hands it back to the caller (see
    /// [`outbox`](crate::outbox)). Call [`replay_outbox`](Self::replay_outbox) once at start to
    /// resend what a previous process left unconfirmed.
    #[cfg(feature = "outbox")]
    pub fn with_outbox(
        transport: impl Transport + 'static,
        config: ProducerConfig,
        outbox: crate::outbox::Outbox,
    ) -> Self {
        let mut producer = Self::new(transport, config);
        if let Some(inner) = Arc::get_mut(&mut producer.inner) {
            inner.outbox = Some(outbox);
        }
        producer
    }

    /// Sends again, with their original ids and keys, the outbox's messages that no task of
    /// this process is delivering or holding for its caller (oldest first): those a previous
    /// process left unconfirmed, and those handed back here whose [`SendHandle`] was dropped
    /// without receiving them. Waits for window space like [`send`](Self::send) and returns the
    /// handles; await them, or the messages stay for the next replay. Without an outbox,
    /// returns none.
    #[cfg(feature = "outbox")]
    pub async fn replay_outbox(&self) -> Result<Vec<SendHandle>, crate::outbox::OutboxError> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(Vec::new());
        };
        let entries = outbox.claim_unclaimed()?;
        if !entries.is_empty() {
            tracing::info!(messages = entries.len(), "replaying the outbox");
        }
        let mut handles = Vec::with_capacity(entries.len());
        for (msg, claim) in entries {
            if self.inner.closed.load(Ordering::Acquire) {
                break; // the rest's claims end as they drop: they stay for the next replay
            }
            let Ok(permit) = self.inner.window.clone().acquire_owned().await else {
                break;
            };
            permit.forget(); // the driver gives the slot back when the message is settled
            handles.push(self.start_one(msg, Some(claim)));
        }
        Ok(handles)
    }

    /// The configuration in effect.
    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    /// Hands `msg` to the producer. Waits while the in-flight window is full, then starts
    /// delivery and returns a handle that resolves on the confirm or with the message handed
    /// back. Must be called within a Tokio runtime.
    ///
    /// Fails at once with [`SendError::Closed`] after [`close`](Self::close), also when the
    /// close began while this send waited for window space.
    pub async fn send(&self, mut msg: Message) -> Result<SendHandle, SendError> {
        match self.admit(std::slice::from_mut(&mut msg)).await {
            Ok(mut claims) => Ok(self.start_one(msg, claims.pop())),
            Err(refusal) => Err(refusal.hand_back(vec![msg]).error),
        }
    }

    /// Hands several messages to the producer at once: waits until the window has space for all
    /// of them and takes it in one step, commits them to the outbox (if any) in one commit, then
    /// starts them. Returns their handles in order; each message frees its window slot when it
    /// is settled. On failure, every message of the batch is handed back in the error (the first
    /// one in the error itself, the rest in [`BatchError::rest`]); none was sent.
    ///
    /// Fails with [`SendError::BatchTooLarge`] when the batch exceeds the window, and with
    /// [`SendError::Closed`] after [`close`](Self::close), also when the close began while
    /// this batch waited for window space.
    pub async fn send_batch(&self, mut msgs: Vec<Message>) -> Result<Vec<SendHandle>, BatchError> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let claims = match self.admit(&mut msgs).await {
            Ok(claims) => claims,
            Err(refusal) => return Err(refusal.hand_back(msgs)),
        };
        let mut claims = claims.into_iter();
        Ok(msgs
            .into_iter()
            .map(|msg| self.start_one(msg, claims.next()))
            .collect())
    }

    /// Takes window space for all of `msgs` in one step and commits them to the outbox (if
    /// any): their claims in order, or why the batch is refused (nothing taken then). The
    /// window slots are forgotten here; the driver gives each back when its message settles.
    /// With `otel`, first adds the caller's trace context (caller's task, before the outbox).
    async fn admit(&self, msgs: &mut [Message]) -> Result<Vec<Claim>, Refusal> {
        #[cfg(feature = "otel")]
        crate::trace_context::inject_current_all(msgs);
        let size = msgs.len();
        let Some(needed) = u32::try_from(size)
            .ok()
            .filter(|&n| n <= self.inner.window_size)
        else {
            return Err(Refusal::TooLarge {
                size,
                window: self.inner.window_size as usize,
            });
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Refusal::Closed);
        }
        // All at once: holding part of the window while waiting for the rest deadlocks against
        // another batch or `close`, since the semaphore serves waiters in order.
        let Ok(permits) = self.inner.window.clone().acquire_many_owned(needed).await else {
            return Err(Refusal::Closed);
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Refusal::Closed);
        }
        let claims = self.spool(msgs).await.map_err(Refusal::NotSpooled)?;
        permits.forget();
        Ok(claims)
    }

    /// [`send_batch`](Self::send_batch) with one handle for the whole batch instead of one per
    /// message: it resolves once every message is settled, to how many were confirmed and the
    /// messages handed back (in send order, each in its [`SendError`]). Cheaper per message
    /// than a handle each; use `send_batch` when each message's outcome is needed on its own
    /// (e.g. to journal it as soon as it is confirmed).
    ///
    /// ```
    /// use reliable_core::memory::InMemoryBroker;
    /// use reliable_core::producer::{Producer, ProducerConfig};
    /// use reliable_core::Message;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = InMemoryBroker::new();
    /// broker.declare_queue("orders");
    /// let producer = Producer::new(broker.transport(), ProducerConfig::default());
    /// let batch = (0..100).map(|i| Message::new(format!("order {i}")).with_destination("orders"));
    /// let outcome = producer.send_many(batch.collect()).await?.await;
    /// assert_eq!(outcome.confirmed, 100);
    /// assert!(outcome.handed_back.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_many(&self, mut msgs: Vec<Message>) -> Result<BatchHandle, BatchError> {
        let (handle, replies) = batch::batch(msgs.len());
        if msgs.is_empty() {
            return Ok(handle);
        }
        let claims = match self.admit(&mut msgs).await {
            Ok(claims) => claims,
            Err(refusal) => return Err(refusal.hand_back(msgs)),
        };
        let mut claims = claims.into_iter();
        for (msg, reply) in msgs.into_iter().zip(replies) {
            let reply = reply.for_message(msg.id());
            self.start(msg, claims.next(), driver::Reply::Batch(reply));
        }
        Ok(handle)
    }

    /// [`send`](Self::send), then waits for the outcome.
    pub async fn send_confirmed(&self, msg: Message) -> Result<Confirmed, SendError> {
        self.send(msg).await?.await
    }

    /// Commits `msgs` to the outbox, if there is one, and returns their claims in order (none
    /// without an outbox). `Err` carries the outbox's reason.
    async fn spool(&self, msgs: &[Message]) -> Result<Vec<Claim>, String> {
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &self.inner.outbox {
            return outbox.put(msgs).await.map_err(|e| e.to_string());
        }
        let _ = msgs;
        Ok(Vec::new())
    }

    /// Hands `msg` to the driver, which holds its window slot (taken and forgotten by the
    /// caller) and `claim` (its outbox entry) until the message is settled, then releases the
    /// slot. The driver's queue keeps the order of these calls, which is the order the
    /// transport sees.
    fn start_one(&self, msg: Message, claim: Option<Claim>) -> SendHandle {
        let (reply, rx) = oneshot::channel();
        let id = msg.id();
        self.start(msg, claim, driver::Reply::One(reply));
        SendHandle::new(id, rx)
    }

    /// Hands `msg` to the driver, its outcome to go to `reply`.
    fn start(&self, msg: Message, claim: Option<Claim>, reply: driver::Reply) {
        let inner = &self.inner;
        let ticket = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        inner.in_flight.fetch_add(1, Ordering::Relaxed);
        inner.counters.sent.fetch_add(1, Ordering::Relaxed);
        let queue = self.feed.queue.get_or_init(|| {
            let (queue, jobs) = mpsc::unbounded_channel();
            tokio::spawn(driver::Driver::new(inner.clone(), jobs).run());
            queue
        });
        let job = driver::Job {
            ticket,
            msg,
            first_sent: now,
            claim,
            reply,
        };
        if queue.send(driver::Command::Send(job)).is_err() {
            // The driver is gone only when its runtime shut down; the job (and its reply)
            // dropped with the send error, so the handle resolves to `Aborted`.
            inner.in_flight.fetch_sub(1, Ordering::Relaxed);
            inner.window.add_permits(1);
        }
    }

    /// Messages unconfirmed for at least `older_than` since their first send, oldest first:
    /// asked of the producer's driver, which holds them (none before the first send).
    pub async fn unconfirmed(&self, older_than: Duration) -> Vec<Unconfirmed> {
        let Some(queue) = self.feed.queue.get() else {
            return Vec::new();
        };
        let (reply, listed) = oneshot::channel();
        let ask = driver::Command::Unconfirmed { older_than, reply };
        if queue.send(ask).is_err() {
            return Vec::new();
        }
        listed.await.unwrap_or_default()
    }

    /// Waits until every message sent so far is settled (confirmed or handed back). Bounded by
    /// the deadline of the newest message.
    pub async fn flush(&self) {
        // Taking the whole window means no message is in flight; the semaphore is fair, so
        // later sends queue behind the flush.
        if let Ok(all) = self.inner.window.acquire_many(self.inner.window_size).await {
            drop(all);
        }
    }

    /// Shuts the producer down, for every clone: stops accepting messages (later sends, and
    /// sends still waiting for window space, fail with [`SendError::Closed`]), waits until every
    /// pending message is settled, then closes the transport once ([`Transport::close`], e.g.
    /// the Kafka client's flush).
    ///
    /// Bounded in time: the wait for pending messages ends by the deadline of the newest one
    /// ([`ProducerConfig::deadline`]), and the transport gets at most
    /// [`ProducerConfig::confirm_timeout`] to close (past that it is left to finish on its own,
    /// with a warning). Calling it again returns once the first call's work is done.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.flush().await;
        self.inner.window.close();
        let transport = &self.inner.transport;
        let bound = self.inner.config.confirm_timeout;
        self.inner
            .transport_closed
            .get_or_init(|| async move {
                if tokio::time::timeout(bound, transport.close()).await.is_err() {
                    tracing::warn!(
                        ?bound,
                        "the transport did not close within the confirm timeout; left to finish on its own"
                    );
                }
            })
            .await;
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProducerStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProducerStats {
            sent: load(&c.sent),
            attempts: load(&c.attempts),
            confirmed: load(&c.confirmed),
            resent: ResendCounts {
                nack: load(&c.resent_nack),
                timeout: load(&c.resent_timeout),
                connection_lost: load(&c.resent_connection),
                busy: load(&c.resent_busy),
            },
            failed: load(&c.failed),
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            confirm_latency_p50: self.inner.latency.quantile(0.50),
            confirm_latency_p99: self.inner.latency.quantile(0.99),
        }
    }
}
