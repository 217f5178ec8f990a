//! What the harness runs: scenarios, their variants and the sizes of each mode.

use std::fmt;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;

/// A fault scenario: which broker carries the messages and what gets killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
#[allow(clippy::enum_variant_names)] // every scenario is a kill; the names say of what
pub enum Scenario {
    /// kill -9 of the RabbitMQ node, then restart (loss-matrix rows L1, L3).
    AmqpBrokerKill,
    /// The Kafka broker leading partition 0 dies before its followers caught up: the followers
    /// are frozen (SIGSTOP) for a second, the leader is killed -9, the followers resume, the
    /// leader restarts (L6, L7).
    KafkaLeaderKill,
    /// SIGKILL of the RabbitMQ consumer process, then restart (L4, L8).
    AmqpConsumerKill,
    /// SIGKILL of the Kafka consumer process, then restart (L5, L8).
    KafkaConsumerKill,
    /// SIGKILL of the Kafka producer process while the cluster is slow to acknowledge (the
    /// followers frozen for a moment), then restart: what it had accepted but not yet had
    /// confirmed must still arrive (the durable outbox).
    KafkaProducerKill,
}

/// What a scenario's fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A broker process.
    Broker,
    /// The consumer process.
    Consumer,
    /// The producer process.
    Producer,
}

impl Scenario {
    /// Every scenario, in the order a run takes them.
    pub const ALL: [Scenario; 5] = [
        Scenario::AmqpBrokerKill,
        Scenario::AmqpConsumerKill,
        Scenario::KafkaLeaderKill,
        Scenario::KafkaConsumerKill,
        Scenario::KafkaProducerKill,
    ];

    /// The broker the scenario's messages travel through.
    pub fn broker(self) -> Broker {
        match self {
            Scenario::AmqpBrokerKill | Scenario::AmqpConsumerKill => Broker::Amqp,
            Scenario::KafkaLeaderKill
            | Scenario::KafkaConsumerKill
            | Scenario::KafkaProducerKill => Broker::Kafka,
        }
    }

    /// What the fault hits.
    pub fn target(self) -> Target {
        match self {
            Scenario::AmqpBrokerKill | Scenario::KafkaLeaderKill => Target::Broker,
            Scenario::AmqpConsumerKill | Scenario::KafkaConsumerKill => Target::Consumer,
            Scenario::KafkaProducerKill => Target::Producer,
        }
    }

    /// The name used in tables, file names and queue / topic names.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AmqpBrokerKill => "amqp-broker-kill",
            Scenario::KafkaLeaderKill => "kafka-leader-kill",
            Scenario::AmqpConsumerKill => "amqp-consumer-kill",
            Scenario::KafkaConsumerKill => "kafka-consumer-kill",
            Scenario::KafkaProducerKill => "kafka-producer-kill",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The broker of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Broker {
    /// RabbitMQ through `reliable-amqp`.
    Amqp,
    /// Kafka through `reliable-kafka`.
    Kafka,
}

/// The configuration a scenario runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// The SDK's safe presets, with a durable dedupe inbox in the consumer.
    Safe,
    /// The negative control: the classic unsafe setting for the component the fault hits.
    Control,
}

impl Variant {
    /// The name used in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Safe => "safe",
            Variant::Control => "control",
        }
    }
}

/// Which side of a run uses an unsafe setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// The producer is unsafe (no confirms + transient messages; or acks=1 without idempotence).
    pub unsafe_producer: bool,
    /// The consumer is unsafe (auto-ack or auto-commit, with an in-memory buffer, no dedupe).
    pub unsafe_consumer: bool,
    /// The producer spools every message to a durable outbox before sending it.
    pub outbox: bool,
}

/// Which component runs unsafe in `scenario` under `variant`: the control flips the settings of
/// the component its fault hits and keeps the rest safe, so loss is attributable.
pub fn roles(scenario: Scenario, variant: Variant) -> Roles {
    let control = variant == Variant::Control;
    let target = scenario.target();
    Roles {
        unsafe_producer: control && target == Target::Broker,
        unsafe_consumer: control && target == Target::Consumer,
        outbox: !control && target == Target::Producer,
    }
}

/// A one-line description of the configuration of a run, for the report.
pub fn describe(scenario: Scenario, variant: Variant) -> &'static str {
    match (scenario, variant) {
        (Scenario::AmqpBrokerKill, Variant::Safe) => {
            "quorum queue, confirms + mandatory + persistent, manual ack, dedupe inbox"
        }
        (Scenario::AmqpBrokerKill, Variant::Control) => {
            "classic durable queue, no confirms, transient messages"
        }
        (Scenario::AmqpConsumerKill, Variant::Safe) => {
            "quorum queue, manual ack after the effect, dedupe inbox"
        }
        (Scenario::AmqpConsumerKill, Variant::Control) => {
            "auto-ack into an in-memory buffer, no dedupe"
        }
        (Scenario::KafkaLeaderKill, Variant::Safe) => {
            "RF 3, min.isr 2, acks=all + idempotence, manual commit, dedupe inbox"
        }
        (Scenario::KafkaLeaderKill, Variant::Control) => "acks=1, no idempotence",
        (Scenario::KafkaConsumerKill, Variant::Safe) => {
            "commit of the processed watermark only, dedupe inbox"
        }
        (Scenario::KafkaConsumerKill, Variant::Control) => {
            "auto-commit (100 ms) + auto offset store, in-memory buffer, no dedupe"
        }
        (Scenario::KafkaProducerKill, Variant::Safe) => {
            "durable outbox (redb), replayed on restart, dedupe inbox"
        }
        (Scenario::KafkaProducerKill, Variant::Control) => {
            "unconfirmed messages only in memory (no outbox)"
        }
    }
}

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// CI: a few thousand messages and one fault per scenario, a few minutes in all.
    Short,
    /// By hand: 100k messages and five faults per scenario.
    Long,
}

/// The sizes of one scenario run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sizes {
    /// Messages the producer sends.
    pub messages: u64,
    /// The producer's rate, messages per second.
    pub rate: u32,
    /// The consumer's rate limit, messages per second: below the producer's, so a backlog builds
    /// up and a fault always has unprocessed messages to lose.
    pub consumer_capacity: u32,
    /// Faults injected per scenario.
    pub faults: u32,
    /// How long a broker or consumer stays dead before it is restarted.
    #[serde(with = "millis")]
    pub downtime: Duration,
    /// After the producer finished: how long the consumed count may stand still before the
    /// drain is declared finished (messages still missing then count as lost).
    #[serde(with = "millis")]
    pub quiet: Duration,
}

impl Mode {
    /// The sizes of this mode.
    pub fn sizes(self) -> Sizes {
        match self {
            Mode::Short => Sizes {
                messages: 3_000,
                rate: 500,
                consumer_capacity: 400,
                faults: 1,
                downtime: Duration::from_secs(1),
                quiet: Duration::from_secs(15),
            },
            Mode::Long => Sizes {
                messages: 100_000,
                rate: 1_000,
                consumer_capacity: 800,
                faults: 5,
                downtime: Duration::from_secs(2),
                quiet: Duration::from_secs(30),
            },
        }
    }
}

/// Serializes a [`Duration`] as whole milliseconds.
pub mod millis {
    use std::time::Duration;

    /// Writes `d` as milliseconds.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The producer's progress (confirmed messages) at which fault `i` of `faults` is injected:
/// evenly spread over the run, never at its very start or end.
pub fn fault_threshold(messages: u64, faults: u32, i: u32) -> u64 {
    messages * u64::from(i + 1) / u64::from(faults + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_spread_inside_the_run() {
        let t: Vec<_> = (0..5).map(|i| fault_threshold(100_000, 5, i)).collect();
        assert_eq!(t, [16_666, 33_333, 50_000, 66_666, 83_333]);
        assert_eq!(fault_threshold(3_000, 1, 0), 1_500);
    }

    #[test]
    fn the_control_flips_only_the_component_the_fault_hits() {
        for s in Scenario::ALL {
            let safe = roles(s, Variant::Safe);
            assert!(!safe.unsafe_producer && !safe.unsafe_consumer, "{s}");
            assert_eq!(safe.outbox, s.target() == Target::Producer, "{s}");
            let c = roles(s, Variant::Control);
            assert_eq!(c.unsafe_consumer, s.target() == Target::Consumer, "{s}");
            assert_eq!(c.unsafe_producer, s.target() == Target::Broker, "{s}");
            assert!(!c.outbox, "{s}");
        }
    }

    #[test]
    fn the_consumer_is_slower_than_the_producer_so_a_backlog_exists_at_each_fault() {
        for m in [Mode::Short, Mode::Long] {
            let s = m.sizes();
            assert!(s.consumer_capacity < s.rate);
            assert!(s.faults >= 1);
        }
        assert!(Mode::Long.sizes().messages >= 100_000);
        assert!(Mode::Long.sizes().faults >= 5);
    }
}
