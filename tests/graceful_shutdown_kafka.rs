//! SIGTERM to a Kafka consumer process mid-stream, against the real 3-broker cluster: the child
//! (this test binary again, in `child_consumer_process`, running the Kafka mode of
//! `examples/graceful_shutdown.rs`'s service) journals every payload it applied; the test
//! produces N records to a fresh topic (4 partitions, replication factor 3), sends SIGTERM once
//! some were applied and committed, and checks that the child exits 0 within a bound. Then a
//! second consumer of the same group, started after, reads to the end of every partition from
//! the group's committed offsets: it must get exactly the records the child did not apply.
//! Nothing lost (every record applied or still ahead of the group) and nothing the child
//! applied delivered again: the handlers in progress at SIGTERM finish, and the pipeline's
//! close commits them.
//!
//! The control runs the same child without the stop signal (`std::future::pending()`), so
//! SIGTERM kills it: records it applied since the last periodic commit, and those in progress,
//! come back to the group. The control must show that redelivery, so the check above is known
//! to see it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use reliable::core::producer::Producer;
use reliable::core::Message;
use reliable::kafka::{KafkaTransport, TopicSpec};
use reliable_test_support::{kafka, require, unique_name, KafkaCluster};

#[allow(dead_code)] // `main` and the env parsing serve the example binary
#[path = "../examples/graceful_shutdown.rs"]
mod example;

mod child;
use child::Stop;

/// The child's instructions: mode, bootstrap, topic, group and journal file, tab-separated.
const CHILD_ENV: &str = "RELIABLE_GRACEFUL_KAFKA_CHILD";
const RECORDS: usize = 400;
const PARTITIONS: i32 = 4;
/// Applied records seen (and a first periodic commit) before the SIGTERM is sent.
const BEFORE_SIGTERM: usize = 40;
/// How long the child may take to start applying records.
const START_BOUND: Duration = Duration::from_secs(60);
/// How long the child may take to stop after SIGTERM.
const STOP_BOUND: Duration = Duration::from_secs(30);
/// How long the second consumer may take to reach the end of every partition.
const READ_BOUND: Duration = Duration::from_secs(30);

/// The consumer process: does nothing unless started by the tests below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let [mode, bootstrap, topic, group, journal] = spec.split('\t').collect::<Vec<_>>()[..] else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let service = example::Service {
        broker: example::Broker::Kafka {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            group: group.to_owned(),
        },
        journal: Some(journal.into()),
        work: Duration::from_millis(25),
    };
    let stats = if Stop::from_name(mode) == Stop::Signal {
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
    let cluster = require!(kafka(3));
    let run = Run::start(&cluster, Stop::Signal).await;
    assert!(
        run.status.success(),
        "the child exits 0 after SIGTERM: {:?}",
        run.status
    );
    // Joining the group (not just reading its offsets) also shows the child left it: a member
    // that did not would hold its partitions until its session timed out (45 s).
    let rest = read_rest(&cluster.bootstrap, &run, Reader::Join).await;
    let redelivered = run.check(&rest);
    assert!(
        redelivered.is_empty(),
        "applied by the child (committed before it exited) yet delivered again: {redelivered:?}"
    );
    run.clean_up(&cluster.bootstrap).await;
}

/// The control: without the stop signal the same SIGTERM kills the child, and what it applied
/// since its last commit is delivered again. Still nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_the_stop_signal_redelivers_applied_records() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let cluster = require!(kafka(3));
    let run = Run::start(&cluster, Stop::NoSignal).await;
    assert_eq!(
        run.status.signal(),
        Some(15),
        "the control child is killed by SIGTERM: {:?}",
        run.status
    );
    // The killed member stays in the group until its session times out, so a joining reader
    // would wait for that: read from the group's committed offsets without joining.
    let rest = read_rest(&cluster.bootstrap, &run, Reader::Assign).await;
    let redelivered = run.check(&rest);
    assert!(
        !redelivered.is_empty(),
        "killed without a clean stop, the records the child applied after its last commit \
         ({:?}) should come back; none did",
        rest.committed
    );
    run.clean_up(&cluster.bootstrap).await;
}

/// One child run: records produced, the child started, SIGTERM sent, the child's exit.
struct Run {
    topic: String,
    group: String,
    /// What the child journaled, in order.
    applied: Vec<String>,
    status: ExitStatus,
    stop_took: Duration,
}

impl Run {
    /// Produces the records to a fresh topic, runs the child until `BEFORE_SIGTERM` records
    /// are applied and the group has a committed offset, sends SIGTERM and waits for the
    /// child's exit (bounded).
    async fn start(cluster: &KafkaCluster, stop: Stop) -> Run {
        let topic = unique_name("graceful-stop-kafka");
        let group = format!("{topic}-group");
        let transport = KafkaTransport::builder(&cluster.bootstrap)
            .topic(TopicSpec::new(&topic).partitions(PARTITIONS))
            .topic(TopicSpec::new(format!("{topic}.dlq")))
            .build()
            .await
            .expect("topics created, producer built");
        let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
        let batch = (0..RECORDS)
            .map(|i| {
                let payload = format!("r{i:04}");
                Message::new(payload.clone())
                    .with_destination(topic.as_str())
                    .with_routing_key(payload)
            })
            .collect();
        let outcome = producer.send_many(batch).await.expect("accepted").await;
        assert_eq!(outcome.confirmed, RECORDS, "every record confirmed");
        producer.close().await;

        let journal = std::env::temp_dir().join(unique_name("graceful-kafka-journal"));
        let spec = [
            stop.name(),
            &cluster.bootstrap,
            &topic,
            &group,
            &journal.display().to_string(),
        ]
        .join("\t");
        let mut child = child::spawn(CHILD_ENV, &spec);
        if child::wait_for_lines(&journal, BEFORE_SIGTERM, Instant::now(), START_BOUND)
            .await
            .is_none()
        {
            let _ = child.kill();
            panic!("the child applied fewer than {BEFORE_SIGTERM} records in {START_BOUND:?}");
        }
        // And a periodic commit has landed, so what the control shows is redelivery of the
        // records applied after a commit, not of a group that never committed.
        let offsets = GroupOffsets::new(&cluster.bootstrap, &group, &topic);
        let started = Instant::now();
        while offsets.now().values().all(Option::is_none) {
            if started.elapsed() > START_BOUND {
                let _ = child.kill();
                panic!("the child committed nothing in {START_BOUND:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stopped = child::terminate(&mut child, STOP_BOUND).await;
        let applied = child::take_journal(&journal);
        Run {
            topic,
            group,
            applied,
            status: stopped.status,
            stop_took: stopped.took,
        }
    }

    /// Checks what holds with and without a clean stop: the child applied each record once and
    /// stopped mid-stream, the reader got each record once, and together they cover every
    /// record (nothing lost). Returns the records the child applied that the reader got again.
    fn check(&self, rest: &Rest) -> Vec<String> {
        let applied: BTreeSet<String> = self.applied.iter().cloned().collect();
        assert_eq!(
            applied.len(),
            self.applied.len(),
            "the child applied each once"
        );
        assert!(
            applied.len() < RECORDS,
            "SIGTERM came mid-stream ({} of {RECORDS} applied)",
            applied.len()
        );
        let read: BTreeSet<String> = rest.payloads.iter().cloned().collect();
        assert_eq!(
            read.len(),
            rest.payloads.len(),
            "the reader got each record once"
        );
        let all: BTreeSet<String> = (0..RECORDS).map(|i| format!("r{i:04}")).collect();
        let seen: BTreeSet<String> = applied.union(&read).cloned().collect();
        let lost: Vec<&String> = all.difference(&seen).collect();
        assert!(lost.is_empty(), "lost: {lost:?}");
        let redelivered: Vec<String> = applied.intersection(&read).cloned().collect();
        println!(
            "applied by the child: {}, read by the group after it: {} (of them applied already: \
             {}), committed offsets {:?}, exit {:?}, stop took {:?}",
            applied.len(),
            read.len(),
            redelivered.len(),
            rest.committed,
            self.status,
            self.stop_took,
        );
        redelivered
    }

    async fn clean_up(&self, bootstrap: &str) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .expect("admin client");
        let dlq = format!("{}.dlq", self.topic);
        let _ = admin
            .delete_topics(&[self.topic.as_str(), &dlq], &AdminOptions::new())
            .await;
    }
}

/// How the second consumer takes the partitions.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// Subscribes: joins the group, as the next instance of the service would.
    Join,
    /// Assigns every partition at the group's committed offset, without joining.
    Assign,
}

/// What the group gets after the child: the payloads, and the committed offsets they start at.
struct Rest {
    payloads: Vec<String>,
    committed: BTreeMap<i32, Option<i64>>,
}

/// Reads a group's committed offsets of a topic without joining the group.
struct GroupOffsets {
    consumer: BaseConsumer,
    partitions: TopicPartitionList,
}

impl GroupOffsets {
    fn new(bootstrap: &str, group: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("offsets reader");
        let mut partitions = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            partitions.add_partition(topic, p);
        }
        Self {
            consumer,
            partitions,
        }
    }

    /// Per partition, the committed offset (`None`: nothing committed yet).
    fn now(&self) -> BTreeMap<i32, Option<i64>> {
        self.consumer
            .committed_offsets(self.partitions.clone(), Duration::from_secs(10))
            .expect("committed offsets")
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), Some(o)),
                _ => (e.partition(), None),
            })
            .collect()
    }
}

/// Reads the run's topic as its group, from the committed offsets to the end of every
/// partition (bounded by `READ_BOUND`). Commits nothing.
async fn read_rest(bootstrap: &str, run: &Run, reader: Reader) -> Rest {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &run.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()
        .expect("reader");
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions
            .add_partition_offset(&run.topic, p, Offset::Stored)
            .expect("partition");
    }
    match reader {
        Reader::Join => consumer.subscribe(&[&run.topic]).expect("subscribe"),
        Reader::Assign => consumer.assign(&partitions).expect("assign"),
    }
    let deadline = Instant::now() + READ_BOUND;
    let mut at_end = BTreeSet::new();
    let mut payloads = Vec::new();
    while at_end.len() < PARTITIONS as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Err(_) => panic!(
                "{reader:?}: the end of partitions {at_end:?} only reached in {READ_BOUND:?} \
                 ({} records read)",
                payloads.len()
            ),
            Ok(Ok(m)) => {
                at_end.remove(&m.partition());
                payloads
                    .push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Ok(Err(e)) => panic!("reader: {e}"),
        }
    }
    Rest {
        payloads,
        committed: GroupOffsets::new(bootstrap, &run.group, &run.topic).now(),
    }
}
