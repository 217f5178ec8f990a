//! Safe settings for RabbitMQ: presets, and the refusal of overrides that lose data.
//!
//! [`AmqpSettings::safe`] (also the [`Default`]) is the preset every other preset starts
//! from: quorum queues, durable exchanges, persistent messages (delivery mode 2), publisher
//! confirms, `mandatory` on every publish, manual acks, a bounded prefetch and a short
//! connection heartbeat ([`DEFAULT_HEARTBEAT`]). The named
//! variants change only settings that keep messages safe ([`AmqpSettings::classic_durable`],
//! [`AmqpSettings::transactional`], [`AmqpSettings::high_throughput`]).
//!
//! Overriding a setting so that it loses data is a typed error ([`UnsafeSetting`]) that names
//! the setting, the value and why it loses data. The only way to get such a setting is the
//! loudly named [`AmqpSettings::unsafe_allow_data_loss`], which logs a warning.
//!
//! ```
//! use reliable_amqp::settings::{AmqpSettings, DataLoss, QueueType};
//!
//! let settings = AmqpSettings::safe().with_prefetch(200)?;
//! assert_eq!(settings.queue_type(), QueueType::Quorum);
//!
//! let refused = AmqpSettings::safe().with_persistent_messages(false).unwrap_err();
//! assert_eq!(refused.setting, "persistent_messages");
//!
//! // Only a loud, explicit opt-out gets a lossy setting:
//! let lossy = AmqpSettings::safe().unsafe_allow_data_loss(DataLoss::TransientMessages);
//! assert!(!lossy.persistent_messages());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod refusal;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use crate::tls::TlsConfig;

pub use refusal::{DataLoss, InvalidSetting, SettingsError, UnsafeSetting};

/// The kind of queue the topology helpers declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// Replicated, durable, fsyncs before confirming (`x-queue-type: quorum`). The default.
    Quorum,
    /// A durable classic queue (`x-queue-type: classic`, `durable: true`). Survives a broker
    /// restart with persistent messages, but is not replicated.
    ClassicDurable,
    /// A non-durable classic queue: it and every message in it vanish when the broker
    /// restarts. Only reachable through [`AmqpSettings::unsafe_allow_data_loss`].
    ClassicTransient,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn x_queue_type(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::ClassicDurable | QueueType::ClassicTransient => "classic",
        }
    }

    /// Whether the queue survives a broker restart.
    pub fn durable(self) -> bool {
        !matches!(self, QueueType::ClassicTransient)
    }
}

/// How the publisher makes a publish durable: publisher confirms, or AMQP transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishMode {
    /// Publisher confirms (the default): many publishes in flight, each confirmed on its own.
    Confirms,
    /// AMQP transactions (`tx.select` / `tx.commit`): one commit round trip per publish or
    /// batch. Slower than confirms (a synchronous round trip, and fsync per commit); use it
    /// when a batch must be committed as a whole.
    Transactions,
}

/// The publisher's reconnect policy: exponential backoff with jitter between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first retry.
    pub min_delay: Duration,
    /// Largest delay between two attempts.
    pub max_delay: Duration,
    /// Attempts per reopen before the publish fails with a retryable connection-lost error
    /// (the caller, usually the core's reliable producer, retries later with the same id).
    pub max_attempts: usize,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            max_attempts: 8,
        }
    }
}

/// RabbitMQ settings for publishers, consumers and topology. Start from a preset.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpSettings {
    preset: &'static str,
    queue_type: QueueType,
    persistent_messages: bool,
    publisher_confirms: bool,
    mandatory: bool,
    manual_ack: bool,
    prefetch: u16,
    publish_mode: PublishMode,
    reconnect: ReconnectPolicy,
    confirm_timeout: Duration,
    heartbeat: Duration,
    tls: Option<TlsConfig>,
    opted_out: Vec<DataLoss>,
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("preset", &self.preset)
            .field("queue_type", &self.queue_type)
            .field("persistent_messages", &self.persistent_messages)
            .field("publisher_confirms", &self.publisher_confirms)
            .field("mandatory", &self.mandatory)
            .field("manual_ack", &self.manual_ack)
            .field("prefetch", &self.prefetch)
            .field("publish_mode", &self.publish_mode)
            .field("reconnect", &self.reconnect)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("tls", &self.tls)
            .field("unsafe_allow_data_loss", &self.opted_out)
            .finish()
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self::safe()
    }
}

/// The default prefetch of the presets (unacked deliveries per consumer channel).
pub const DEFAULT_PREFETCH: u16 = 200;

/// The default [`AmqpSettings::confirm_timeout`]: 30 seconds.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The heartbeat every preset proposes: 5 seconds, so a link that stops carrying bytes is
/// declared dead within about 10 s instead of the broker's default 60 s times two (L12).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// The longest heartbeat [`AmqpSettings::with_heartbeat`] accepts: RabbitMQ's own default.
/// The lower of the two proposals wins, so a longer one would change nothing on a broker with
/// default settings.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

impl AmqpSettings {
    /// The safe default: quorum queues, durable exchanges, persistent messages, publisher
    /// confirms, `mandatory`, manual acks, prefetch [`DEFAULT_PREFETCH`], heartbeat
    /// [`DEFAULT_HEARTBEAT`].
    pub fn safe() -> Self {
        Self {
            preset: "safe",
            queue_type: QueueType::Quorum,
            persistent_messages: true,
            publisher_confirms: true,
            mandatory: true,
            manual_ack: true,
            prefetch: DEFAULT_PREFETCH,
            publish_mode: PublishMode::Confirms,
            reconnect: ReconnectPolicy::default(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT,
            tls: None,
            opted_out: Vec::new(),
        }
    }

    /// Like [`safe`](Self::safe) with durable classic queues: for single-node brokers or
    /// features quorum queues lack (priorities, exclusive consumers). Not replicated.
    pub fn classic_durable() -> Self {
        Self {
            preset: "classic_durable",
            queue_type: QueueType::ClassicDurable,
            ..Self::safe()
        }
    }

    /// Like [`safe`](Self::safe), publishing inside AMQP transactions instead of with
    /// confirms: the slower alternative, for when a batch must commit as a whole.
    pub fn transactional() -> Self {
        Self {
            preset: "transactional",
            publish_mode: PublishMode::Transactions,
            ..Self::safe()
        }
    }

    /// Like [`safe`](Self::safe) with a larger prefetch (300) for fast handlers.
    pub fn high_throughput() -> Self {
        Self {
            preset: "high_throughput",
            prefetch: 300,
            ..Self::safe()
        }
    }

    /// Sets the queue type. [`QueueType::ClassicTransient`] is refused: it loses data.
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Result<Self, UnsafeSetting> {
        if !queue_type.durable() {
            return Err(DataLoss::NonDurableQueues.into());
        }
        self.queue_type = queue_type;
        Ok(self)
    }

    /// Persistent messages (delivery mode 2). `false` is refused: it loses data.
    pub fn with_persistent_messages(self, persistent: bool) -> Result<Self, UnsafeSetting> {
        self.require(persistent, DataLoss::TransientMessages)
    }

    /// Publisher confirms. `false` is refused: it loses data.
    pub fn with_publisher_confirms(self, confirms: bool) -> Result<Self, UnsafeSetting> {
        self.require(confirms, DataLoss::NoPublisherConfirms)
    }

    /// `mandatory` on every publish. `false` is refused: it loses data.
    pub fn with_mandatory(self, mandatory: bool) -> Result<Self, UnsafeSetting> {
        self.require(mandatory, DataLoss::NoMandatory)
    }

    /// Manual acks on consumers. `false` (auto-ack) is refused: it loses data.
    pub fn with_manual_ack(self, manual: bool) -> Result<Self, UnsafeSetting> {
        self.require(manual, DataLoss::AutoAck)
    }

    fn require(self, value: bool, loss: DataLoss) -> Result<Self, UnsafeSetting> {
        if value {
            Ok(self)
        } else {
            Err(loss.into())
        }
    }

    /// Unacked deliveries per consumer channel (`basic.qos`). Must be 1..=10000: 0 means
    /// unbounded in AMQP, which buffers without limit.
    pub fn with_prefetch(mut self, prefetch: u16) -> Result<Self, InvalidSetting> {
        if !(1..=10_000).contains(&prefetch) {
            return Err(InvalidSetting {
                setting: "prefetch",
                value: prefetch.to_string(),
                expected: "1..=10000 (0 would be unbounded)",
            });
        }
        self.prefetch = prefetch;
        Ok(self)
    }

    /// Sets how publishes are made durable.
    pub fn with_publish_mode(mut self, mode: PublishMode) -> Self {
        self.publish_mode = mode;
        self
    }

    /// Sets the publisher's reconnect policy. `max_attempts` must be at least 1 and
    /// `min_delay <= max_delay`.
    pub fn with_reconnect(mut self, policy: ReconnectPolicy) -> Result<Self, InvalidSetting> {
        if policy.max_attempts == 0 || policy.min_delay > policy.max_delay {
            return Err(InvalidSetting {
                setting: "reconnect",
                value: format!("{policy:?}"),
                expected: "max_attempts >= 1 and min_delay <= max_delay",
            });
        }
        self.reconnect = policy;
        Ok(self)
    }

    /// Sets how long one publish may wait for its confirm (confirm mode: from
    /// `basic.publish` to the broker's `basic.ack`; transaction mode: from waiting for the
    /// channel's transaction to `tx.commit-ok`). On expiry the publish fails with the
    /// retryable [`PublishError::Timeout`](reliable_core::PublishError::Timeout): the message
    /// is not known to be confirmed, so resend it (same id). Default
    /// [`DEFAULT_CONFIRM_TIMEOUT`]; must be 1 ms..=1 hour.
    ///
    /// A backstop for using the publisher directly, so that a dead peer cannot hold a publish
    /// until lapin's heartbeat notices it. The core's reliable producer wraps each attempt in
    /// its own, usually shorter, timeout. Opening a channel is bounded separately, by the
    /// [`ReconnectPolicy`].
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Result<Self, InvalidSetting> {
        if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&timeout) {
            return Err(InvalidSetting {
                setting: "confirm_timeout",
                value: format!("{timeout:?}"),
                expected: "1ms..=1h",
            });
        }
        self.confirm_timeout = timeout;
        Ok(self)
    }

    /// Sets the AMQP heartbeat the adapter proposes for the connections it opens from a URL
    /// (`connect(url, ..)`). Default [`DEFAULT_HEARTBEAT`]; must be whole seconds from 1 s to
    /// [`MAX_HEARTBEAT`].
    ///
    /// The heartbeat is how a connection notices a link that stops carrying bytes without
    /// closing (no FIN, no RST): each side sends a heartbeat frame when it has sent nothing
    /// for half the interval, and gives the connection up after two intervals without a
    /// byte from its peer. Until then, publishes written into the dead link wait; the broker
    /// side likewise keeps the connection. Client and broker each propose a value and the
    /// lower wins (lapin, RabbitMQ), so a broker configured shorter still decides.
    ///
    /// It replaces a `heartbeat` parameter in the URL's query. It does not apply to a wrapped
    /// connection or channel (`from_connection`, `from_channel`): their owner chose it
    /// (`heartbeat` in the URI it connected with).
    ///
    /// Turning heartbeats off (zero) is refused, and there is no opt-out for it: it loses no
    /// message by itself, but leaves a silent network undetected for as long as the operating
    /// system's TCP timeouts (minutes to hours), so resends pile into a dead connection.
    /// Very short values (1-2 s) may declare a busy but healthy link dead; 5-20 s is the
    /// range RabbitMQ recommends.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Result<Self, InvalidSetting> {
        let whole_seconds = heartbeat.subsec_nanos() == 0;
        if !whole_seconds || !(Duration::from_secs(1)..=MAX_HEARTBEAT).contains(&heartbeat) {
            return Err(InvalidSetting {
                setting: "heartbeat",
                value: format!("{heartbeat:?}"),
                expected: "whole seconds from 1 s to 60 s (AMQP negotiates heartbeats in \
                           seconds; heartbeats cannot be turned off, since a dead link would \
                           then go unnoticed); keep the preset's 5 s unless the network needs \
                           more",
            });
        }
        self.heartbeat = heartbeat;
        Ok(self)
    }

    /// Connects `amqps://` URLs with `tls`: a CA of your own and, optionally, a client
    /// certificate (see [`crate::tls`]; needs the `tls` feature). Without it an `amqps://` URL
    /// trusts the system's CA store. With it, an `amqp://` URL is refused
    /// ([`AmqpError::TlsWithoutAmqps`](crate::AmqpError::TlsWithoutAmqps)). Does not apply to
    /// a wrapped connection or channel.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Applies a setting that LOSES DATA, on purpose. Logs a warning naming it. Meant for
    /// throw-away queues and for tests that must show loss (negative controls); a production
    /// service should never call this.
    pub fn unsafe_allow_data_loss(mut self, loss: DataLoss) -> Self {
        tracing::warn!(
            setting = loss.setting(),
            value = loss.value(),
            why = loss.why(),
            "unsafe_allow_data_loss: a setting that loses data is enabled"
        );
        match loss {
            DataLoss::NonDurableQueues => self.queue_type = QueueType::ClassicTransient,
            DataLoss::TransientMessages => self.persistent_messages = false,
            DataLoss::NoPublisherConfirms => self.publisher_confirms = false,
            DataLoss::NoMandatory => self.mandatory = false,
            DataLoss::AutoAck => self.manual_ack = false,
        }
        if !self.opted_out.contains(&loss) {
            self.opted_out.push(loss);
        }
        self
    }

    /// The preset these settings started from.
    pub fn preset(&self) -> &'static str {
        self.preset
    }
    /// The queue type the topology helpers declare.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }
    /// Whether messages are published persistent (delivery mode 2).
    pub fn persistent_messages(&self) -> bool {
        self.persistent_messages
    }
    /// Whether publisher channels are in confirm mode.
    pub fn publisher_confirms(&self) -> bool {
        self.publisher_confirms
    }
    /// Whether every publish sets `mandatory`.
    pub fn mandatory(&self) -> bool {
        self.mandatory
    }
    /// Whether consumers ack manually.
    pub fn manual_ack(&self) -> bool {
        self.manual_ack
    }
    /// The consumer prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }
    /// Confirms or transactions.
    pub fn publish_mode(&self) -> PublishMode {
        self.publish_mode
    }
    /// The publisher's reconnect policy.
    pub fn reconnect(&self) -> ReconnectPolicy {
        self.reconnect
    }
    /// How long one publish may wait for its confirm or commit (see
    /// [`with_confirm_timeout`](Self::with_confirm_timeout)).
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }
    /// The heartbeat proposed for connections opened from a URL (see
    /// [`with_heartbeat`](Self::with_heartbeat)).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }
    /// The TLS settings of `amqps://` connections (see [`with_tls`](Self::with_tls)).
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }
    /// The data-loss opt-outs applied, in order; empty for a safe configuration.
    pub fn data_loss_opt_outs(&self) -> &[DataLoss] {
        &self.opted_out
    }
}
