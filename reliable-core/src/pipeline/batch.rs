//! One batch of deliveries in one task: every delivery is counted (poison), the ones still
//! allowed to run go through [`Handler::handle_batch`], and then each delivery is settled by
//! its own outcome (see [`process`]: retried in place while unavailable, dead-lettered,
//! requeued, acked).
//!
//! Deliveries of one [sequence](crate::transport::Delivery::sequence) must not overlap, so the
//! batch is handled in waves: each `handle_batch` call takes the next delivery of every
//! sequence still going (a delivery without a sequence is a sequence of its own, so a batch
//! without sequences is one wave), and the wave's successes are acked before the next wave.
//! A delivery that does not succeed ends its sequence's waves: it is settled first (held,
//! dead-lettered or requeued) while the other sequences go on, and only then are the
//! deliveries after it handled, one at a time, each once the one before is settled; after a
//! requeue, they are handed back behind it without running.
//!
//! A sequence holds one concurrency slot (its handlers run one at a time) and gives it back
//! once all its deliveries are settled.

use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::OwnedSemaphorePermit;

use super::poison::Poison;
use super::process::{hand_back, process, Hold, Settled, Started, Task};
use super::{Counters, DeadLetter, Handler, HandlerError};
use crate::message::Message;
use crate::metrics::HandlerTimer;
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
    /// Processes and settles every delivery of `batch`, whose sequences are `sequences`;
    /// `slots` holds one concurrency slot per sequence (fewer only when the source handed out
    /// more than asked).
    pub(super) async fn run(
        self,
        batch: Vec<Delivery>,
        sequences: Sequences,
        mut slots: OwnedSemaphorePermit,
    ) {
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let waves = self.waves(batch, &sequences, &mut slots, closed_tx);
        futures::join!(waves, self.finish_closed(closed_rx));
    }

    fn task(&self) -> Task<'_> {
        Task {
            dead_letter: &self.dead_letter,
            poison: &self.poison,
            counters: &self.counters,
        }
    }

    fn hold(&self) -> Hold {
        Hold {
            window: self.window,
            draining: self.draining.clone(),
        }
    }

    /// Runs the batch's waves (see the module docs): acks each wave's successes, and sends
    /// each sequence ended by a delivery that did not succeed to `closed`.
    async fn waves(
        &self,
        batch: Vec<Delivery>,
        sequences: &Sequences,
        slots: &mut OwnedSemaphorePermit,
        closed: UnboundedSender<Closed>,
    ) {
        let mut items: Vec<Option<Delivery>> = batch.into_iter().map(Some).collect();
        // Per sequence still going: its index, how far it got, and its slot.
        let mut going: Vec<(usize, usize, Option<OwnedSemaphorePermit>)> = (0..sequences.len())
            .map(|s| (s, 0, slots.split(1)))
            .collect();
        while !going.is_empty() {
            let wave: Vec<usize> = going
                .iter()
                .map(|&(s, at, _)| sequences.member(s, at))
                .collect();
            let started = {
                let deliveries: Vec<&Delivery> =
                    wave.iter().filter_map(|&i| items[i].as_ref()).collect();
                self.attempt_wave(&deliveries).await
            };
            let mut acks = Vec::with_capacity(wave.len());
            let mut done = Vec::new();
            let mut next = Vec::with_capacity(going.len());
            for ((s, at, slot), (i, started)) in going.drain(..).zip(wave.into_iter().zip(started))
            {
                let Some(delivery) = items[i].take() else {
                    continue;
                };
                let rest = sequences.len_of(s);
                if matches!(started.outcome, Some(Ok(()))) {
                    acks.push(process(
                        &*self.handler,
                        self.task(),
                        self.hold(),
                        delivery,
                        started,
                    ));
                    if at + 1 < rest {
                        next.push((s, at + 1, slot));
                    } else {
                        done.push(slot);
                    }
                } else {
                    let after = (at + 1..rest)
                        .filter_map(|k| items[sequences.member(s, k)].take())
                        .collect();
                    // The receiver lives as long as this batch; a send cannot fail.
                    let _ = closed.send(Closed {
                        failed: (delivery, started),
                        after,
                        slot,
                    });
                }
            }
            join_all(acks).await;
            drop(done);
            going = next;
        }
    }

    /// Settles the sequences `closed` sends, concurrently: the delivery that ended its waves
    /// first, then each one after it, in order, once the one before is settled.
    async fn finish_closed(&self, mut closed: UnboundedReceiver<Closed>) {
        let mut running = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                got = closed.recv(), if open => match got {
                    Some(sequence) => running.push(self.finish(sequence)),
                    None => open = false,
                },
                Some(()) = running.next(), if !running.is_empty() => {}
                else => break,
            }
        }
    }

    /// Settles one closed sequence in order; see [`finish_closed`](Self::finish_closed).
    async fn finish(&self, sequence: Closed) {
        let Closed {
            failed: (delivery, started),
            after,
            slot,
        } = sequence;
        let mut settled =
            process(&*self.handler, self.task(), self.hold(), delivery, started).await;
        for delivery in after {
            if settled == Settled::Requeued {
                hand_back(self.task(), delivery).await;
            } else {
                settled = process(
                    &*self.handler,
                    self.task(),
                    self.hold(),
                    delivery,
                    Started::default(),
                )
                .await;
            }
        }
        drop(slot);
    }

    /// Counts the deliveries of one wave and runs the batch handler once over those allowed
    /// to run; answers how far each got.
    async fn attempt_wave(&self, wave: &[&Delivery]) -> Vec<Started> {
        let counts = join_all(wave.iter().map(|d| self.poison.count(d))).await;
        let mut started = Vec::with_capacity(wave.len());
        let mut runnable = Vec::with_capacity(wave.len());
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
        let msgs: Vec<&Message> = runnable.iter().map(|&i| wave[i].message()).collect();
        let timer = HandlerTimer::start();
        let answered = AssertUnwindSafe(self.handler.handle_batch(&msgs))
            .catch_unwind()
            .await;
        // A panicked batch is not timed: its messages are handled (and timed) one by one.
        if answered.is_ok() {
            self.counters.metrics.handled(timer, msgs.len());
        }
        match answered {
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

/// A sequence whose waves ended at a delivery that did not succeed.
struct Closed {
    /// That delivery, and how far it got.
    failed: (Delivery, Started),
    /// The deliveries after it, in order, not handled yet.
    after: Vec<Delivery>,
    /// The sequence's concurrency slot.
    slot: Option<OwnedSemaphorePermit>,
}

/// A batch's sequences: per sequence the indices of its deliveries, in batch order; a
/// delivery without a sequence is a sequence of its own.
pub(super) struct Sequences {
    /// The batch's indices, grouped by sequence.
    order: Vec<usize>,
    /// Where each sequence's indices start in `order`, plus the end.
    starts: Vec<usize>,
}

impl Sequences {
    /// The sequences of `batch`.
    pub(super) fn of(batch: &[Delivery]) -> Self {
        if batch.iter().all(|d| d.sequence().is_none()) {
            return Self {
                order: (0..batch.len()).collect(),
                starts: (0..=batch.len()).collect(),
            };
        }
        // Each delivery's rank: its sequence's place among the batch's sequences.
        let mut named: Vec<(u64, usize)> = Vec::new();
        let mut sizes: Vec<usize> = Vec::new();
        let ranks: Vec<usize> = batch
            .iter()
            .map(|d| {
                let rank = match d.sequence() {
                    Some(seq) => match named.iter().find(|(s, _)| *s == seq) {
                        Some(&(_, rank)) => rank,
                        None => {
                            named.push((seq, sizes.len()));
                            sizes.push(0);
                            sizes.len() - 1
                        }
                    },
                    None => {
                        sizes.push(0);
                        sizes.len() - 1
                    }
                };
                sizes[rank] += 1;
                rank
            })
            .collect();
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0;
        for size in &sizes {
            starts.push(at);
            at += size;
        }
        starts.push(at);
        let mut fill = starts.clone();
        let mut order = vec![0; batch.len()];
        for (i, rank) in ranks.into_iter().enumerate() {
            order[fill[rank]] = i;
            fill[rank] += 1;
        }
        Self { order, starts }
    }

    /// How many sequences.
    pub(super) fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// How many deliveries sequence `s` has.
    fn len_of(&self, s: usize) -> usize {
        self.starts[s + 1] - self.starts[s]
    }

    /// The batch index of the `k`-th delivery of sequence `s`.
    fn member(&self, s: usize, k: usize) -> usize {
        self.order[self.starts[s] + k]
    }
}
