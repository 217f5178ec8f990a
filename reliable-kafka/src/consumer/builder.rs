//! [`KafkaConsumerBuilder`]: configuration of a [`KafkaConsumer`], kept apart from its
//! behaviour.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use reliable_core::offsets::OffsetTracker;
use tokio::sync::Notify;

use super::commit::PeriodicCommit;
use super::lag::LagBook;
use super::rebalance::ConsumerCtx;
use super::{KafkaConsumer, Ordering, RawConsumer, Shared};
use crate::config::{consumer_preset, harden_consumer_config, redact, RedactedConfig, Safety};
use crate::security::{self, KafkaSecurity};
use crate::topic::{ensure_topic, TopicSpec};
use crate::Error;

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

    /// TLS and SASL/SCRAM settings: sets `security.protocol`, the `ssl.*` files and the
    /// `sasl.*` login on the client config (see [`KafkaSecurity`]; needs the `ssl` feature).
    /// At build time a refused handshake or login is [`Error::Security`], never a timeout.
    pub fn security(mut self, security: &KafkaSecurity) -> Self {
        security.apply(&mut self.config);
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
    /// commits what is finished (default 10 s; keep it below `max.poll.interval.ms`). See the
    /// [module docs](super) for where the wait happens.
    pub fn revoke_drain_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_drain_timeout = timeout;
        self
    }

    /// Which deliveries may be processed at the same time (default [`Ordering::PerPartition`]);
    /// see the [module docs](super#ordering).
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
    /// periodic commit. Must run inside a tokio runtime. Sets `statistics.interval.ms` to 1 s
    /// unless the config sets it: librdkafka's statistics feed [`KafkaConsumer::lag`] (a
    /// longer interval makes the lag staler, `0` turns it off).
    pub async fn build(self) -> Result<KafkaConsumer, Error> {
        let mut config = self.config;
        harden_consumer_config(&mut config, &self.safety)?;
        crate::config::enable_statistics(&mut config);
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
        if self.check_topics && !self.topics.is_empty() {
            for spec in &self.topics {
                ensure_topic(&config, spec).await?;
            }
        } else {
            // The topic check names TLS and login failures; without it, this one request does.
            security::probe(&config).await?;
        }
        let shared = Arc::new(Shared {
            tracker: OffsetTracker::new(),
            next: Mutex::default(),
            revoke_drain_timeout: self.revoke_drain_timeout,
            config: config.clone(),
            ordering: self.ordering,
            gate: Mutex::default(),
            settled: Notify::new(),
            commit_lock: Mutex::new(()),
            ackers: AtomicUsize::new(0),
            lag: Arc::new(LagBook::new(&config)),
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
        let periodic = PeriodicCommit::start(
            Arc::downgrade(&consumer),
            shared.clone(),
            self.commit_interval,
        );
        Ok(KafkaConsumer {
            consumer,
            shared,
            periodic,
            max_held: self.max_held,
            deferred: None,
            topic: None,
        })
    }
}
