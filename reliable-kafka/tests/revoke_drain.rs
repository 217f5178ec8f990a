//! The partition-revoke drain (issue 14, item 6): while a revoke waits for the deliveries of
//! the revoked partitions, the async runtime keeps running, so a timer fires on time and a
//! handler task can still settle its delivery, whose offset the revoke commit then includes.
//!
//! The runtime has a single worker thread: the rebalance callback runs inside
//! `KafkaConsumer::next` on that worker, so a drain that blocks the thread stops every other
//! task of the runtime, deterministically. (On a current-thread runtime the consumer does not
//! wait at all; with more workers a blocked worker only slows the others down.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message};
use reliable_kafka::config::consumer_preset;
use reliable_kafka::{KafkaConsumer, KafkaConsumerBuilder, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
const TICK: Duration = Duration::from_millis(20);

fn builder(bootstrap: &str, group: &str, spec: TopicSpec) -> KafkaConsumerBuilder {
    let mut config = consumer_preset(bootstrap, group);
    // The members learn of a rebalance within half a second.
    config.set("heartbeat.interval.ms", "500");
    KafkaConsumer::builder_from_config(config)
        .ordering(Ordering::Unordered)
        .subscribe(spec)
        .commit_interval(Duration::from_secs(3600)) // only the revoke commits
        .revoke_drain_timeout(DRAIN_TIMEOUT)
}

/// Blocks until the coordinator reports `group` rebalancing (a member joined and the group
/// waits for the others to give up their partitions), or `within` passed.
fn wait_for_rebalance(bootstrap: &str, group: &str, within: Duration) -> bool {
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("rk-drain-watch"))
        .create()
        .unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(list) = watcher.fetch_group_list(Some(group), Duration::from_secs(5)) {
            if list
                .groups()
                .iter()
                .any(|g| g.name() == group && g.state() == "PreparingRebalance")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn revoke_drain_keeps_the_runtime_running_and_commits_what_settles_meanwhile() {
    let cluster = require!(kafka(3));
    let bootstrap = cluster.bootstrap.clone();
    let topic = unique_name("rk-drain");
    let spec = TopicSpec::new(&topic);
    let t = KafkaTransport::builder(&bootstrap)
        .topic(spec.clone())
        .build()
        .await
        .unwrap();
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    for i in 0..5 {
        producer
            .send_confirmed(Message::new(format!("d{i}")).with_destination(&topic))
            .await
            .unwrap();
    }
    producer.close().await;
    t.close().await;

    let group = unique_name("rk-drain-g");
    let mut a = builder(&bootstrap, &group, spec.clone())
        .build()
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(30), a.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        held.push(d);
    }
    let mut held = held.into_iter();
    for _ in 0..3 {
        held.next().unwrap().ack().await.unwrap();
    }
    // Offset 3 is settled by a handler task while the revoke drains; offset 4 stays
    // unfinished until after the revoke.
    let (three, four) = (held.next().unwrap(), held.next().unwrap());
    assert_eq!(three.position().unwrap().offset, 3);
    assert_eq!(four.position().unwrap().offset, 4);

    // A timer that measures how late it fires, for the whole rebalance.
    let stop_ticker = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = stop_ticker.clone();
        async move {
            let mut worst = Duration::ZERO;
            while !stop.load(AtomicOrdering::Relaxed) {
                let start = Instant::now();
                tokio::time::sleep(TICK).await;
                worst = worst.max(start.elapsed().saturating_sub(TICK));
            }
            worst
        }
    });

    // The handler of offset 3 finishes while the revoke drains: the coordinator reports the
    // rebalance, A hears of it at its next heartbeat (within 0.5 s) and starts draining.
    let (rebalancing_tx, rebalancing_rx) = tokio::sync::oneshot::channel::<bool>();
    let watcher = {
        let (bootstrap, group) = (bootstrap.clone(), group.clone());
        std::thread::spawn(move || {
            let _ = rebalancing_tx.send(wait_for_rebalance(
                &bootstrap,
                &group,
                Duration::from_secs(60),
            ));
        })
    };
    let late_ack = tokio::spawn(async move {
        assert!(rebalancing_rx.await.unwrap(), "the group never rebalanced");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let acked_at = Instant::now();
        (three.ack().await, acked_at)
    });

    // A keeps polling: its rebalance callback runs inside `next`.
    let (stop_a, mut stop_a_rx) = tokio::sync::oneshot::channel::<()>();
    let a_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_a_rx => return a,
                n = a.next() => {
                    if let Ok(Some(d)) = n {
                        let _ = d.ack().await;
                    }
                }
            }
        }
    });

    // B joins the group from its own thread and runtime, which triggers the revoke.
    let stop_b = Arc::new(AtomicBool::new(false));
    let b_thread = {
        let (bootstrap, group, spec, stop) = (
            bootstrap.clone(),
            group.clone(),
            spec.clone(),
            stop_b.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut b = builder(&bootstrap, &group, spec).build().await.unwrap();
                while !stop.load(AtomicOrdering::Relaxed) {
                    if let Ok(Ok(Some(d))) =
                        tokio::time::timeout(Duration::from_millis(200), b.next()).await
                    {
                        let _ = d.ack().await;
                    }
                }
                let _ = b.close().await;
            });
        })
    };

    // The revoke commit shows up (nobody else commits).
    let deadline = Instant::now() + Duration::from_secs(60);
    let committed = loop {
        let (b, g, tp) = (bootstrap.clone(), group.clone(), topic.clone());
        let c = tokio::task::spawn_blocking(move || common::committed_offset(&b, &g, &tp, 0))
            .await
            .unwrap();
        if c.is_some() || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let revoke_seen = Instant::now();
    let (late, acked_at) = late_ack.await.unwrap();
    stop_ticker.store(true, AtomicOrdering::Relaxed);
    let worst = ticker.await.unwrap();

    // Shut down before asserting. B leaves first while A is still polled, so A serves the
    // rebalance B's leaving causes (closing a consumer with an unserved rebalance can hang in
    // librdkafka), then A closes.
    stop_b.store(true, AtomicOrdering::Relaxed);
    b_thread.join().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_a.send(());
    let mut a = a_task.await.unwrap();
    let _ = four.ack().await;
    let _ = a.close().await;
    drop(a);
    watcher.join().unwrap();

    eprintln!(
        "timer worst lateness {worst:?}; late ack {late:?} {:?} before the commit was seen; committed {committed:?}",
        revoke_seen.saturating_duration_since(acked_at)
    );
    assert!(
        worst < Duration::from_millis(500),
        "a {TICK:?} timer fired {worst:?} late: the revoke drain blocked the runtime's worker"
    );
    assert!(
        late.is_ok(),
        "the handler could not settle offset 3 during the drain: {late:?}"
    );
    assert_eq!(
        committed,
        Some(4),
        "the revoke commit includes offset 3 (settled during the drain) and stops at offset 4"
    );
}
