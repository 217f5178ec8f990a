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

use std::collections::{HashMap, HashSet};
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
use tokio::task::JoinHandle;

use crate::config::{consumer_preset, harden_consumer_config, redact, RedactedConfig, Safety};
use crate::topic::{ensure_topic, TopicSpec};
use crate::Error;

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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn forget(&self, tp: &TopicPartition) -> Option<i64> {
        lock(&self.next).remove(tp);
        lock(&self.requeued).retain(|(p, _)| p != tp);
        self.tracker.revoke(tp)
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
            while parts
                .iter()
                .any(|tp| !self.tracker.in_flight(tp).is_empty())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut tpl = TopicPartitionList::new();
        for tp in &parts {
            let unfinished = self.tracker.in_flight(tp).len();
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
}

impl fmt::Debug for KafkaConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumerBuilder")
            .field("config", &RedactedConfig(&self.config))
            .field("topics", &self.topics)
            .field("check_topics", &self.check_topics)
            .field("commit_interval", &self.commit_interval)
            .field("revoke_drain_timeout", &self.revoke_drain_timeout)
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

    /// Turns a received record into a delivery; `None` for a record handed out before and not
    /// requeued (it comes back after a seek for an earlier offset).
    fn delivery(&self, record: &BorrowedMessage<'_>) -> Option<Delivery> {
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
        let message = decode(record);
        tracing::trace!(message_id = %message.id(), partition = %tp, offset, "received");
        let acker = KafkaAcker {
            consumer: self.consumer.clone(),
            shared: self.shared.clone(),
            partition: tp.clone(),
            offset,
        };
        Some(
            Delivery::new(message, Box::new(acker))
                .with_redelivered(redelivered)
                .with_position(Position {
                    partition: tp,
                    offset,
                }),
        )
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

#[async_trait]
impl DeliverySource for KafkaConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        loop {
            // `recv` is cancel safe; nothing is tracked before a record is returned.
            let record = self
                .consumer
                .recv()
                .await
                .map_err(|e| classify(&e, &self.shared.config))?;
            if let Some(delivery) = self.delivery(&record) {
                return Ok(Some(delivery));
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
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        if let Some(task) = self.commit_task.take() {
            task.abort();
        }
    }
}

/// Settles one delivery by finishing its offset in the tracker (or seeking back to it).
struct KafkaAcker {
    consumer: Arc<RawConsumer>,
    shared: Arc<Shared>,
    partition: TopicPartition,
    offset: i64,
}

impl KafkaAcker {
    fn finish(&self) -> Result<(), AckError> {
        self.shared
            .tracker
            .complete(&self.partition, self.offset)
            .map_err(|e| AckError::Stale {
                reason: e.to_string(),
            })
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
            return Err(AckError::Stale {
                reason: format!("{} was revoked", self.partition),
            });
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
