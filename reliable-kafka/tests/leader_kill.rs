//! Loss-matrix rows L6 and L7 under fire: the partition leader is killed -9 while producing
//! through the SDK with its default send order and timeouts; every message the SDK confirmed is
//! consumed afterwards, and every record key in send order (issue 18).

mod common;
mod order;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message, MessageId};
use reliable_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

fn brokers_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/brokers")
}

fn brokers(args: &[&str]) -> String {
    let out = Command::new(brokers_script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/brokers {args:?} failed: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Restarts the killed broker when dropped, also when the test fails.
struct Restart(Option<String>);

impl Restart {
    fn now(&mut self) {
        if let Some(id) = self.0.take() {
            brokers(&["kafka-restart", &id]);
        }
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = Command::new(brokers_script())
                .args(["kafka-restart", &id])
                .status();
        }
    }
}

const SENT: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_production_loses_no_confirmed_message() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-kill");
    // The defaults (SendOrder::Preserved): librdkafka retries each message for the whole
    // deadline, and the core waits it out.
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .deadline(Duration::from_secs(90))
        .default_topic(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap();
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());

    // Ask for the leader before producing: the query itself takes a moment.
    let leader = brokers(&["kafka-leader", &topic, "0"]);
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let producer = producer.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut handles = Vec::new();
            for i in 0..SENT {
                let msg = Message::new(format!("kill-{i}")).with_routing_key(message_key(i as u64));
                handles.push(producer.send(msg).await.unwrap());
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            handles
        })
    };
    while sent.load(Ordering::Relaxed) < SENT / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = sent.load(Ordering::Relaxed);
    let mut restart = Restart(Some(leader.clone()));
    brokers(&["kafka-kill", &leader]);

    let handles = sender.await.unwrap();
    let mut confirmed = HashSet::<MessageId>::new();
    let mut failed = 0usize;
    for h in handles {
        match h.await {
            Ok(c) => {
                confirmed.insert(c.id);
            }
            Err(e) => {
                failed += 1;
                eprintln!("not confirmed (handed back): {e}");
            }
        }
    }
    let stats = producer.stats();
    producer.close().await;
    transport.close().await;
    restart.now();

    // Everything in the partition, read back through the SDK consumer.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .create()
        .unwrap();
    let (_, high) = probe
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("rk-kill-g"))
        .subscribe(TopicSpec::new(&topic))
        .build()
        .await
        .unwrap();
    let mut counts = HashMap::<MessageId, usize>::new();
    // (key, send index) of every record, in log order (one partition).
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut records = 0i64;
    while records < high && Instant::now() < deadline {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(10), source.next()).await else {
            break;
        };
        let d = next.unwrap().unwrap();
        *counts.entry(d.message().id()).or_default() += 1;
        log.push(send_index(d.message()));
        records += 1;
        d.ack().await.unwrap();
    }
    source.close().await.unwrap();

    let lost = confirmed
        .iter()
        .filter(|id| !counts.contains_key(id))
        .count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let order = order::check(&log);
    eprintln!(
        "leader-kill figures: sent={SENT} killed_after={killed_at} confirmed={} handed_back={failed} \
         records_in_log={high} consumed_unique={} lost={lost} duplicates={duplicates} resends={:?} \
         out_of_order_per_key={} (first: {:?})",
        confirmed.len(),
        counts.len(),
        stats.resent,
        order.out_of_order,
        order.first_inversion,
    );
    assert_eq!(confirmed.len() + failed, SENT);
    assert!(
        confirmed.len() > SENT / 4,
        "too little was confirmed to prove anything"
    );
    assert_eq!(lost, 0, "confirmed messages missing after the leader kill");
    assert_eq!(
        order.out_of_order, 0,
        "first copies out of order per key after the leader kill; the first: {:?}",
        order.first_inversion
    );
}

/// The message `kill-{i}`'s key and send index `i`, which grows along each key.
fn send_index(msg: &Message) -> (String, u64) {
    let payload = String::from_utf8_lossy(msg.payload());
    let i: u64 = payload
        .strip_prefix("kill-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("not a leader-kill message: {payload}"));
    (message_key(i), i)
}

fn message_key(i: u64) -> String {
    format!("k{}", i % 7)
}
