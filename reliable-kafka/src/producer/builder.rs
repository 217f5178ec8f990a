//! Building a [`KafkaTransport`]: the safe preset, the topics it checks and creates, the send
//! order and timeouts (how long librdkafka owns a message) and the loudly named opt-outs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use reliable_core::backoff::BackoffPolicy;
use reliable_core::producer::{ProducerConfig, SendOrder};

use super::client::{Client, Link};
use super::KafkaTransport;
use crate::config::{harden_producer_config_sized, redact, RedactedConfig, Safety};
use crate::security::{self, KafkaSecurity};
use crate::topic::{ensure_topic, TopicSpec};
use crate::Error;

/// Builds a [`KafkaTransport`] from the safe preset or a user's [`ClientConfig`], checking the
/// topics it will write to at start-up.
#[must_use]
pub struct KafkaTransportBuilder {
    pub(super) config: ClientConfig,
    /// Set only by [`confirm_timeout`](Self::confirm_timeout).
    pub(super) confirm_timeout: Option<Duration>,
    pub(super) deadline: Duration,
    pub(super) order: SendOrder,
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
            .field("deadline", &self.deadline)
            .field("order", &self.order)
            .field("safety", &self.safety)
            .field("topics", &self.topics)
            .field("check_topics", &self.check_topics)
            .finish_non_exhaustive()
    }
}

impl KafkaTransportBuilder {
    /// Bounds each attempt: librdkafka's `message.timeout.ms` becomes nine tenths of `timeout`
    /// and the core producer's confirm timeout `timeout`, so librdkafka reports a message
    /// failed after that and the core resends it as a new record (in
    /// [`SendOrder::Preserved`] holding the later messages of its key meanwhile, see the
    /// [module docs](super#order)).
    ///
    /// Unset (the default), [`SendOrder::Preserved`] lets librdkafka own each message for the
    /// whole [`deadline`](Self::deadline), which resends nothing as a new record while the
    /// deadline lasts; [`SendOrder::Relaxed`] bounds attempts by the core's default confirm
    /// timeout (5 s). Use the resulting core settings
    /// ([`KafkaTransport::recommended_producer_config`]).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = Some(timeout);
        self
    }

    /// The longest a message may stay unconfirmed (default 60 s, as
    /// [`ProducerConfig::default`]). In [`SendOrder::Preserved`] without a
    /// [`confirm_timeout`](Self::confirm_timeout), librdkafka retries a message for this long
    /// (`message.timeout.ms`) and the core hands it back [`DEADLINE_MARGIN`] later at the
    /// latest; otherwise it is the core producer's deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Whether resends keep the send order per record key (default
    /// [`SendOrder::Preserved`]); the core producer's
    /// [`order`](ProducerConfig::order) in
    /// [`recommended_producer_config`](KafkaTransport::recommended_producer_config). See the
    /// [module docs](super#order).
    pub fn order(mut self, order: SendOrder) -> Self {
        self.order = order;
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

    /// Validates the config, checks the topics and creates the producer. Sets
    /// `statistics.interval.ms` to 1 s unless the config sets it: librdkafka's statistics
    /// tell whether the client is [connected](reliable_core::Transport::connected).
    pub async fn build(self) -> Result<KafkaTransport, Error> {
        let mut config = self.config;
        let timing = Timing::new(self.order, self.confirm_timeout, self.deadline);
        harden_producer_config_sized(
            &mut config,
            timing.message_timeout,
            timing.core.confirm_timeout,
            &self.safety,
        )?;
        if self.check_topics && !self.topics.is_empty() {
            for spec in &self.topics {
                ensure_topic(&config, spec).await?;
            }
        } else {
            // The topic check names TLS and login failures; without it, this one request does.
            security::probe(&config).await?;
        }
        crate::config::enable_statistics(&mut config);
        let link = Link::default();
        let producer = Client::create(&config, Arc::clone(&link)).map_err(|e| Error::Client {
            client: "producer",
            reason: redact(&config, e.to_string()),
        })?;
        Ok(KafkaTransport::assemble(
            producer,
            link,
            config,
            self.default_topic,
            timing.core,
        ))
    }
}

/// How much later than librdkafka's `message.timeout.ms` the core producer gives up on a
/// message when librdkafka owns it for the whole deadline: librdkafka checks for timed-out
/// messages about once a second, so its report arrives within this margin.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// How long librdkafka owns a message, and the core producer settings that let it.
pub(super) struct Timing {
    /// `message.timeout.ms`, unless the client config sets it.
    pub(super) message_timeout: Duration,
    /// The recommended core producer config; its confirm timeout is the most
    /// `message.timeout.ms` may be.
    pub(super) core: ProducerConfig,
}

impl Timing {
    /// The timing for `order`, an explicit per-attempt `confirm_timeout` (if any) and the
    /// delivery `deadline`.
    pub(super) fn new(
        order: SendOrder,
        confirm_timeout: Option<Duration>,
        deadline: Duration,
    ) -> Self {
        let defaults = ProducerConfig::default();
        match (order, confirm_timeout) {
            (SendOrder::Preserved, None) => {
                // The core waits out librdkafka: its attempt and deadline end only after
                // librdkafka's own timeout report. A first resend delay of at least the margin
                // puts any resend after that report past the deadline, so the core hands the
                // message back instead of writing a copy librdkafka would hold past the
                // deadline.
                let bound = deadline.saturating_add(DEADLINE_MARGIN);
                let backoff = BackoffPolicy {
                    min_delay: defaults.backoff.min_delay.max(DEADLINE_MARGIN),
                    max_delay: defaults.backoff.max_delay.max(DEADLINE_MARGIN),
                    ..defaults.backoff.clone()
                };
                Self {
                    message_timeout: deadline,
                    core: ProducerConfig {
                        confirm_timeout: bound,
                        deadline: bound,
                        backoff,
                        order,
                        ..defaults
                    },
                }
            }
            (_, confirm_timeout) => {
                let confirm_timeout = confirm_timeout.unwrap_or(defaults.confirm_timeout);
                Self::per_attempt(order, confirm_timeout, deadline)
            }
        }
    }

    /// librdkafka owns each attempt for nine tenths of `confirm_timeout`; the core resends
    /// after its report.
    pub(super) fn per_attempt(
        order: SendOrder,
        confirm_timeout: Duration,
        deadline: Duration,
    ) -> Self {
        Self {
            message_timeout: confirm_timeout / 10 * 9,
            core: ProducerConfig {
                confirm_timeout,
                deadline,
                order,
                ..ProducerConfig::default()
            },
        }
    }
}
