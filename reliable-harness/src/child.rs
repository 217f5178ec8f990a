//! What the orchestrator tells a child process (producer or consumer) on its command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::plan::{Broker, Scenario, Variant};

/// The arguments every child process takes.
#[derive(Args, Clone, Debug)]
pub struct ChildArgs {
    /// The scenario the child belongs to.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Safe run or negative control.
    #[arg(long, value_enum)]
    pub variant: Variant,
    /// The queue (RabbitMQ) or topic (Kafka).
    #[arg(long)]
    pub dest: String,
    /// The journal the child appends to.
    #[arg(long)]
    pub journal: PathBuf,
    /// Where the brokers are.
    #[command(flatten)]
    pub brokers: BrokerArgs,
}

/// Where the brokers are (the same variables the tests read).
#[derive(Args, Clone, Debug)]
pub struct BrokerArgs {
    /// The RabbitMQ URL.
    #[arg(long, env = "RELIABLE_AMQP_URL", default_value = reliable_test_support::DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// The Kafka bootstrap servers.
    #[arg(long, env = "RELIABLE_KAFKA_BOOTSTRAP", default_value = reliable_test_support::DEFAULT_KAFKA_BOOTSTRAP)]
    pub kafka_bootstrap: String,
}

impl BrokerArgs {
    /// The same settings as command-line arguments for a child process.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            self.amqp_url.clone(),
            "--kafka-bootstrap".into(),
            self.kafka_bootstrap.clone(),
        ]
    }
}

impl ChildArgs {
    /// The broker of the child's scenario.
    pub fn broker(&self) -> Broker {
        self.scenario.broker()
    }

    /// The Kafka consumer group of the scenario run (the topic name: one group per run).
    pub fn group(&self) -> String {
        format!("{}-group", self.dest)
    }
}

/// The Kafka session timeout of the harness's consumers: the broker's minimum, so a killed
/// consumer's partitions move to its successor quickly.
pub const KAFKA_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Partitions of each Kafka topic the harness creates.
pub const KAFKA_PARTITIONS: i32 = 3;

/// The width of the sequence number at the start of every payload.
pub const SEQ_WIDTH: usize = 12;

/// Every payload is this long (the sequence number, right-aligned, then padding).
pub const PAYLOAD_BYTES: usize = 100;

/// The payload of message `seq`.
pub fn payload(seq: u64) -> Vec<u8> {
    let mut p = format!("{seq:>SEQ_WIDTH$}").into_bytes();
    p.resize(PAYLOAD_BYTES, b'.');
    p
}

/// The sequence number in a payload, if the harness wrote it.
pub fn parse_payload(payload: &[u8]) -> Option<u64> {
    if payload.len() != PAYLOAD_BYTES {
        return None;
    }
    std::str::from_utf8(&payload[..SEQ_WIDTH])
        .ok()?
        .trim_start()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_foreign_ones_are_refused() {
        for seq in [0, 7, 99_999, 999_999_999_999] {
            assert_eq!(payload(seq).len(), PAYLOAD_BYTES);
            assert_eq!(parse_payload(&payload(seq)), Some(seq));
        }
        assert_eq!(parse_payload(b"hello"), None);
        assert_eq!(parse_payload(&[b'x'; PAYLOAD_BYTES]), None);
    }
}
