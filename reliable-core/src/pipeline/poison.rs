//! Poison messages (loss-matrix row L10): counting each message's deliveries across crashes and
//! restarts, stopping one that keeps crashing its consumer, and the dead-letter copy with its
//! origin.
//!
//! A delivery is counted before its handler runs, by the pipeline's [`AttemptCounter`] when it
//! has one, otherwise from the broker's own count ([`Delivery::delivery_count`]). Past
//! [`PipelineConfig::max_deliveries`](super::PipelineConfig::max_deliveries) the message is
//! dead-lettered without running its handler again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::attempts::AttemptCounter;
use crate::idempotency::StoreError;
use crate::message::{headers, IdempotencyKey, Message, MessageId};
use crate::producer::SendError;
use crate::transport::Delivery;

use super::{DeadLetter, HandlerError};

/// Deliberate requeues remembered per message, at most; past it the memory starts afresh (a
/// message requeued before then may then be stopped one delivery early).
const REQUEUES_REMEMBERED: usize = 100_000;

/// How one delivery was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Counted {
    /// By the broker: deliveries without an outcome so far, this one included.
    Broker(u32),
    /// By the attempt counter: the same, from the counter.
    Counter(u32),
}

impl Counted {
    /// The deliveries counted, this one included.
    pub(super) fn attempts(self) -> u32 {
        match self {
            Counted::Broker(n) | Counted::Counter(n) => n,
        }
    }
}

/// The pipeline's delivery counting; shared by its tasks.
pub(super) struct Poison {
    counter: Option<Arc<dyn AttemptCounter>>,
    max_deliveries: u32,
    /// Requeues this process made on purpose (a dependency or the dead-letter publish was
    /// unavailable), per message: a broker's count includes them, but they are no crash.
    requeued: Mutex<HashMap<MessageId, u32>>,
}

impl Poison {
    pub(super) fn new(counter: Option<Arc<dyn AttemptCounter>>, max_deliveries: u32) -> Self {
        Self {
            counter,
            max_deliveries: max_deliveries.max(1),
            requeued: Mutex::new(HashMap::new()),
        }
    }

    fn requeued(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, u32>> {
        // Only counts live here; a panic elsewhere cannot leave one half-written.
        self.requeued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `delivery`: one more attempt recorded in the counter (before the handler runs,
    /// so a crash in it is counted); else the broker's count, less this process's deliberate
    /// requeues; else `None` (nothing counts across a crash).
    ///
    /// The counter goes first because it counts exactly the deliveries that reached a handler:
    /// a broker counts every return, so the prefetched deliveries a crashed consumer had not
    /// started yet are counted too.
    pub(super) async fn count(&self, delivery: &Delivery) -> Result<Option<Counted>, StoreError> {
        if let Some(counter) = &self.counter {
            let n = counter
                .record_attempt(&delivery.message().idempotency_key())
                .await?;
            return Ok(Some(Counted::Counter(n)));
        }
        Ok(delivery.delivery_count().map(|n| {
            let ours = self
                .requeued()
                .get(&delivery.message().id())
                .copied()
                .unwrap_or(0);
            Counted::Broker(n.saturating_sub(ours).max(1))
        }))
    }

    /// Records that `delivery` is handed back on purpose without reaching a handler: a
    /// broker that counts deliveries counts its return, which is no crash.
    pub(super) fn handed_back(&self, delivery: &Delivery) {
        if self.counter.is_some() || delivery.delivery_count().is_none() {
            return;
        }
        remember_requeue(&mut self.requeued(), delivery.message().id());
    }

    /// The failure that stops a message delivered `counted` times, if that is too many.
    pub(super) fn exceeded(&self, counted: Counted) -> Option<HandlerError> {
        let n = counted.attempts();
        (n > self.max_deliveries).then(|| {
            HandlerError::permanent(format!(
                "poison message: crashed its consumer {} times (delivered {n} times without an \
                 outcome; PipelineConfig::max_deliveries is {}); dead-lettered without running \
                 the handler again",
                n - 1,
                self.max_deliveries
            ))
        })
    }

    /// The pipeline settled the message (`requeued`: nacked back on purpose): forget its count,
    /// or, for a deliberate requeue, remember that this return was no crash. A message already
    /// past the limit keeps its count, so it stays stopped.
    pub(super) async fn settled(
        &self,
        id: MessageId,
        key: &IdempotencyKey,
        counted: Option<Counted>,
        requeued: bool,
    ) {
        match counted {
            Some(Counted::Broker(_)) => {
                let mut map = self.requeued();
                if requeued {
                    remember_requeue(&mut map, id);
                } else {
                    map.remove(&id);
                }
            }
            // Past the limit the count stays (until the store's TTL), whatever the outcome: a
            // settle may not be durable yet (a Kafka offset waits for the next commit), and a
            // crash before it delivers the message again, which must be stopped again rather
            // than run with a fresh count.
            Some(Counted::Counter(n)) if n <= self.max_deliveries => {
                if let Some(counter) = &self.counter {
                    if let Err(e) = counter.clear(key).await {
                        // The count stays one too high: the message is stopped one delivery
                        // early at worst.
                        tracing::warn!(error = %e, "could not clear the message's attempt count");
                    }
                }
            }
            Some(Counted::Counter(_)) | None => {}
        }
    }
}

/// Counts one deliberate requeue of `id` in `map`.
fn remember_requeue(map: &mut HashMap<MessageId, u32>, id: MessageId) {
    if map.len() >= REQUEUES_REMEMBERED && !map.contains_key(&id) {
        map.clear();
    }
    *map.entry(id).or_insert(0) += 1;
}

/// How a dead letter went.
pub(super) enum DeadLettered {
    /// A copy was published and confirmed.
    Published,
    /// The delivery is to be rejected to the broker's dead letter.
    Reject,
}

/// Dead-letters `delivery` after `err`: publishes the copy (awaited to its confirm), or says to
/// reject it to the broker.
pub(super) async fn send_dead_letter(
    dead_letter: &DeadLetter,
    delivery: &Delivery,
    err: &HandlerError,
    counted: Option<Counted>,
) -> Result<DeadLettered, SendError> {
    match dead_letter {
        DeadLetter::BrokerReject => Ok(DeadLettered::Reject),
        DeadLetter::Publish {
            producer,
            destination,
        } => {
            producer
                .send_confirmed(copy(delivery, destination, err, counted))
                .await?;
            Ok(DeadLettered::Published)
        }
    }
}

/// The copy of `delivery`'s message that goes to the dead letter: the same id and key, the
/// reason, where it came from and how often it was delivered.
fn copy(
    delivery: &Delivery,
    destination: &str,
    err: &HandlerError,
    counted: Option<Counted>,
) -> Message {
    let mut reason = err.to_string();
    if reason.len() > 1024 {
        let mut end = 1024;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let mut copy = delivery.message().clone().with_destination(destination);
    copy.set_header(headers::DEAD_LETTER_REASON, reason);
    if let Some(queue) = delivery.origin() {
        copy.set_header(headers::ORIGIN_QUEUE, queue);
    }
    if let Some(p) = delivery.position() {
        copy.set_header(headers::ORIGIN_TOPIC, p.partition.topic.to_string());
        copy.set_header(headers::ORIGIN_PARTITION, p.partition.partition.to_string());
        copy.set_header(headers::ORIGIN_OFFSET, p.offset.to_string());
    }
    if let Some(c) = counted {
        copy.set_header(headers::DELIVERY_ATTEMPTS, c.attempts().to_string());
    }
    copy
}
