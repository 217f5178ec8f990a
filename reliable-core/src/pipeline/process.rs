//! One delivery's way through the pipeline: counted, run through the handler, held and
//! retried in place while a dependency is unavailable, then acked, dead-lettered or requeued.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use super::poison::{send_dead_letter, Counted, DeadLettered, Poison};
use super::{Counters, DeadLetter, ErrorKind, Handler, HandlerError};
use crate::backoff::BackoffPolicy;
use crate::metrics::{HandlerTimer, PipelineMetrics};
use crate::transport::{AckError, Delivery};

/// In-place retries while a delivery is held (see the module docs).
const HOLD_RETRY: BackoffPolicy = BackoffPolicy {
    min_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(2),
    factor: 2.0,
    jitter: true,
};

/// How long one delivery may be held before a requeue, and the pipeline's shutdown signal.
pub(super) struct Hold {
    pub(super) window: Duration,
    pub(super) draining: tokio::sync::watch::Receiver<bool>,
}

impl Hold {
    /// Starts holding one delivery now.
    fn start(self) -> Holding {
        Holding {
            // `None`: a window too long to represent has no end.
            deadline: tokio::time::Instant::now().checked_add(self.window),
            delays: Box::new(HOLD_RETRY.delays()),
            draining: self.draining,
        }
    }
}

/// One delivery being held: when to give up, and the waits between in-place attempts.
struct Holding {
    deadline: Option<tokio::time::Instant>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    draining: tokio::sync::watch::Receiver<bool>,
}

impl Holding {
    /// Waits before the next in-place attempt (the last one falls on the deadline); `false`
    /// once the hold is over: the window has passed, or the pipeline is shutting down.
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.deadline.is_some_and(|d| now >= d) || *self.draining.borrow() {
            return false;
        }
        let next = self.delays.next().unwrap_or(HOLD_RETRY.max_delay);
        let delay = self.deadline.map_or(next, |d| next.min(d - now));
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            // Shutdown, or the pipeline is gone: either way, stop holding.
            _ = self.draining.wait_for(|draining| *draining) => false,
        }
    }
}

/// Runs the handler, turning a panic into a permanent failure; times it for the metrics.
async fn run_handler<H: Handler + ?Sized>(
    handler: &H,
    metrics: &PipelineMetrics,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    let timer = HandlerTimer::start();
    let outcome = AssertUnwindSafe(handler.handle(delivery.message()))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::permanent("handler panicked")));
    metrics.handled(timer, 1);
    outcome
}

fn unavailable(outcome: &Result<(), HandlerError>) -> bool {
    matches!(outcome, Err(e) if e.kind() == ErrorKind::Unavailable)
}

/// What a delivery's task shares with the pipeline.
pub(super) struct Task<'a> {
    pub(super) dead_letter: &'a DeadLetter,
    pub(super) poison: &'a Poison,
    pub(super) counters: &'a Counters,
}

/// One attempt at a delivery: counts it the first time (a count that cannot be recorded is an
/// unavailable dependency), stops it without running the handler when it has been delivered
/// too often, and otherwise runs the handler.
async fn attempt<H: Handler + ?Sized>(
    handler: &H,
    poison: &Poison,
    metrics: &PipelineMetrics,
    delivery: &Delivery,
    counted: &mut Option<Option<Counted>>,
) -> Result<(), HandlerError> {
    let count = match *counted {
        Some(count) => count,
        None => match poison.count(delivery).await {
            Ok(count) => {
                *counted = Some(count);
                count
            }
            Err(e) => {
                return Err(HandlerError::unavailable(format!(
                    "cannot record the delivery attempt: {e}"
                )))
            }
        },
    };
    if let Some(stop) = count.and_then(|c| poison.exceeded(c)) {
        return Err(stop);
    }
    run_handler(handler, metrics, delivery).await
}

/// How far a delivery got before [`process`] takes it over: counted or not, and the outcome
/// of its first handler attempt, if its batch ran one.
#[derive(Default)]
pub(super) struct Started {
    /// `Some` once the delivery was counted (see [`Poison::count`]).
    pub(super) counted: Option<Option<Counted>>,
    /// The outcome of the first attempt; `None` to run it here.
    pub(super) outcome: Option<Result<(), HandlerError>>,
}

/// How [`process`] settled a delivery, as far as the rest of its sequence cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// Acked, dead-lettered or rejected (or its settle failed): the next delivery of its
    /// sequence may run.
    Final,
    /// Handed back to the broker to be delivered again: the deliveries after it in its
    /// sequence must go back too, behind it, without running.
    Requeued,
}

/// Handles one delivery and settles it once its outcome is final. A delivery that comes with
/// the outcome of its batch's attempt ([`Started::outcome`]) is not handled again unless that
/// outcome was [`ErrorKind::Unavailable`] (then it is held and retried in place, one message
/// at a time).
pub(super) async fn process<H: Handler + ?Sized>(
    handler: &H,
    task: Task<'_>,
    hold: Hold,
    delivery: Delivery,
    started: Started,
) -> Settled {
    let Started {
        mut counted,
        outcome,
    } = started;
    let outcome = match outcome {
        Some(outcome) => outcome,
        // Boxed too: after a batch attempt, only a panicking batch handler gets here.
        None => {
            let metrics = &task.counters.metrics;
            Box::pin(attempt(
                handler,
                task.poison,
                metrics,
                &delivery,
                &mut counted,
            ))
            .await
        }
    };
    if outcome.is_ok() {
        // The common case, without a span of its own: the batch's span covers it.
        task.counters.succeeded.fetch_add(1, Ordering::Relaxed);
        task.counters.metrics.acked();
        let counted = counted.flatten();
        let forget = counted.map(|_| {
            let message = delivery.message();
            (message.id(), message.idempotency_key().clone())
        });
        let id = delivery.message().id();
        let settled = delivery.ack().await;
        if let Some((id, key)) = forget {
            task.poison.settled(id, &key, counted, false).await;
        }
        if let Err(e) = settled {
            task.counters
                .settle_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, message_id = %id, "could not settle delivery");
        }
        return Settled::Final;
    }
    let span = tracing::info_span!(
        "reliable.consume",
        message_id = %delivery.message().id(),
        redelivered = delivery.redelivered(),
        delivery_count = delivery.delivery_count(),
        attempts = tracing::field::Empty,
    );
    // Boxed: the rare path's state stays out of every delivery's future.
    Box::pin(settle_failed(handler, task, hold, delivery, counted, outcome).instrument(span)).await
}

/// The rest of [`process`] for a delivery whose first attempt failed.
async fn settle_failed<H: Handler + ?Sized>(
    handler: &H,
    task: Task<'_>,
    hold: Hold,
    delivery: Delivery,
    mut counted: Option<Option<Counted>>,
    mut outcome: Result<(), HandlerError>,
) -> Settled {
    let Task {
        dead_letter,
        poison,
        counters,
    } = task;
    let (id, key) = (
        delivery.message().id(),
        delivery.message().idempotency_key().clone(),
    );
    let window = hold.window;
    let mut hold = Some(hold);
    if let Some(Some(c)) = counted {
        tracing::Span::current().record("attempts", c.attempts());
    }
    if unavailable(&outcome) {
        if let (Some(h), Err(err)) = (hold.take(), &outcome) {
            counters.held.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, hold = ?window, "handler dependency unavailable; holding the delivery and retrying in place (not acked, not dead-lettered)");
            let mut holding = h.start();
            while unavailable(&outcome) && holding.wait().await {
                let was_counted = counted.is_some();
                outcome =
                    attempt(handler, poison, &counters.metrics, &delivery, &mut counted).await;
                if let (false, Some(Some(c))) = (was_counted, counted) {
                    tracing::Span::current().record("attempts", c.attempts());
                }
            }
            if !unavailable(&outcome) {
                tracing::info!("handler dependency available again; settling without a requeue");
            }
        }
    }
    let counted = counted.flatten();
    let mut requeued = false;
    let settled = match outcome {
        Ok(()) => {
            counters.succeeded.fetch_add(1, Ordering::Relaxed);
            counters.metrics.acked();
            delivery.ack().await
        }
        Err(err) if err.kind() == ErrorKind::Unavailable => {
            counters.requeued.fetch_add(1, Ordering::Relaxed);
            counters.metrics.requeued();
            requeued = true;
            tracing::warn!(error = %err, hold = ?window, "handler dependency still unavailable after the hold; requeueing the message (not acked, not dead-lettered)");
            delivery.nack(true).await
        }
        Err(err) => {
            let mut sent = send_dead_letter(dead_letter, &delivery, &err, counted).await;
            if let (Err(dl), Some(h)) = (&sent, hold.take()) {
                counters.held.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, dead_letter_error = %dl, hold = ?window, "dead-letter publish failed; holding the delivery and retrying the publish in place");
                let mut holding = h.start();
                while sent.is_err() && holding.wait().await {
                    sent = send_dead_letter(dead_letter, &delivery, &err, counted).await;
                }
            }
            match sent {
                Ok(DeadLettered::Published) => {
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    counters.metrics.dead_lettered();
                    tracing::warn!(error = %err, "message dead-lettered");
                    delivery.ack().await
                }
                Ok(DeadLettered::Reject) => {
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    counters.metrics.dead_lettered();
                    tracing::warn!(error = %err, "message rejected to the broker's dead letter");
                    delivery.reject().await
                }
                Err(dl) => {
                    counters.requeued.fetch_add(1, Ordering::Relaxed);
                    counters.metrics.requeued();
                    requeued = true;
                    tracing::error!(error = %err, dead_letter_error = %dl, hold = ?window, "dead-letter publish still failing after the hold; requeueing");
                    delivery.nack(true).await
                }
            }
        }
    };
    poison.settled(id, &key, counted, requeued).await;
    if let Err(e) = settled {
        counters.settle_failures.fetch_add(1, Ordering::Relaxed);
        let e: AckError = e;
        tracing::warn!(error = %e, "could not settle delivery");
    }
    if requeued {
        Settled::Requeued
    } else {
        Settled::Final
    }
}

/// Hands a delivery back to the broker without running its handler: one after a delivery of
/// its sequence that was requeued, so that it comes back behind that one, in order.
pub(super) async fn hand_back(task: Task<'_>, delivery: Delivery) {
    task.counters.requeued.fetch_add(1, Ordering::Relaxed);
    task.counters.metrics.requeued();
    task.poison.handed_back(&delivery);
    let id = delivery.message().id();
    tracing::debug!(message_id = %id, "handed back behind a requeued delivery of its sequence");
    if let Err(e) = delivery.nack(true).await {
        task.counters
            .settle_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, message_id = %id, "could not settle delivery");
    }
}
