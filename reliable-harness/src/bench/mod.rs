//! `reliable-harness bench`: the SDK against the clients it wraps, on the same brokers, in one
//! run.
//!
//! | part | cases | ratio reported |
//! |---|---|---|
//! | `amqp` | raw lapin with a confirm window, the SDK with the same window (16 … 4096), raw lapin carrying the SDK's identity (a fresh id per message) at the headline window, the SDK in transaction mode (one commit per message, and per batch), raw lapin waiting for each confirm; classic and quorum queues | SDK / raw carrying the identity (target), SDK / bare raw (context); confirms / transactions per message |
//! | `kafka` | raw rdkafka bare and carrying the SDK's identity header (a fresh id per record), the SDK, Kafka's own Java producer (`ProducerPerformance`) | SDK / raw carrying the header (target), SDK / bare raw (context), SDK / Java |
//! | `consume` | raw consumers that commit (Kafka) or ack (RabbitMQ) per handled message and decode each message's id, and the bare auto-commit / auto-ack ones, against the SDK's manual-commit / manual-ack consumer under the pipeline with in-memory dedupe | SDK / raw doing the same work (target), SDK / bare raw (context) |
//! | `memory` | resident bytes per unconfirmed message at 100k pending (a fresh child process) | — |
//! | `order` | the SDK with `SendOrder::Preserved` against `Relaxed`, one sender under injected faults (in-memory broker) | Preserved / Relaxed, median of paired rounds |
//!
//! Every message is a 100-byte payload, persistent (RabbitMQ) or acks=all with idempotence to
//! an RF 3 / min.insync.replicas 2 topic (Kafka). A warm-up round is discarded; then the cases
//! of one comparison run in ABBA order round by round ([`Round`]), so drift on the machine hits
//! them alike. Each case's row is its median round, each target the median of the per-round
//! paired ratios, and every round's figure is kept in the JSON. Latency is from the send call (including any wait for
//! window space) to the confirm. Client CPU is counted over the measured window only
//! ([`Mark`]): not the connection set-up, topic checks, warm-up publish or close around it.
//! What is still not alike between the cases is listed in the README (Performance).
//! Results: `bench.json`, `bench.md` and `window.png` in `--out`.

mod amqp;
mod consume;
mod kafka;
mod memory;
mod order;
mod plot;
mod report;
mod rounds;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::FutureExt;
use reliable_core::producer::Producer;
use reliable_core::Message;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::child::BrokerArgs;
use crate::HarnessError;
use report::markdown;
pub use report::{CaseResult, Report};

pub use memory::{child as memory_child, MemoryArgs};
pub use rounds::{paired_ratio, Round, Tally};

/// A part of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// RabbitMQ producers: confirm windows and transactions.
    Amqp,
    /// Kafka producers: raw rdkafka, the SDK, the Java producer.
    Kafka,
    /// Consumers: raw auto-commit / auto-ack against the SDK with dedupe.
    Consume,
    /// Memory per pending message.
    Memory,
    /// What ordered resends cost under faults.
    Order,
}

/// A Kafka producer case.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaCase {
    /// Raw rdkafka.
    Raw,
    /// Raw rdkafka with the SDK's identity header.
    RawHeaders,
    /// The SDK.
    Sdk,
    /// Kafka's Java producer.
    Java,
}

/// Options of `bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Which parts to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Amqp, Part::Kafka, Part::Consume, Part::Memory, Part::Order])]
    pub only: Vec<Part>,
    /// RabbitMQ messages per windowed case and round.
    #[arg(long, default_value_t = 30_000)]
    pub amqp_messages: u64,
    /// RabbitMQ messages per case for the slow cases (a transaction or a confirm wait per
    /// message).
    #[arg(long, default_value_t = 1_000)]
    pub slow_messages: u64,
    /// Messages per transaction in the transaction-per-batch case.
    #[arg(long, default_value_t = 100)]
    pub tx_batch: usize,
    /// The confirm windows of the sweep (messages unconfirmed at once).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256, 1024, 4096])]
    pub windows: Vec<usize>,
    /// The window of the headline comparison (the SDK's default `max_in_flight`).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Kafka messages per producer case and round.
    #[arg(long, default_value_t = 200_000)]
    pub kafka_messages: u64,
    /// Messages unconfirmed at once for raw rdkafka and the SDK (Kafka).
    #[arg(long, default_value_t = 8192)]
    pub kafka_window: usize,
    /// Kafka messages per consumer case and round: enough that librdkafka's prefetch (up to
    /// 64 MiB queued per consumer) is a small part of the run. The RabbitMQ consumer cases use
    /// `--amqp-messages` (a prefetch of 200 is small against it).
    #[arg(long, default_value_t = 1_000_000)]
    pub consume_messages: u64,
    /// Which Kafka producer cases to run (for profiling one alone).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [KafkaCase::Raw, KafkaCase::RawHeaders, KafkaCase::Sdk, KafkaCase::Java])]
    pub kafka_cases: Vec<KafkaCase>,
    /// Messages per round of the send-order cases.
    #[arg(long, default_value_t = 50_000)]
    pub order_messages: u64,
    /// Pending messages for the memory figure.
    #[arg(long, default_value_t = 100_000)]
    pub pending: u64,
    /// Measured rounds per comparison, after a discarded warm-up round (the median counts).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Fail (exit 1) when a target ratio is missed.
    #[arg(long)]
    pub check: bool,
    /// The directory of Apache Kafka's jars (for the Java producer).
    #[arg(long, env = "RELIABLE_KAFKA_LIBS")]
    pub kafka_libs: Option<PathBuf>,
    /// Where the results go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Where the brokers are.
    #[command(flatten)]
    pub brokers: BrokerArgs,
}

/// One measured run of one case.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Messages sent (or consumed).
    pub messages: u64,
    /// Wall time of the run.
    pub took: Duration,
    /// Latencies in microseconds (per message, or per commit where a case commits batches).
    pub latencies_us: Vec<u64>,
    /// p50 and p99 in milliseconds as reported by a client that measures its own (the Java
    /// producer), instead of `latencies_us`.
    pub reported_ms: Option<(f64, f64)>,
    /// CPU time the client used in the measured window (see [`Mark`]).
    pub cpu: Option<Duration>,
}

/// One end of a case's measured window: the wall clock and this process's CPU time, read
/// together. A case takes one when its clock starts (after connecting, topic checks and the
/// warm-up publish) and one when it stops, so client CPU counts the measured work only.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    at: Instant,
    cpu: Duration,
}

impl Mark {
    /// Reads the clock and this process's CPU time now.
    pub fn now() -> Self {
        let cpu = cpu_time();
        Self {
            at: Instant::now(),
            cpu,
        }
    }

    /// The sample of the window from this mark to now.
    pub fn sample(self, messages: u64, latencies_us: Vec<u64>) -> Sample {
        Sample::between(self, Mark::now(), messages, latencies_us)
    }
}

impl Sample {
    /// A run measured here between `start` and `end`: wall time and CPU time of that window.
    pub fn between(start: Mark, end: Mark, messages: u64, latencies_us: Vec<u64>) -> Self {
        Self {
            messages,
            took: end.at.saturating_duration_since(start.at),
            latencies_us,
            reported_ms: None,
            cpu: Some(end.cpu.saturating_sub(start.cpu)),
        }
    }

    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.took.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if let Some((p50, p99)) = self.reported_ms {
            return Some(if p < 0.9 { p50 } else { p99 });
        }
        if self.latencies_us.is_empty() {
            return None;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        Some(self.latencies_us[i] as f64 / 1000.0)
    }
}

/// A confirm to wait for, as the collector sees it.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Awaits confirms in send order, recording each one's latency from its send call.
pub struct Collector {
    tx: mpsc::UnboundedSender<(Instant, Confirm)>,
    task: tokio::task::JoinHandle<Result<Vec<u64>, String>>,
}

impl Collector {
    /// Starts collecting; `expected` sizes the latency buffer.
    pub fn new(expected: u64) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Confirm)>();
        let task = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(expected as usize);
            while let Some((sent, confirm)) = rx.recv().await {
                confirm.await?;
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            Ok(latencies)
        });
        Self { tx, task }
    }

    /// Hands over the confirm of a message whose send call started at `sent`.
    pub fn push(&self, sent: Instant, confirm: Confirm) -> Result<(), HarnessError> {
        self.tx
            .send((sent, confirm))
            .map_err(|_| HarnessError::Setup("the confirm collector stopped".into()))
    }

    /// Waits for every confirm; the first failure ends the case.
    pub async fn finish(self) -> Result<Vec<u64>, HarnessError> {
        drop(self.tx);
        self.task
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .map_err(|e| HarnessError::Setup(format!("a confirm failed: {e}")))
    }
}

/// Sends `messages` through a raw client with at most `window` unconfirmed: `send(seq, permit)`
/// publishes message `seq` and returns its confirm, which must drop `permit` once confirmed.
/// A warm-up publish (`u64::MAX`) is confirmed before the clock starts.
pub async fn windowed<F, Fut>(messages: u64, window: usize, send: F) -> Result<Sample, HarnessError>
where
    F: Fn(u64, Option<OwnedSemaphorePermit>) -> Fut,
    Fut: Future<Output = Result<Confirm, HarnessError>>,
{
    send(u64::MAX, None)
        .await?
        .await
        .map_err(|e| HarnessError::Setup(format!("the warm-up publish failed: {e}")))?;
    let permits = Arc::new(Semaphore::new(window));
    let collector = Collector::new(messages);
    let started = Mark::now();
    for seq in 0..messages {
        let sent = Instant::now();
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        collector.push(sent, send(seq, Some(permit)).await?)?;
    }
    let latencies_us = collector.finish().await?;
    Ok(started.sample(messages, latencies_us))
}

/// Sends `messages` through the SDK producer (its own window bounds them), after one confirmed
/// warm-up message (`u64::MAX`), then closes it.
pub async fn through_producer(
    producer: Producer,
    messages: u64,
    message: impl Fn(u64) -> Message,
) -> Result<Sample, HarnessError> {
    producer.send(message(u64::MAX)).await?.await?;
    let collector = Collector::new(messages);
    let started = Mark::now();
    for seq in 0..messages {
        let sent = Instant::now();
        let handle = producer.send(message(seq)).await?;
        collector.push(
            sent,
            async move { handle.await.map(|_| ()).map_err(|e| e.to_string()) }.boxed(),
        )?;
    }
    let latencies_us = collector.finish().await?;
    let sample = started.sample(messages, latencies_us);
    producer.close().await;
    Ok(sample)
}

/// CPU time (user + system, every thread) this process has used so far, at the kernel's
/// 10 ms tick; zero when `/proc` cannot be read.
pub fn cpu_time() -> Duration {
    proc_cpu("/proc/self/stat").unwrap_or_default()
}

/// CPU time (user + system, every thread) process `pid` has used so far; `None` once it is
/// gone (or where there is no `/proc`).
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    proc_cpu(&format!("/proc/{pid}/stat"))
}

/// `utime + stime` of a `/proc/<pid>/stat` file (children it waited for are not counted).
fn proc_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat_cpu(&stat)
}

fn stat_cpu(stat: &str) -> Option<Duration> {
    // Fields after the command name (which may hold spaces) start at the last ')'; utime and
    // stime are the 12th and 13th of them.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux the project runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A name unique to this run.
pub fn stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Runs the benchmark; `Ok(false)` when `--check` is given and a target is missed.
pub async fn run(args: BenchArgs) -> Result<bool, HarnessError> {
    std::fs::create_dir_all(&args.out)?;
    let mut report = Report::default();
    report.notes.push(format!(
        "{} measured rounds per comparison after a discarded warm-up, cases in ABBA order; rows are median rounds, targets medians of paired ratios; 100-byte payloads",
        args.rounds
    ));
    let started = Instant::now();
    if args.only.contains(&Part::Amqp) {
        amqp::run(&args, &mut report).await?;
    }
    if args.only.contains(&Part::Kafka) {
        kafka::run(&args, &mut report).await?;
    }
    if args.only.contains(&Part::Consume) {
        consume::run(&args, &mut report).await?;
    }
    if args.only.contains(&Part::Memory) {
        report.memory = Some(memory::measure(&args).await?);
    }
    if args.only.contains(&Part::Order) {
        order::run(&args, &mut report).await?;
    }
    report
        .notes
        .push(format!("{:.0} s in all", started.elapsed().as_secs_f64()));
    let md = markdown(&report);
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_string_pretty(&report).map_err(|e| HarnessError::Setup(e.to_string()))?,
    )?;
    std::fs::write(args.out.join("bench.md"), &md)?;
    if args.only.contains(&Part::Amqp) {
        plot::window_curve(&report, &args.out.join("window.png"))?;
    }
    println!("{md}");
    Ok(!args.check || report.targets.iter().all(|t| t.met))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of `messages` in `millis`, half of it client CPU.
    pub(super) fn sample(messages: u64, millis: u64, latencies_us: Vec<u64>) -> Sample {
        Sample {
            messages,
            took: Duration::from_millis(millis),
            latencies_us,
            reported_ms: None,
            cpu: Some(Duration::from_millis(millis / 2)),
        }
    }

    #[test]
    fn targets_compare_two_cases_of_the_run_and_say_when_they_are_missed() {
        let mut report = Report::default();
        let round = Round::all(1).last().unwrap();
        let mut fast = Tally::default();
        fast.add(round, sample(1_000, 100, vec![]));
        let mut slow = Tally::default();
        slow.add(round, sample(1_000, 1_000, vec![]));
        report.push(fast.result("g", "fast", None));
        report.push(slow.result("g", "slow", None));
        report.push(Tally::default().result("g", "not run", None));
        assert_eq!(report.cases.len(), 2);
        report.target(
            "fast / slow",
            ("g", "fast", None),
            ("g", "slow", None),
            10.0,
        );
        report.target(
            "slow / fast",
            ("g", "slow", None),
            ("g", "fast", None),
            0.95,
        );
        report.target("missing", ("g", "not run", None), ("g", "fast", None), 1.0);
        assert_eq!(report.targets.len(), 2);
        assert!(report.targets[0].met && report.targets[0].ratio == 10.0);
        assert!(!report.targets[1].met && report.targets[1].ratio == 0.1);
        assert!(markdown(&report).contains("| slow / fast | 0.10 | 0.95 | **no** |"));
        report.context("for scale", ("g", "fast", None), ("g", "slow", None));
        report.context("missing", ("g", "not run", None), ("g", "fast", None));
        assert_eq!(report.context.len(), 1);
        assert!(markdown(&report).contains("| for scale | 10.00 |"));
    }

    #[test]
    fn cpu_is_utime_plus_stime_of_the_process_not_its_children() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 150 50 7000 9000 20 0 4";
        assert_eq!(stat_cpu(stat), Some(Duration::from_millis(2_000)));
        assert_eq!(stat_cpu("42 (x) S 1"), None);
    }

    #[test]
    fn a_sample_counts_the_cpu_between_its_marks() {
        let start = Mark::now();
        let mut end = Mark::now();
        end.cpu = start.cpu + Duration::from_millis(30);
        let s = Sample::between(start, end, 10, Vec::new());
        assert_eq!(s.cpu, Some(Duration::from_millis(30)));
        assert!(s.took < Duration::from_secs(1));
    }
}
