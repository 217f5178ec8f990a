//! [`KafkaConsumer`]: a manual-commit consumer implementing the core [`DeliverySource`]
//! (loss-matrix row L5; invariants 4 and 5).
//!
//! librdkafka never commits or stores an offset on its own (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`, enforced by [`harden_consumer_config`]). Every message
//! handed out is tracked in an [`OffsetTracker`]; its [`Acker`] marks it finished, and only the
//! contiguous finished watermark per partition is committed:
//!
//! * **periodically**, every [`commit_interval`](KafkaConsumerBuilder::commit_interval) (1 s by
//!   default), by a background task, whether or not the pipeline is pulling;
//! * **on demand**, with [`KafkaConsumer::commit_now`];
//! * **on close** ([`DeliverySource::close`], called by the pipeline after it has drained and
//!   settled every delivery);
//! * **on partition revoke** (rebalance): the consumer first waits, at most
//!   [`revoke_drain_timeout`](KafkaConsumerBuilder::revoke_drain_timeout) (10 s by default;
//!   not at all on a current-thread runtime, where the handlers cannot run meanwhile), for the
//!   deliveries of the revoked partitions still in flight, then synchronously commits what is
//!   finished there. Work still unfinished after the wait stays uncommitted: the partition's
//!   new owner receives it again (deduplicated by the idempotency key) and its late settle
//!   returns [`AckError::Stale`]. A *lost* assignment (session timeout) commits nothing.
//!
//! A commit never passes an unfinished offset, so a crash (even SIGKILL with a full buffer)
//! redelivers everything not yet processed. `ack`, `reject` and `nack(false)` finish an offset;
//! `nack(true)` seeks the partition back to it so it is delivered again (deliveries above it that
//! were already handed out are not repeated).
//!
//! # Ordering
//!
//! The pipeline handles several deliveries at once. [`Ordering`] (set with
//! [`KafkaConsumerBuilder::ordering`]) says which of them may overlap:
//!
//! * [`Ordering::PerPartition`] (the default): a record is handed out only once every earlier record of its
//!   partition is settled, so each partition is handled strictly in log order while different
//!   partitions run concurrently;
//! * [`Ordering::PerKey`]: the same per (partition, record key); records without a key are
//!   ordered per partition;
//! * [`Ordering::Unordered`]: records are handed out as they arrive.
//!
//! In the ordered modes, records that arrive for a busy partition (or key) are held by the
//! consumer, at most [`max_held`](KafkaConsumerBuilder::max_held) of them (1000 by default); when
//! the limit is reached the consumer stops polling until a delivery is settled. Held records are
//! tracked as unfinished, so no commit passes them; on partition revoke they are dropped without
//! being handed out, and the partition's new owner reads them. In the ordered modes
//! `nack(true)` does not seek: the record is put back at the head of its partition's (or key's)
//! queue and handed out again, marked redelivered, before any later record of that partition
//! (or key).
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use reliable_core::offsets::OffsetTracker;
use reliable_core::{
    AckError, Acker, ConsumeError, Delivery, DeliverySource, Message, Position, TopicPartition,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{consumer_preset, harden_consumer_config, redact, RedactedConfig, Safety};
use crate::topic::{ensure_topic, TopicSpec};
use crate::Error;

/// Which deliveries of one consumer may be processed at the same time; see the
/// [module docs](self#ordering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ordering {
    /// One delivery per partition at a time: a record is handed out only after every earlier
    /// record of its partition was settled (acked, rejected or nacked). Partitions are processed
    /// concurrently.
    PerPartition,
    /// One delivery per (partition, record key) at a time: records of one key are handled in log
    /// order, different keys of a partition concurrently. Records without a key are ordered per
    /// partition.
    PerKey,
    /// No ordering: records are handed out as they arrive, several of one partition may be in
    /// flight and finish out of order. The offset tracker still never commits past unfinished
    /// work.
    Unordered,
}

/// What an ordered mode serialises on: a partition, or a partition and a record key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GateKey {
    partition: TopicPartition,
    key: Option<Box<[u8]>>,
}

/// A record held back because its partition (or key) is busy.
struct Held {
    offset: i64,
    message: Message,
    redelivered: bool,
}

/// The ordered modes' bookkeeping: which keys are busy and the records waiting for them.
#[derive(Default)]
struct Gate {
    /// Keys with a delivery handed out and unsettled, with that delivery's ticket.
    busy: HashMap<GateKey, u64>,
    /// Records waiting for their key, in log order.
    waiting: HashMap<GateKey, VecDeque<Held>>,
    /// Free keys with a waiting record, to hand out first.
    ready: VecDeque<GateKey>,
    /// Records in `waiting`.
    held: usize,
    /// The last ticket issued.
    ticket: u64,
}

impl Gate {
    fn issue(&mut self, key: GateKey) -> u64 {
        self.ticket = self.ticket.wrapping_add(1);
        self.busy.insert(key, self.ticket);
        self.ticket
    }

    /// Frees `key` if `ticket` still holds it; true when a waiting record became ready.
    fn release(&mut self, key: &GateKey, ticket: u64) -> bool {
        if self.busy.get(key) != Some(&ticket) {
            return false;
        }
        self.busy.remove(key);
        if self.waiting.get(key).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(key.clone());
            return true;
        }
        false
    }

    /// The next waiting record whose key is free, marking the key busy.
    fn take_ready(&mut self) -> Option<(GateKey, Held, u64)> {
        while let Some(key) = self.ready.pop_front() {
            if self.busy.contains_key(&key) {
                continue;
            }
            let Some(queue) = self.waiting.get_mut(&key) else {
                continue;
            };
            let Some(held) = queue.pop_front() else {
                self.waiting.remove(&key);
                continue;
            };
            if queue.is_empty() {
                self.waiting.remove(&key);
            }
            self.held = self.held.saturating_sub(1);
            let ticket = self.issue(key.clone());
            return Some((key, held, ticket));
        }
        None
    }

    /// Offsets of `tp` held back (tracked as unfinished, never handed out).
    fn held_offsets(&self, tp: &TopicPartition) -> HashSet<i64> {
        self.waiting
            .iter()
            .filter(|(k, _)| &k.partition == tp)
            .flat_map(|(_, q)| q.iter().map(|h| h.offset))
            .collect()
    }

    /// Drops everything about a revoked partition.
    fn forget(&mut self, tp: &TopicPartition) {
        self.busy.retain(|k, _| &k.partition != tp);
        let mut dropped = 0;
        self.waiting.retain(|k, q| {
            let keep = &k.partition != tp;
            if !keep {
                dropped += q.len();
            }
            keep
        });
        self.held = self.held.saturating_sub(dropped);
        self.ready.retain(|k| &k.partition != tp);
    }
}

/// State shared by the consumer, its ackers, its commit task and its rebalance callback.
struct Shared {
    tracker: OffsetTracker,
    /// Per partition: one past the highest offset handed out.
    next: Mutex<HashMap<TopicPartition, i64>>,
    /// Offsets nacked with requeue, to hand out again when the seek brings them back.
    requeued: Mutex<HashSet<(TopicPartition, i64)>>,
    revoke_drain_timeout: Duration,
    /// For redacting client errors (invariant 8).
    config: ClientConfig,
    ordering: Ordering,
    /// Busy keys and held records of the ordered modes.
    gate: Mutex<Gate>,
    /// Woken when a delivery is settled in an ordered mode.
    settled: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn forget(&self, tp: &TopicPartition) -> Option<i64> {
        lock(&self.next).remove(tp);
        lock(&self.requeued).retain(|(p, _)| p != tp);
        lock(&self.gate).forget(tp);
        self.tracker.revoke(tp)
    }

    /// Offsets of `tp` handed out and not settled (held records are not waited for).
    fn unsettled(&self, tp: &TopicPartition) -> Vec<i64> {
        let held = lock(&self.gate).held_offsets(tp);
        let mut in_flight = self.tracker.in_flight(tp);
        in_flight.retain(|o| !held.contains(o));
        in_flight
    }

    fn on_revoke(&self, consumer: &BaseConsumer<ConsumerCtx>, revoked: &TopicPartitionList) {
        let parts: Vec<TopicPartition> = revoked
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        if consumer.assignment_lost() {
            for tp in &parts {
                self.forget(tp);
            }
            tracing::warn!(
                partitions = parts.len(),
                "partitions lost; unfinished work will be redelivered to their new owner"
            );
            return;
        }
        let can_wait = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread);
        if can_wait {
            let deadline = Instant::now() + self.revoke_drain_timeout;
            while parts.iter().any(|tp| !self.unsettled(tp).is_empty()) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut tpl = TopicPartitionList::new();
        for tp in &parts {
            let unfinished = self.unsettled(tp).len();
            if let Some(position) = self.forget(tp) {
                if unfinished > 0 {
                    tracing::warn!(partition = %tp, unfinished, position, "revoking with work in flight; it will be redelivered");
                }
                if let Err(e) =
                    tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(position))
                {
                    tracing::warn!(partition = %tp, error = %e, "cannot commit on revoke");
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => tracing::debug!(
                partitions = tpl.count(),
                "committed finished work of revoked partitions"
            ),
            Err(e) => {
                tracing::warn!(error = %redact(&self.config, e.to_string()), "commit on revoke failed; finished messages will be redelivered")
            }
        }
    }
}

/// The rdkafka context: commits on partition revoke.
struct ConsumerCtx {
    shared: Arc<Shared>,
}

impl ClientContext for ConsumerCtx {}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            self.shared.on_revoke(consumer, revoked);
        }
    }
}

/// The rdkafka consumer with the SDK's context.
type RawConsumer = StreamConsumer<ConsumerCtx>;

/// A manual-commit Kafka consumer implementing the core [`DeliverySource`]; see the module
/// docs.
pub struct KafkaConsumer {
    consumer: Arc<RawConsumer>,
    shared: Arc<Shared>,
    commit_task: Option<JoinHandle<()>>,
    max_held: usize,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("config", &RedactedConfig(&self.shared.config))
            .finish_non_exhaustive()
    }
}

/// Builds a [`KafkaConsumer`] from the safe preset or a user's [`ClientConfig`].
#[must_use]
pub struct KafkaConsumerBuilder {
    config: ClientConfig,
    safety: Safety,
    topics: Vec<TopicSpec>,
    check_topics: bool,
    commit_interval: Duration,
    revoke_drain_timeout: Duration,
    ordering: Ordering,
    max_held: usize,
}

impl fmt::Debug for KafkaConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumerBuilder")
            .field("config", &RedactedConfig(&self.config))
            .field("topics", &self.topics)
            .field("check_topics", &self.check_topics)
            .field("commit_interval", &self.commit_interval)
            .field("revoke_drain_timeout", &self.revoke_drain_timeout)
            .field("ordering", &self.ordering)
            .field("max_held", &self.max_held)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumerBuilder {
    /// Subscribes to `spec.name`; at build time the topic is created or verified (see
    /// [`ensure_topic`]) unless [`skip_topic_check`](Self::skip_topic_check) was called.
    pub fn subscribe(mut self, spec: TopicSpec) -> Self {
        self.topics.push(spec);
        self
    }

    /// Skips the start-up topic check (the topics must exist).
    pub fn skip_topic_check(mut self) -> Self {
        tracing::warn!("Kafka topic safety check disabled; unsafe topics will not be detected");
        self.check_topics = false;
        self
    }

    /// Unsafe settings knowingly accepted (default: none).
    pub fn safety(mut self, safety: Safety) -> Self {
        self.safety = safety;
        self
    }

    /// How often the finished watermark is committed (default 1 s).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How long a partition revoke waits for that partition's deliveries in flight before it
    /// commits what is finished (default 10 s; keep it below `max.poll.interval.ms`).
    pub fn revoke_drain_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_drain_timeout = timeout;
        self
    }

    /// Which deliveries may be processed at the same time (default [`Ordering::PerPartition`]); see
    /// the [module docs](self#ordering).
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
    }

    /// In the ordered modes, how many received records may wait for their partition (or key)
    /// before the consumer stops polling until a delivery is settled (default 1000, at least 1).
    pub fn max_held(mut self, limit: usize) -> Self {
        self.max_held = limit.max(1);
        self
    }

    /// Validates the config, checks the topics, creates the consumer, subscribes and starts the
    /// periodic commit. Must run inside a tokio runtime.
    pub async fn build(self) -> Result<KafkaConsumer, Error> {
        let mut config = self.config;
        harden_consumer_config(&mut config, &self.safety)?;
        if config.get("group.id").is_none() {
            return Err(Error::Client {
                client: "consumer",
                reason: "`group.id` is not set; commits need a consumer group".into(),
            });
        }
        if self.topics.is_empty() {
            return Err(Error::Client {
                client: "consumer",
                reason: "no topic to subscribe to; call subscribe(TopicSpec::new(..))".into(),
            });
        }
        if self.check_topics {
            for spec in &self.topics {
                ensure_topic(&config, spec).await?;
            }
        }
        let shared = Arc::new(Shared {
            tracker: OffsetTracker::new(),
            next: Mutex::default(),
            requeued: Mutex::default(),
            revoke_drain_timeout: self.revoke_drain_timeout,
            config: config.clone(),
            ordering: self.ordering,
            gate: Mutex::default(),
            settled: Notify::new(),
        });
        let client_err = |e: KafkaError| Error::Client {
            client: "consumer",
            reason: redact(&config, e.to_string()),
        };
        let consumer: RawConsumer = config
            .create_with_context(ConsumerCtx {
                shared: shared.clone(),
            })
            .map_err(client_err)?;
        let names: Vec<&str> = self.topics.iter().map(|t| t.name.as_str()).collect();
        consumer.subscribe(&names).map_err(client_err)?;
        let consumer = Arc::new(consumer);
        let commit_task = tokio::spawn(commit_periodically(
            consumer.clone(),
            shared.clone(),
            self.commit_interval,
        ));
        Ok(KafkaConsumer {
            consumer,
            shared,
            commit_task: Some(commit_task),
            max_held: self.max_held,
        })
    }
}

async fn commit_periodically(consumer: Arc<RawConsumer>, shared: Arc<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = commit_pending(&consumer, &shared).await {
            tracing::warn!(error = %e, "periodic commit failed; retrying at the next interval");
        }
    }
}

/// Commits every partition's finished watermark that moved; returns how many were committed.
async fn commit_pending(
    consumer: &Arc<RawConsumer>,
    shared: &Arc<Shared>,
) -> Result<usize, String> {
    let pending = shared.tracker.pending_commits();
    if pending.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, position) in &pending {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*position))
            .map_err(|e| e.to_string())?;
    }
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| redact(&shared.config, e.to_string()))?;
    for (tp, position) in &pending {
        shared.tracker.mark_committed(tp, *position);
        tracing::trace!(partition = %tp, position, "committed");
    }
    Ok(pending.len())
}

impl KafkaConsumer {
    /// A builder from the safe preset ([`consumer_preset`]).
    pub fn builder(bootstrap_servers: &str, group_id: &str) -> KafkaConsumerBuilder {
        Self::builder_from_config(consumer_preset(bootstrap_servers, group_id))
    }

    /// A builder from the caller's `config` (which must set `group.id`): at build time missing
    /// safe settings are added and weaker ones refused with [`Error::UnsafeConfig`].
    pub fn builder_from_config(config: ClientConfig) -> KafkaConsumerBuilder {
        KafkaConsumerBuilder {
            config,
            safety: Safety::strict(),
            topics: Vec::new(),
            check_topics: true,
            commit_interval: Duration::from_secs(1),
            revoke_drain_timeout: Duration::from_secs(10),
            ordering: Ordering::PerPartition,
            max_held: 1000,
        }
    }

    /// Commits the finished watermark of every partition now; returns how many partitions'
    /// positions moved.
    pub async fn commit_now(&self) -> Result<usize, ConsumeError> {
        commit_pending(&self.consumer, &self.shared)
            .await
            .map_err(|reason| ConsumeError::Commit { reason })
    }

    /// The offset tracker (in-flight offsets and the committable watermark per partition).
    pub fn tracker(&self) -> &OffsetTracker {
        &self.shared.tracker
    }

    /// The validated client configuration.
    pub fn client_config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The ordering mode.
    pub fn ordering(&self) -> Ordering {
        self.shared.ordering
    }

    /// Records the receipt of `record`: `None` for a record handed out before and not requeued
    /// (it comes back after a seek for an earlier offset), else whether it is a redelivery.
    /// A new record is tracked as unfinished.
    fn admit(&self, record: &BorrowedMessage<'_>) -> Option<bool> {
        let tp = TopicPartition::new(record.topic(), record.partition());
        let offset = record.offset();
        let redelivered = {
            let mut next = lock(&self.shared.next);
            match next.get(&tp) {
                Some(&n) if offset < n => {
                    if !lock(&self.shared.requeued).remove(&(tp.clone(), offset)) {
                        return None;
                    }
                    true
                }
                _ => {
                    next.insert(tp.clone(), offset.saturating_add(1));
                    false
                }
            }
        };
        if !redelivered {
            self.shared.tracker.track(&tp, offset);
        }
        Some(redelivered)
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
        let ticket = ticket.map(|mut t| {
            t.message = Some(message.clone());
            t
        });
        let acker = KafkaAcker {
            consumer: self.consumer.clone(),
            shared: self.shared.clone(),
            partition: partition.clone(),
            offset,
            ticket,
        };
        Delivery::new(message, Box::new(acker))
            .with_redelivered(redelivered)
            .with_position(Position { partition, offset })
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
            Some(Ticket {
                key,
                id,
                message: None,
            }),
        ))
    }

    /// In an ordered mode, hands `record` out if its partition (or key) is free, else holds it.
    fn gate(&self, record: &BorrowedMessage<'_>, redelivered: bool) -> Option<Delivery> {
        let partition = TopicPartition::new(record.topic(), record.partition());
        let offset = record.offset();
        let key = GateKey {
            partition: partition.clone(),
            key: match self.shared.ordering {
                Ordering::PerKey => record.key().map(Box::from),
                _ => None,
            },
        };
        let message = decode(record);
        let mut gate = lock(&self.shared.gate);
        if gate.busy.contains_key(&key) || gate.waiting.contains_key(&key) {
            tracing::trace!(%partition, offset, "held until its partition or key is free");
            gate.waiting.entry(key).or_default().push_back(Held {
                offset,
                message,
                redelivered,
            });
            gate.held += 1;
            return None;
        }
        let id = gate.issue(key.clone());
        drop(gate);
        Some(self.delivery(
            partition,
            offset,
            message,
            redelivered,
            Some(Ticket {
                key,
                id,
                message: None,
            }),
        ))
    }
}

/// Rebuilds the SDK message from a record. Records produced without the SDK's identity
/// headers get a fresh id and an idempotency key derived from their position, so their
/// redeliveries still deduplicate.
fn decode(record: &BorrowedMessage<'_>) -> Message {
    let payload = record.payload().unwrap_or_default().to_vec();
    let headers: Vec<(&str, String)> = record
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| Some((h.key, String::from_utf8_lossy(h.value?).into_owned())))
                .collect()
        })
        .unwrap_or_default();
    let wire = headers.iter().map(|(k, v)| (*k, v.as_str()));
    let message = match Message::from_wire(payload.clone(), wire) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(topic = record.topic(), partition = record.partition(), offset = record.offset(), error = %e, "record without SDK identity headers; deriving its idempotency key from its position");
            let position_key = format!(
                "kafka:{}/{}/{}",
                record.topic(),
                record.partition(),
                record.offset()
            );
            let mut m = Message::new(payload);
            for (k, v) in &headers {
                m.set_header(*k, v.clone());
            }
            m.clone().with_idempotency_key(position_key).unwrap_or(m)
        }
    };
    let message = message.with_destination(record.topic());
    match record.key() {
        Some(key) => message.with_routing_key(String::from_utf8_lossy(key)),
        None => message,
    }
}

fn classify(e: &KafkaError, config: &ClientConfig) -> ConsumeError {
    let reason = redact(config, e.to_string());
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::InvalidConfig,
        ) => ConsumeError::Fatal { reason },
        _ => ConsumeError::ConnectionLost { reason },
    }
}

impl KafkaConsumer {
    /// An error librdkafka reported while polling. A fatal one (authorization, configuration)
    /// ends consumption; the rest (a broker down, the coordinator moving) are librdkafka's
    /// own to recover from — it reconnects and rejoins the group only while it is polled, so
    /// they are logged and polling goes on at once. Handing them to the caller as retryable
    /// errors made the pipeline back off on each queued error and stall for many seconds
    /// after a broker died (seen in the fault harness's leader-kill scenario).
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
        if self.shared.ordering == Ordering::Unordered {
            loop {
                // `recv` is cancel safe; nothing is tracked before a record is returned.
                let record = match self.consumer.recv().await {
                    Ok(record) => record,
                    Err(e) => {
                        self.client_error(&e)?;
                        continue;
                    }
                };
                if let Some(redelivered) = self.admit(&record) {
                    let tp = TopicPartition::new(record.topic(), record.partition());
                    let message = decode(&record);
                    return Ok(Some(self.delivery(
                        tp,
                        record.offset(),
                        message,
                        redelivered,
                        None,
                    )));
                }
            }
        }
        // Ordered: held records live in `self.shared`, so a cancelled call loses none; each
        // await point below is cancel safe.
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
            if let Some(redelivered) = self.admit(&record) {
                if let Some(delivery) = self.gate(&record, redelivered) {
                    return Ok(Some(delivery));
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        if let Some(task) = self.commit_task.take() {
            task.abort();
            let _ = task.await;
        }
        let committed = self.commit_now().await?;
        tracing::debug!(partitions = committed, "final commit done");
        Ok(())
    }

    /// Kafka has no dead letter: a reject only moves the offset past the record.
    fn rejects_to_dead_letter(&self) -> bool {
        false
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        if let Some(task) = self.commit_task.take() {
            task.abort();
        }
    }
}

/// In an ordered mode, the hold a delivery has on its partition (or key).
struct Ticket {
    key: GateKey,
    id: u64,
    /// A copy of the message, handed out again on `nack(true)`.
    message: Option<Message>,
}

/// Settles one delivery by finishing its offset in the tracker (or seeking back to it).
struct KafkaAcker {
    consumer: Arc<RawConsumer>,
    shared: Arc<Shared>,
    partition: TopicPartition,
    offset: i64,
    ticket: Option<Ticket>,
}

impl KafkaAcker {
    fn finish(&self) -> Result<(), AckError> {
        let done = self
            .shared
            .tracker
            .complete(&self.partition, self.offset)
            .map_err(|e| AckError::Stale {
                reason: e.to_string(),
            });
        self.release();
        done
    }

    /// Frees the partition (or key) for its next record and wakes a waiting `next()`.
    fn release(&self) {
        if let Some(t) = &self.ticket {
            lock(&self.shared.gate).release(&t.key, t.id);
            self.shared.settled.notify_one();
        }
    }

    /// Ordered `nack(true)`: the record goes back to the head of its queue.
    fn requeue_held(&self, ticket: &Ticket) -> Result<(), AckError> {
        let Some(message) = ticket.message.clone() else {
            return Err(AckError::Other {
                reason: "no copy of the message to requeue; it is redelivered after a restart"
                    .into(),
            });
        };
        {
            let mut gate = lock(&self.shared.gate);
            if gate.busy.get(&ticket.key) != Some(&ticket.id) {
                return Err(AckError::Stale {
                    reason: format!("{} was revoked", self.partition),
                });
            }
            gate.waiting
                .entry(ticket.key.clone())
                .or_default()
                .push_front(Held {
                    offset: self.offset,
                    message,
                    redelivered: true,
                });
            gate.held += 1;
            gate.release(&ticket.key, ticket.id);
        }
        self.shared.settled.notify_one();
        Ok(())
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.finish()
    }

    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        if !requeue {
            return self.finish();
        }
        if !self
            .shared
            .tracker
            .in_flight(&self.partition)
            .contains(&self.offset)
        {
            self.release();
            return Err(AckError::Stale {
                reason: format!("{} was revoked", self.partition),
            });
        }
        if let Some(ticket) = &self.ticket {
            return self.requeue_held(ticket);
        }
        lock(&self.shared.requeued).insert((self.partition.clone(), self.offset));
        self.consumer
            .seek(
                &self.partition.topic,
                self.partition.partition,
                Offset::Offset(self.offset),
                Duration::ZERO,
            )
            .map_err(|e| AckError::Other {
                reason: format!(
                    "seek back to offset {} failed ({}); it is redelivered after a restart",
                    self.offset,
                    redact(&self.shared.config, e.to_string())
                ),
            })
    }

    async fn reject(&self) -> Result<(), AckError> {
        self.finish()
    }
}
