//! Helpers of the send-order tests (issue 18): keyed, numbered messages, a raw read-back of a
//! topic in log order, and the per-key order check.
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::ClientConfig;
use reliable_core::producer::SendHandle;
use reliable_core::Message;

pub use reliable_test_support::order::Order;
use reliable_test_support::order::{numbered_payload, sequence};

/// The record key of key number `key`.
pub fn key_name(key: u64) -> String {
    format!("key-{key}")
}

/// The `seq`-th message of key number `key` to `topic`: a 100-byte payload that starts with the
/// per-key sequence number.
pub fn numbered(topic: &str, key: u64, seq: u64) -> Message {
    Message::new(numbered_payload(seq))
        .with_destination(topic)
        .with_routing_key(key_name(key))
}

/// Records in `topic` (the sum of its partitions' high watermarks).
pub fn log_size(bootstrap: &str, topic: &str, partitions: i32) -> i64 {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("probe consumer");
    (0..partitions)
        .map(|p| {
            probe
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .sum()
}

/// Reads all of `topic` with a plain rdkafka consumer (no SDK, no commits): `(key, seq)` per
/// record, each partition in log order, copies included. Waits until the log stands still for
/// two seconds first, so late copies are counted.
pub async fn read_back(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(String, u64)> {
    let mut size = log_size(bootstrap, topic, partitions);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = log_size(bootstrap, topic, partitions);
        if now == size {
            break;
        }
        size = now;
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            reliable_test_support::unique_name("order-reader"),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as i64) < size {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("read {} of {size} records, then nothing", out.len()))
            .expect("reading the topic back");
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .expect("a keyed record");
        let seq = sequence(m.payload().unwrap_or_default()).expect("a numbered payload");
        out.push((key, seq));
    }
    out
}

/// The order of a topic read back, per record key (`records` holds each partition in log
/// order).
pub fn check(records: &[(String, u64)]) -> Order<String> {
    reliable_test_support::order::check(records.iter().cloned())
}

/// Awaits every handle (each at most 120 s): the confirmed (key, seq) pairs, and what was
/// handed back (`key/seq: error`).
pub async fn settle(
    handles: Vec<((String, u64), SendHandle)>,
) -> (HashSet<(String, u64)>, Vec<String>) {
    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for ((key, seq), handle) in handles {
        match tokio::time::timeout(Duration::from_secs(120), handle).await {
            Ok(Ok(_)) => {
                confirmed.insert((key, seq));
            }
            Ok(Err(e)) => failed.push(format!("{key}/{seq}: {e}")),
            Err(_) => failed.push(format!("{key}/{seq}: unresolved after 120 s")),
        }
    }
    (confirmed, failed)
}

/// Confirmed messages missing from the topic read back.
pub fn lost(confirmed: &HashSet<(String, u64)>, records: &[(String, u64)]) -> usize {
    let stored: HashSet<&(String, u64)> = records.iter().collect();
    confirmed.iter().filter(|m| !stored.contains(m)).count()
}
