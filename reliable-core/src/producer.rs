//! The reliable producer: confirm tracking, resend and a bounded in-flight window over any
//! [`Transport`] (loss-matrix rows L1, L2 and L7; invariants 1, 2, 3 and 6).
//!
//! Every message given to [`Producer::send`] is recorded in a pending map until its fate is
//! final. Each attempt is bounded by [`ProducerConfig::confirm_timeout`]; a timeout, a nack, a
//! lost connection or a busy client triggers a resend of the *same* message (same id, same
//! idempotency key) after an exponential backoff with jitter. Unroutable, too-large and fatal
//! refusals are final at once. Every message is settled in bounded time: by
//! [`ProducerConfig::deadline`] at the latest, or after [`ProducerConfig::max_attempts`].
//!
//! The [`SendHandle`] resolves `Ok` only on a broker confirm; otherwise it resolves to a
//! [`SendError`] carrying the message back, so nothing is dropped in silence.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::BackoffPolicy;
use crate::message::{IdempotencyKey, Message, MessageId};
use crate::stats::LatencyHistogram;
use crate::transport::{PublishError, Transport};

/// How the producer bounds and retries publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProducerConfig {
    /// How long one attempt may wait for the broker's confirm before it is resent. Default 5 s.
    pub confirm_timeout: Duration,
    /// The longest a message may stay unconfirmed, over all attempts; then it is handed back in
    /// [`SendError::DeadlineExceeded`]. Default 60 s.
    pub deadline: Duration,
    /// The most publish attempts per message (at least 1); then it is handed back in
    /// [`SendError::AttemptsExhausted`]. Default 20.
    pub max_attempts: u32,
    /// The most messages unconfirmed at once; [`Producer::send`] waits while the window is full.
    /// Default 1024.
    pub max_in_flight: usize,
    /// The delay between attempts. Default: [`BackoffPolicy::default`].
    pub backoff: BackoffPolicy,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
            max_attempts: 20,
            max_in_flight: 1024,
            backoff: BackoffPolicy::default(),
        }
    }
}

/// Why a message was resent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResendCause {
    /// The broker nacked it.
    Nack,
    /// No confirm within the attempt timeout.
    Timeout,
    /// The connection was lost before the confirm.
    ConnectionLost,
    /// The client was busy (local queue full).
    Busy,
}

impl ResendCause {
    fn of(err: &PublishError) -> Option<Self> {
        match err {
            PublishError::Nacked { .. } => Some(Self::Nack),
            PublishError::Timeout => Some(Self::Timeout),
            PublishError::ConnectionLost { .. } => Some(Self::ConnectionLost),
            PublishError::Busy { .. } => Some(Self::Busy),
            _ => None,
        }
    }
}

/// Resends counted by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResendCounts {
    /// Resends after a nack.
    pub nack: u64,
    /// Resends after a confirm timeout.
    pub timeout: u64,
    /// Resends after a lost connection.
    pub connection_lost: u64,
    /// Resends after the client was busy.
    pub busy: u64,
}

impl ResendCounts {
    /// All resends.
    pub fn total(&self) -> u64 {
        self.nack + self.timeout + self.connection_lost + self.busy
    }
}

/// A snapshot of the producer's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProducerStats {
    /// Messages accepted by [`Producer::send`].
    pub sent: u64,
    /// Publish attempts made (first sends plus resends).
    pub attempts: u64,
    /// Messages the broker confirmed.
    pub confirmed: u64,
    /// Resends by cause.
    pub resent: ResendCounts,
    /// Messages handed back in an error.
    pub failed: u64,
    /// Messages not yet settled.
    pub in_flight: u64,
    /// Median time from the first send to the confirm (`None` before the first confirm).
    pub confirm_latency_p50: Option<Duration>,
    /// 99th percentile of the time from the first send to the confirm.
    pub confirm_latency_p99: Option<Duration>,
}

/// A message still waiting for its confirm, as listed by [`Producer::unconfirmed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconfirmed {
    /// The message id.
    pub id: MessageId,
    /// The idempotency key.
    pub idempotency_key: IdempotencyKey,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the first attempt started.
    pub first_sent: Instant,
    /// When the latest attempt started.
    pub last_sent: Instant,
}

/// The broker confirmed a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmed {
    /// The confirmed message's id.
    pub id: MessageId,
    /// Attempts it took (1 when no resend was needed).
    pub attempts: u32,
    /// Time from the first send to the confirm.
    pub latency: Duration,
}

/// A message the producer could not get confirmed, handed back with the reason.
///
/// Every variant except [`SendError::Aborted`] carries the message: resend it later, store it, or
/// report it; it is never dropped in silence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The broker refused the message for good (unroutable, too large, fatal configuration).
    #[error("message {} refused after {attempts} attempt(s): {source}", message.id())]
    Refused {
        /// The message, handed back.
        message: Box<Message>,
        /// The broker's refusal; its text says what to fix.
        source: PublishError,
        /// Attempts made.
        attempts: u32,
    },
    /// Every allowed attempt failed with a retryable error.
    #[error("message {} not confirmed after {attempts} attempts (last: {last_error}); check the broker and send it again", message.id())]
    AttemptsExhausted {
        /// The message, handed back.
        message: Box<Message>,
        /// The last attempt's error.
        last_error: PublishError,
        /// Attempts made.
        attempts: u32,
    },
    /// The overall deadline passed before a confirm.
    #[error("message {} not confirmed within {elapsed:?} ({attempts} attempts, last: {last_error}); check the broker and send it again", message.id())]
    DeadlineExceeded {
        /// The message, handed back.
        message: Box<Message>,
        /// The last attempt's error.
        last_error: PublishError,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
    },
    /// The producer was closed; the message was never sent.
    #[error("producer is closed; message {} was not sent, use an open producer", message.id())]
    Closed {
        /// The message, handed back.
        message: Box<Message>,
    },
    /// A [`Producer::send_batch`] larger than the in-flight window can never fit; split it.
    #[error("a batch of {size} messages cannot fit the in-flight window of {window}; send smaller batches (message {} handed back)", message.id())]
    BatchTooLarge {
        /// The batch's first message, handed back.
        message: Box<Message>,
        /// Messages in the batch.
        size: usize,
        /// The window ([`ProducerConfig::max_in_flight`]).
        window: usize,
    },
    /// The producer's [outbox](crate::outbox) could not store the message; it was not sent.
    #[error("message {} not sent: the outbox could not store it ({reason})", message.id())]
    NotSpooled {
        /// The message, handed back.
        message: Box<Message>,
        /// What the outbox reported.
        reason: String,
    },
    /// The task tracking the message ended without an answer (the runtime shut down). Whether the
    /// broker has the message is unknown; send it again (consumers deduplicate by key).
    #[error("tracking of message {id} was aborted (runtime shut down); its fate is unknown, send it again")]
    Aborted {
        /// The message id.
        id: MessageId,
    },
}

impl SendError {
    /// The message handed back, if this error carries it.
    pub fn message(&self) -> Option<&Message> {
        match self {
            Self::Refused { message, .. }
            | Self::AttemptsExhausted { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::NotSpooled { message, .. }
            | Self::BatchTooLarge { message, .. }
            | Self::Closed { message } => Some(message),
            Self::Aborted { .. } => None,
        }
    }

    /// Takes the message back, if this error carries it.
    pub fn into_message(self) -> Option<Message> {
        match self {
            Self::Refused { message, .. }
            | Self::AttemptsExhausted { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::NotSpooled { message, .. }
            | Self::BatchTooLarge { message, .. }
            | Self::Closed { message } => Some(*message),
            Self::Aborted { .. } => None,
        }
    }
}

/// Why [`Producer::send_batch`] sent nothing: the error (carrying the batch's first message)
/// and the batch's other messages, handed back in order.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} more messages of the batch handed back)", rest.len())]
pub struct BatchError {
    /// What went wrong; carries the batch's first message.
    #[source]
    pub error: SendError,
    /// The batch's other messages, in order.
    pub rest: Vec<Message>,
}

impl BatchError {
    /// `msgs` must not be empty (checked by the caller).
    fn new(msgs: Vec<Message>, error: impl FnOnce(Box<Message>) -> SendError) -> Self {
        let mut it = msgs.into_iter();
        let head = it
            .next()
            .unwrap_or_else(|| Message::new(bytes::Bytes::new()));
        Self {
            error: error(Box::new(head)),
            rest: it.collect(),
        }
    }
}

/// Resolves when the message is confirmed (`Ok`) or handed back (`Err`).
///
/// Dropping the handle does not cancel the delivery: the producer keeps resending until the
/// message is settled, and logs a failure nobody waits for at `error` level.
#[derive(Debug)]
pub struct SendHandle {
    id: MessageId,
    rx: oneshot::Receiver<Result<Confirmed, SendError>>,
}

impl SendHandle {
    /// The id of the message this handle tracks.
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl Future for SendHandle {
    type Output = Result<Confirmed, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(SendError::Aborted { id })))
    }
}

/// A reliable producer over a [`Transport`]. Cheap to clone; clones share the window, the
/// pending map and the stats.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    config: ProducerConfig,
    window: Arc<Semaphore>,
    window_size: u32,
    pending: DashMap<u64, PendingEntry, rustc_hash::FxBuildHasher>,
    next_ticket: AtomicU64,
    closed: AtomicBool,
    counters: Counters,
    latency: LatencyHistogram,
    #[cfg(feature = "outbox")]
    outbox: Option<crate::outbox::Outbox>,
}

struct PendingEntry {
    id: MessageId,
    key: IdempotencyKey,
    attempts: u32,
    first_sent: Instant,
    last_sent: Instant,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    attempts: AtomicU64,
    confirmed: AtomicU64,
    failed: AtomicU64,
    resent_nack: AtomicU64,
    resent_timeout: AtomicU64,
    resent_connection: AtomicU64,
    resent_busy: AtomicU64,
}

impl Counters {
    fn resent(&self, cause: ResendCause) -> &AtomicU64 {
        match cause {
            ResendCause::Nack => &self.resent_nack,
            ResendCause::Timeout => &self.resent_timeout,
            ResendCause::ConnectionLost => &self.resent_connection,
            ResendCause::Busy => &self.resent_busy,
        }
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .field("in_flight", &self.inner.pending.len())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer publishing through `transport`.
    ///
    /// `max_attempts` below 1 counts as 1 and `max_in_flight` is clamped to `1..=u32::MAX >> 3`.
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
                transport,
                window: Arc::new(Semaphore::new(window_size as usize)),
                window_size,
                config,
                pending: DashMap::with_hasher(rustc_hash::FxBuildHasher),
                next_ticket: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                counters: Counters::default(),
                latency: LatencyHistogram::new(),
                #[cfg(feature = "outbox")]
                outbox: None,
            }),
        }
    }

    /// A producer that commits every message to `outbox` before its first send and removes it
    /// on confirm (see [`outbox`](crate::outbox)). Call [`replay_outbox`](Self::replay_outbox)
    /// once at start to resend what a previous process left unconfirmed.
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

    /// Sends again, with their original ids and keys, the messages the outbox holds from
    /// before this producer started (oldest first), waiting for window space like
    /// [`send`](Self::send). Returns their handles. Without an outbox, returns none.
    #[cfg(feature = "outbox")]
    pub async fn replay_outbox(&self) -> Result<Vec<SendHandle>, crate::outbox::OutboxError> {
        let Some(outbox) = &self.inner.outbox else {
            return Ok(Vec::new());
        };
        let pending = outbox.pending()?;
        if !pending.is_empty() {
            tracing::info!(messages = pending.len(), "replaying the outbox");
        }
        let mut handles = Vec::with_capacity(pending.len());
        for msg in pending {
            let Ok(permit) = self.inner.window.clone().acquire_owned().await else {
                break; // closed meanwhile: the rest stays in the outbox for the next start
            };
            handles.push(self.start(msg, permit));
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
    /// Fails at once with [`SendError::Closed`] after [`close`](Self::close).
    pub async fn send(&self, msg: Message) -> Result<SendHandle, SendError> {
        let closed = |message| SendError::Closed {
            message: Box::new(message),
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed(msg));
        }
        let Ok(permit) = self.inner.window.clone().acquire_owned().await else {
            return Err(closed(msg));
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed(msg));
        }
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &self.inner.outbox {
            if let Err(e) = outbox.put(std::slice::from_ref(&msg)).await {
                return Err(SendError::NotSpooled {
                    message: Box::new(msg),
                    reason: e.to_string(),
                });
            }
        }
        Ok(self.start(msg, permit))
    }

    /// Hands several messages to the producer at once: waits for window space for all of them,
    /// commits them to the outbox (if any) in one commit, then starts them. Returns their
    /// handles in order. On failure, every message of the batch is handed back in the error
    /// (the first one in the error itself, the rest in [`BatchError::rest`]); none was sent.
    pub async fn send_batch(&self, msgs: Vec<Message>) -> Result<Vec<SendHandle>, BatchError> {
        let mut rest = msgs.into_iter();
        let Some(head) = rest.next() else {
            return Ok(Vec::new());
        };
        let msgs: Vec<Message> = std::iter::once(head).chain(rest).collect();
        let size = msgs.len();
        let window = self.inner.window_size as usize;
        if size > window {
            return Err(BatchError::new(msgs, |message| SendError::BatchTooLarge {
                message,
                size,
                window,
            }));
        }
        let closed = |message| SendError::Closed { message };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BatchError::new(msgs, closed));
        }
        let mut permits = Vec::with_capacity(size);
        for _ in 0..size {
            match self.inner.window.clone().acquire_owned().await {
                Ok(permit) => permits.push(permit),
                Err(_) => return Err(BatchError::new(msgs, closed)),
            }
        }
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &self.inner.outbox {
            if let Err(e) = outbox.put(&msgs).await {
                let reason = e.to_string();
                return Err(BatchError::new(msgs, |message| SendError::NotSpooled {
                    message,
                    reason,
                }));
            }
        }
        Ok(msgs
            .into_iter()
            .zip(permits)
            .map(|(msg, permit)| self.start(msg, permit))
            .collect())
    }

    /// [`send`](Self::send), then waits for the outcome.
    pub async fn send_confirmed(&self, msg: Message) -> Result<Confirmed, SendError> {
        self.send(msg).await?.await
    }

    fn start(&self, msg: Message, permit: OwnedSemaphorePermit) -> SendHandle {
        let inner = self.inner.clone();
        let id = msg.id();
        let ticket = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        inner.pending.insert(
            ticket,
            PendingEntry {
                id,
                key: msg.idempotency_key().clone(),
                attempts: 1,
                first_sent: now,
                last_sent: now,
            },
        );
        inner.counters.sent.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let span = tracing::info_span!(
            "reliable.publish",
            message_id = %id,
            idempotency_key = %msg.idempotency_key(),
        );
        tokio::spawn(
            async move {
                let outcome = inner.deliver(ticket, msg, now).await;
                match &outcome {
                    Ok(c) => {
                        inner.counters.confirmed.fetch_add(1, Ordering::Relaxed);
                        inner.latency.record(c.latency);
                    }
                    Err(_) => {
                        inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Settled either way: confirmed, or handed back to the caller.
                #[cfg(feature = "outbox")]
                if let Some(outbox) = &inner.outbox {
                    outbox.remove(id);
                }
                // Leave the pending map before the window so `flush` sees an empty map.
                inner.pending.remove(&ticket);
                drop(permit);
                if let Err(Err(e)) = tx.send(outcome) {
                    tracing::error!(error = %e, "message handed back, but its send handle was dropped");
                }
            }
            .instrument(span),
        );
        SendHandle { id, rx }
    }

    /// Messages unconfirmed for at least `older_than` since their first send.
    pub fn unconfirmed(&self, older_than: Duration) -> Vec<Unconfirmed> {
        let now = Instant::now();
        let mut out: Vec<Unconfirmed> = self
            .inner
            .pending
            .iter()
            .filter(|e| now.saturating_duration_since(e.first_sent) >= older_than)
            .map(|e| Unconfirmed {
                id: e.id,
                idempotency_key: e.key.clone(),
                attempts: e.attempts,
                first_sent: e.first_sent,
                last_sent: e.last_sent,
            })
            .collect();
        out.sort_by_key(|u| (u.first_sent, u.id));
        out
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

    /// Stops accepting messages, waits until every pending one is settled, then closes the
    /// window. Later sends fail with [`SendError::Closed`].
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.flush().await;
        self.inner.window.close();
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
            in_flight: self.inner.pending.len() as u64,
            confirm_latency_p50: self.inner.latency.quantile(0.50),
            confirm_latency_p99: self.inner.latency.quantile(0.99),
        }
    }
}

impl Inner {
    /// Attempts until confirm, final refusal, attempts exhausted or deadline; never longer than
    /// the deadline.
    async fn deliver(
        &self,
        ticket: u64,
        msg: Message,
        first_sent: Instant,
    ) -> Result<Confirmed, SendError> {
        let cfg = &self.config;
        // `None`: a deadline too far away to represent (e.g. `Duration::MAX`) is no deadline.
        let deadline = first_sent.checked_add(cfg.deadline);
        // Built at the first resend: most messages never need it.
        let mut delays = None;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // The first attempt's entry was written by `start`.
            let now = if attempts == 1 {
                first_sent
            } else {
                let now = Instant::now();
                if let Some(mut e) = self.pending.get_mut(&ticket) {
                    e.attempts = attempts;
                    e.last_sent = now;
                }
                now
            };
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let budget = cfg
                .confirm_timeout
                .min(deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now)));
            let result = match tokio::time::timeout(budget, (*self.transport).publish(&msg)).await {
                Ok(r) => r,
                Err(_) => Err(PublishError::Timeout),
            };
            let err = match result {
                Ok(()) => {
                    let latency = Instant::now().saturating_duration_since(first_sent);
                    tracing::debug!(attempts, ?latency, "confirmed");
                    return Ok(Confirmed {
                        id: msg.id(),
                        attempts,
                        latency,
                    });
                }
                Err(e) => e,
            };
            let Some(cause) = ResendCause::of(&err).filter(|_| err.is_retryable()) else {
                tracing::warn!(error = %err, attempts, "publish refused");
                return Err(SendError::Refused {
                    message: Box::new(msg),
                    source: err,
                    attempts,
                });
            };
            if attempts >= cfg.max_attempts {
                tracing::warn!(error = %err, attempts, "publish attempts exhausted");
                return Err(SendError::AttemptsExhausted {
                    message: Box::new(msg),
                    last_error: err,
                    attempts,
                });
            }
            let delay = delays
                .get_or_insert_with(|| cfg.backoff.delays())
                .next()
                .unwrap_or(cfg.backoff.max_delay);
            let now = Instant::now();
            let past_deadline =
                deadline.is_some_and(|d| now.checked_add(delay).is_none_or(|t| t >= d));
            if past_deadline {
                tracing::warn!(error = %err, attempts, "publish deadline exceeded");
                return Err(SendError::DeadlineExceeded {
                    message: Box::new(msg),
                    last_error: err,
                    attempts,
                    elapsed: now.saturating_duration_since(first_sent),
                });
            }
            tracing::debug!(error = %err, ?cause, attempts, ?delay, "resending");
            tokio::time::sleep(delay).await;
            self.counters.resent(cause).fetch_add(1, Ordering::Relaxed);
        }
    }
}
