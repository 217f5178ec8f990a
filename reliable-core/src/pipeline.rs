//! The reliable consumer pipeline: idempotency check → handler → outcome → ack (loss-matrix
//! rows L4, L5 and L8; invariant 4).
//!
//! A [`Pipeline`] pulls [`Delivery`](crate::transport::Delivery)s from a [`DeliverySource`], runs them through a
//! [`Handler`] with bounded concurrency and settles each one only after the outcome is final:
//!
//! | handler outcome | what the pipeline does |
//! |---|---|
//! | `Ok` (including a duplicate skipped by [`DedupeLayer`]) | ack |
//! | `Err` (permanent, retries exhausted, or a panic) | dead letter (publish awaited to its confirm), then ack |
//! | `Err` of kind [`ErrorKind::Unavailable`] (a dependency such as the idempotency store is down) | held: the handler is retried in place for up to [`PipelineConfig::requeue_delay`]; then settled by its new outcome, or, still unavailable, nacked with requeue: never acked, never dead-lettered |
//! | dead-letter publish failed | held: the publish is retried in place for up to [`PipelineConfig::requeue_delay`]; still failing, nack with requeue: the message comes back, nothing is lost |
//!
//! # Holding before a requeue
//!
//! A requeue is not free: a RabbitMQ quorum queue counts each message's returns and, past its
//! delivery limit (20 by default from RabbitMQ 4.0), dead-letters the message or, without a
//! dead-letter exchange, drops it; RabbitMQ 4.0-4.2 count every `nack` with requeue. So the
//! pipeline keeps a delivery whose dependency or dead-letter publish is unavailable, retrying
//! with backoff (100 ms doubling to 2 s, with jitter), and nacks it only when
//! [`PipelineConfig::requeue_delay`] (30 s) has passed: an outage shorter than that costs no
//! requeue at all, a longer one one requeue per window. A held delivery keeps its concurrency
//! slot. On shutdown ([`Pipeline::run_until`]) held deliveries are nacked at once.
//!
//! Behaviour around the user's handler is built from tower-style [`Layer`]s; the built-in ones
//! are [`TimeoutLayer`] (per-attempt time limit), [`RetryLayer`] (transient errors retried with
//! backoff) and [`DedupeLayer`] (idempotency store). Add your own by implementing [`Layer`].
//! [`HandlerBuilder::layer`] wraps what it has so far, so add layers innermost first:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use reliable_core::idempotency::InMemoryIdempotencyStore;
//! use reliable_core::memory::InMemoryBroker;
//! use reliable_core::pipeline::*;
//! use reliable_core::producer::{Producer, ProducerConfig};
//! use reliable_core::{Message, Transport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = InMemoryBroker::new();
//! broker.declare_queue("orders");
//! broker.declare_queue("orders.dlq");
//! broker.transport().publish(&Message::new("paid").with_destination("orders")).await?;
//!
//! let handler = HandlerBuilder::new(handler_fn(|msg: Message| async move {
//!     if msg.payload().is_empty() {
//!         return Err(HandlerError::permanent("empty order"));
//!     }
//!     Ok(())
//! }))
//! .layer(TimeoutLayer::new(Duration::from_secs(30)))
//! .layer(RetryLayer::new(RetryPolicy::default()))
//! .layer(DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default())))
//! .build();
//!
//! let dead_letter = DeadLetter::publish(
//!     Producer::new(broker.transport(), ProducerConfig::default()),
//!     "orders.dlq",
//! );
//! let source = broker.consumer("orders").end_when_drained();
//! let stats = Pipeline::new(source, handler, dead_letter).run().await?;
//! assert_eq!(stats.succeeded, 1);
//! assert_eq!(broker.acked_count("orders"), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Shutdown
//!
//! [`Pipeline::run_until`] stops taking deliveries when its signal fires, waits for the handlers
//! in flight, settles them, and then calls [`DeliverySource::close`] for the final ack/commit.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::attempts::AttemptCounter;
use crate::backoff::BackoffPolicy;
use crate::metrics::PipelineMetrics;
use crate::producer::Producer;
use crate::transport::{ConsumeError, ConsumerLag, DeliverySource};

mod batch;
mod dedupe;
mod handler;
mod health;
mod poison;
mod process;
#[cfg(feature = "otel")]
mod trace_layer;
#[cfg(feature = "serde")]
mod typed;

pub use dedupe::{Dedupe, DedupeError, DedupeLayer};
pub use handler::{
    handler_fn, ErrorKind, Handler, HandlerBuilder, HandlerError, HandlerFn, Layer, Retry,
    RetryLayer, RetryPolicy, Timeout, TimeoutLayer,
};
pub use health::{PipelineHealth, PipelineState};
#[cfg(feature = "otel")]
pub use trace_layer::{TraceContext, TraceContextLayer};
#[cfg(feature = "serde")]
pub use typed::{json_handler, JsonHandler};

use batch::{Batch, Sequences};
use poison::Poison;

/// Where messages go when their handler fails for good.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DeadLetter {
    /// Publish a copy (same id and key, plus the `x-dead-letter-reason` header; the origin:
    /// `x-origin-queue` for queue deliveries whose adapter names the queue, `x-origin-topic` /
    /// `x-origin-partition` / `x-origin-offset` for offset-based ones; and
    /// `x-delivery-attempts` where deliveries are counted) to `destination` through
    /// `producer`, and ack the original only after that publish is confirmed.
    Publish {
        /// The confirmed-publish producer.
        producer: Producer,
        /// The dead-letter queue's exchange or topic.
        destination: String,
    },
    /// Reject the delivery and let the broker dead-letter it. Only loss-free when the broker
    /// routes every rejected message to a durable queue, at least once (an AMQP quorum queue
    /// with a dead-letter exchange, at-least-once dead-lettering and a bound dead-letter
    /// queue). The source says whether it does ([`DeliverySource::rejects_to_dead_letter`]):
    /// Kafka never does, an AMQP consumer only when it verified the route at start. Over any
    /// other source the pipeline refuses to start with [`PipelineError::NoBrokerDeadLetter`],
    /// before it takes a delivery; use [`DeadLetter::Publish`] there.
    BrokerReject,
}

impl DeadLetter {
    /// Dead-letters through `producer` to `destination`.
    pub fn publish(producer: Producer, destination: impl Into<String>) -> Self {
        Self::Publish {
            producer,
            destination: destination.into(),
        }
    }
}

/// Pipeline limits.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    /// Deliveries handled at once (at least 1). Keep the broker's prefetch at or above this.
    /// Default 16. The deliveries of one [sequence](crate::transport::Delivery::sequence) in a
    /// batch (a Kafka partition's run in an ordered mode) are handled one at a time and take
    /// one slot together.
    pub concurrency: usize,
    /// Delay between attempts to pull from a source that lost its connection.
    pub reconnect_backoff: BackoffPolicy,
    /// How long a delivery is held, its handler (after [`ErrorKind::Unavailable`]) or its
    /// dead-letter publish (after a failure) retried in place with backoff, before it is
    /// nacked back to the broker. Default 30 s.
    ///
    /// Each nack may count towards a RabbitMQ quorum queue's delivery limit (see the module
    /// docs), so longer holds make outages cost fewer requeues; 0 nacks at once. Keep it well
    /// below the broker's consumer timeout (RabbitMQ: 30 minutes), and remember a held
    /// delivery keeps its concurrency slot.
    pub requeue_delay: Duration,
    /// How many deliveries of one message may end without an outcome (the consumer crashed,
    /// was killed or lost its connection under the handler) before the next delivery is
    /// dead-lettered without running the handler: the handler runs at most this many times
    /// for a message that keeps crashing its consumer. At least 1; default 5.
    ///
    /// Deliveries are counted where the count survives the consumer: by the
    /// [`AttemptCounter`] given to [`Pipeline::with_attempt_counter`] (use a durable one; it
    /// counts exactly the deliveries that reached the handler), else by the broker (a RabbitMQ
    /// quorum queue's `x-delivery-count`, less the requeues this process made on purpose).
    /// A broker counts every return, prefetched deliveries the crashed consumer never started
    /// included: with the broker's count alone, keep the prefetch near the concurrency, or a
    /// consumer crashing `max_deliveries` times stops its prefetched neighbours too. With
    /// neither, nothing counts across a crash and a message that crashes its consumer is
    /// redelivered for ever.
    pub max_deliveries: u32,
    /// Deliveries taken from the source at once ([`DeliverySource::next_batch`]) and handled
    /// together in one task (at least 1; capped by the free share of
    /// [`concurrency`](Self::concurrency)). Default 64.
    pub batch_size: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            concurrency: 16,
            reconnect_backoff: BackoffPolicy::default(),
            requeue_delay: Duration::from_secs(30),
            max_deliveries: 5,
        }
    }
}

/// What a pipeline run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Deliveries taken from the source.
    pub received: u64,
    /// Deliveries whose handler succeeded (duplicates skipped included), then acked.
    pub succeeded: u64,
    /// Deliveries dead-lettered, then acked (or rejected to the broker's DLX).
    pub dead_lettered: u64,
    /// Deliveries nacked back to the broker: the dead-letter publish failed, or a dependency
    /// of the handler was unavailable, for longer than [`PipelineConfig::requeue_delay`] (or
    /// until shutdown).
    pub requeued: u64,
    /// Deliveries held and retried in place because a dependency or the dead-letter publish
    /// was unavailable, whether they recovered or were then requeued.
    pub held: u64,
    /// Settle calls (ack / nack / reject) that failed; the broker redelivers those messages.
    pub settle_failures: u64,
}

struct Counters {
    received: AtomicU64,
    succeeded: AtomicU64,
    dead_lettered: AtomicU64,
    requeued: AtomicU64,
    held: AtomicU64,
    settle_failures: AtomicU64,
    activity: health::Activity,
    /// The same events for the `metrics` recorder (nothing without the feature).
    metrics: PipelineMetrics,
    /// The source's lag, for the health snapshot (`None`: the source cannot tell).
    lag: Option<Arc<dyn ConsumerLag>>,
}

impl Counters {
    /// Zeroed counters, recording into `metrics` too.
    fn new(metrics: PipelineMetrics, lag: Option<Arc<dyn ConsumerLag>>) -> Self {
        Self {
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            held: AtomicU64::new(0),
            settle_failures: AtomicU64::new(0),
            activity: health::Activity::new(),
            metrics,
            lag,
        }
    }

    fn snapshot(&self) -> PipelineStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PipelineStats {
            received: l(&self.received),
            succeeded: l(&self.succeeded),
            dead_lettered: l(&self.dead_lettered),
            requeued: l(&self.requeued),
            held: l(&self.held),
            settle_failures: l(&self.settle_failures),
        }
    }
}

/// Why a pipeline run ended in error. Deliveries already taken were drained and settled first.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The source failed for good; fix what the source error names and restart.
    #[error("delivery source failed: {0}")]
    Source(#[source] ConsumeError),
    /// The final close/commit failed; unsettled or uncommitted messages will be redelivered.
    #[error("closing the delivery source failed: {0}")]
    Close(#[source] ConsumeError),
    /// [`DeadLetter::BrokerReject`] over a source whose rejects are not known to reach a
    /// durable dead-letter queue (Kafka has no dead letter; an AMQP consumer did not verify its
    /// queue's route): a rejected message could be dropped, so the pipeline refused to start.
    /// No delivery was taken, and the source was closed.
    #[error("DeadLetter::BrokerReject could drop poison messages: this source's rejects are not known to reach a durable dead-letter queue (Kafka has no dead letter; a RabbitMQ consumer must be started with AmqpConsumer::connect_checked on a quorum queue declared with QueueSpec::with_dead_letter, and AmqpConsumer::dead_letter_route says what is missing); or use DeadLetter::publish(producer, \"<queue or topic>.dlq\") to dead-letter through a confirmed publish")]
    NoBrokerDeadLetter,
}

/// The consumer pipeline; see the module docs.
pub struct Pipeline<S, H> {
    source: S,
    handler: Arc<H>,
    dead_letter: Arc<DeadLetter>,
    config: PipelineConfig,
    counters: Arc<Counters>,
    attempt_counter: Option<Arc<dyn AttemptCounter>>,
}

impl<S, H> fmt::Debug for Pipeline<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl<S: DeliverySource, H: Handler + 'static> Pipeline<S, H> {
    /// A pipeline pulling from `source`, handling with `handler` (build it with
    /// [`HandlerBuilder`]) and dead-lettering through `dead_letter`.
    pub fn new(source: S, handler: H, dead_letter: DeadLetter) -> Self {
        let metrics = PipelineMetrics::new(source.metrics_label());
        let lag = source.consumer_lag();
        Self {
            source,
            handler: Arc::new(handler),
            dead_letter: Arc::new(dead_letter),
            config: PipelineConfig::default(),
            counters: Arc::new(Counters::new(metrics, lag)),
            attempt_counter: None,
        }
    }

    /// Counts deliveries in `counter` where the broker does not count them (Kafka, classic
    /// queues), so that a message crashing its consumer is dead-lettered after
    /// [`PipelineConfig::max_deliveries`]. The count must outlive the consumer process: use a
    /// durable counter (`reliable-stores`), or share the store every consumer of the queue or
    /// topic uses. It takes precedence over a broker's own count (which also counts prefetched
    /// deliveries that never reached a handler).
    pub fn with_attempt_counter(mut self, counter: Arc<dyn AttemptCounter>) -> Self {
        self.attempt_counter = Some(counter);
        self
    }

    /// Replaces the limits.
    pub fn with_config(mut self, config: PipelineConfig) -> Self {
        self.config = config;
        self
    }

    /// A live view of the counters, readable while the pipeline runs.
    pub fn stats(&self) -> PipelineStatsHandle {
        PipelineStatsHandle(self.counters.clone())
    }

    /// Runs until the source ends, then drains and closes it.
    pub async fn run(self) -> Result<PipelineStats, PipelineError> {
        self.run_until(std::future::pending()).await
    }

    /// Runs until `shutdown` resolves or the source ends: then stops taking deliveries, waits for
    /// the handlers in flight, settles them, and closes the source (final ack/commit).
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<PipelineStats, PipelineError> {
        if matches!(*self.dead_letter, DeadLetter::BrokerReject)
            && !self.source.rejects_to_dead_letter()
        {
            tracing::error!(
                "DeadLetter::BrokerReject over a source without a verified broker dead letter; not starting"
            );
            // Hand back what the source may hold (an AMQP prefetch) rather than wait for drop.
            if let Err(e) = self.source.close().await {
                tracing::warn!(error = %e, "closing the refused source failed; its broker redelivers what it held");
            }
            return Err(PipelineError::NoBrokerDeadLetter);
        }
        // Ends the holds of deliveries in flight once the pipeline stops taking new ones.
        let (draining, drain_signal) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        self.counters.activity.set(PipelineState::Running);
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut reconnect: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
        let mut failure = None;
        let poison = Arc::new(Poison::new(
            self.attempt_counter.clone(),
            self.config.max_deliveries,
        ));
        loop {
            while let Some(done) = tasks.try_join_next() {
                log_join(done);
            }
            let mut permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            // Only this loop takes slots, so the free ones stay free until taken below.
            let want = self
                .config
                .batch_size
                .max(1)
                .min(slots.available_permits().saturating_add(1));
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break,
                n = self.source.next_batch(want) => n,
            };
            match next {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => {
                    reconnect = None;
                    self.counters.activity.delivered();
                    self.counters
                        .received
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.counters.metrics.consumed(batch.len());
                    // A slot per sequence: the deliveries of one run one at a time.
                    let sequences = Sequences::of(&batch);
                    let more = u32::try_from(sequences.len().saturating_sub(1)).unwrap_or(u32::MAX);
                    if more > 0 {
                        // A source handing out more than asked still gets its deliveries
                        // handled; the slots then come free as they finish.
                        match slots.clone().try_acquire_many_owned(more) {
                            Ok(extra) => permit.merge(extra),
                            Err(_) => tracing::debug!(
                                deliveries = batch.len(),
                                "source returned more deliveries than free slots"
                            ),
                        }
                    }
                    let span = tracing::info_span!("reliable.consume", deliveries = batch.len());
                    let run = Batch {
                        handler: self.handler.clone(),
                        dead_letter: self.dead_letter.clone(),
                        counters: self.counters.clone(),
                        poison: poison.clone(),
                        window: self.config.requeue_delay,
                        draining: drain_signal.clone(),
                    };
                    tasks.spawn(run.run(batch, sequences, permit).instrument(span));
                }
                Err(e) if e.is_retryable() => {
                    let delays = reconnect
                        .get_or_insert_with(|| Box::new(self.config.reconnect_backoff.delays()));
                    let delay = delays
                        .next()
                        .unwrap_or(self.config.reconnect_backoff.max_delay);
                    tracing::warn!(error = %e, ?delay, "delivery source failed; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    failure = Some(PipelineError::Source(e));
                    break;
                }
            }
        }
        tracing::debug!(in_flight = tasks.len(), "pipeline draining");
        self.counters.activity.set(PipelineState::Draining);
        // No receiver left (no delivery was taken) is not an error.
        let _ = draining.send(true);
        while let Some(done) = tasks.join_next().await {
            log_join(done);
        }
        let closed = self.source.close().await;
        self.counters.activity.set(PipelineState::Stopped);
        let stats = self.counters.snapshot();
        match (failure, closed) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(PipelineError::Close(e)),
            (None, Ok(())) => Ok(stats),
        }
    }
}

/// A live view of a running pipeline's counters.
#[derive(Clone)]
pub struct PipelineStatsHandle(Arc<Counters>);

impl PipelineStatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> PipelineStats {
        self.0.snapshot()
    }
}

impl fmt::Debug for PipelineStatsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        // `process` catches handler panics; reaching this is a bug in a settle call.
        tracing::error!(error = %e, "pipeline task failed; the broker will redeliver its message");
    }
}
