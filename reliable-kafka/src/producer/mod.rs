//! [`KafkaTransport`]: the core [`Transport`] over an rdkafka producer (loss-matrix row L7;
//! invariants 1, 3 and 6).
//!
//! One [`publish`](Transport::publish) is one produce: the message's topic
//! ([`Message::destination`], or the transport's default topic), its key
//! ([`Message::routing_key`], which picks the partition through librdkafka's consistent
//! partitioner, so every resend lands in the same partition) and every wire header (message id,
//! idempotency key, user headers). It resolves `Ok` on the delivery report under `acks=all`;
//! failures are classified for the core [`Producer`](reliable_core::producer::Producer), which
//! resends with the same id and key:
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
//! Dropping an rdkafka producer purges what it still queues, so the transport flushes before
//! it lets go of the client:
//!
//! * [`Producer::close`](reliable_core::producer::Producer::close) is the way to shut down: once
//!   every pending message is settled it calls [`Transport::close`], which flushes librdkafka's
//!   queue on a blocking thread ([`spawn_blocking`](tokio::task::spawn_blocking)), bounded by
//!   the flush timeout (`message.timeout.ms` plus 1 s; the core producer gives it at most its
//!   confirm timeout).
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
//!     .confirm_timeout(Duration::from_secs(10))
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use reliable_core::pipeline::DeadLetter;
use reliable_core::producer::{Producer as CoreProducer, ProducerConfig};
use reliable_core::{Message, PublishError, Transport};
use tracing::Instrument;

use crate::config::{harden_producer_config, redact, RedactedConfig, Safety};
use crate::Error;

mod builder;

use builder::create_producer;
pub use builder::KafkaTransportBuilder;

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
    confirm_timeout: Duration,
    max_message_bytes: usize,
    flush_timeout: Duration,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &RedactedConfig(&self.inner.config))
            .field("default_topic", &self.inner.default_topic)
            .field("confirm_timeout", &self.inner.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// A builder from the safe preset ([`producer_preset`](crate::config::producer_preset)).
    pub fn builder(bootstrap_servers: &str) -> KafkaTransportBuilder {
        // Only the address here: `build` completes the preset from the final confirm timeout,
        // so `.confirm_timeout(..)` also sets `message.timeout.ms` to match.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::builder_from_config(config)
    }

    /// A builder from the caller's `config`: at build time missing safe settings are added and
    /// weaker ones refused with [`Error::UnsafeConfig`].
    pub fn builder_from_config(config: ClientConfig) -> KafkaTransportBuilder {
        KafkaTransportBuilder {
            config,
            confirm_timeout: ProducerConfig::default().confirm_timeout,
            safety: Safety::strict(),
            default_topic: None,
            topics: Vec::new(),
            check_topics: true,
        }
    }

    /// Wraps an existing `producer`. `config` must be the configuration it was created from: it
    /// is validated like a builder's (an unsafe setting is refused) and used to rebuild the
    /// producer after a fatal error. No topic check runs; call
    /// [`ensure_topic`](crate::topic::ensure_topic) yourself.
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
        Ok(Self::assemble(producer, checked, None, confirm_timeout))
    }

    fn assemble(
        producer: FutureProducer,
        config: ClientConfig,
        default_topic: Option<String>,
        confirm_timeout: Duration,
    ) -> Self {
        let max_message_bytes = config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let message_timeout = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(confirm_timeout);
        Self {
            inner: Arc::new(Inner {
                producer: RwLock::new((0, producer)),
                generations: AtomicU64::new(0),
                config,
                default_topic,
                confirm_timeout,
                max_message_bytes,
                // Every queued message has its delivery report by then.
                flush_timeout: message_timeout + Duration::from_secs(1),
            }),
        }
    }

    /// A core [`ProducerConfig`] whose confirm timeout matches this transport's.
    pub fn recommended_producer_config(&self) -> ProducerConfig {
        ProducerConfig {
            confirm_timeout: self.inner.confirm_timeout,
            ..ProducerConfig::default()
        }
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
        let topic = msg
            .destination()
            .or(self.inner.default_topic.as_deref())
            .ok_or_else(|| PublishError::Unroutable {
                reason: "the message has no destination and the transport no default topic".into(),
            })?;
        let span = tracing::debug_span!("reliable.kafka.publish", message_id = %msg.id(), topic);
        async move {
            let headers = msg
                .wire_headers()
                .fold(OwnedHeaders::new(), |h, (key, value)| {
                    h.insert(Header {
                        key,
                        value: Some(value),
                    })
                });
            let payload: &[u8] = msg.payload();
            let mut record = FutureRecord::<str, [u8]>::to(topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = msg.routing_key() {
                record = record.key(key);
            }
            let (generation, producer) = self.current();
            let delivery = match producer.send_result(record) {
                Ok(delivery) => delivery,
                Err((e, _)) => return Err(self.classify(generation, &e, payload.len())),
            };
            // Cancel safe: dropping the future leaves the message to librdkafka, whose report
            // then goes nowhere; the core resends with the same id.
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
                    let err = self.classify(generation, &e, payload.len());
                    tracing::debug!(error = %err, "delivery failed");
                    Err(err)
                }
                Err(_) => Err(PublishError::ConnectionLost {
                    reason: "the producer was dropped before the delivery report".into(),
                }),
            }
        }
        .instrument(span)
        .await
    }

    /// Flushes librdkafka's queue; see [`KafkaTransport::close`].
    async fn close(&self) {
        KafkaTransport::close(self).await;
    }
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
