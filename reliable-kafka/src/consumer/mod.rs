//! [`KafkaConsumer`]: a manual-commit consumer implementing the core [`DeliverySource`]
//! (loss-matrix row L5; invariants 4 and 5).
//!
//! librdkafka never commits or stores an offset on its own (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`, enforced by
//! [`harden_consumer_config`](crate::config::harden_consumer_config)). Every message handed out
//! is tracked in an [`OffsetTracker`]; its [`Acker`](reliable_core::Acker) marks it finished,
//! and only the contiguous finished watermark per partition is committed:
//!
//! * **periodically**, every [`commit_interval`](KafkaConsumerBuilder::commit_interval) (1 s by
//!   default), by a background task, whether or not the pipeline is pulling;
//! * **on demand**, with [`KafkaConsumer::commit_now`];
//! * **on close** ([`DeliverySource::close`], called by the pipeline after it has drained and
//!   settled every delivery): the periodic task is stopped and awaited first, then the final
//!   watermark is committed;
//! * **on partition revoke** (rebalance): the consumer first waits, at most
//!   [`revoke_drain_timeout`](KafkaConsumerBuilder::revoke_drain_timeout) (10 s by default),
//!   for the deliveries of the revoked partitions still in flight, then synchronously commits
//!   what is finished there. librdkafka runs this inside [`next`](DeliverySource::next); on a
//!   multi-thread runtime the wait runs in [`tokio::task::block_in_place`], so the rest of the
//!   runtime (the handlers settling those deliveries, timers) keeps running; on a
//!   current-thread runtime, where the handlers could only run on the waiting thread, it does
//!   not wait. Work still unfinished after the wait stays uncommitted: the partition's new
//!   owner receives it again (deduplicated by the idempotency key) and its late settle returns
//!   [`AckError::Stale`](reliable_core::AckError::Stale). A *lost* assignment (session
//!   timeout) commits nothing.
//!
//! Commits are serialised and each reads the watermark when it is sent, so a slow commit can
//! never land after a newer one with an older position. A commit never passes an unfinished
//! offset, so a crash (even SIGKILL with a full buffer) redelivers everything not yet
//! processed. `ack`, `reject` and `nack(false)` finish an offset; `nack(true)` hands the record
//! out again, marked redelivered, from a copy the consumer keeps: the partition is not sought
//! back, so any number of requeues of one partition each come back, and the records after
//! them are not fetched or handed out again.
//!
//! [`KafkaConsumer::offsets`] shows the watermark and the unfinished offsets per partition,
//! read-only: only the consumer's own ackers finish offsets.
//!
//! [`KafkaConsumer::lag`] shows, per owned partition, how many records lie beyond the group's
//! committed offset, from librdkafka's statistics (no extra request); the pipeline's health
//! reports their sum and, with the `metrics` feature of `reliable-core`, each partition is the
//! gauge `reliable_commit_lag{topic, partition}`. See the [`lag`] module for the exact
//! definition and what happens on revoke.
//!
//! # Ordering
//!
//! The pipeline handles several deliveries at once. [`Ordering`] (set with
//! [`KafkaConsumerBuilder::ordering`]) says which of them may overlap:
//!
//! * [`Ordering::PerPartition`] (the default): each partition is handled strictly in log order,
//!   one record at a time, while different partitions run concurrently. [`next`](DeliverySource::next)
//!   hands a record out only once every earlier record of its partition is settled;
//!   [`next_batch`](DeliverySource::next_batch) hands the records of a partition it has ready
//!   out together as a run, one [sequence](Delivery::sequence) the pipeline handles one record
//!   at a time (a record's handler starts once the one before it succeeded or was settled),
//!   and no later record of that partition until the run is settled;
//! * [`Ordering::PerKey`]: the same per (partition, record key); records without a key are
//!   ordered per partition;
//! * [`Ordering::Unordered`]: records are handed out as they arrive.
//!
//! In the ordered modes, records that arrive for a busy partition (or key) are held by the
//! consumer, at most [`max_held`](KafkaConsumerBuilder::max_held) of them (1000 by default); when
//! the limit is reached the consumer stops polling until a delivery is settled. Held records are
//! tracked as unfinished, so no commit passes them; on partition revoke they are dropped without
//! being handed out, and the partition's new owner reads them. A record requeued with
//! `nack(true)` goes back to the head of its partition's (or key's) queue, behind the records
//! of its run requeued before it, and is handed out again before any later record of that
//! partition (or key); in the unordered mode it is handed out again before any new record.
//!
//! Client errors: only fatal ones (authorization, invalid configuration) come out of
//! [`next`](DeliverySource::next), as [`ConsumeError::Fatal`]. A broker going down or the group
//! coordinator moving are logged and polling goes on, because librdkafka reconnects and rejoins
//! the group only while it is polled.
//!
//! ```no_run
//! use reliable_core::pipeline::{handler_fn, DeadLetter, HandlerBuilder, Pipeline};
//! use reliable_core::producer::Producer;
//! use reliable_kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let source = KafkaConsumer::builder("127.0.0.1:19092", "billing")
//!     .subscribe(TopicSpec::new("orders"))
//!     .build()
//!     .await?;
//! let dlq = KafkaTransport::builder("127.0.0.1:19092")
//!     .topic(TopicSpec::new("orders.dlq"))
//!     .build()
//!     .await?;
//! let dead_letter = DeadLetter::publish(
//!     Producer::new(dlq.clone(), dlq.recommended_producer_config()),
//!     "orders.dlq",
//! );
//! let handler = HandlerBuilder::new(handler_fn(|_msg| async { Ok(()) })).build();
//! Pipeline::new(source, handler, dead_letter).run().await?;
//! # Ok(()) }
//! ```

mod acker;
mod builder;
mod commit;
pub mod lag;
mod ordering;
mod rebalance;
mod record;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::ClientConfig;
use reliable_core::offsets::{OffsetTracker, OffsetsView};
use reliable_core::transport::ConsumerLag;
use reliable_core::{ConsumeError, Delivery, DeliverySource, Message, Position, TopicPartition};
use tokio::sync::Notify;

pub use builder::KafkaConsumerBuilder;
pub use lag::{KafkaLag, PartitionLag};
pub use ordering::Ordering;

use acker::{KafkaAcker, Ticket};
use commit::PeriodicCommit;
use ordering::{Gate, GateKey, Held};
use rebalance::ConsumerCtx;
use record::{classify, decode};

use crate::config::RedactedConfig;

/// The rdkafka consumer with the SDK's context.
type RawConsumer = StreamConsumer<ConsumerCtx>;

/// State shared by the consumer, its ackers, its commit task and its rebalance callback.
///
/// Locks are taken in this order, never the other way: `commit_lock`, `gate`, `next`, then
/// the tracker's own.
struct Shared {
    tracker: OffsetTracker,
    /// Per partition: one past the highest offset received (handed out or held).
    next: Mutex<HashMap<TopicPartition, i64>>,
    revoke_drain_timeout: Duration,
    /// For redacting client errors (invariant 8).
    config: ClientConfig,
    ordering: Ordering,
    /// Records kept in memory (held by an ordered mode, or requeued) and busy keys.
    gate: Mutex<Gate>,
    /// Woken when a delivery is settled in an ordered mode, or requeued.
    settled: Notify,
    /// Held while a commit is built and sent, so commits go out one at a time (see the
    /// [`commit`] module).
    commit_lock: Mutex<()>,
    /// Ackers alive: deliveries handed out and neither settled nor dropped.
    ackers: AtomicUsize,
    /// The lag of the owned partitions (see the [`lag`] module).
    lag: Arc<lag::LagBook>,
}

/// Locks `m`, also after a panic elsewhere poisoned it (the state stays consistent: every
/// critical section is a few map operations).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Drops everything about a revoked partition and returns its final commit position.
    fn forget(&self, tp: &TopicPartition) -> Option<i64> {
        let mut gate = lock(&self.gate);
        gate.forget(tp);
        lock(&self.next).remove(tp);
        self.lag.revoked(tp);
        self.tracker.revoke(tp)
    }

    /// Offsets of `tp` handed out and with a handler now (records kept in memory are not
    /// waited for).
    fn unsettled(&self, tp: &TopicPartition) -> Vec<i64> {
        let kept = lock(&self.gate).kept_offsets(tp);
        let mut in_flight = self.tracker.in_flight(tp);
        in_flight.retain(|o| !kept.contains(o));
        in_flight
    }
}

/// A manual-commit Kafka consumer implementing the core [`DeliverySource`]; see the module
/// docs.
pub struct KafkaConsumer {
    /// Stopped before the client is closed (fields drop in order).
    periodic: PeriodicCommit,
    consumer: Arc<RawConsumer>,
    shared: Arc<Shared>,
    max_held: usize,
    /// A fatal client error met while a batch was being filled, returned by the next call
    /// so the deliveries already taken are handed out first.
    deferred: Option<ConsumeError>,
    /// The name of the topic of the last record, shared by the records that follow it.
    topic: Option<Arc<str>>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("config", &RedactedConfig(&self.shared.config))
            .field("ordering", &self.shared.ordering)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Commits the finished watermark of every partition now; returns how many partitions'
    /// positions moved.
    pub async fn commit_now(&self) -> Result<usize, ConsumeError> {
        commit::commit_now(&self.consumer, &self.shared)
            .await
            .map_err(|e| ConsumeError::Commit {
                reason: e.to_string(),
            })
    }

    /// A read-only view of the consumer's offsets: per partition the position a commit would
    /// store, the unfinished offsets (handed out, held or requeued) and the last committed
    /// position. Only the consumer's ackers finish offsets, so the view has no way to:
    ///
    /// ```compile_fail
    /// # fn f(consumer: &reliable_kafka::KafkaConsumer, tp: &reliable_core::TopicPartition) {
    /// consumer.offsets().complete(tp, 0); // error: no such method on `OffsetsView`
    /// # }
    /// ```
    pub fn offsets(&self) -> OffsetsView<'_> {
        self.shared.tracker.view()
    }

    /// A live view of the lag of each partition this consumer owns (records beyond the
    /// group's committed offset; see the [`lag`] module). Take it before the consumer moves
    /// into a pipeline; the pipeline's
    /// [`health`](reliable_core::pipeline::PipelineStatsHandle::health) reports the total.
    pub fn lag(&self) -> KafkaLag {
        self.shared.lag.view()
    }

    /// The validated client configuration.
    pub fn client_config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The ordering mode.
    pub fn ordering(&self) -> Ordering {
        self.shared.ordering
    }

    /// Records the receipt of `record` and tracks it as unfinished; false for a record at or
    /// below one received before from its partition (librdkafka went back, e.g. after an
    /// offset reset): that one is in flight or finished already and is not handed out again.
    fn admit(&self, tp: &TopicPartition, record: &BorrowedMessage<'_>) -> bool {
        let offset = record.offset();
        {
            let mut next = lock(&self.shared.next);
            if next.get(tp).is_some_and(|&n| offset < n) {
                tracing::debug!(partition = %tp, offset, "record received again; it was handed out before, skipping it");
                return false;
            }
            next.insert(tp.clone(), offset.saturating_add(1));
        }
        self.shared.tracker.track(tp, offset);
        true
    }

    /// Builds the delivery of a record handed out now.
    fn delivery(
        &self,
        partition: TopicPartition,
        offset: i64,
        message: Message,
        redelivered: bool,
        ticket: Option<Ticket>,
    ) -> Delivery {
        tracing::trace!(message_id = %message.id(), %partition, offset, redelivered, "handed out");
        let sequence = ticket.as_ref().map(|t| t.id);
        let acker = KafkaAcker::new(
            self.shared.clone(),
            partition.clone(),
            offset,
            message.clone(),
            ticket,
        );
        let delivery = Delivery::new(message, Box::new(acker))
            .with_redelivered(redelivered)
            .with_position(Position { partition, offset });
        match sequence {
            Some(sequence) => delivery.with_sequence(sequence),
            None => delivery,
        }
    }

    /// In the unordered mode, the next record handed back by `nack(true)`.
    fn take_requeued(&self) -> Option<Delivery> {
        let (partition, held) = lock(&self.shared.gate).take_requeued()?;
        Some(self.delivery(partition, held.offset, held.message, held.redelivered, None))
    }

    /// In an ordered mode, the next held record whose partition (or key) is free.
    fn take_ready(&self) -> Option<Delivery> {
        let (key, held, id) = lock(&self.shared.gate).take_ready()?;
        let partition = key.partition.clone();
        Some(self.delivery(
            partition,
            held.offset,
            held.message,
            held.redelivered,
            Some(Ticket { key, id }),
        ))
    }

    /// In an ordered mode, hands `record` out if its partition (or key) is free, else holds it.
    fn gate(&self, partition: TopicPartition, record: &BorrowedMessage<'_>) -> Option<Delivery> {
        let offset = record.offset();
        let key = GateKey {
            partition: partition.clone(),
            key: match self.shared.ordering {
                Ordering::PerKey => record.key().map(Box::from),
                _ => None,
            },
        };
        let message = decode(record, &partition.topic);
        let mut gate = lock(&self.shared.gate);
        if let Some(id) = gate.join(&key) {
            drop(gate);
            return Some(self.delivery(
                partition,
                offset,
                message,
                false,
                Some(Ticket { key, id }),
            ));
        }
        if gate.must_wait(&key) {
            tracing::trace!(%partition, offset, "held until its partition or key is free");
            gate.hold(
                key,
                Held {
                    offset,
                    message,
                    redelivered: false,
                },
            );
            return None;
        }
        let id = gate.issue(key.clone());
        drop(gate);
        Some(self.delivery(partition, offset, message, false, Some(Ticket { key, id })))
    }

    /// An error librdkafka reported while polling. A fatal one (authorization, configuration)
    /// ends consumption; the rest (a broker down, the coordinator moving) are librdkafka's
    /// own to recover from — it reconnects and rejoins the group only while it is polled, so
    /// they are logged and polling goes on at once. Handing them to the caller as retryable
    /// errors would make the pipeline back off on each queued error and stall for many seconds
    /// after a broker died.
    fn client_error(&self, e: &KafkaError) -> Result<(), ConsumeError> {
        match classify(e, &self.shared.config) {
            fatal @ ConsumeError::Fatal { .. } => Err(fatal),
            other => {
                tracing::warn!(error = %other, "kafka client error; librdkafka recovers, polling on");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl DeliverySource for KafkaConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        if let Some(fatal) = self.deferred.take() {
            return Err(fatal);
        }
        lock(&self.shared.gate).begin();
        // Records kept in memory live in `self.shared`, so a cancelled call loses none; each
        // await point below is cancel safe (`recv` takes a record only when it returns it).
        if self.shared.ordering == Ordering::Unordered {
            loop {
                if let Some(delivery) = self.take_requeued() {
                    return Ok(Some(delivery));
                }
                let record = tokio::select! {
                    r = self.consumer.recv() => match r {
                        Ok(record) => record,
                        Err(e) => {
                            self.client_error(&e)?;
                            continue;
                        }
                    },
                    () = self.shared.settled.notified() => continue,
                };
                let tp = partition_of(&mut self.topic, &record);
                if self.admit(&tp, &record) {
                    let message = decode(&record, &tp.topic);
                    return Ok(Some(self.delivery(
                        tp,
                        record.offset(),
                        message,
                        false,
                        None,
                    )));
                }
            }
        }
        loop {
            if let Some(delivery) = self.take_ready() {
                return Ok(Some(delivery));
            }
            if lock(&self.shared.gate).held >= self.max_held {
                self.shared.settled.notified().await;
                continue;
            }
            let record = tokio::select! {
                r = self.consumer.recv() => match r {
                    Ok(record) => record,
                    Err(e) => {
                        self.client_error(&e)?;
                        continue;
                    }
                },
                () = self.shared.settled.notified() => continue,
            };
            let tp = partition_of(&mut self.topic, &record);
            if self.admit(&tp, &record) {
                if let Some(delivery) = self.gate(tp, &record) {
                    return Ok(Some(delivery));
                }
            }
        }
    }

    /// Waits for the first delivery as [`next`](DeliverySource::next) does, then adds what is
    /// ready without waiting: records handed back or freed in the consumer's memory first,
    /// then records librdkafka has already fetched (at most `max` of them are polled per
    /// call). In an ordered mode the records of one partition (or key) in a batch are a run:
    /// they carry one [sequence](Delivery::sequence), in log order, and the partition stays
    /// busy until every record of the run is settled, so no later batch holds a record of it
    /// meanwhile. The pipeline handles a run one record at a time and different runs
    /// concurrently. A run's records handed back by `nack(true)` in run order come out again
    /// in that order, before any later record of their partition (or key).
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let Some(first) = self.next().await? else {
            return Ok(Vec::new());
        };
        let mut batch = Vec::with_capacity(max.clamp(1, 1024));
        batch.push(first);
        let unordered = self.shared.ordering == Ordering::Unordered;
        let mut polled = 0usize;
        // No await point from here on: a cancelled call loses nothing.
        while batch.len() < max {
            let kept = if unordered {
                self.take_requeued()
            } else {
                self.take_ready()
            };
            if let Some(delivery) = kept {
                batch.push(delivery);
                continue;
            }
            if polled >= max || (!unordered && lock(&self.shared.gate).held >= self.max_held) {
                break;
            }
            let Some(polled_now) = ready_now(self.consumer.recv()) else {
                break;
            };
            polled += 1;
            let record = match polled_now {
                Ok(record) => record,
                Err(e) => {
                    if let Err(fatal) = self.client_error(&e) {
                        self.deferred = Some(fatal);
                        break;
                    }
                    continue;
                }
            };
            let tp = partition_of(&mut self.topic, &record);
            if !self.admit(&tp, &record) {
                continue;
            }
            if unordered {
                let message = decode(&record, &tp.topic);
                batch.push(self.delivery(tp, record.offset(), message, false, None));
            } else if let Some(delivery) = self.gate(tp, &record) {
                batch.push(delivery);
            }
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        // The periodic task finishes a commit it has started; only then is the final
        // watermark committed, so it is the last commit of this consumer.
        self.periodic.stop().await;
        let committed = self.commit_now().await?;
        tracing::debug!(partitions = committed, "final commit done");
        Ok(())
    }

    /// Kafka has no dead letter: a reject only moves the offset past the record.
    fn rejects_to_dead_letter(&self) -> bool {
        false
    }

    /// The total of [`KafkaConsumer::lag`].
    fn consumer_lag(&self) -> Option<Arc<dyn ConsumerLag>> {
        Some(Arc::new(self.lag()))
    }
}

/// The output of `future` if it is ready at its first poll; the future is dropped otherwise.
/// Used on `recv`, which takes a record only when it returns it (dropping it loses nothing).
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// The partition of `record`, its topic name shared with the records before it when it is the
/// same (one allocation per topic change, not per record).
fn partition_of(cache: &mut Option<Arc<str>>, record: &BorrowedMessage<'_>) -> TopicPartition {
    let name = record.topic();
    let topic = match cache {
        Some(topic) if **topic == *name => topic.clone(),
        _ => {
            let topic: Arc<str> = Arc::from(name);
            *cache = Some(topic.clone());
            topic
        }
    };
    TopicPartition::new(topic, record.partition())
}
