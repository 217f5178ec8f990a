//! A poison record that aborts its consumer process (issue 14, item 3; loss-matrix row L10),
//! against the real Kafka cluster: the test runs the consumer as a child process (this test
//! binary again, in `child_consumer_process`), which calls `std::process::abort()` on one
//! record; the test restarts it after each crash. Kafka counts nothing, so the pipeline counts
//! each delivery in a `RedbStore` at a fixed path before the handler runs: the count survives
//! the aborts, and after `max_deliveries` crashes the record goes to the dead-letter topic with
//! its origin (topic, partition, offset, attempts) without running its handler again. Every
//! other record is applied once. The control runs the same consumer without the counter: no
//! count survives a crash, and the record crashes every restart.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reliable_core::message::headers;
use reliable_core::pipeline::{handler_fn, HandlerError, Pipeline, PipelineConfig};
use reliable_core::producer::Producer;
use reliable_core::Message;
use reliable_kafka::config::consumer_preset;
use reliable_kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
use reliable_stores::{RedbStore, RedbStoreConfig};
use reliable_test_support::{kafka, require, unique_name};

/// The child's instructions: bootstrap, topic, group, counter file (`-` for none), effects file
/// (tab-separated).
const CHILD_ENV: &str = "RELIABLE_KAFKA_POISON_CHILD";
const MAX_DELIVERIES: u32 = 3;

/// The consumer process: does nothing unless started by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\t').collect();
    let [bootstrap, topic, group, counts, effects] = parts[..] else {
        panic!("bad {CHILD_ENV}");
    };
    let mut client = consumer_preset(bootstrap, group);
    // Static membership: a restarted process takes its predecessor's place at once instead
    // of waiting out the dead member's session.
    client.set("group.instance.id", format!("{group}-member"));
    client.set("session.timeout.ms", "6000");
    let source = KafkaConsumer::builder_from_config(client)
        .subscribe(TopicSpec::new(topic))
        .build()
        .await
        .expect("consumer");
    let dlq = format!("{topic}.dlq");
    let dlq_transport = KafkaTransport::builder(bootstrap)
        .topic(TopicSpec::new(&dlq))
        .build()
        .await
        .expect("dead-letter transport");
    let counter = (counts != "-")
        .then(|| RedbStore::open(counts, RedbStoreConfig::default()).expect("attempt counter"));
    // The effects file is its own dedupe record: records the commit had not covered when the
    // process died come again and are skipped.
    let applied: HashSet<String> = std::fs::read_to_string(effects)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let applied = Arc::new(std::sync::Mutex::new(applied));
    let effects = effects.to_owned();
    let handler = handler_fn(move |msg: Message| {
        let (effects, applied) = (effects.clone(), applied.clone());
        async move {
            if msg.payload().as_ref() == b"poison" {
                std::process::abort();
            }
            let payload = String::from_utf8_lossy(msg.payload()).into_owned();
            if applied.lock().unwrap().insert(payload.clone()) {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&effects)
                    .expect("effects file");
                f.write_all(format!("{payload}\n").as_bytes())
                    .expect("effect written");
            }
            Ok::<(), HandlerError>(())
        }
    });
    let mut pipeline = Pipeline::new(source, handler, dlq_transport.dead_letter(dlq)).with_config(
        PipelineConfig {
            concurrency: 1,
            max_deliveries: MAX_DELIVERIES,
            ..PipelineConfig::default()
        },
    );
    if let Some(counter) = counter {
        pipeline = pipeline.with_attempt_counter(Arc::new(counter));
    }
    // Ends once nothing has arrived for 5 s (a restarted member needs a moment to be assigned
    // its partition and fetch).
    let stats = pipeline.stats();
    let idle = async move {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = stats.snapshot().received;
            if now == last && now > 0 {
                return;
            }
            last = now;
        }
    };
    pipeline.run_until(idle).await.expect("pipeline");
}

/// Creates a one-partition topic (and its DLQ) holding five records, the third "poison";
/// returns the topic and the poison record's id.
async fn setup(bootstrap: &str) -> (String, reliable_core::MessageId) {
    let topic = unique_name("rk-poison-proc");
    let dlq = format!("{topic}.dlq");
    // One partition: the poison record sits between the others, which must still get through.
    let transport = KafkaTransport::builder(bootstrap)
        .topic(TopicSpec::new(&topic).partitions(1))
        .topic(TopicSpec::new(&dlq))
        .build()
        .await
        .unwrap();
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let payloads = ["m0", "m1", "poison", "m3", "m4"];
    let mut poison_id = None;
    for p in payloads {
        let receipt = producer
            .send_confirmed(Message::new(p.to_owned()).with_destination(&topic))
            .await
            .unwrap();
        if p == "poison" {
            poison_id = Some(receipt.id);
        }
    }
    producer.close().await;
    transport.close().await;
    (topic, poison_id.unwrap())
}

/// Runs the consumer process at most `runs` times, until it ends cleanly; returns the crashes
/// and whether it ended cleanly.
fn restart_until_clean(runs: u32, spec: &str) -> (u32, bool) {
    let mut crashes = 0;
    for _ in 0..runs {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_consumer_process", "--nocapture"])
            .env(CHILD_ENV, spec)
            .status()
            .unwrap();
        if status.success() {
            return (crashes, true);
        }
        crashes += 1;
    }
    (crashes, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_aborts_its_consumer_is_dead_lettered_with_its_origin_after_max_deliveries_restarts(
) {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let cluster = require!(kafka(3));
    let (topic, poison_id) = setup(&cluster.bootstrap).await;
    let dlq = format!("{topic}.dlq");
    let group = unique_name("rk-poison-proc-group");
    let dir = tempfile::tempdir().unwrap();
    let counts = dir.path().join("attempts.redb");
    let effects = dir.path().join("effects");
    let spec = format!(
        "{}\t{topic}\t{group}\t{}\t{}",
        cluster.bootstrap,
        counts.display(),
        effects.display()
    );
    let (crashes, clean) = restart_until_clean(MAX_DELIVERIES + 3, &spec);
    assert!(clean, "the consumer stopped crashing");
    assert_eq!(
        crashes, MAX_DELIVERIES,
        "one crash per delivery up to the limit"
    );
    let applied = std::fs::read_to_string(&effects).unwrap();
    let mut applied: Vec<&str> = applied.lines().collect();
    applied.sort_unstable();
    assert_eq!(
        applied,
        ["m0", "m1", "m3", "m4"],
        "everything else applied once"
    );

    let dead = common::read_all(&cluster.bootstrap, &dlq, 2, Duration::from_secs(15)).await;
    assert_eq!(dead.len(), 1, "dead-lettered once: {dead:?}");
    let record = &dead[0];
    assert_eq!(record.message.payload().as_ref(), b"poison");
    assert_eq!(record.message.id(), poison_id);
    let h = |name: &str| record.headers.get(name).map(String::as_str);
    assert_eq!(h(headers::ORIGIN_TOPIC), Some(topic.as_str()));
    assert_eq!(h(headers::ORIGIN_PARTITION), Some("0"));
    assert_eq!(h(headers::ORIGIN_OFFSET), Some("2"), "the third record");
    assert_eq!(
        h(headers::DELIVERY_ATTEMPTS),
        Some((MAX_DELIVERIES + 1).to_string().as_str())
    );
    let reason = h(headers::DEAD_LETTER_REASON).unwrap_or_default();
    assert!(
        reason.contains(&format!("crashed its consumer {MAX_DELIVERIES} times")),
        "{reason}"
    );
    // The whole topic is consumed and committed.
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_a_durable_counter_the_record_crashes_every_restart() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let cluster = require!(kafka(3));
    let (topic, _) = setup(&cluster.bootstrap).await;
    let group = unique_name("rk-poison-proc-control");
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects");
    let spec = format!(
        "{}\t{topic}\t{group}\t-\t{}",
        cluster.bootstrap,
        effects.display()
    );
    let runs = MAX_DELIVERIES + 2;
    let (crashes, clean) = restart_until_clean(runs, &spec);
    assert!(!clean, "without a count the poison record never stops");
    assert_eq!(crashes, runs, "a crash on every restart, past the limit");
    let dead = common::read_all(
        &cluster.bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_secs(3),
    )
    .await;
    assert!(dead.is_empty(), "nothing reached the dead letter: {dead:?}");
}
