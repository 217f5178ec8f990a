//! Building a [`KafkaTransport`]: the safe preset, the topics it checks and creates, the
//! confirm timeout and the loudly named opt-outs.

use std::fmt;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use super::KafkaTransport;
use crate::config::{harden_producer_config, redact, RedactedConfig, Safety};
use crate::topic::{ensure_topic, TopicSpec};
use crate::Error;

/// Builds a [`KafkaTransport`] from the safe preset or a user's [`ClientConfig`], checking the
/// topics it will write to at start-up.
#[must_use]
pub struct KafkaTransportBuilder {
    pub(super) config: ClientConfig,
    pub(super) confirm_timeout: Duration,
    pub(super) safety: Safety,
    pub(super) default_topic: Option<String>,
    pub(super) topics: Vec<TopicSpec>,
    pub(super) check_topics: bool,
}

impl fmt::Debug for KafkaTransportBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransportBuilder")
            .field("config", &RedactedConfig(&self.config))
            .field("confirm_timeout", &self.confirm_timeout)
            .field("safety", &self.safety)
            .field("topics", &self.topics)
            .field("check_topics", &self.check_topics)
            .finish_non_exhaustive()
    }
}

impl KafkaTransportBuilder {
    /// The core producer's confirm timeout (default 5 s, as
    /// [`ProducerConfig::default`](reliable_core::producer::ProducerConfig::default)); librdkafka's `message.timeout.ms` is kept at or below it.
    /// Use the same value in the core producer
    /// ([`KafkaTransport::recommended_producer_config`] does).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Unsafe settings knowingly accepted (default: none).
    pub fn safety(mut self, safety: Safety) -> Self {
        self.safety = safety;
        self
    }

    /// The topic for messages without a [`destination`](reliable_core::Message::destination); it is
    /// checked (or created) at build time like [`topic`](Self::topic).
    pub fn default_topic(mut self, spec: TopicSpec) -> Self {
        self.default_topic = Some(spec.name.clone());
        self.topics.push(spec);
        self
    }

    /// A topic this transport writes to: created with safe settings when missing, verified when
    /// present (see [`ensure_topic`]).
    pub fn topic(mut self, spec: TopicSpec) -> Self {
        self.topics.push(spec);
        self
    }

    /// Skips the start-up topic check. The topics' replication settings then go unverified:
    /// only for clusters checked by other means.
    pub fn skip_topic_check(mut self) -> Self {
        tracing::warn!("Kafka topic safety check disabled; unsafe topics will not be detected");
        self.check_topics = false;
        self
    }

    /// Validates the config, checks the topics and creates the producer.
    pub async fn build(self) -> Result<KafkaTransport, Error> {
        let mut config = self.config;
        harden_producer_config(&mut config, self.confirm_timeout, &self.safety)?;
        if self.check_topics {
            for spec in &self.topics {
                ensure_topic(&config, spec).await?;
            }
        }
        let producer = create_producer(&config)?;
        Ok(KafkaTransport::assemble(
            producer,
            config,
            self.default_topic,
            self.confirm_timeout,
        ))
    }
}

pub(super) fn create_producer(config: &ClientConfig) -> Result<FutureProducer, Error> {
    config.create().map_err(|e| Error::Client {
        client: "producer",
        reason: redact(config, e.to_string()),
    })
}
