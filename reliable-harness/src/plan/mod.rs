//! What the harness runs: scenarios, their variants and the sizes of each mode.

use std::fmt;
use std::time::Duration;

use clap::ValueEnum;
use reliable_amqp::topology::{DeadLetterTarget, QueueSpec};
use serde::Serialize;

/// A fault scenario: which broker carries the messages and what goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
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
    /// Bad publishes mixed into a stream of good ones: unroutable messages (`mandatory`, a
    /// routing key no queue is bound to), publishes to a missing exchange (the broker closes
    /// the channel with 404) and first attempts cut short after a few microseconds (L2,
    /// invariant 9). Every good message must arrive, no bad one may be reported confirmed.
    AmqpBadPublish,
    /// The producer's link to RabbitMQ goes silent (a TCP proxy stops carrying bytes, no FIN,
    /// no RST) for longer than the confirm timeout and the heartbeat timeouts of both sides,
    /// then carries them again (L12).
    AmqpSilentNetwork,
    /// Poison messages on RabbitMQ: some messages abort the consumer process (the harness
    /// restarts it), some fail their handler permanently (L10). Each must end in the dead
    /// letter with its origin after at most `max_deliveries` crashes; the rest applied once.
    AmqpPoison,
    /// The same on Kafka, where only the pipeline's durable attempt counter counts crashes.
    KafkaPoison,
    /// kill -9 of the node leading the queue in the 3-node RabbitMQ cluster
    /// (`scripts/rabbit-cluster`), then restart, while the SDK produces and consumes through
    /// all three addresses (L1, L3).
    AmqpNodeKill,
    /// The node leading the queue is cut off (its link down: no FIN, no RST) from the other
    /// nodes and from every client for longer than the heartbeat timeouts, then healed (L1,
    /// L3, L12).
    AmqpPartition,
    /// The Kafka broker leading partition 0 is cut off from the other brokers (replication,
    /// the controller quorum) while clients still reach it, then from the clients too, then
    /// healed: packets dropped, no FIN, no RST (L6, L7).
    KafkaPartition,
    /// The producer process is cut off from RabbitMQ (everything it sends dropped: no FIN, no
    /// RST) for longer than the heartbeat timeouts and the confirm timeout, then let through
    /// again (L12).
    AmqpClientPartition,
    /// The producer process is cut off from every Kafka broker (everything it sends dropped:
    /// no FIN, no RST) for longer than librdkafka's request timeout, its connections reset
    /// halfway (also those it has closed since), then let through again (L7, L12).
    KafkaClientPartition,
    /// A seeded random schedule over the whole run (see `run/nemesis.rs`): node kills,
    /// frozen nodes, partitions of the 3-node RabbitMQ cluster, consumer kills and the
    /// producer cut off (its connections reset halfway). Its control runs both producer and
    /// consumer unsafe.
    AmqpNemesis,
    /// The same on Kafka: broker kills, frozen brokers, partitions, consumer kills, the
    /// producer cut off.
    KafkaNemesis,
}

/// The fewest messages a nemesis run sends: 128 s at the short mode's rate, so the producer is
/// still sending when a long fault ends. A Kafka follower killed with -9 and restarted holds
/// the partitions' high watermark (acks=all waits for every in-sync replica) until it leaves
/// the ISR or catches up, up to about a minute here, and the paced producer sends on meanwhile.
const NEMESIS_MESSAGES: u64 = 64_000;

/// What a scenario's fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A broker process.
    Broker,
    /// The consumer process.
    Consumer,
    /// The producer process.
    Producer,
    /// The producer's publishes themselves (bad ones mixed in).
    Publishes,
    /// The network between the producer and the broker.
    Link,
    /// The consumer's handler (poison messages crash it or fail it).
    Handler,
    /// A node of a broker cluster (RabbitMQ's 3 nodes, Kafka's 3 brokers): killed, or cut
    /// off by a partition.
    Node,
}

impl Scenario {
    /// Every scenario, in the order a run takes them.
    pub const ALL: [Scenario; 16] = [
        Scenario::AmqpBrokerKill,
        Scenario::AmqpConsumerKill,
        Scenario::AmqpBadPublish,
        Scenario::AmqpSilentNetwork,
        Scenario::AmqpPoison,
        Scenario::AmqpNodeKill,
        Scenario::AmqpPartition,
        Scenario::AmqpClientPartition,
        Scenario::AmqpNemesis,
        Scenario::KafkaLeaderKill,
        Scenario::KafkaPartition,
        Scenario::KafkaClientPartition,
        Scenario::KafkaNemesis,
        Scenario::KafkaConsumerKill,
        Scenario::KafkaProducerKill,
        Scenario::KafkaPoison,
    ];

    /// The broker the scenario's messages travel through.
    pub fn broker(self) -> Broker {
        match self {
            Scenario::AmqpBrokerKill
            | Scenario::AmqpConsumerKill
            | Scenario::AmqpBadPublish
            | Scenario::AmqpSilentNetwork
            | Scenario::AmqpPoison
            | Scenario::AmqpNodeKill
            | Scenario::AmqpPartition
            | Scenario::AmqpClientPartition
            | Scenario::AmqpNemesis => Broker::Amqp,
            Scenario::KafkaLeaderKill
            | Scenario::KafkaConsumerKill
            | Scenario::KafkaProducerKill
            | Scenario::KafkaPoison
            | Scenario::KafkaPartition
            | Scenario::KafkaClientPartition
            | Scenario::KafkaNemesis => Broker::Kafka,
        }
    }

    /// What the fault hits.
    pub fn target(self) -> Target {
        match self {
            Scenario::AmqpBrokerKill | Scenario::KafkaLeaderKill => Target::Broker,
            Scenario::AmqpConsumerKill | Scenario::KafkaConsumerKill => Target::Consumer,
            Scenario::KafkaProducerKill => Target::Producer,
            Scenario::AmqpBadPublish => Target::Publishes,
            Scenario::AmqpSilentNetwork
            | Scenario::AmqpClientPartition
            | Scenario::KafkaClientPartition => Target::Link,
            Scenario::AmqpPoison | Scenario::KafkaPoison => Target::Handler,
            Scenario::AmqpNodeKill
            | Scenario::AmqpPartition
            | Scenario::KafkaPartition
            | Scenario::AmqpNemesis
            | Scenario::KafkaNemesis => Target::Node,
        }
    }

    /// Whether the scenario runs on the 3-node RabbitMQ cluster (`scripts/rabbit-cluster`)
    /// instead of the single node.
    pub fn cluster(self) -> bool {
        self.target() == Target::Node && self.broker() == Broker::Amqp
    }

    /// Whether the scenario mixes poison messages into its stream (see
    /// [`Fate`](crate::poison::Fate)).
    pub fn poison(self) -> bool {
        self.target() == Target::Handler
    }

    /// Whether the fault runs through the whole stream instead of striking at planned
    /// moments: such a run has one fault, whatever the mode.
    pub fn continuous(self) -> bool {
        self == Scenario::AmqpBadPublish || self.poison()
    }

    /// Faults planned for one run of this scenario: the nemesis strikes at least three times.
    pub fn faults(self, sizes: &Sizes) -> u32 {
        if self.continuous() {
            1
        } else if self.nemesis() {
            sizes.faults.max(3)
        } else {
            sizes.faults
        }
    }

    /// Messages of one run of this scenario: a nemesis run lasts long enough (at least 128 s
    /// at the short mode's rate) for its faults, back to back, to strike while the producer
    /// still sends.
    pub fn messages(self, sizes: &Sizes) -> u64 {
        if self.nemesis() {
            sizes.messages.max(NEMESIS_MESSAGES)
        } else {
            sizes.messages
        }
    }

    /// Whether the faults of a run are drawn by the nemesis.
    pub fn nemesis(self) -> bool {
        matches!(self, Scenario::AmqpNemesis | Scenario::KafkaNemesis)
    }

    /// The name used in tables, file names and queue / topic names.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AmqpBrokerKill => "amqp-broker-kill",
            Scenario::KafkaLeaderKill => "kafka-leader-kill",
            Scenario::AmqpConsumerKill => "amqp-consumer-kill",
            Scenario::KafkaConsumerKill => "kafka-consumer-kill",
            Scenario::KafkaProducerKill => "kafka-producer-kill",
            Scenario::AmqpBadPublish => "amqp-bad-publish",
            Scenario::AmqpSilentNetwork => "amqp-silent-network",
            Scenario::AmqpPoison => "amqp-poison",
            Scenario::KafkaPoison => "kafka-poison",
            Scenario::AmqpNodeKill => "amqp-node-kill",
            Scenario::AmqpPartition => "amqp-partition",
            Scenario::KafkaPartition => "kafka-partition",
            Scenario::AmqpNemesis => "amqp-nemesis",
            Scenario::KafkaNemesis => "kafka-nemesis",
            Scenario::AmqpClientPartition => "amqp-client-partition",
            Scenario::KafkaClientPartition => "kafka-client-partition",
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

/// What one message of a run is meant to be: only `amqp-bad-publish` mixes bad ones in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// Routed to the run's queue: must be confirmed and arrive.
    Good,
    /// Published with `mandatory` and a routing key no queue is bound to: must be refused
    /// (returned), never confirmed.
    Unroutable,
    /// Published to an exchange that does not exist: the broker closes the channel (404); must
    /// be refused, and only it.
    MissingExchange,
}

impl Publish {
    /// What message `seq` of a `scenario` run is: in `amqp-bad-publish` one in ten is
    /// unroutable and one in fifty goes to a missing exchange; every other message is good.
    pub fn of(scenario: Scenario, seq: u64) -> Self {
        if scenario != Scenario::AmqpBadPublish {
            return Publish::Good;
        }
        match (seq % 10, seq % 50) {
            (3, _) => Publish::Unroutable,
            (_, 7) => Publish::MissingExchange,
            _ => Publish::Good,
        }
    }

    /// Whether the broker must refuse the message (so it must never be reported confirmed).
    pub fn refused(self) -> bool {
        self != Publish::Good
    }

    /// How long the first attempt to publish message `seq` of a `scenario` run may take
    /// before it is cut short (its future dropped, as a caller's timeout does), if it is: in
    /// `amqp-bad-publish`, one good message in ten and one unroutable message in two, after
    /// 0 to 400 µs.
    pub fn cut_short(scenario: Scenario, seq: u64) -> Option<Duration> {
        let cut = scenario == Scenario::AmqpBadPublish && (seq % 10 == 5 || seq % 20 == 13);
        cut.then(|| Duration::from_micros(seq.wrapping_mul(37) % 400))
    }
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
    /// The producer is unsafe: the classic unsafe setting against the scenario's fault (no
    /// confirms + transient messages for a broker kill, no `mandatory` for bad publishes, no
    /// confirms for a silent network; acks=1 without idempotence for Kafka).
    pub unsafe_producer: bool,
    /// The consumer is unsafe (auto-ack or auto-commit, with an in-memory buffer, no dedupe).
    pub unsafe_consumer: bool,
    /// The producer spools every message to a durable outbox before sending it.
    pub outbox: bool,
    /// The RabbitMQ queue is a classic durable one instead of a quorum queue (a quorum queue
    /// would persist the transient messages of the broker-kill control, and counts
    /// deliveries in `x-delivery-count`, which the poison control must not have).
    pub classic_queue: bool,
    /// The consumer's pipeline counts deliveries in a durable attempt counter (redb in the
    /// run's directory) that survives the consumer's crashes; the poison control has none.
    pub attempt_counter: bool,
}

/// Which component runs unsafe in `scenario` under `variant`: the control flips the settings of
/// the component its fault hits and keeps the rest safe, so loss is attributable.
pub fn roles(scenario: Scenario, variant: Variant) -> Roles {
    let control = variant == Variant::Control;
    let target = scenario.target();
    Roles {
        unsafe_producer: control
            && matches!(
                target,
                Target::Broker | Target::Publishes | Target::Link | Target::Node
            ),
        unsafe_consumer: control && (target == Target::Consumer || scenario.nemesis()),
        outbox: !control && target == Target::Producer,
        classic_queue: control
            && matches!(
                scenario,
                Scenario::AmqpBrokerKill
                    | Scenario::AmqpPoison
                    | Scenario::AmqpNodeKill
                    | Scenario::AmqpPartition
                    | Scenario::AmqpNemesis
            ),
        attempt_counter: !control && scenario.poison(),
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
            "RF 3, min.isr 2, acks=all + idempotence (120 s delivery deadline), manual commit, dedupe inbox"
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
        (Scenario::AmqpBadPublish, Variant::Safe) => {
            "quorum queue, confirms + mandatory, returns matched by message id, dedupe inbox"
        }
        (Scenario::AmqpBadPublish, Variant::Control) => {
            "no `mandatory`: the broker acks unroutable messages and drops them; resends in `SendOrder::Relaxed`"
        }
        (Scenario::AmqpSilentNetwork, Variant::Safe) => {
            "confirms, 2 s confirm timeout, heartbeat 5 s, resend on a fresh connection, dedupe inbox"
        }
        (Scenario::AmqpSilentNetwork, Variant::Control) => {
            "no confirms: a publish counts once written to the socket"
        }
        (Scenario::AmqpPoison, Variant::Safe) => {
            "attempts counted in redb before the handler, max 3 deliveries, dead letter with origin"
        }
        (Scenario::AmqpPoison, Variant::Control) => {
            "classic queue (no x-delivery-count), no attempt counter: crashes counted nowhere"
        }
        (Scenario::KafkaPoison, Variant::Safe) => {
            "attempts counted in redb before the handler, max 3 deliveries, DLQ topic with origin"
        }
        (Scenario::KafkaPoison, Variant::Control) => {
            "no attempt counter: a retry count in memory dies with each crash"
        }
        (Scenario::AmqpNemesis, Variant::Safe) => {
            "3-node cluster, all three addresses, quorum queue, confirms + mandatory + persistent, manual ack, dedupe inbox"
        }
        (Scenario::AmqpNemesis, Variant::Control) => {
            "classic durable queue on node 1, only its address, no confirms, transient messages; auto-ack into an in-memory buffer, no dedupe"
        }
        (Scenario::KafkaNemesis, Variant::Safe) => {
            "RF 3, min.isr 2, acks=all + idempotence (120 s delivery deadline), manual commit, dedupe inbox"
        }
        (Scenario::KafkaNemesis, Variant::Control) => {
            "acks=1, no idempotence; auto-commit + auto offset store, in-memory buffer, no dedupe"
        }
        (Scenario::AmqpClientPartition, Variant::Safe) => {
            "quorum queue, confirms (5 s timeout), heartbeat 5 s, resend on a fresh connection, dedupe inbox"
        }
        (Scenario::AmqpClientPartition, Variant::Control) => {
            "no confirms: a publish counts once written to the socket"
        }
        (Scenario::KafkaClientPartition, Variant::Safe) => {
            "RF 3, min.isr 2, acks=all + idempotence (120 s delivery deadline), manual commit, dedupe inbox"
        }
        (Scenario::KafkaClientPartition, Variant::Control) => {
            "acks=0: a record counts once written to the socket"
        }
        (Scenario::KafkaPartition, Variant::Safe) => {
            "RF 3, min.isr 2, acks=all + idempotence, manual commit, dedupe inbox"
        }
        (Scenario::KafkaPartition, Variant::Control) => "acks=1, no idempotence",
        (Scenario::AmqpNodeKill | Scenario::AmqpPartition, Variant::Safe) => {
            "3-node cluster, all three addresses, quorum queue on every node, confirms + mandatory + persistent, manual ack, dedupe inbox"
        }
        (Scenario::AmqpNodeKill | Scenario::AmqpPartition, Variant::Control) => {
            "classic durable queue on the faulted node, only its address, no confirms, transient messages"
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
    /// How long a silent network stays silent: longer than the confirm timeout and than the
    /// heartbeat timeouts of both sides (lapin gives up after two heartbeats without a byte,
    /// 10 s at the presets' 5 s; RabbitMQ after about three, 15 s), so the dead connection is
    /// given up on both ends and what was written into it is refused when the link heals.
    #[serde(with = "millis")]
    pub blackhole: Duration,
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
                blackhole: Duration::from_secs(20),
            },
            Mode::Long => Sizes {
                messages: 100_000,
                rate: 1_000,
                consumer_capacity: 800,
                faults: 5,
                downtime: Duration::from_secs(2),
                quiet: Duration::from_secs(30),
                blackhole: Duration::from_secs(20),
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

/// The RabbitMQ queue a scenario's messages go through, as the parent declares it and the
/// consumer checks it: a quorum queue dead-lettering at least once to `<dest>.dlx` /
/// `<dest>.dlq`, or, for the classic-queue control, a classic durable queue without one (its
/// consumer dead-letters by a confirmed publish to the same exchange).
pub fn amqp_queue(dest: &str, classic_queue: bool) -> QueueSpec {
    if classic_queue {
        QueueSpec::classic_durable(dest)
    } else {
        QueueSpec::quorum(dest).with_dead_letter(amqp_dead_letter(dest))
    }
}

/// Where a scenario's RabbitMQ dead letters go.
pub fn amqp_dead_letter(dest: &str) -> DeadLetterTarget {
    DeadLetterTarget::new(format!("{dest}.dlx"), format!("{dest}.dlq"))
}

#[cfg(test)]
mod tests;
