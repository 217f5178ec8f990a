//! The fault controls of `scripts/brokers` do what the fault tests rely on: a Kafka broker
//! killed with -9 leaves the in-sync replicas of an RF=3 topic, a new leader takes over, and the
//! restarted broker rejoins the ISR; a RabbitMQ node killed with -9 comes back with the
//! persistent messages of its durable queues.
//!
//! These tests stop and start the shared brokers, so they live in their own test binary (cargo
//! runs test binaries one after another) and run one at a time within it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::admin::AdminOptions;
use reliable_test_support::{amqp_url, kafka, require, unique_name};
use tokio::sync::Mutex;

/// One fault at a time: both tests take the brokers down.
static FAULTS: Mutex<()> = Mutex::const_new(());

fn brokers(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/brokers");
    let out = Command::new(&script)
        .args(args)
        .output()
        .expect("run scripts/brokers");
    assert!(
        out.status.success(),
        "scripts/brokers {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn isr(topic: &str) -> Vec<String> {
    brokers(&["kafka-isr", topic])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_kafka_leader_is_replaced_and_rejoins_the_isr_after_restart() {
    let cluster = require!(kafka(3));
    let _one_fault = FAULTS.lock().await;
    let topic = unique_name("fault-isr");
    let admin = cluster.create_replicated_topic(&topic).await;
    wait_until("3 in-sync replicas", Duration::from_secs(30), || {
        isr(&topic).len() == 3
    });

    let leader = brokers(&["kafka-leader", &topic]);
    brokers(&["kafka-kill", &leader]);
    wait_until(
        "a new leader and a shrunk ISR",
        Duration::from_secs(60),
        || {
            let now = brokers(&["kafka-leader", &topic]);
            let isr = isr(&topic);
            now != leader && now != "-1" && isr.len() == 2 && !isr.contains(&leader)
        },
    );

    brokers(&["kafka-restart", &leader]);
    wait_until(
        "the restarted broker back in the ISR",
        Duration::from_secs(60),
        || {
            let isr = isr(&topic);
            isr.len() == 3 && isr.contains(&leader)
        },
    );

    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .expect("delete topic");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_rabbitmq_node_restarts_with_its_persistent_messages() {
    let url = require!(amqp_url());
    let _one_fault = FAULTS.lock().await;
    let queue = unique_name("fault-rabbit");
    {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        // A classic durable queue: its persistent messages are on disk before the confirm.
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare");
    }
    // The queue's definition must be on disk before the kill, as a long-lived queue's is: on
    // RabbitMQ 3.10 a queue declared moments before a kill -9 can be missing after the restart
    // (README, "Known broker limitation"). A clean stop writes the metadata; the harness does
    // the same before its kills.
    brokers(&["rabbit-stop"]);
    brokers(&["rabbit-restart"]);
    {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect after the clean restart");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        for i in 0..10u8 {
            let confirmation = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &[i],
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirmation.is_ack());
            assert!(
                confirmation.take_message().is_none(),
                "{queue} is missing after the clean restart: message {i} was returned"
            );
        }
    }

    brokers(&["rabbit-kill"]);
    brokers(&["rabbit-restart"]);

    // Queues recover after the node accepts connections; until then basic.consume can fail.
    // Consume again with manual ack, as a client that loses nothing does.
    let start = Instant::now();
    let (_conn, channel, mut consumer) = loop {
        match consume_manual_ack(&url, &queue).await {
            Ok(ready) => break ready,
            Err(e) if start.elapsed() < Duration::from_secs(90) => {
                eprintln!("consume after restart failed, trying again: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!(
                "cannot consume {queue} 90 s after the restart: {e}\nthe node's log ends:\n{}",
                rabbit_log_tail(40)
            ),
        }
    };
    let mut got = Vec::new();
    while got.len() < 10 {
        let next = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a delivery within 20 s")
            .expect("stream open")
            .expect("delivery");
        got.push(next.data[0]);
        next.ack(BasicAckOptions::default()).await.expect("ack");
    }
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
}

async fn consume_manual_ack(
    url: &str,
    queue: &str,
) -> Result<(Connection, lapin::Channel, lapin::Consumer), lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "fault".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, channel, consumer))
}

/// The last `lines` lines of the RabbitMQ node's log, for a failure message: which queues the
/// node recovered after the kill says whether the queue's definition or the node's data went.
fn rabbit_log_tail(lines: usize) -> String {
    let dir = std::env::var_os("RELIABLE_BROKERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".brokers"));
    let log = dir.join("rabbitmq/log/reliable@localhost.log");
    match std::fs::read_to_string(&log) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}
