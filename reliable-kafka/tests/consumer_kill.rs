//! Loss-matrix row L5: a consumer process is killed with SIGKILL while messages sit in its
//! in-memory buffer. The classic setup (auto-commit, auto offset store) has committed offsets
//! of messages it never processed, so a restart skips them; the SDK consumer commits only the
//! processed watermark, so a restart delivers everything unprocessed.
//!
//! Each scenario runs the consumer in a child process (this test binary, re-executed with
//! `RK_CHILD_MODE` set) and kills it with SIGKILL.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message};
use reliable_kafka::config::consumer_preset;
use reliable_kafka::rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use reliable_kafka::rdkafka::message::{Headers, Message as _};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const TOTAL: usize = 20;
const PROCESSED_BEFORE_KILL: usize = 5;
/// Lets the coordinator drop the killed member quickly (the broker's minimum).
const SESSION_TIMEOUT_MS: &str = "6000";

fn env(name: &str) -> String {
    std::env::var(name).unwrap()
}

/// The child side: buffer every message, process the first few, then wait to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer() {
    let Ok(mode) = std::env::var("RK_CHILD_MODE") else {
        return; // only runs as the child of the scenarios below
    };
    let (bootstrap, topic, group) = (env("RK_BOOTSTRAP"), env("RK_TOPIC"), env("RK_GROUP"));
    match mode.as_str() {
        "classic" => {
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "100")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", SESSION_TIMEOUT_MS)
                .create()
                .unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            let mut buffer = Vec::new();
            while buffer.len() < TOTAL {
                let m = consumer.recv().await.unwrap();
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "x-message-id"))
                    .map(|h| String::from_utf8_lossy(h.value.unwrap()).into_owned())
                    .unwrap();
                buffer.push(id);
            }
            for id in &buffer[..PROCESSED_BEFORE_KILL] {
                println!("PROCESSED {id}");
            }
        }
        "sdk" => {
            let mut config = consumer_preset(&bootstrap, &group);
            config.set("session.timeout.ms", SESSION_TIMEOUT_MS);
            let mut source = KafkaConsumer::builder_from_config(config)
                .ordering(Ordering::Unordered)
                .subscribe(TopicSpec::new(&topic))
                .commit_interval(Duration::from_millis(100))
                .build()
                .await
                .unwrap();
            let mut buffer = Vec::new();
            while buffer.len() < TOTAL {
                buffer.push(source.next().await.unwrap().unwrap());
            }
            for d in buffer.drain(..PROCESSED_BEFORE_KILL) {
                println!("PROCESSED {}", d.message().id());
                d.ack().await.unwrap();
            }
            // The rest stays in the buffer, unprocessed, when the kill comes.
            std::mem::forget(buffer);
            std::mem::forget(source);
        }
        other => panic!("unknown RK_CHILD_MODE {other}"),
    }
    // Give the (auto or watermark) commit time to happen, then wait for SIGKILL.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("READY");
    tokio::time::sleep(Duration::from_secs(120)).await;
    panic!("child was not killed");
}

struct Figures {
    processed_before_kill: usize,
    committed: i64,
    redelivered: usize,
    lost: usize,
}

async fn scenario(mode: &str) -> Option<Figures> {
    let cluster = kafka(3).ok()?;
    let topic = unique_name(&format!("rk-ckill-{mode}"));
    let group = unique_name(&format!("rk-ckill-{mode}-g"));
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .default_topic(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap();
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let mut all = HashSet::new();
    for i in 0..TOTAL {
        let c = producer
            .send_confirmed(Message::new(format!("c{i}")))
            .await
            .unwrap();
        all.insert(c.id.to_string());
    }
    producer.close().await;
    transport.close().await;

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_consumer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RK_CHILD_MODE", mode)
        .env("RK_BOOTSTRAP", &cluster.bootstrap)
        .env("RK_TOPIC", &topic)
        .env("RK_GROUP", &group)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let processed = tokio::task::spawn_blocking(move || {
        let mut processed = HashSet::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // The harness may print "test child_consumer ... " on the same line first.
            if let Some((_, id)) = line.split_once("PROCESSED ") {
                processed.insert(id.trim().to_owned());
            }
            if line.ends_with("READY") {
                return Some(processed);
            }
        }
        None
    });
    let processed = tokio::time::timeout(Duration::from_secs(60), processed)
        .await
        .ok()
        .and_then(|r| r.unwrap());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let processed = processed.expect("child consumer did not get ready");
    assert_eq!(processed.len(), PROCESSED_BEFORE_KILL);

    let committed = common::committed_offset(&cluster.bootstrap, &group, &topic, 0).unwrap_or(0);
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .create()
        .unwrap();
    let (_, high) = probe
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .unwrap();

    // Restart: a new SDK consumer in the same group resumes at the committed offset.
    let mut redelivered = HashSet::new();
    if committed < high {
        let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
            .ordering(Ordering::Unordered)
            .subscribe(TopicSpec::new(&topic))
            .build()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (redelivered.len() as i64) < high - committed && Instant::now() < deadline {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(30), source.next()).await
            else {
                break;
            };
            let d = next.unwrap().unwrap();
            redelivered.insert(d.message().id().to_string());
            d.ack().await.unwrap();
        }
        source.close().await.unwrap();
    }
    let lost = all
        .iter()
        .filter(|id| !processed.contains(*id) && !redelivered.contains(*id))
        .count();
    let figures = Figures {
        processed_before_kill: processed.len(),
        committed,
        redelivered: redelivered.len(),
        lost,
    };
    eprintln!(
        "consumer-kill figures ({mode}): total={TOTAL} processed_before_kill={} committed_offset={} redelivered_after_restart={} lost={}",
        figures.processed_before_kill, figures.committed, figures.redelivered, figures.lost
    );
    Some(figures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_auto_commit_with_buffer_loses_messages_on_sigkill() {
    require!(kafka(3));
    let f = scenario("classic").await.unwrap();
    assert_eq!(
        f.committed, TOTAL as i64,
        "auto-commit committed the whole buffer"
    );
    assert_eq!(f.lost, TOTAL - PROCESSED_BEFORE_KILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_consumer_loses_nothing_on_sigkill_with_a_full_buffer() {
    require!(kafka(3));
    let f = scenario("sdk").await.unwrap();
    assert_eq!(f.committed, PROCESSED_BEFORE_KILL as i64);
    assert_eq!(f.redelivered, TOTAL - PROCESSED_BEFORE_KILL);
    assert_eq!(f.lost, 0);
}
