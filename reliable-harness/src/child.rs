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
    /// The URLs of the 3-node RabbitMQ cluster's nodes, comma-separated
    /// (`scripts/rabbit-cluster env`), for the cluster scenarios.
    #[arg(
        long,
        env = "RELIABLE_AMQP_CLUSTER_URLS",
        default_value = "",
        hide_env_values = true
    )]
    pub amqp_cluster_urls: String,
}

impl BrokerArgs {
    /// The same settings as command-line arguments for a child process.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            self.amqp_url.clone(),
            "--kafka-bootstrap".into(),
            self.kafka_bootstrap.clone(),
            "--amqp-cluster-urls".into(),
            self.amqp_cluster_urls.clone(),
        ]
    }

    /// The RabbitMQ addresses the SDK is given: `--amqp-url` may list several nodes of one
    /// cluster, comma-separated.
    pub fn amqp_urls(&self) -> Vec<&str> {
        split_urls(&self.amqp_url)
    }

    /// The cluster's node URLs; an error that says how to start the cluster when there are
    /// none.
    pub fn cluster_urls(&self) -> Result<Vec<&str>, crate::HarnessError> {
        let urls = split_urls(&self.amqp_cluster_urls);
        if urls.is_empty() {
            return Err(crate::HarnessError::BrokerUnavailable {
                broker: "the RabbitMQ cluster",
                detail: "no node URLs: run scripts/rabbit-cluster up, then eval \"$(scripts/rabbit-cluster env)\" (or pass --amqp-cluster-urls)".to_owned(),
            });
        }
        Ok(urls)
    }
}

/// The non-empty entries of a comma-separated list of URLs.
fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
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

/// Record keys of the Kafka messages: message `seq` has key `seq % KAFKA_KEYS`, so per-key
/// order is checked over many keys, and each key keeps to one partition.
pub const KAFKA_KEYS: u64 = 16;

/// The record key of Kafka message `seq` (the decimal `seq % KAFKA_KEYS`: under librdkafka's
/// default partitioner, CRC-32 of the key modulo 3, these 16 spread 6, 6 and 4 over the
/// partitions, so the leader kill of partition 0 still hits keyed traffic).
pub fn record_key(seq: u64) -> String {
    (seq % KAFKA_KEYS).to_string()
}

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

    /// CRC-32 (IEEE), as librdkafka's `consistent_random` partitioner hashes a key.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    #[test]
    fn every_partition_carries_several_record_keys() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926, "the CRC-32 check value");
        let mut per_partition = [0; KAFKA_PARTITIONS as usize];
        for seq in 0..KAFKA_KEYS {
            let partition = crc32(record_key(seq).as_bytes()) % KAFKA_PARTITIONS as u32;
            per_partition[partition as usize] += 1;
        }
        assert_eq!(per_partition, [6, 6, 4]);
    }
}
