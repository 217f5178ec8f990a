//! The orchestrator: prepares queues and topics, starts the producer and consumer processes,
//! injects the faults on schedule, drains, and checks the journals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{ensure_topic, TopicSpec};
use serde::Serialize;
use tokio::time::Instant;

use crate::child::{BrokerArgs, KAFKA_PARTITIONS};
use crate::journal::{check, open_append, ConsumerView, ProducerView, Tail};
use crate::plan::{describe, fault_threshold, roles, Broker, Mode, Scenario, Sizes, Variant};
use crate::report::{self, Report, RunResult, Verdict};
use crate::HarnessError;

/// Orchestrator options.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// short (CI) or long (by hand).
    #[arg(long, value_enum, default_value = "short")]
    pub mode: Mode,
    /// Scenarios to run (default: all).
    #[arg(long = "scenario", value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Variants to run (default: safe and control).
    #[arg(long = "variant", value_enum)]
    pub variants: Vec<Variant>,
    /// Overrides the mode's message count.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Overrides the mode's fault count per scenario.
    #[arg(long)]
    pub faults: Option<u32>,
    /// Where journals, logs and the results (results.json, results.md) go.
    #[arg(long, default_value = "target/faults")]
    pub out: PathBuf,
    /// The broker control script (kill, restart, leader lookup).
    #[arg(long, default_value = "scripts/brokers")]
    pub brokers_script: PathBuf,
    /// Where the brokers are.
    #[command(flatten)]
    pub brokers: BrokerArgs,
}

/// One scenario run to do.
#[derive(Clone, Debug)]
struct Planned {
    scenario: Scenario,
    variant: Variant,
    dest: String,
}

impl Planned {
    fn label(&self) -> String {
        format!("{}/{}", self.scenario, self.variant.name())
    }
}

/// One injected fault, as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    /// What was done.
    pub action: String,
    /// Seconds since the run started.
    pub at_s: f64,
    /// Confirmed messages when it struck.
    pub confirmed_before: u64,
    /// Seconds from the kill until the component was back (and, for Kafka, in sync).
    pub recovery_s: f64,
}

/// Runs every planned scenario and writes the report; `Ok(true)` when every verdict holds.
pub async fn run(args: RunArgs) -> Result<bool, HarnessError> {
    let mut sizes = args.mode.sizes();
    if let Some(m) = args.messages {
        sizes.messages = m;
    }
    if let Some(f) = args.faults {
        sizes.faults = f;
    }
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let variants = if args.variants.is_empty() {
        vec![Variant::Safe, Variant::Control]
    } else {
        args.variants.clone()
    };
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let planned: Vec<Planned> = scenarios
        .iter()
        .flat_map(|&scenario| variants.iter().map(move |&variant| (scenario, variant)))
        .map(|(scenario, variant)| Planned {
            scenario,
            variant,
            dest: match scenario.broker() {
                Broker::Amqp => format!("harness.{scenario}.{}.{stamp}", variant.name()),
                Broker::Kafka => format!("harness-{scenario}-{}-{stamp}", variant.name()),
            },
        })
        .collect();
    std::fs::create_dir_all(&args.out)?;
    eprintln!(
        "harness: {} mode, {} runs, {} messages at {}/s each, consumer {}/s, {} fault(s) per run",
        args.mode.name(),
        planned.len(),
        sizes.messages,
        sizes.rate,
        sizes.consumer_capacity,
        sizes.faults
    );
    prepare(&args, &planned).await?;
    let started = Instant::now();
    let mut results = Vec::new();
    for p in &planned {
        let result = run_one(&args, &sizes, p).await?;
        eprintln!("harness: {} -> {}", p.label(), result.verdict);
        results.push(result);
    }
    let report = Report::new(args.mode, sizes, results, started.elapsed());
    let passed = report.passed;
    report::write(&report, &args.out)?;
    println!("{}", report::markdown(&report));
    eprintln!(
        "harness: results in {} and {}",
        args.out.join("results.json").display(),
        args.out.join("results.md").display()
    );
    Ok(passed)
}

/// Creates every queue and topic before any process starts, and makes RabbitMQ's fresh quorum
/// queues survive a kill -9 (see the README's RabbitMQ 3.10 note): declare, then one clean
/// broker restart, as a deployment would have done long before.
async fn prepare(args: &RunArgs, planned: &[Planned]) -> Result<(), HarnessError> {
    let amqp: Vec<&Planned> = planned
        .iter()
        .filter(|p| p.scenario.broker() == Broker::Amqp)
        .collect();
    if !amqp.is_empty() {
        let conn = Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
            .await
            .map_err(|e| HarnessError::BrokerUnavailable {
                broker: "RabbitMQ",
                detail: e.to_string(),
            })?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| HarnessError::Setup(format!("channel: {e}")))?;
        for p in &amqp {
            let spec = if roles(p.scenario, p.variant).unsafe_producer {
                QueueSpec::classic_durable(&p.dest)
            } else {
                QueueSpec::quorum(&p.dest)
            };
            topology::declare_queue(&channel, &spec).await?;
        }
        let _ = conn.close(200, "prepared".into()).await;
        if amqp.iter().any(|p| p.scenario == Scenario::AmqpBrokerKill) {
            eprintln!("harness: clean RabbitMQ restart so the new queues' metadata is on disk");
            brokers(&args.brokers_script, &["rabbit-stop"]).await?;
            brokers(&args.brokers_script, &["rabbit-restart"]).await?;
        }
    }
    for p in planned
        .iter()
        .filter(|p| p.scenario.broker() == Broker::Kafka)
    {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &args.brokers.kafka_bootstrap);
        let spec = TopicSpec::new(&p.dest).partitions(KAFKA_PARTITIONS);
        ensure_topic(&client, &spec)
            .await
            .map_err(|e| HarnessError::BrokerUnavailable {
                broker: "Kafka",
                detail: e.to_string(),
            })?;
    }
    Ok(())
}

/// Runs `scripts/brokers ARGS` and returns its standard output.
async fn brokers(script: &Path, args: &[&str]) -> Result<String, HarnessError> {
    let mut command = Command::new(script);
    command.args(args).stderr(Stdio::inherit());
    let what = format!("{} {}", script.display(), args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?
        .map_err(|e| HarnessError::Script {
            command: what.clone(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(HarnessError::Script {
            command: what,
            detail: output.status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The child processes of one run.
struct Children {
    exe: PathBuf,
    base: Vec<String>,
    dir: PathBuf,
    capacity: u32,
    producer_args: Vec<String>,
    producer: Option<KillOnDrop>,
    consumer: Option<Child>,
    consumer_kills: u32,
    consumer_crashes: u32,
}

impl Children {
    fn spawn(&self, role: &str, extra: &[String]) -> Result<Child, HarnessError> {
        let log = open_append(&self.dir.join(format!("{role}.out")))?;
        let err = log.try_clone()?;
        let journal = self.dir.join(format!("{role}.log"));
        Ok(Command::new(&self.exe)
            .arg(role)
            .args(&self.base)
            .arg("--journal")
            .arg(journal)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()?)
    }

    fn start_producer(&mut self) -> Result<(), HarnessError> {
        self.producer = Some(KillOnDrop(self.spawn("produce", &self.producer_args)?));
        Ok(())
    }

    /// SIGKILL, and reap.
    fn kill_producer(&mut self) {
        self.producer = None;
    }

    /// The producer's exit status, once it has exited on its own.
    fn producer_exited(&mut self) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        match self.producer.as_mut() {
            Some(p) => Ok(p.0.try_wait()?),
            None => Ok(None),
        }
    }

    fn start_consumer(&mut self) -> Result<(), HarnessError> {
        let capacity = ["--capacity".to_owned(), self.capacity.to_string()];
        self.consumer = Some(self.spawn("consume", &capacity)?);
        Ok(())
    }

    /// SIGKILL, and reap.
    fn kill_consumer(&mut self) {
        if let Some(mut c) = self.consumer.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a consumer that died on its own (counted: it must not happen in safe runs).
    fn supervise(&mut self) -> Result<(), HarnessError> {
        let exited = match self.consumer.as_mut() {
            Some(c) => c.try_wait()?,
            None => return Ok(()),
        };
        if let Some(status) = exited {
            self.consumer_crashes += 1;
            eprintln!("harness: consumer exited on its own ({status}); restarting it");
            self.start_consumer()?;
        }
        Ok(())
    }
}

/// A child process killed (SIGKILL) and reaped when dropped: an aborted run leaves nothing
/// running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_consumer();
    }
}

fn child_args(args: &RunArgs, p: &Planned) -> Vec<String> {
    let mut v = vec![
        "--scenario".into(),
        p.scenario.name().into(),
        "--variant".into(),
        p.variant.name().into(),
        "--dest".into(),
        p.dest.clone(),
    ];
    v.extend(args.brokers.to_args());
    v
}

struct Views {
    producer_tail: Tail,
    consumer_tail: Tail,
    producer: ProducerView,
    consumer: ConsumerView,
}

impl Views {
    fn new(dir: &Path) -> Self {
        Self {
            producer_tail: Tail::new(&dir.join("produce.log")),
            consumer_tail: Tail::new(&dir.join("consume.log")),
            producer: ProducerView::default(),
            consumer: ConsumerView::default(),
        }
    }

    fn refresh(&mut self) -> Result<(), HarnessError> {
        let (p, c) = (&mut self.producer, &mut self.consumer);
        self.producer_tail.read(|l| p.apply(l))?;
        self.consumer_tail.read(|l| c.apply(l))?;
        Ok(())
    }

    /// Whether every confirmed message has its effect.
    fn all_confirmed_applied(&self) -> bool {
        self.producer
            .confirmed
            .iter()
            .all(|s| self.consumer.effects.contains_key(s))
    }
}

async fn run_one(args: &RunArgs, sizes: &Sizes, p: &Planned) -> Result<RunResult, HarnessError> {
    let label = p.label();
    let dir = args
        .out
        .join(format!("{}-{}", p.scenario, p.variant.name()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut children = Children {
        exe: std::env::current_exe()?,
        base: child_args(args, p),
        dir: dir.clone(),
        capacity: sizes.consumer_capacity,
        producer_args: vec![
            "--messages".to_owned(),
            sizes.messages.to_string(),
            "--rate".to_owned(),
            sizes.rate.to_string(),
        ],
        producer: None,
        consumer: None,
        consumer_kills: 0,
        consumer_crashes: 0,
    };
    let started = Instant::now();
    children.start_consumer()?;
    children.start_producer()?;
    let mut views = Views::new(&dir);
    let mut faults = Vec::new();
    let mut last_status = Instant::now();
    // Bounded: production at the nominal rate three times over, plus recovery of every fault.
    let production = Duration::from_secs_f64(sizes.messages as f64 / f64::from(sizes.rate.max(1)));
    let limit = production * 3 + Duration::from_secs(120) * (sizes.faults + 1);
    let producer_status = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        views.refresh()?;
        children.supervise()?;
        if let Some(status) = children.producer_exited()? {
            break Some(status);
        }
        if started.elapsed() > limit {
            eprintln!("harness: {label}: producer still running after {limit:?}; stopping it");
            break None;
        }
        let done = faults.len() as u32;
        let confirmed = views.producer.confirmed.len() as u64;
        if done < sizes.faults && confirmed >= fault_threshold(sizes.messages, sizes.faults, done) {
            let record = inject(args, sizes, p, &mut children, confirmed, started).await?;
            eprintln!(
                "harness: {label}: fault {}/{}: {} (back after {:.1} s)",
                done + 1,
                sizes.faults,
                record.action,
                record.recovery_s
            );
            faults.push(record);
        }
        if last_status.elapsed() >= Duration::from_secs(2) {
            last_status = Instant::now();
            status_line(&label, started, sizes, &views, faults.len());
        }
    };
    children.kill_producer(); // reaped, or killed if it overran its time
                              // Drain: until every confirmed message has its effect (then a short settle for late
                              // duplicates), or until nothing new arrives for the quiet period (what is missing then is
                              // lost).
    let progress = |v: &Views| v.consumer.deliveries_total + v.consumer.effects_total;
    let mut last_progress = (Instant::now(), progress(&views));
    let drain_started = Instant::now();
    let mut complete_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        views.refresh()?;
        children.supervise()?;
        if progress(&views) != last_progress.1 {
            last_progress = (Instant::now(), progress(&views));
        }
        if views.all_confirmed_applied() {
            let since = *complete_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(2) {
                break;
            }
        } else {
            complete_since = None;
        }
        if last_progress.0.elapsed() >= sizes.quiet
            || drain_started.elapsed() >= production * 2 + sizes.quiet * 4
        {
            break;
        }
        if last_status.elapsed() >= Duration::from_secs(2) {
            last_status = Instant::now();
            status_line(&label, started, sizes, &views, faults.len());
        }
    }
    children.kill_consumer();
    views.refresh()?;
    let counts = check(&views.producer, &views.consumer);
    let verdict = Verdict::judge(
        p.variant,
        sizes,
        &counts,
        faults.len() as u32,
        &views.producer,
        producer_status.is_some_and(|s| s.success()),
    );
    Ok(RunResult {
        scenario: p.scenario,
        variant: p.variant,
        config: describe(p.scenario, p.variant),
        destination: p.dest.clone(),
        counts,
        resent: views.producer.done.map_or(0, |(_, r)| r),
        faults_planned: sizes.faults,
        faults,
        consumer_starts: views.consumer.starts,
        consumer_kills: children.consumer_kills,
        consumer_crashes: children.consumer_crashes,
        duration_s: round1(started.elapsed().as_secs_f64()),
        verdict,
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn status_line(label: &str, started: Instant, sizes: &Sizes, views: &Views, faults: usize) {
    eprintln!(
        "harness: {label} {:>6.1}s confirmed {}/{} failed {} | delivered {} applied {} | faults {}/{} | consumer starts {}",
        started.elapsed().as_secs_f64(),
        views.producer.confirmed.len(),
        sizes.messages,
        views.producer.failed.len(),
        views.consumer.deliveries_total,
        views.consumer.effects.len(),
        faults,
        sizes.faults,
        views.consumer.starts,
    );
}

/// Brokers in the project's Kafka cluster (`scripts/brokers up`).
const KAFKA_BROKERS: u32 = 3;

/// How long the followers are frozen before the leader is killed: below the cluster's broker
/// session timeout (3 s), so they are not fenced for the pause itself.
const FOLLOWER_PAUSE: Duration = Duration::from_millis(1000);

/// Injects the scenario's fault and waits until the component is back.
async fn inject(
    args: &RunArgs,
    sizes: &Sizes,
    p: &Planned,
    children: &mut Children,
    confirmed: u64,
    started: Instant,
) -> Result<FaultRecord, HarnessError> {
    let at = started.elapsed();
    let kill = Instant::now();
    let script = &args.brokers_script;
    let action = match p.scenario {
        Scenario::AmqpBrokerKill => {
            brokers(script, &["rabbit-kill"]).await?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(script, &["rabbit-restart"]).await?;
            "kill -9 RabbitMQ, restart".to_owned()
        }
        Scenario::KafkaLeaderKill => {
            let leader = brokers(script, &["kafka-leader", &p.dest, "0"]).await?;
            let id: u32 = leader.parse().map_err(|_| HarnessError::Script {
                command: "kafka-leader".into(),
                detail: format!("not a broker id: {leader:?}"),
            })?;
            // The leader dies before its followers caught up: freeze them, let the leader take
            // writes alone for a moment, kill it, then let them run again. acks=1 writes of
            // that moment were confirmed by the leader only; acks=all writes were not confirmed.
            let followers: Vec<String> = (1..=KAFKA_BROKERS)
                .filter(|&b| b != id)
                .map(|b| b.to_string())
                .collect();
            for f in &followers {
                brokers(script, &["kafka-pause", f]).await?;
            }
            tokio::time::sleep(FOLLOWER_PAUSE).await;
            let killed = brokers(script, &["kafka-kill", &id.to_string()]).await;
            for f in &followers {
                brokers(script, &["kafka-resume", f]).await?;
            }
            killed?;
            tokio::time::sleep(sizes.downtime).await;
            brokers(script, &["kafka-restart", &id.to_string()]).await?;
            wait_in_sync(args, &p.dest).await?;
            format!(
                "followers frozen {} ms, kill -9 Kafka broker {id} (leader of partition 0), restart",
                FOLLOWER_PAUSE.as_millis()
            )
        }
        Scenario::KafkaProducerKill => {
            // The cluster is slow to acknowledge (the followers of partition 0's leader are
            // frozen), so the producer holds unconfirmed messages when it dies.
            let leader = brokers(script, &["kafka-leader", &p.dest, "0"]).await?;
            let followers: Vec<String> = (1..=KAFKA_BROKERS)
                .map(|b| b.to_string())
                .filter(|b| *b != leader)
                .collect();
            for f in &followers {
                brokers(script, &["kafka-pause", f]).await?;
            }
            tokio::time::sleep(FOLLOWER_PAUSE).await;
            children.kill_producer();
            for f in &followers {
                brokers(script, &["kafka-resume", f]).await?;
            }
            tokio::time::sleep(sizes.downtime).await;
            children.start_producer()?;
            format!(
                "followers frozen {} ms, SIGKILL the producer process, restart",
                FOLLOWER_PAUSE.as_millis()
            )
        }
        Scenario::AmqpConsumerKill | Scenario::KafkaConsumerKill => {
            children.kill_consumer();
            children.consumer_kills += 1;
            tokio::time::sleep(sizes.downtime).await;
            children.start_consumer()?;
            "SIGKILL the consumer process, restart".to_owned()
        }
    };
    Ok(FaultRecord {
        action,
        at_s: round1(at.as_secs_f64()),
        confirmed_before: confirmed,
        recovery_s: round1(kill.elapsed().as_secs_f64()),
    })
}

/// Waits until every partition of `topic` has all its replicas in sync again, so the next
/// fault starts from a fully replicated topic.
async fn wait_in_sync(args: &RunArgs, topic: &str) -> Result<(), HarnessError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
        .create()
        .map_err(|e| HarnessError::Setup(format!("metadata client: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let topic = topic.to_owned();
    let consumer = std::sync::Arc::new(consumer);
    loop {
        let c = consumer.clone();
        let t = topic.clone();
        let in_sync = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.isr().len() == p.replicas().len())
                    })
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?;
        if in_sync {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Script {
                command: format!("wait for {topic} in sync"),
                detail: "replicas not back in sync after 180 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Mode {
    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Short => "short",
            Mode::Long => "long",
        }
    }
}
