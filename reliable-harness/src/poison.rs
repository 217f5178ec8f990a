//! The poison checker (loss-matrix row L10): reads a run's dead letters with a client of its
//! own at the end of the run and accounts for every message the handler crashed on or failed.
//!
//! A crashing or failing message is accounted for when its copy is in the dead letter
//! (RabbitMQ: the `<dest>.dlq` queue; Kafka: the `<dest>.dlq` topic) with its origin: the
//! queue it came from, or its topic, partition and offset, and the attempts counted. Nothing
//! loops when every crashing message caused at most `max_deliveries` crashes (each crash is one
//! journaled delivery of it: the handler journals the delivery, then aborts); a message
//! delivered [`LOOP_EVIDENCE`] times or more shows the loop.

use std::collections::HashMap;
use std::time::Duration;

use reliable_amqp::lapin::options::BasicGetOptions;
use reliable_amqp::lapin::types::AMQPValue;
use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_core::message::headers;
use reliable_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use reliable_kafka::rdkafka::message::{Headers, Message as _};
use reliable_kafka::rdkafka::ClientConfig;
use serde::Serialize;
use tokio::time::Instant;

use crate::child::parse_payload;
use crate::journal::ConsumerView;
use crate::plan::{Broker, Scenario};
use crate::HarnessError;

/// What the consumer's handler does with message `seq` of a poison scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Applies its effect.
    Apply,
    /// Aborts the consumer process (`std::process::abort()`), every time it runs.
    Crash,
    /// Fails permanently ([`HandlerError::permanent`](reliable_core::pipeline::HandlerError)).
    Fail,
}

/// One message in this many aborts its consumer (at `seq % CRASH_EVERY == CRASH_EVERY / 2`,
/// so never the first).
pub const CRASH_EVERY: u64 = 1_000;
/// One message in this many fails its handler permanently (at `seq % FAIL_EVERY ==
/// FAIL_EVERY / 2`, never a crashing one).
pub const FAIL_EVERY: u64 = 300;
/// `PipelineConfig::max_deliveries` of the poison scenarios: the crashes a poison message may
/// cause before the pipeline dead-letters it.
pub const POISON_MAX_DELIVERIES: u32 = 3;
/// Deliveries of one crashing message that prove a loop: twice the limit and one more.
pub const LOOP_EVIDENCE: u32 = 2 * POISON_MAX_DELIVERIES + 1;

impl Fate {
    /// What the handler does with message `seq` of a `scenario` run: only the poison
    /// scenarios have messages that crash or fail.
    pub fn of(scenario: Scenario, seq: u64) -> Self {
        if !scenario.poison() {
            Fate::Apply
        } else if seq % CRASH_EVERY == CRASH_EVERY / 2 {
            Fate::Crash
        } else if seq % FAIL_EVERY == FAIL_EVERY / 2 {
            Fate::Fail
        } else {
            Fate::Apply
        }
    }
}

/// One dead-lettered copy, as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadCopy {
    /// The origin headers name the run's queue or topic (and, on Kafka, a partition and an
    /// offset).
    pub origin_ok: bool,
    /// The `x-delivery-attempts` header.
    pub attempts: Option<u32>,
    /// The message id (`x-message-id`): every copy of one message must carry the original's.
    pub id: Option<String>,
}

impl DeadCopy {
    /// The copy names its origin and the attempts counted.
    fn complete(&self) -> bool {
        self.origin_ok && self.attempts.is_some()
    }
}

/// The dead letters of a run, by sequence number.
#[derive(Clone, Debug, Default)]
pub struct DeadLetters {
    /// Copies per sequence number.
    pub by_seq: HashMap<u64, Vec<DeadCopy>>,
    /// Copies whose payload the harness never wrote.
    pub foreign: u64,
}

impl DeadLetters {
    /// Whether message `seq` is in the dead letter with its origin and attempt count.
    pub fn accounts_for(&self, seq: u64) -> bool {
        self.by_seq
            .get(&seq)
            .is_some_and(|c| c.iter().any(DeadCopy::complete))
    }

    fn total(&self) -> usize {
        self.by_seq.values().map(Vec::len).sum()
    }

    fn add(&mut self, payload: &[u8], copy: DeadCopy) {
        match parse_payload(payload) {
            Some(seq) => self.by_seq.entry(seq).or_default().push(copy),
            None => self.foreign += 1,
        }
    }
}

/// Reads the dead letters of run `dest` until `expected` copies arrived or `wait` passed, then
/// for one more second (a duplicate copy would show).
pub async fn read(
    broker: Broker,
    brokers: &crate::child::BrokerArgs,
    dest: &str,
    expected: usize,
    wait: Duration,
) -> Result<DeadLetters, HarnessError> {
    match broker {
        Broker::Amqp => read_amqp(&brokers.amqp_url, dest, expected, wait).await,
        Broker::Kafka => read_kafka(&brokers.kafka_bootstrap, dest, expected, wait).await,
    }
}

async fn read_amqp(
    url: &str,
    dest: &str,
    expected: usize,
    wait: Duration,
) -> Result<DeadLetters, HarnessError> {
    let unavailable = |e: reliable_amqp::lapin::Error| HarnessError::BrokerUnavailable {
        broker: "RabbitMQ",
        detail: e.to_string(),
    };
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(unavailable)?;
    let channel = conn.create_channel().await.map_err(unavailable)?;
    let dlq = crate::plan::amqp_dead_letter(dest)
        .queue()
        .name()
        .to_owned();
    let mut dead = DeadLetters::default();
    let mut deadline = Instant::now() + wait;
    let mut extra = false;
    loop {
        let got = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(unavailable)?;
        match got {
            Some(m) => {
                let h = m.delivery.properties.headers().clone().unwrap_or_default();
                let text = |name: &str| match h.inner().get(name) {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                };
                let copy = DeadCopy {
                    origin_ok: text(headers::ORIGIN_QUEUE).as_deref() == Some(dest),
                    attempts: text(headers::DELIVERY_ATTEMPTS).and_then(|a| a.parse().ok()),
                    id: text(headers::MESSAGE_ID),
                };
                dead.add(&m.delivery.data, copy);
            }
            None => {
                if !extra && dead.total() >= expected {
                    extra = true;
                    deadline = Instant::now() + Duration::from_secs(1);
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = conn.close(200, "dead letters read".into()).await;
    Ok(dead)
}

async fn read_kafka(
    bootstrap: &str,
    dest: &str,
    expected: usize,
    wait: Duration,
) -> Result<DeadLetters, HarnessError> {
    let setup = |e: reliable_kafka::rdkafka::error::KafkaError| {
        HarnessError::Setup(format!("dead-letter reader: {e}"))
    };
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{dest}-dlq-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(setup)?;
    let dlq = format!("{dest}.dlq");
    consumer.subscribe(&[&dlq]).map_err(setup)?;
    let mut dead = DeadLetters::default();
    let mut deadline = Instant::now() + wait;
    let mut extra = false;
    loop {
        if !extra && dead.total() >= expected {
            extra = true;
            deadline = Instant::now() + Duration::from_secs(1);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(next) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let Ok(m) = next else {
            continue;
        };
        let h: HashMap<String, String> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let get = |name: &str| h.get(name).map(String::as_str);
        let parses = |name: &str| get(name).is_some_and(|v| v.parse::<i64>().is_ok());
        let copy = DeadCopy {
            origin_ok: get(headers::ORIGIN_TOPIC) == Some(dest)
                && parses(headers::ORIGIN_PARTITION)
                && parses(headers::ORIGIN_OFFSET),
            attempts: get(headers::DELIVERY_ATTEMPTS).and_then(|a| a.parse().ok()),
            id: get(headers::MESSAGE_ID).map(str::to_owned),
        };
        dead.add(m.payload().unwrap_or_default(), copy);
    }
    Ok(dead)
}

/// What the poison checker found in one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoisonCounts {
    /// Sent messages planned to crash the consumer.
    pub crashing: u64,
    /// Sent messages planned to fail their handler.
    pub failing: u64,
    /// Of those, in the dead letter with their origin.
    pub dead_lettered: u64,
    /// Dead-letter copies beyond the first of a message, with the original's id: dead letters
    /// are at least once (a consumer that dies after the copy's confirm and before the commit
    /// or ack dead-letters the message again), and the id lets a reader drop the extra copy.
    pub dead_letter_duplicates: u64,
    /// Copies of one message with different ids (or none): not recognisable as duplicates.
    pub dead_letter_conflicts: u64,
    /// Copies without (or with a wrong) origin or attempt count.
    pub without_origin: u64,
    /// Messages planned to apply that ended in the dead letter (or foreign copies).
    pub wrongly_dead_lettered: u64,
    /// Crashing or failing messages whose effect was applied.
    pub poison_applied: u64,
    /// Crashes (journaled deliveries of crashing messages), all messages together.
    pub crashes: u64,
    /// The most crashes one message caused.
    pub max_crashes_per_message: u32,
    /// A message was delivered [`LOOP_EVIDENCE`] times or more.
    pub loop_seen: bool,
}

/// Whether a crashing message has been delivered often enough to prove a loop.
pub fn loop_seen(scenario: Scenario, consumer: &ConsumerView) -> bool {
    consumer
        .delivered
        .iter()
        .any(|(&s, &n)| n >= LOOP_EVIDENCE && Fate::of(scenario, s) == Fate::Crash)
}

/// Accounts for the crashing and failing messages among the `attempted` sent ones.
pub fn check(
    scenario: Scenario,
    attempted: u64,
    consumer: &ConsumerView,
    dead: &DeadLetters,
) -> PoisonCounts {
    let mut c = PoisonCounts {
        wrongly_dead_lettered: dead.foreign,
        loop_seen: loop_seen(scenario, consumer),
        ..PoisonCounts::default()
    };
    for seq in 0..attempted {
        let fate = Fate::of(scenario, seq);
        let copies = dead.by_seq.get(&seq).map_or(&[][..], Vec::as_slice);
        c.without_origin += copies.iter().filter(|d| !d.complete()).count() as u64;
        match fate {
            Fate::Apply => c.wrongly_dead_lettered += copies.len() as u64,
            Fate::Crash | Fate::Fail => {
                if fate == Fate::Crash {
                    c.crashing += 1;
                    let n = consumer.delivered.get(&seq).copied().unwrap_or(0);
                    c.crashes += u64::from(n);
                    c.max_crashes_per_message = c.max_crashes_per_message.max(n);
                } else {
                    c.failing += 1;
                }
                c.poison_applied += u64::from(consumer.effects.contains_key(&seq));
                if copies.iter().any(DeadCopy::complete) {
                    c.dead_lettered += 1;
                }
                c.dead_letter_duplicates += copies.len().saturating_sub(1) as u64;
                if let Some(first) = copies.first() {
                    c.dead_letter_conflicts += copies
                        .iter()
                        .filter(|d| d.id.is_none() || d.id != first.id)
                        .count() as u64;
                }
            }
        }
    }
    c
}

impl PoisonCounts {
    /// The safe run's failed checks (empty when the run holds).
    pub fn safe_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let missing = (self.crashing + self.failing).saturating_sub(self.dead_lettered);
        let checks = [
            (
                missing,
                "crashing or failing messages not in the dead letter with their origin",
            ),
            (
                self.dead_letter_conflicts,
                "dead-letter copies without the original's message id",
            ),
            (
                self.without_origin,
                "dead-letter copies without their origin",
            ),
            (self.wrongly_dead_lettered, "good messages dead-lettered"),
            (self.poison_applied, "crashing or failing messages applied"),
        ];
        for (n, what) in checks {
            if n > 0 {
                notes.push(format!("{n} {what}"));
            }
        }
        if self.max_crashes_per_message > POISON_MAX_DELIVERIES || self.loop_seen {
            notes.push(format!(
                "a message crashed its consumer {} times (limit {POISON_MAX_DELIVERIES}): loop",
                self.max_crashes_per_message
            ));
        }
        notes
    }

    /// The figures of a poison run, for the report.
    pub fn figure(&self) -> String {
        format!(
            "{} crashing + {} failing messages, {} dead-lettered with origin ({} extra copies, \
             same id); {} crashes, at most {} per message",
            self.crashing,
            self.failing,
            self.dead_lettered,
            self.dead_letter_duplicates,
            self.crashes,
            self.max_crashes_per_message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(lines: &[&str]) -> ConsumerView {
        let mut c = ConsumerView::default();
        lines.iter().for_each(|l| c.apply(l));
        c
    }

    fn copy() -> DeadCopy {
        DeadCopy {
            origin_ok: true,
            attempts: Some(1),
            id: Some("id".to_owned()),
        }
    }

    #[test]
    fn poison_scenarios_crash_on_a_few_messages_and_fail_on_some_others() {
        let fates: Vec<Fate> = (0..3_000)
            .map(|s| Fate::of(Scenario::KafkaPoison, s))
            .collect();
        let count = |f| fates.iter().filter(|&&x| x == f).count();
        assert_eq!((count(Fate::Crash), count(Fate::Fail)), (3, 10));
        assert_eq!(Fate::of(Scenario::AmqpPoison, 500), Fate::Crash);
        assert_eq!(Fate::of(Scenario::AmqpPoison, 0), Fate::Apply);
        assert!((0..3_000).all(|s| Fate::of(Scenario::AmqpConsumerKill, s) == Fate::Apply));
    }

    #[test]
    fn every_crashing_and_failing_message_must_be_dead_lettered_once_with_its_origin() {
        let s = Scenario::KafkaPoison;
        // Up to 600: seq 500 crashes, 150 and 450 fail.
        let c = consumer(&["D 500", "D 500", "D 500", "D 150", "D 450", "E 1"]);
        let mut dead = DeadLetters::default();
        for seq in [150, 450, 500] {
            dead.by_seq.insert(seq, vec![copy()]);
        }
        let counts = check(s, 600, &c, &dead);
        assert_eq!(
            (counts.crashing, counts.failing, counts.dead_lettered),
            (1, 2, 3)
        );
        assert_eq!((counts.crashes, counts.max_crashes_per_message), (3, 3));
        assert!(counts.safe_notes().is_empty(), "{:?}", counts.safe_notes());

        // A second copy with the original's id is an at-least-once duplicate, not a failure.
        let mut twice = dead.clone();
        twice.by_seq.get_mut(&150).unwrap().push(copy());
        let counts = check(s, 600, &c, &twice);
        assert_eq!(counts.dead_letter_duplicates, 1);
        assert!(counts.safe_notes().is_empty(), "{:?}", counts.safe_notes());

        let mut bad = dead.clone();
        bad.by_seq.remove(&450);
        bad.by_seq.get_mut(&500).unwrap().push(DeadCopy {
            id: Some("other".to_owned()),
            ..copy()
        });
        bad.by_seq.insert(7, vec![DeadCopy::default()]);
        let counts = check(s, 600, &c, &bad);
        let notes = counts.safe_notes().join("; ");
        assert!(
            notes.contains("1 crashing or failing messages not in"),
            "{notes}"
        );
        assert!(
            notes.contains("1 dead-letter copies without the original's"),
            "{notes}"
        );
        assert!(notes.contains("1 dead-letter copies without"), "{notes}");
        assert!(notes.contains("1 good messages dead-lettered"), "{notes}");
    }

    #[test]
    fn a_message_crashing_more_often_than_the_limit_is_a_loop() {
        let s = Scenario::AmqpPoison;
        let four: Vec<&str> = vec!["D 500"; 4];
        let counts = check(s, 600, &consumer(&four), &DeadLetters::default());
        assert!(!counts.loop_seen);
        assert!(counts.safe_notes().iter().any(|n| n.contains("loop")));
        let many: Vec<&str> = vec!["D 500"; LOOP_EVIDENCE as usize];
        assert!(loop_seen(s, &consumer(&many)));
        assert!(!loop_seen(Scenario::AmqpConsumerKill, &consumer(&many)));
    }
}
