//! One batch of deliveries in one task: each delivery of the batch is processed (see
//! [`process`]) concurrently with the others, and gives its concurrency slot back as soon as it
//! is settled.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::OwnedSemaphorePermit;

use super::poison::Poison;
use super::process::{process, Hold, Started, Task};
use super::{Counters, DeadLetter, Handler};
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
        let started: Vec<Started> = batch.iter().map(|_| Started::default()).collect();
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
}
