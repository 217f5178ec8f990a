//! SIGTERM to a consumer process mid-stream, against the real RabbitMQ: the child (this test
//! binary again, in `child_consumer_process`, running `examples/graceful_shutdown.rs`'s
//! service) journals every payload it applied; the test publishes N messages, sends SIGTERM
//! once some were applied, and checks that the child exits 0 within a bound, that nothing is
//! lost (every message applied by the child or still in the queue) and that nothing the child
//! applied comes back (it was acked before the child exited).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use reliable::amqp::{AmqpPublisher, AmqpSettings};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;
use reliable_test_support::{require, unique_name};

#[allow(dead_code)] // `main` and the env parsing serve the example binary
#[path = "../examples/graceful_shutdown.rs"]
mod example;

/// The child's instructions: queue and journal file, tab-separated.
const CHILD_ENV: &str = "RELIABLE_GRACEFUL_CHILD";
const MESSAGES: usize = 400;
/// Applied messages seen before the SIGTERM is sent.
const BEFORE_SIGTERM: usize = 40;
/// How long the child may take to stop after SIGTERM.
const STOP_BOUND: Duration = Duration::from_secs(30);

/// The consumer process: does nothing unless started by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let Some((queue, journal)) = spec.split_once('\t') else {
        panic!("bad {CHILD_ENV}");
    };
    let service = example::Service {
        url: reliable_test_support::amqp_url().expect("RabbitMQ URL"),
        queue: queue.to_owned(),
        journal: Some(journal.into()),
        work: Duration::from_millis(25),
    };
    let stats = service
        .serve(reliable::shutdown_signal())
        .await
        .expect("a clean stop");
    println!("child stopped: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_redelivers_nothing_applied() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let url = require!(reliable_test_support::amqp_url());
    let queue = unique_name("graceful-stop");
    let service = example::Service {
        url: url.clone(),
        queue: queue.clone(),
        journal: None,
        work: Duration::ZERO,
    };
    service.declare().await.expect("queue declared");
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .expect("publisher");
    let producer = Producer::new(publisher, ProducerConfig::default());
    let all: BTreeSet<String> = (0..MESSAGES).map(|i| format!("m{i:04}")).collect();
    let batch = all
        .iter()
        .map(|p| Message::new(p.clone()).with_routing_key(&queue))
        .collect();
    let outcome = producer.send_many(batch).await.expect("accepted").await;
    assert_eq!(outcome.confirmed, MESSAGES, "every message confirmed");
    producer.close().await;

    let journal = std::env::temp_dir().join(unique_name("graceful-journal"));
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_consumer_process", "--nocapture"])
        .env(CHILD_ENV, format!("{queue}\t{}", journal.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("child started");
    let applied_before = wait_for_lines(&journal, BEFORE_SIGTERM, Duration::from_secs(60)).await;
    assert!(
        applied_before >= BEFORE_SIGTERM,
        "the child applied {applied_before} messages in 60 s"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success(), "SIGTERM sent");
    let sent_at = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break status;
        }
        if sent_at.elapsed() > STOP_BOUND {
            let _ = child.kill();
            panic!("the child did not stop within {STOP_BOUND:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "the child exits 0 after SIGTERM: {status:?}"
    );

    let applied = std::fs::read_to_string(&journal).expect("journal");
    let applied: Vec<&str> = applied.lines().collect();
    let first: BTreeSet<String> = applied.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(first.len(), applied.len(), "the child applied each once");
    assert!(
        first.len() < MESSAGES,
        "SIGTERM came mid-stream ({} of {MESSAGES} applied)",
        first.len()
    );

    // What is left in the queue: everything the child did not apply, and nothing it did.
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut rest = BTreeSet::new();
    let mut redelivered = Vec::new();
    while let Some(got) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        let payload = String::from_utf8_lossy(&got.delivery.data).into_owned();
        got.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        if first.contains(&payload) || !rest.insert(payload.clone()) {
            redelivered.push(payload);
        }
    }
    assert!(
        redelivered.is_empty(),
        "applied by the child (acked before exit) yet delivered again: {redelivered:?}"
    );
    let seen: BTreeSet<String> = first.union(&rest).cloned().collect();
    let lost: Vec<&String> = all.difference(&seen).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    println!(
        "applied by the child: {}, left in the queue: {}, stop took {:?}",
        first.len(),
        rest.len(),
        sent_at.elapsed()
    );

    for q in [queue.clone(), format!("{queue}.dlq")] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            service.dead_letter_exchange().as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
    let _ = std::fs::remove_file(&journal);
}

/// Waits until `path` has at least `lines` lines (or `bound` passes); the count then.
async fn wait_for_lines(path: &std::path::Path, lines: usize, bound: Duration) -> usize {
    let start = Instant::now();
    loop {
        let now = std::fs::read_to_string(path).map_or(0, |s| s.lines().count());
        if now >= lines || start.elapsed() > bound {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
