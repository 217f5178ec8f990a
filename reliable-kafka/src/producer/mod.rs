//! [`KafkaTransport`]: the core [`Transport`] over an rdkafka producer (loss-matrix row L7;
//! invariants 1, 3 and 6).
//!
//! One [`submit`](Transport::submit) (or [`publish`](Transport::publish)) is one produce: the
//! message's topic ([`Message::destination`], or the transport's default topic), its key
//! ([`Message::routing_key`], which picks the partition through librdkafka's consistent
//! partitioner, so every resend lands in the same partition) and every wire header (message id,
//! idempotency key, user headers). The submission enqueues the record into librdkafka
//! (`send_result`) when it is first polled, so librdkafka's partition queues hold the records in
//! submission order; its attempt resolves `Ok` on the delivery report under `acks=all`.
//! Failures are classified for the core [`Producer`](reliable_core::producer::Producer), which
//! resends with the same id and key (a refusal at enqueue, such as `QueueFull`, is the
//! submission's error):
//!
//! | librdkafka error | [`PublishError`] |
//! |---|---|
//! | `MessageTimedOut`, `RequestTimedOut` | `Timeout` (retryable) |
//! | `QueueFull` | `Busy` (retryable) |
//! | `MessageSizeTooLarge` | `TooLarge` |
//! | `UnknownTopic`, `UnknownPartition` | `Unroutable` |
//! | authorization / authentication / invalid config | `Fatal` |
//! | fatal idempotence error (`Fatal`) | producer rebuilt from its config, then `ConnectionLost` (retryable); `Fatal` when it cannot be rebuilt |
//! | broker down, purged by a rebuild | `ConnectionLost` (retryable) |
//! | anything else | `Nacked` (retryable) |
//!
//! # Order
//!
//! The core producer submits the messages of one [`lane`](Transport::lane) (a topic and record
//! key; the keyless messages of a topic share one lane) in send order, and librdkafka's
//! idempotent producer (`enable.idempotence`, at most 5 requests in flight) writes each
//! partition in enqueue order, retrying internally in order and without duplicates. What could
//! still reorder a key is a resend: a copy written as a new record lands behind newer records.
//! The rule, in the default [`SendOrder::Preserved`]:
//!
//! * librdkafka owns the retries of a message for the whole delivery deadline
//!   ([`KafkaTransportBuilder::deadline`], default 60 s, becomes `message.timeout.ms`), and
//!   [`recommended_producer_config`](KafkaTransport::recommended_producer_config) gives the
//!   core a confirm timeout and deadline [`DEADLINE_MARGIN`] longer, so the core never cuts an
//!   attempt librdkafka still owns;
//! * a message is resent as a new record only after librdkafka reported it failed (a fatal
//!   idempotence error that rebuilt the producer, a broker refusal); the core holds the later
//!   messages of its lane until the resend is confirmed or handed back. A message that timed out
//!   in librdkafka has used its deadline and is handed back, not resent.
//!
//! With [`KafkaTransportBuilder::confirm_timeout`] set, librdkafka owns each attempt only for
//! nine tenths of that timeout; the core then resends after each librdkafka timeout, still in
//! lane order in `Preserved`. [`SendOrder::Relaxed`] (through
//! [`KafkaTransportBuilder::order`]) keeps the per-attempt timeout (default 5 s) and resends
//! each message on its own while later messages of its key go on: more throughput during
//! faults, and a resent message lands behind newer ones.
//!
//! # Shutting down
//!
//! Dropping an rdkafka producer purges what it still queues, so the transport flushes before
//! it lets go of the client:
//!
//! * [`Producer::close`](reliable_core::producer::Producer::close) is the way to shut down: once
//!   every pending message is settled it calls [`Transport::close`], which flushes librdkafka's
//!   queue on a blocking thread ([`spawn_blocking`](tokio::task::spawn_blocking)), bounded by
//!   the flush timeout (`message.timeout.ms` plus 1 s; the core producer gives it at most its
//!   confirm timeout, which the recommended config keeps longer than `message.timeout.ms`).
//! * Dropping the last clone without a close still flushes what librdkafka queues, bounded by
//!   the flush timeout, without blocking the async runtime: inside a Tokio runtime the flush
//!   runs on a blocking thread that owns the client until it is done (a runtime shutting down
//!   waits for it); outside one, the dropping thread flushes.
//!
//! ```no_run
//! use std::time::Duration;
//! use reliable_core::producer::Producer;
//! use reliable_core::Message;
//! use reliable_kafka::{KafkaTransport, TopicSpec};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = KafkaTransport::builder("127.0.0.1:19092")
//!     .deadline(Duration::from_secs(30))
//!     .default_topic(TopicSpec::new("orders").partitions(3))
//!     .build()
//!     .await?;
//! let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
//! producer.send_confirmed(Message::new("paid").with_routing_key("order-42")).await?;
//! // Settles every message, then flushes and closes the transport.
//! producer.close().await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use reliable_core::pipeline::DeadLetter;
use reliable_core::producer::{Producer as CoreProducer, ProducerConfig, SendOrder};
use reliable_core::{Attempt, Message, PublishError, Submission, Transport};
use tracing::Instrument;

use crate::config::{harden_producer_config, redact, RedactedConfig, Safety};
use crate::Error;

mod builder;

use builder::{create_producer, Timing};
pub use builder::{KafkaTransportBuilder, DEADLINE_MARGIN};

/// Kafka's default `message.max.bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// The core [`Transport`] over an rdkafka [`FutureProducer`]; see the module docs. Cheap to
/// clone (shared).
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    /// The live producer and its generation (bumped by every rebuild).
    producer: RwLock<(u64, FutureProducer)>,
    generations: AtomicU64,
    /// The validated config, to rebuild the producer after a fatal error.
    config: ClientConfig,
    default_topic: Option<String>,
    /// What [`KafkaTransport::recommended_producer_config`] returns.
    recommended: ProducerConfig,
    max_message_bytes: usize,
    flush_timeout: Duration,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &RedactedConfig(&self.inner.config))
            .field("default_topic", &self.inner.default_topic)
            .field("recommended", &self.inner.recommended)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// A builder from the safe preset ([`producer_preset`](crate::config::producer_preset)).
    pub fn builder(bootstrap_servers: &str) -> KafkaTransportBuilder {
        // Only the address here: `build` completes the preset from the final order, deadline
        // and confirm timeout, which size `message.timeout.ms`.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::builder_from_config(config)
    }

    /// A builder from the caller's `config`: at build time missing safe settings are added and
    /// weaker ones refused with [`Error::UnsafeConfig`].
    pub fn builder_from_config(config: ClientConfig) -> KafkaTransportBuilder {
        KafkaTransportBuilder {
            config,
            confirm_timeout: None,
            deadline: ProducerConfig::default().deadline,
            order: SendOrder::default(),
            safety: Safety::strict(),
            default_topic: None,
            topics: Vec::new(),
            check_topics: true,
        }
    }

    /// Wraps an existing `producer`. `config` must be the configuration it was created from: it
    /// is validated like a builder's (an unsafe setting is refused) and used to rebuild the
    /// producer after a fatal error. `confirm_timeout` is the core producer's per-attempt
    /// timeout, as [`KafkaTransportBuilder::confirm_timeout`]: `message.timeout.ms` may not
    /// exceed it. No topic check runs; call [`ensure_topic`](crate::topic::ensure_topic)
    /// yourself.
    pub fn from_producer(
        producer: FutureProducer,
        config: &ClientConfig,
        confirm_timeout: Duration,
        safety: &Safety,
    ) -> Result<Self, Error> {
        let mut checked = config.clone();
        harden_producer_config(&mut checked, confirm_timeout, safety)?;
        // Settings the check had to add are missing from the running producer: it is weaker
        // than the preset.
        let missing: Vec<_> = checked
            .config_map()
            .into_iter()
            .filter(|(k, _)| config.get(k).is_none())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Client {
                client: "producer",
                reason: format!(
                    "the wrapped producer was created without {}; create it from a config that sets them (see config::producer_preset)",
                    missing.join(", ")
                ),
            });
        }
        let timing = Timing::per_attempt(
            SendOrder::default(),
            confirm_timeout,
            ProducerConfig::default().deadline,
        );
        Ok(Self::assemble(producer, checked, None, timing.core))
    }

    fn assemble(
        producer: FutureProducer,
        config: ClientConfig,
        default_topic: Option<String>,
        recommended: ProducerConfig,
    ) -> Self {
        let max_message_bytes = config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let message_timeout = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(recommended.confirm_timeout);
        Self {
            inner: Arc::new(Inner {
                producer: RwLock::new((0, producer)),
                generations: AtomicU64::new(0),
                config,
                default_topic,
                recommended,
                max_message_bytes,
                // Every queued message has its delivery report by then.
                flush_timeout: message_timeout + Duration::from_secs(1),
            }),
        }
    }

    /// The core [`ProducerConfig`] that fits this transport's `message.timeout.ms` and order
    /// (see the [module docs](self#order)); the rest are [`ProducerConfig::default`]'s values.
    ///
    /// * [`SendOrder::Preserved`] without a per-attempt confirm timeout (the builder's
    ///   default): confirm timeout and deadline are the builder's
    ///   [`deadline`](KafkaTransportBuilder::deadline) plus [`DEADLINE_MARGIN`], and the first
    ///   resend delay is at least that margin, so librdkafka's own timeout report ends a
    ///   message and the core hands it back instead of resending it.
    /// * Otherwise: the builder's confirm timeout (default 5 s) and deadline (default 60 s).
    ///
    /// When overriding fields, keep the confirm timeout and the deadline at least as long as
    /// these: a shorter one cuts attempts librdkafka still owns, and the core then resends
    /// copies that may land behind newer records.
    pub fn recommended_producer_config(&self) -> ProducerConfig {
        self.inner.recommended.clone()
    }

    /// The dead letter Kafka needs, since it has none of its own: poison records are published
    /// to `topic` through this transport, and the original's offset is committed only after
    /// that publish is confirmed. Ensure `topic` when building the transport
    /// ([`KafkaTransportBuilder::topic`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), reliable_kafka::Error> {
    /// use reliable_kafka::{KafkaTransport, TopicSpec};
    ///
    /// let dlq = KafkaTransport::builder("127.0.0.1:9092")
    ///     .topic(TopicSpec::new("orders.dlq"))
    ///     .build()
    ///     .await?;
    /// let dead_letter = dlq.dead_letter("orders.dlq");
    /// # let _ = dead_letter;
    /// # Ok(())
    /// # }
    /// ```
    pub fn dead_letter(&self, topic: impl Into<String>) -> DeadLetter {
        DeadLetter::publish(
            CoreProducer::new(self.clone(), self.recommended_producer_config()),
            topic,
        )
    }

    /// The validated client configuration.
    pub fn client_config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// How many times the producer was rebuilt after a fatal error.
    pub fn rebuilds(&self) -> u64 {
        self.inner.generations.load(Ordering::Relaxed)
    }

    /// Waits (at most the flush timeout: `message.timeout.ms` plus 1 s) until librdkafka has a
    /// delivery report for every queued message; the flush runs on a blocking thread, never on
    /// an async worker. [`Producer::close`](reliable_core::producer::Producer::close) calls this
    /// (as [`Transport::close`]); call it yourself only when publishing through the transport
    /// without a core producer. The transport stays usable afterwards.
    pub async fn close(&self) {
        let producer = self.current().1;
        let timeout = self.inner.flush_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => tracing::debug!("kafka producer flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %redact(&self.inner.config, e.to_string()), "kafka producer flush incomplete; unconfirmed messages are resent by the core producer or handed back")
            }
            Err(e) => tracing::warn!(error = %e, "kafka producer flush task failed"),
        }
    }

    fn current(&self) -> (u64, FutureProducer) {
        let guard = self
            .inner
            .producer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Replaces the producer of generation `generation` after a fatal error (once, however many
    /// publishes saw the error). `Ok` when a fresh producer is in place.
    fn rebuild(&self, generation: u64) -> Result<(), String> {
        let mut guard = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.0 != generation {
            return Ok(()); // someone else rebuilt it already
        }
        let fresh = create_producer(&self.inner.config).map_err(|e| e.to_string())?;
        let next = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let old = std::mem::replace(&mut *guard, (next, fresh));
        drop(guard);
        tracing::warn!(
            generation = next,
            "kafka producer rebuilt after a fatal error; unconfirmed messages are resent"
        );
        // Dropping the old producer purges (failing its queued messages as retryable) and
        // blocks briefly; keep that off the async threads.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(old))),
            Err(_) => drop(old),
        }
        Ok(())
    }

    fn classify(&self, generation: u64, err: &KafkaError, size: usize) -> PublishError {
        let reason = || redact(&self.inner.config, err.to_string());
        let fatal = || {
            let (_, producer) = self.current();
            producer.client().fatal_error()
        };
        use RDKafkaErrorCode as C;
        match err.rdkafka_error_code() {
            Some(C::QueueFull) => PublishError::Busy { reason: reason() },
            Some(C::MessageTimedOut | C::RequestTimedOut) => PublishError::Timeout,
            Some(C::MessageSizeTooLarge) => PublishError::TooLarge {
                size,
                limit: self.inner.max_message_bytes,
            },
            Some(C::UnknownTopic | C::UnknownPartition) => {
                PublishError::Unroutable { reason: reason() }
            }
            Some(
                C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::InvalidConfig,
            ) => PublishError::Fatal { reason: reason() },
            Some(C::Fatal) => self.after_fatal(generation, reason()),
            _ if fatal().is_some() => self.after_fatal(generation, reason()),
            Some(
                C::AllBrokersDown | C::BrokerTransportFailure | C::PurgeQueue | C::PurgeInflight,
            ) => PublishError::ConnectionLost { reason: reason() },
            _ => PublishError::Nacked { reason: reason() },
        }
    }

    fn after_fatal(&self, generation: u64, reason: String) -> PublishError {
        let detail = self
            .current()
            .1
            .client()
            .fatal_error()
            .map(|(code, text)| redact(&self.inner.config, format!("{code}: {text}")))
            .unwrap_or(reason);
        match self.rebuild(generation) {
            Ok(()) => PublishError::ConnectionLost {
                reason: format!("fatal producer error ({detail}); producer rebuilt"),
            },
            Err(why) => PublishError::Fatal {
                reason: format!("fatal producer error ({detail}); could not rebuild: {why}"),
            },
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let producer = self
            .producer
            .get_mut()
            .map(|p| p.1.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().1.clone());
        if producer.in_flight_count() == 0 {
            return; // closed, or nothing queued: dropping purges nothing
        }
        let flush = FlushOnDrop {
            producer: Some(producer),
            timeout: self.flush_timeout,
            config: self.config.clone(),
        };
        match tokio::runtime::Handle::try_current() {
            // A flush blocks for up to the flush timeout: keep it off the runtime's threads.
            // If the runtime drops the task unrun (it is shutting down), the flush runs where
            // the task is dropped.
            Ok(rt) => drop(rt.spawn_blocking(move || drop(flush))),
            Err(_) => drop(flush),
        }
    }
}

/// Flushes its producer (a clone that keeps the librdkafka client and its queue alive) when
/// dropped: on whichever thread drops it, blocking for up to `timeout`.
struct FlushOnDrop {
    producer: Option<FutureProducer>,
    timeout: Duration,
    /// For redacting the client's errors.
    config: ClientConfig,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let Some(producer) = self.producer.take() else {
            return;
        };
        let queued = producer.in_flight_count();
        match producer.flush(self.timeout) {
            Ok(()) => {
                tracing::debug!(
                    messages = queued,
                    "kafka transport dropped without close; its queue was flushed"
                );
            }
            Err(e) => {
                tracing::warn!(error = %redact(&self.config, e.to_string()), messages = producer.in_flight_count(), "kafka transport dropped without close and the flush timed out; the messages still queued are purged (the core producer resends or hands back the ones it tracks)");
            }
        }
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let span = self.publish_span(msg);
        async move { self.enqueue(msg)?.await }
            .instrument(span)
            .await
    }

    /// Enqueues `msg` into librdkafka when first polled (the submission) and returns the wait
    /// for its delivery report (the attempt); see the [module docs](self#order).
    fn submit(self: Arc<Self>, msg: Arc<Message>) -> Submission {
        let span = self.publish_span(&msg);
        let attempt_span = span.clone();
        Box::pin(
            async move {
                let delivery = self.enqueue(&msg)?;
                let attempt: Attempt = Box::pin(delivery.instrument(attempt_span));
                Ok(attempt)
            }
            .instrument(span),
        )
    }

    /// A stable hash of the message's topic and record key: one key always lands in one
    /// partition, so its messages keep their order while other keys go on. Messages without a
    /// key (spread over partitions by librdkafka) share one lane per topic.
    fn lane(&self, msg: &Message) -> u64 {
        lane_of(self.topic_of(msg).unwrap_or_default(), msg.routing_key())
    }

    /// Flushes librdkafka's queue; see [`KafkaTransport::close`].
    async fn close(&self) {
        KafkaTransport::close(self).await;
    }
}

impl KafkaTransport {
    /// The topic `msg` goes to: its destination, or the default topic.
    fn topic_of<'a>(&'a self, msg: &'a Message) -> Option<&'a str> {
        msg.destination().or(self.inner.default_topic.as_deref())
    }

    fn publish_span(&self, msg: &Message) -> tracing::Span {
        let topic = self.topic_of(msg).unwrap_or_default();
        tracing::debug_span!("reliable.kafka.publish", message_id = %msg.id(), topic)
    }

    /// Hands `msg` to librdkafka now (so the caller's order is librdkafka's enqueue order) and
    /// returns the wait for its delivery report. Errors are refusals at enqueue.
    fn enqueue(
        &self,
        msg: &Message,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let topic = self
            .topic_of(msg)
            .ok_or_else(|| PublishError::Unroutable {
                reason: "the message has no destination and the transport no default topic; set one with Message::with_destination or KafkaTransportBuilder::default_topic".into(),
            })?;
        let headers = msg
            .wire_headers()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let payload: &[u8] = msg.payload();
        let size = payload.len();
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(payload)
            .headers(headers);
        if let Some(key) = msg.routing_key() {
            record = record.key(key);
        }
        let (generation, producer) = self.current();
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| self.classify(generation, &e, size))?;
        let this = self.clone();
        // Cancel safe: dropping the future leaves the message to librdkafka, whose report then
        // goes nowhere; the core resends with the same id.
        Ok(async move {
            match delivery.await {
                Ok(Ok(report)) => {
                    tracing::trace!(
                        partition = report.partition,
                        offset = report.offset,
                        "delivered"
                    );
                    Ok(())
                }
                Ok(Err((e, _))) => {
                    let err = this.classify(generation, &e, size);
                    tracing::debug!(error = %err, "delivery failed");
                    Err(err)
                }
                Err(_) => Err(PublishError::ConnectionLost {
                    reason: "the producer was dropped before the delivery report".into(),
                }),
            }
        })
    }
}

/// The lane of a message to `topic` with record key `key` (`None`: one lane per topic). Lanes
/// only need to agree within one process.
fn lane_of(topic: &str, key: Option<&str>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((topic, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::producer_preset;

    #[test]
    fn wrapping_a_producer_validates_the_config_it_was_built_from() {
        let timeout = Duration::from_secs(5);
        let safe = producer_preset("127.0.0.1:1", timeout);
        let producer: FutureProducer = safe.create().unwrap();
        let t = KafkaTransport::from_producer(producer, &safe, timeout, &Safety::strict()).unwrap();
        assert_eq!(t.recommended_producer_config().confirm_timeout, timeout);

        let mut weak = ClientConfig::new();
        weak.set("bootstrap.servers", "127.0.0.1:1");
        let producer: FutureProducer = weak.create().unwrap();
        let err =
            KafkaTransport::from_producer(producer, &weak, timeout, &Safety::strict()).unwrap_err();
        assert!(err.to_string().contains("enable.idempotence=true"), "{err}");

        weak.set("acks", "0");
        let producer: FutureProducer = weak.create().unwrap();
        let err =
            KafkaTransport::from_producer(producer, &weak, timeout, &Safety::strict()).unwrap_err();
        assert!(matches!(err, Error::UnsafeConfig(_)), "{err}");
    }

    /// A transport on an address nothing listens on: building and enqueueing need no broker.
    async fn offline(builder: KafkaTransportBuilder) -> KafkaTransport {
        builder.skip_topic_check().build().await.unwrap()
    }

    fn message_timeout(t: &KafkaTransport) -> Option<&str> {
        t.client_config().get("message.timeout.ms")
    }

    #[tokio::test]
    async fn preserved_order_gives_librdkafka_the_whole_deadline() {
        let t = offline(KafkaTransport::builder("127.0.0.1:1")).await;
        assert_eq!(message_timeout(&t), Some("60000"));
        let core = t.recommended_producer_config();
        assert_eq!(core.order, SendOrder::Preserved);
        assert_eq!(
            core.confirm_timeout,
            Duration::from_secs(60) + DEADLINE_MARGIN
        );
        assert_eq!(core.deadline, core.confirm_timeout);
        assert!(core.backoff.min_delay >= DEADLINE_MARGIN);

        let t =
            offline(KafkaTransport::builder("127.0.0.1:1").deadline(Duration::from_secs(30))).await;
        assert_eq!(message_timeout(&t), Some("30000"));
        assert_eq!(
            t.recommended_producer_config().deadline,
            Duration::from_secs(30) + DEADLINE_MARGIN
        );
    }

    #[tokio::test]
    async fn a_confirm_timeout_or_relaxed_order_bounds_each_attempt() {
        let t = offline(
            KafkaTransport::builder("127.0.0.1:1").confirm_timeout(Duration::from_secs(10)),
        )
        .await;
        assert_eq!(message_timeout(&t), Some("9000"));
        let core = t.recommended_producer_config();
        assert_eq!(
            (core.order, core.confirm_timeout, core.deadline),
            (
                SendOrder::Preserved,
                Duration::from_secs(10),
                Duration::from_secs(60)
            )
        );

        let t = offline(KafkaTransport::builder("127.0.0.1:1").order(SendOrder::Relaxed)).await;
        assert_eq!(message_timeout(&t), Some("4500"));
        let core = t.recommended_producer_config();
        assert_eq!(
            core,
            ProducerConfig {
                order: SendOrder::Relaxed,
                ..ProducerConfig::default()
            }
        );
    }

    #[tokio::test]
    async fn a_message_timeout_past_the_core_confirm_timeout_is_refused() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "120000");
        let err = KafkaTransport::builder_from_config(config.clone())
            .skip_topic_check()
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("message.timeout.ms"), "{err}");
        // Within the deadline's bound it is the user's choice.
        config.set("message.timeout.ms", "30000");
        let t = offline(KafkaTransport::builder_from_config(config)).await;
        assert_eq!(message_timeout(&t), Some("30000"));
    }

    #[test]
    fn lanes_follow_topic_and_key() {
        assert_eq!(lane_of("a", Some("k")), lane_of("a", Some("k")));
        assert_ne!(lane_of("a", Some("k")), lane_of("a", Some("j")));
        assert_ne!(lane_of("a", Some("k")), lane_of("b", Some("k")));
        assert_ne!(lane_of("a", None), lane_of("a", Some("")));
        assert_ne!(lane_of("ab", None), lane_of("a", Some("b")));
    }

    #[tokio::test]
    async fn lane_uses_the_default_topic() {
        let t = offline(
            KafkaTransport::builder("127.0.0.1:1").default_topic(crate::TopicSpec::new("orders")),
        )
        .await;
        let keyed = Message::new("x").with_routing_key("k");
        assert_eq!(t.lane(&keyed), lane_of("orders", Some("k")));
        assert_eq!(
            t.lane(&keyed.clone().with_destination("other")),
            lane_of("other", Some("k"))
        );
        assert_eq!(t.lane(&Message::new("y")), lane_of("orders", None));
    }

    /// The submission enqueues into librdkafka on its first poll, not when it is created: two
    /// submissions polled in the opposite order land in the opposite order. A refusal at
    /// enqueue is the submission's error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submission_enqueues_on_first_poll() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::mocking::MockCluster;
        use rdkafka::{Message as _, Offset, TopicPartitionList};

        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("order", 1, 1).unwrap();
        let t = Arc::new(
            offline(
                KafkaTransport::builder(&mock.bootstrap_servers())
                    .default_topic(crate::TopicSpec::new("order")),
            )
            .await,
        );
        let first = t.clone().submit(Arc::new(Message::new("created first")));
        let second = t.clone().submit(Arc::new(Message::new("created second")));
        let second = second.await.unwrap();
        let first = first.await.unwrap();
        first.await.unwrap();
        second.await.unwrap();

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "submission-order")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("order", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut payloads = Vec::new();
        while payloads.len() < 2 {
            let m = consumer
                .poll(Duration::from_secs(10))
                .expect("the mock cluster returns both records")
                .unwrap();
            payloads.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
        }
        assert_eq!(payloads, ["created second", "created first"]);

        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", mock.bootstrap_servers());
        let refused = Arc::new(offline(KafkaTransport::builder_from_config(config)).await);
        let err = refused
            .submit(Arc::new(Message::new("x")))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
        t.close().await;
    }

    #[tokio::test]
    async fn message_without_topic_is_unroutable() {
        let timeout = Duration::from_secs(5);
        let safe = producer_preset("127.0.0.1:1", timeout);
        let producer: FutureProducer = safe.create().unwrap();
        let t = KafkaTransport::from_producer(producer, &safe, timeout, &Safety::strict()).unwrap();
        let err = t.publish(&Message::new("x")).await.unwrap_err();
        assert!(matches!(err, PublishError::Unroutable { .. }));
    }

    /// librdkafka's MockCluster fails the idempotent producer's `InitProducerId` with
    /// `CLUSTER_AUTHORIZATION_FAILED`, a fatal idempotence error: the transport rebuilds the
    /// producer and the core producer's resend is confirmed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fatal_idempotence_error_rebuilds_the_producer() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        use reliable_core::producer::Producer;

        let mock = MockCluster::new(3).unwrap();
        mock.create_topic("fatal", 1, 3).unwrap();
        mock.request_errors(
            RDKafkaApiKey::InitProducerId,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
        );
        let timeout = Duration::from_secs(5);
        let config = producer_preset(&mock.bootstrap_servers(), timeout);
        let producer: FutureProducer = config.create().unwrap();
        let t =
            KafkaTransport::from_producer(producer, &config, timeout, &Safety::strict()).unwrap();

        let first = t
            .publish(&Message::new("a").with_destination("fatal"))
            .await;
        assert!(
            matches!(first, Err(PublishError::ConnectionLost { ref reason }) if reason.contains("rebuilt")),
            "{first:?}"
        );
        assert_eq!(t.rebuilds(), 1);
        let core = Producer::new(t.clone(), t.recommended_producer_config());
        let confirmed = core
            .send_confirmed(Message::new("b").with_destination("fatal"))
            .await
            .unwrap();
        assert_eq!(confirmed.attempts, 1);
        core.close().await;
        t.close().await;
    }
}
