//! One batch of deliveries in one task: every delivery is counted (poison), the ones still
//! allowed to run go through one [`Handler::handle_batch`] call, and then each delivery is
//! settled by its own outcome (see [`process`]: retried in place while unavailable,
//! dead-lettered, requeued, acked) concurrently with the others, giving its concurrency slot
//! back as soon as it is settled.
//!
//! A batch is settled only once its whole `handle_batch` call has answered, so a slow message
//! delays its batch-mates' settles (not their effects).

use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::OwnedSemaphorePermit;

use super::poison::Poison;
use super::process::{process, Hold, Started, Task};
use super::{Counters, DeadLetter, Handler, HandlerError};
use crate::message::Message;
use crate::transport::Delivery;

/// What a batch's task shares with the pipeline.
pub(super) struct Batch<H: ?Sized> {
    pub(super) handler: Arc<H>,
    pub(super) dead_letter: Arc<DeadLetter>,
    pub(super) counters: Arc<Counters>,
    pub(super) poison: Arc<Poison>,
    /// How long a delivery may be held before a requeue.
    pub(super) window: Duration,
    /// The pipeline's shutdown signal.
    pub(super) draining: tokio::sync::watch::Receiver<bool>,
}

impl<H: Handler + ?Sized> Batch<H> {
    /// Processes and settles every delivery of `batch`; `slots` holds one concurrency slot per
    /// delivery (fewer only when the source handed out more than asked).
    pub(super) async fn run(self, batch: Vec<Delivery>, mut slots: OwnedSemaphorePermit) {
        let started = self.attempt(&batch).await;
        let mut running: FuturesUnordered<_> = batch
            .into_iter()
            .zip(started)
            .map(|(delivery, started)| {
                let slot = slots.split(1);
                let this = &self;
                async move {
                    let task = Task {
                        dead_letter: &this.dead_letter,
                        poison: &this.poison,
                        counters: &this.counters,
                    };
                    let hold = Hold {
                        window: this.window,
                        draining: this.draining.clone(),
                    };
                    process(&*this.handler, task, hold, delivery, started).await;
                    drop(slot);
                }
            })
            .collect();
        while running.next().await.is_some() {}
    }

    /// Counts every delivery and runs the batch handler once over those allowed to run;
    /// answers how far each delivery got.
    async fn attempt(&self, batch: &[Delivery]) -> Vec<Started> {
        let counts = join_all(batch.iter().map(|d| self.poison.count(d))).await;
        let mut started = Vec::with_capacity(batch.len());
        let mut runnable = Vec::with_capacity(batch.len());
        for (i, count) in counts.into_iter().enumerate() {
            match count {
                Ok(count) => {
                    let stop = count.and_then(|c| self.poison.exceeded(c));
                    if stop.is_none() {
                        runnable.push(i);
                    }
                    started.push(Started {
                        counted: Some(count),
                        outcome: stop.map(Err),
                    });
                }
                // Counted (and run) again while the delivery is held.
                Err(e) => started.push(Started {
                    counted: None,
                    outcome: Some(Err(HandlerError::unavailable(format!(
                        "cannot record the delivery attempt: {e}"
                    )))),
                }),
            }
        }
        if runnable.is_empty() {
            return started;
        }
        let msgs: Vec<&Message> = runnable.iter().map(|&i| batch[i].message()).collect();
        match AssertUnwindSafe(self.handler.handle_batch(&msgs))
            .catch_unwind()
            .await
        {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for &i in &runnable {
                    started[i].outcome = Some(outcomes.next().unwrap_or_else(|| {
                        Err(HandlerError::permanent(
                            "Handler::handle_batch answered fewer outcomes than messages",
                        ))
                    }));
                }
            }
            // No outcome: `process` runs each message's handler on its own.
            Err(_) => tracing::error!(
                messages = msgs.len(),
                "Handler::handle_batch panicked; handling the batch's messages one at a time"
            ),
        }
        started
    }
}
