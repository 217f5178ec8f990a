//! [`KafkaTransport`]: the core [`Transport`](reliable_core::Transport) over an rdkafka producer (loss-matrix row L7;
//! invariants 1, 3 and 6).
//!
//! One [`submit`](reliable_core::Transport::submit) (or [`publish`](reliable_core::Transport::publish)) is one produce: the
//! message's topic ([`Message::destination`](reliable_core::Message::destination), or the transport's default topic), its key
//! ([`Message::routing_key`](reliable_core::Message::routing_key), which picks the partition through librdkafka's consistent
//! partitioner, so every resend lands in the same partition) and every wire header (message id,
//! idempotency key, user headers). `submit` enqueues the record into librdkafka before it
//! returns, so librdkafka's partition queues hold the records in submission order; the
//! client's delivery callback answers the attempt's [`Completion`](reliable_core::Completion)
//! (`Ok` on the delivery report under `acks=all`), with no future or channel per message (a
//! `FutureProducer` wrapped with [`KafkaTransport::from_producer`] answers through its
//! delivery future instead).
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
//! The core producer submits the messages of one [`lane`](reliable_core::Transport::lane) (a topic and record
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
//!   every pending message is settled it calls [`Transport::close`](reliable_core::Transport::close), which flushes librdkafka's
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use reliable_core::pipeline::DeadLetter;
use reliable_core::producer::{Producer as CoreProducer, ProducerConfig, SendOrder};
use reliable_core::PublishError;

use crate::config::{harden_producer_config, redact, RedactedConfig, Safety};
use crate::Error;

mod builder;
mod client;
mod submit;
#[cfg(test)]
mod tests;

use builder::Timing;
pub use builder::{KafkaTransportBuilder, DEADLINE_MARGIN};
use client::{Client, Link};

/// Kafka's default `message.max.bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// The core [`Transport`](reliable_core::Transport) over an rdkafka producer whose delivery callback answers each
/// attempt (or an application's [`FutureProducer`], see [`from_producer`](Self::from_producer)); see the module
/// docs. Cheap to clone (shared).
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    /// The live producer and its generation (bumped by every rebuild).
    producer: RwLock<(u64, Client)>,
    /// How the client's delivery callback finds this transport (also for rebuilt clients).
    link: Link,
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
        Ok(Self::assemble(
            Client::Future(producer),
            Link::default(),
            checked,
            None,
            timing.core,
        ))
    }

    /// The transport over `producer`, whose callback (if any) reports through `link`.
    fn assemble(
        producer: Client,
        link: Link,
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
        let transport = Self {
            inner: Arc::new(Inner {
                producer: RwLock::new((0, producer)),
                link: Arc::clone(&link),
                generations: AtomicU64::new(0),
                config,
                default_topic,
                recommended,
                max_message_bytes,
                // Every queued message has its delivery report by then.
                flush_timeout: message_timeout + Duration::from_secs(1),
            }),
        };
        // Set once, here: the link is new or belongs to a client created for this transport.
        let _ = link.set(Arc::downgrade(&transport.inner));
        transport
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
    /// (as [`Transport::close`](reliable_core::Transport::close)); call it yourself only when publishing through the transport
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

    fn current(&self) -> (u64, Client) {
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
        let fresh = Client::create(&self.inner.config, Arc::clone(&self.inner.link))
            .map_err(|e| redact(&self.inner.config, e.to_string()))?;
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

    /// The class of a refusal whose code alone decides it; `None` when the client's fatal
    /// state decides it ([`classify`](Self::classify)).
    fn classify_by_code(&self, err: &KafkaError, size: usize) -> Option<PublishError> {
        let reason = || redact(&self.inner.config, err.to_string());
        use RDKafkaErrorCode as C;
        Some(match err.rdkafka_error_code() {
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
            _ => return None,
        })
    }

    /// Classifies a refusal (see the [module docs](self)); after a fatal idempotence error,
    /// rebuilds the client first. Blocks briefly on a rebuild: call it off the client's
    /// polling thread.
    fn classify(&self, generation: u64, err: &KafkaError, size: usize) -> PublishError {
        if let Some(class) = self.classify_by_code(err, size) {
            return class;
        }
        let reason = || redact(&self.inner.config, err.to_string());
        let fatal = || self.current().1.fatal_error();
        use RDKafkaErrorCode as C;
        match err.rdkafka_error_code() {
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
    producer: Option<Client>,
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
