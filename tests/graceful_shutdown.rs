//! SIGTERM to a consumer process mid-stream, against the real RabbitMQ: the child (this test
//! binary again, in `child_consumer_process`, running `examples/graceful_shutdown.rs`'s
//! service, 25 ms of work per message after its journal entry) journals every payload it
//! applied; the test publishes N messages to a fresh quorum queue, sends SIGTERM once some were
//! applied, and checks that the child exits 0 within a bound, that nothing is lost (every
//! message applied by the child or still in the queue) and that nothing the child applied comes
//! back: the handlers in progress at SIGTERM finish, their coalesced acks go out and the
//! consumer is cancelled before the exit.
//!
//! The control runs the same child without the stop signal (`std::future::pending()`), so
//! SIGTERM kills it. The broker requeues every delivery the dead connection held unacked: the
//! prefetched ones no handler started, and the ones applied whose ack had not gone out. The
//! control must show applied messages in the queue again, so the check above is known to see
//! them. To make that deterministic rather than likely, the control child works 1 s per
//! message (under the 5 s handler timeout) and gets SIGTERM as soon as the journal reaches 8
//! lines: the lines new since the test's previous look at the journal belong to handlers
//! still in their work, so their acks cannot have gone out, and the test asserts that every
//! one of them is in the queue again (it first checks that the kill followed that look by
//! less than the work; at 25 ms of work a loaded machine could break that, and a kill between
//! two handlers would show nothing). Before reading the queue, both tests wait for it to have
//! no consumer left, so the broker's requeue has happened.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use reliable::amqp::{AmqpPublisher, AmqpSettings};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;
use reliable_test_support::{require, unique_name};

#[allow(dead_code)] // `main` and the env parsing serve the example binary
#[path = "../examples/graceful_shutdown.rs"]
mod example;

mod child;
use child::Stop;

/// The child's instructions: mode, queue and journal file, tab-separated.
const CHILD_ENV: &str = "RELIABLE_GRACEFUL_CHILD";
const MESSAGES: usize = 400;
/// Applied messages seen before the SIGTERM is sent.
const BEFORE_SIGTERM: usize = 40;
/// The child's work per message, after its journal entry and before its ack.
const WORK: Duration = Duration::from_millis(25);
/// The control child's work per message: far longer than the test takes from reading the
/// journal to sending SIGTERM, and under the example's 5 s handler timeout.
const CONTROL_WORK: Duration = Duration::from_secs(1);
/// Applied messages seen before the control's SIGTERM: the example runs 4 handlers at once,
/// so the first 4 are done and the next ones are in their work.
const CONTROL_BEFORE_SIGTERM: usize = 8;
/// How long the child may take to start applying messages.
const START_BOUND: Duration = Duration::from_secs(60);
/// How long the child may take to stop after SIGTERM.
const STOP_BOUND: Duration = Duration::from_secs(30);
/// How long the broker may take to drop the child's consumer (and requeue what it held).
const GONE_BOUND: Duration = Duration::from_secs(10);

impl Stop {
    /// The child's work per message.
    fn work(self) -> Duration {
        match self {
            Stop::Signal => WORK,
            Stop::NoSignal => CONTROL_WORK,
        }
    }

    /// Applied messages seen before SIGTERM is sent.
    fn before_sigterm(self) -> usize {
        match self {
            Stop::Signal => BEFORE_SIGTERM,
            Stop::NoSignal => CONTROL_BEFORE_SIGTERM,
        }
    }
}

/// The consumer process: does nothing unless started by the tests below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let [mode, queue, journal] = spec.split('\t').collect::<Vec<_>>()[..] else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let stop = Stop::from_name(mode);
    let service = example::Service {
        broker: example::Broker::RabbitMq {
            url: reliable_test_support::amqp_url().expect("RabbitMQ URL"),
            queue: queue.to_owned(),
        },
        journal: Some(journal.into()),
        work: stop.work(),
    };
    let stats = if stop == Stop::Signal {
        service.serve(reliable::shutdown_signal()).await
    } else {
        service.serve(std::future::pending()).await
    }
    .expect("a clean stop");
    println!("child stopped: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_redelivers_nothing_applied() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let url = require!(reliable_test_support::amqp_url());
    let run = Run::start(&url, Stop::Signal).await;
    assert!(
        run.status.success(),
        "the child exits 0 after SIGTERM: {:?}",
        run.status
    );
    let redelivered = run.check().await;
    assert!(
        redelivered.is_empty(),
        "applied by the child (acked before exit) yet delivered again: {redelivered:?}"
    );
    run.clean_up().await;
}

/// The control: without the stop signal the same SIGTERM kills the child, and the messages it
/// applied but had not acked are in the queue again. Still nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_the_stop_signal_redelivers_applied_messages() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let url = require!(reliable_test_support::amqp_url());
    let run = Run::start(&url, Stop::NoSignal).await;
    assert_eq!(
        run.status.signal(),
        Some(15),
        "the control child is killed by SIGTERM: {:?}",
        run.status
    );
    // The lines new since the test's previous look at the journal were written after it, and
    // their handlers ack only `CONTROL_WORK` later: if SIGTERM came sooner, they were unacked.
    assert!(
        run.kill_lag < CONTROL_WORK,
        "the test took {:?} from its previous look at the journal to SIGTERM, not less than the \
         child's work ({CONTROL_WORK:?}): the handlers of the new lines may have acked",
        run.kill_lag
    );
    let in_progress = &run.applied[run.seen_before..];
    assert!(!in_progress.is_empty(), "the journal grew before SIGTERM");
    let redelivered = run.check().await;
    let missing: Vec<&String> = in_progress
        .iter()
        .filter(|p| !redelivered.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "killed without a clean stop, the messages in progress at SIGTERM ({in_progress:?}, \
         applied, not acked) should be in the queue again; not there: {missing:?} (applied and \
         in the queue again: {redelivered:?})"
    );
    run.clean_up().await;
}

/// One child run: messages published, the child started, SIGTERM sent, the child's exit.
struct Run {
    service: example::Service,
    queue: String,
    conn: Connection,
    channel: Channel,
    /// What the child journaled, in order.
    applied: Vec<String>,
    /// How many lines the journal had at the test's last look before the one that reached the
    /// SIGTERM threshold.
    seen_before: usize,
    /// From that look to the return of `kill`.
    kill_lag: Duration,
    status: ExitStatus,
    stop_took: Duration,
}

impl Run {
    /// Publishes the messages to a fresh queue, runs the child until `stop.before_sigterm()`
    /// messages are applied, sends SIGTERM and waits for the child's exit (bounded).
    async fn start(url: &str, stop: Stop) -> Run {
        let queue = unique_name("graceful-stop");
        let service = example::Service {
            broker: example::Broker::RabbitMq {
                url: url.to_owned(),
                queue: queue.clone(),
            },
            journal: None,
            work: Duration::ZERO,
        };
        service.declare().await.expect("queue declared");
        let publisher = AmqpPublisher::connect(url, AmqpSettings::safe())
            .await
            .expect("publisher");
        let producer = Producer::new(publisher, ProducerConfig::default());
        let batch = (0..MESSAGES)
            .map(|i| Message::new(format!("m{i:04}")).with_routing_key(&queue))
            .collect();
        let outcome = producer.send_many(batch).await.expect("accepted").await;
        assert_eq!(outcome.confirmed, MESSAGES, "every message confirmed");
        producer.close().await;

        let journal = std::env::temp_dir().join(unique_name("graceful-journal"));
        let spec = [stop.name(), &queue, &journal.display().to_string()].join("\t");
        let spawned_at = Instant::now();
        let mut child = child::spawn(CHILD_ENV, &spec);
        let Some((seen_before, looked_at)) =
            child::wait_for_lines(&journal, stop.before_sigterm(), spawned_at, START_BOUND).await
        else {
            let _ = child.kill();
            panic!(
                "the child applied fewer than {} messages in {START_BOUND:?}",
                stop.before_sigterm()
            );
        };
        let stopped = child::terminate(&mut child, STOP_BOUND).await;
        let kill_lag = stopped.sent_at.duration_since(looked_at);
        let applied = child::take_journal(&journal);
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        Run {
            service,
            queue,
            conn,
            channel,
            applied,
            seen_before,
            kill_lag,
            status: stopped.status,
            stop_took: stopped.took,
        }
    }

    /// Checks what holds with and without a clean stop: the child applied each message once
    /// and stopped mid-stream, and what it applied together with what is left in the queue
    /// covers every message (nothing lost). Waits for the queue to have no consumer (the
    /// broker has closed the child's channel and requeued what it held), then empties it.
    /// Returns the messages the child applied that the queue holds again.
    async fn check(&self) -> Vec<String> {
        let applied: BTreeSet<String> = self.applied.iter().cloned().collect();
        assert_eq!(
            applied.len(),
            self.applied.len(),
            "the child applied each once"
        );
        assert!(
            applied.len() < MESSAGES,
            "SIGTERM came mid-stream ({} of {MESSAGES} applied)",
            applied.len()
        );

        let started = Instant::now();
        loop {
            let queue = self
                .channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("passive queue.declare");
            if queue.consumer_count() == 0 {
                break;
            }
            assert!(
                started.elapsed() < GONE_BOUND,
                "the child's consumer still on the queue {GONE_BOUND:?} after its exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut rest = Vec::new();
        let mut flagged = 0;
        while let Some(got) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            got.delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            flagged += usize::from(got.delivery.redelivered);
            rest.push(String::from_utf8_lossy(&got.delivery.data).into_owned());
        }
        let left: BTreeSet<String> = rest.iter().cloned().collect();
        assert_eq!(left.len(), rest.len(), "the queue holds each message once");
        let all: BTreeSet<String> = (0..MESSAGES).map(|i| format!("m{i:04}")).collect();
        let seen: BTreeSet<String> = applied.union(&left).cloned().collect();
        let lost: Vec<&String> = all.difference(&seen).collect();
        assert!(lost.is_empty(), "lost: {lost:?}");
        let redelivered: Vec<String> = applied.intersection(&left).cloned().collect();
        println!(
            "applied by the child: {} (SIGTERM {:?} after the look that saw {}), left in the \
             queue: {} (of them applied already: {}, flagged redelivered: {flagged}), exit {:?}, \
             stop took {:?}",
            applied.len(),
            self.kill_lag,
            self.seen_before,
            left.len(),
            redelivered.len(),
            self.status,
            self.stop_took,
        );
        redelivered
    }

    async fn clean_up(self) {
        for q in [self.queue.clone(), format!("{}.dlq", self.queue)] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .channel
            .exchange_delete(
                self.service.dead_letter_destination().as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}
