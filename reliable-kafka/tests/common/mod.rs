//! Helpers shared by the broker tests: raw topic creation (to build unsafe topics the SDK
//! refuses to make), an independent reader, and the committed offset of a group.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use reliable_core::Message;

/// Creates `topic` with exactly these settings, bypassing the SDK's check.
pub async fn create_raw_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    rf: i32,
    configs: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(rf));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let res = admin.create_topics([&new], &opts).await.unwrap();
    res.into_iter().next().unwrap().unwrap();
}

/// A record as read back independently of the SDK consumer.
#[derive(Debug, Clone)]
pub struct Record {
    pub message: Message,
    pub key: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning with a plain rdkafka consumer (no group commits) until
/// `expected` records arrived or `timeout` passed.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", reliable_test_support::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let headers: HashMap<String, String> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let message = Message::from_wire(
            m.payload().unwrap_or_default().to_vec(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .unwrap();
        out.push(Record {
            message,
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            partition: m.partition(),
            offset: m.offset(),
            headers,
        });
    }
    out
}

/// The offset `group` has committed for `topic`[`partition`], `None` when nothing is committed.
pub fn committed_offset(bootstrap: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    match committed.find_partition(topic, partition).unwrap().offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}
