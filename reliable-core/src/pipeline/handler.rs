//! The user's handler and the layers around it: [`Handler`], [`HandlerError`] and its
//! [`ErrorKind`], [`HandlerBuilder`] with [`Layer`], and the built-in [`RetryLayer`] and
//! [`TimeoutLayer`] ([`DedupeLayer`](super::DedupeLayer) lives in its own module).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;

use crate::backoff::BackoffPolicy;
use crate::message::Message;

/// The user's message handler (and every layer around it).
#[async_trait]
pub trait Handler: Send + Sync {
    /// Applies the message's effect. Must be idempotent per key unless wrapped in a
    /// [`DedupeLayer`](super::DedupeLayer).
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError>;

    /// Applies the effects of several messages (the deliveries the pipeline took in one batch)
    /// and answers one outcome per message, in the same order. Each outcome is settled as
    /// [`handle`](Self::handle)'s would be; a message answered with
    /// [`ErrorKind::Unavailable`] is then held and retried on its own through `handle`.
    ///
    /// Override it where a batch is cheaper than its messages one by one (one database
    /// transaction, one store round trip: [`DedupeLayer`](super::DedupeLayer) does). Answer
    /// every message: a missing outcome counts as a permanent failure. A panic fails no
    /// neighbour: the pipeline then handles the batch's messages one at a time through
    /// `handle`.
    ///
    /// The default runs [`handle`](Self::handle) on every message concurrently; a panic in one
    /// becomes that message's permanent failure.
    async fn handle_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        futures::future::join_all(msgs.iter().map(|msg| handle_caught(self, msg))).await
    }
}

/// `handler.handle(msg)`, a panic turned into a permanent failure.
pub(super) async fn handle_caught<H: Handler + ?Sized>(
    handler: &H,
    msg: &Message,
) -> Result<(), HandlerError> {
    AssertUnwindSafe(handler.handle(msg))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::permanent("handler panicked")))
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        (**self).handle(msg).await
    }

    async fn handle_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        (**self).handle_batch(msgs).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Box<H> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        (**self).handle(msg).await
    }

    async fn handle_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        (**self).handle_batch(msgs).await
    }
}

/// A [`Handler`] from an async closure taking the message by value; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F>(F);

/// Wraps an async closure `Fn(Message) -> Future<Output = Result<(), HandlerError>>` as a
/// [`Handler`]. The message is cloned per call (the payload is shared, not copied).
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        (self.0)(msg.clone()).await
    }
}

/// Whether a handler failure may go away on retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// May succeed later (a database timeout, a busy dependency): retried by [`RetryLayer`].
    Transient,
    /// Will never succeed (malformed payload, violated business rule): dead-lettered at once.
    Permanent,
    /// Something the handler depends on is unreachable (the idempotency store, a database);
    /// the message itself is fine. Retried by [`RetryLayer`]; when retries run out the
    /// pipeline requeues the message after a pause instead of dead-lettering it, so an outage
    /// neither acks nor loses anything.
    Unavailable,
}

/// A handler failure, classified by [`ErrorKind`].
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    source: Box<dyn StdError + Send + Sync>,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            source: source.into(),
        }
    }

    /// A failure no retry can fix; the message goes to the dead letter.
    pub fn permanent(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            source: source.into(),
        }
    }

    /// A dependency is unreachable: retry later, never dead-letter (see
    /// [`ErrorKind::Unavailable`]).
    pub fn unavailable(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            source: source.into(),
        }
    }

    /// The failure's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the failure is transient.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Whether a retry may succeed ([`ErrorKind::Transient`] or [`ErrorKind::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind != ErrorKind::Permanent
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Unavailable => "dependency unavailable",
        };
        write!(f, "{kind} handler error: {}", self.source)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Wraps a handler in more behaviour (tower-style middleware).
pub trait Layer<H> {
    /// The wrapped handler.
    type Handler: Handler;
    /// Wraps `inner`.
    fn layer(&self, inner: H) -> Self::Handler;
}

/// Stacks [`Layer`]s around a handler: each [`layer`](Self::layer) call wraps everything added
/// before it, so the last layer added runs first.
#[derive(Clone, Debug)]
pub struct HandlerBuilder<H>(H);

impl<H: Handler> HandlerBuilder<H> {
    /// Starts from the user's handler.
    pub fn new(handler: H) -> Self {
        Self(handler)
    }

    /// Wraps the current handler in `layer`.
    pub fn layer<L: Layer<H>>(self, layer: L) -> HandlerBuilder<L::Handler> {
        HandlerBuilder(layer.layer(self.0))
    }

    /// The finished handler.
    pub fn build(self) -> H {
        self.0
    }
}

/// How [`RetryLayer`] retries transient failures.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1). Default 5.
    pub max_attempts: u32,
    /// Delay between attempts. Default: 100 ms doubling to 10 s, with jitter.
    pub backoff: BackoffPolicy,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: BackoffPolicy {
                min_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(10),
                factor: 2.0,
                jitter: true,
            },
        }
    }
}

/// Retries transient handler failures with backoff, a bounded number of times; permanent
/// failures and the last transient one pass through (to the dead letter).
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: RetryPolicy,
}

impl RetryLayer {
    /// A retry layer with `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        Self { policy }
    }
}

impl<H: Handler> Layer<H> for RetryLayer {
    type Handler = Retry<H>;
    fn layer(&self, inner: H) -> Retry<H> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The handler made by [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<H> {
    inner: H,
    policy: RetryPolicy,
}

#[async_trait]
impl<H: Handler> Handler for Retry<H> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        let mut delays = self.policy.backoff.delays();
        let mut attempt = 1;
        loop {
            match self.inner.handle(msg).await {
                Err(e) if e.is_retryable() && attempt < self.policy.max_attempts => {
                    let delay = delays.next().unwrap_or(self.policy.backoff.max_delay);
                    tracing::debug!(error = %e, attempt, ?delay, "retrying handler");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Bounds each handler attempt in time; an attempt that runs over fails as transient.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A per-attempt time limit.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<H: Handler> Layer<H> for TimeoutLayer {
    type Handler = Timeout<H>;
    fn layer(&self, inner: H) -> Timeout<H> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The handler made by [`TimeoutLayer`].
#[derive(Clone, Debug)]
pub struct Timeout<H> {
    inner: H,
    timeout: Duration,
}

#[async_trait]
impl<H: Handler> Handler for Timeout<H> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        tokio::time::timeout(self.timeout, self.inner.handle(msg))
            .await
            .unwrap_or_else(|_| {
                Err(HandlerError::transient(format!(
                    "handler did not finish within {:?}",
                    self.timeout
                )))
            })
    }
}
