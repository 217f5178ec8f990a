//! The orchestrator: prepares queues and topics, starts the producer and consumer processes,
//! injects the faults on schedule, drains, and checks the journals.

mod children;
mod inject;
mod judge;
mod nemesis;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::topology;
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{ensure_topic, TopicSpec};
use reliable_test_support::proxy::Proxy;
use serde::Serialize;
use tokio::time::Instant;

use crate::child::{BrokerArgs, KAFKA_PARTITIONS};
use crate::journal::{ConsumerView, ProducerView, Tail};
use crate::plan::{
    amqp_dead_letter, amqp_queue, describe, fault_threshold, roles, Broker, Mode, Scenario, Sizes,
    Variant,
};
use crate::poison::{self, Fate};
use crate::report::{self, Report, RunResult};
use crate::HarnessError;
use children::{child_args, Children};
use inject::{brokers, inject, Targets};

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
    /// The 3-node RabbitMQ cluster's control script (kill, restart, partition, heal, leader),
    /// for the cluster scenarios.
    #[arg(long, default_value = "scripts/rabbit-cluster")]
    pub cluster_script: PathBuf,
    /// The nemesis's seed (default: drawn from the clock and printed, so a run can be
    /// replayed with `--seed`).
    #[arg(long)]
    pub seed: Option<u64>,
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
    /// Messages unconfirmed at some moment of the fault (in flight when it struck, or
    /// accepted while it lasted), where the harness measures it (a silent network).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
}

/// Runs every planned scenario and writes the report; `Ok(true)` when every verdict holds.
pub async fn run(mut args: RunArgs) -> Result<bool, HarnessError> {
    let seed = *args.seed.get_or_insert_with(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos().into())
            .unwrap_or_default()
    });
    eprintln!("harness: nemesis seed {seed} (replay with --seed {seed})");
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
    for cluster in [false, true] {
        let here: Vec<&&Planned> = amqp
            .iter()
            .filter(|p| p.scenario.cluster() == cluster)
            .collect();
        if here.is_empty() {
            continue;
        }
        // The cluster's queues are declared through its first node: a classic queue (the
        // controls') lives there, and the controls connect only to it.
        let url = if cluster {
            args.brokers.cluster_urls()?[0]
        } else {
            args.brokers.amqp_url.as_str()
        };
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| HarnessError::BrokerUnavailable {
                broker: "RabbitMQ",
                detail: e.to_string(),
            })?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| HarnessError::Setup(format!("channel: {e}")))?;
        for p in &here {
            let classic = roles(p.scenario, p.variant).classic_queue;
            if classic || p.scenario.poison() {
                topology::declare_dead_letter_target(&channel, &amqp_dead_letter(&p.dest)).await?;
            }
            topology::declare_queue(&channel, &amqp_queue(&p.dest, classic)).await?;
        }
        let _ = conn.close(200, "prepared".into()).await;
    }
    if amqp.iter().any(|p| p.scenario == Scenario::AmqpBrokerKill) {
        eprintln!("harness: clean RabbitMQ restart so the new queues' metadata is on disk");
        brokers(&args.brokers_script, &["rabbit-stop"]).await?;
        brokers(&args.brokers_script, &["rabbit-restart"]).await?;
    }
    for p in planned
        .iter()
        .filter(|p| p.scenario.broker() == Broker::Kafka)
    {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &args.brokers.kafka_bootstrap);
        let mut specs = vec![TopicSpec::new(&p.dest).partitions(KAFKA_PARTITIONS)];
        if p.scenario.poison() {
            specs.push(TopicSpec::new(format!("{}.dlq", p.dest)));
        }
        for spec in &specs {
            ensure_topic(&client, spec)
                .await
                .map_err(|e| HarnessError::BrokerUnavailable {
                    broker: "Kafka",
                    detail: e.to_string(),
                })?;
        }
    }
    Ok(())
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

    /// Whether every confirmed message meant to be applied has its effect.
    fn all_confirmed_applied(&self, scenario: Scenario) -> bool {
        self.producer
            .confirmed
            .iter()
            .filter(|&&s| Fate::of(scenario, s) == Fate::Apply)
            .all(|s| self.consumer.effects.contains_key(s))
    }
}

async fn run_one(args: &RunArgs, sizes: &Sizes, p: &Planned) -> Result<RunResult, HarnessError> {
    let label = p.label();
    let sizes = &Sizes {
        faults: p.scenario.faults(sizes),
        messages: p.scenario.messages(sizes),
        ..*sizes
    };
    let dir = args
        .out
        .join(format!("{}-{}", p.scenario, p.variant.name()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    // A silent network needs a link that can go silent: the producer reaches RabbitMQ through
    // a TCP proxy in this process (the consumer connects directly).
    let link =
        if p.scenario == Scenario::AmqpSilentNetwork {
            let upstream = reliable_test_support::amqp_socket_addr(&args.brokers.amqp_url)
                .map_err(|missing| HarnessError::BrokerUnavailable {
                    broker: "RabbitMQ",
                    detail: missing.0,
                })?;
            Some(Proxy::start(upstream).await?)
        } else {
            None
        };
    // The cluster scenarios give the SDK every node's address; their controls only the first
    // node's, where the classic queue lives.
    let brokers = if p.scenario.cluster() {
        let nodes = args.brokers.cluster_urls()?;
        let amqp_url = if roles(p.scenario, p.variant).classic_queue {
            nodes[0].to_owned()
        } else {
            nodes.join(",")
        };
        BrokerArgs {
            amqp_url,
            ..args.brokers.clone()
        }
    } else {
        args.brokers.clone()
    };
    let producer_brokers = BrokerArgs {
        amqp_url: link.as_ref().map_or_else(
            || brokers.amqp_url.clone(),
            |proxy| proxy.url_for(&brokers.amqp_url),
        ),
        ..brokers.clone()
    };
    let mut children = Children {
        exe: std::env::current_exe()?,
        base: child_args(p, &brokers),
        producer_base: child_args(p, &producer_brokers),
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
        // The nemesis strikes first once an eighth of the messages is confirmed (a backlog
        // for its consumer kill to lose in the control), then again as soon as the component
        // is back.
        let threshold = if p.scenario.continuous() || (p.scenario.nemesis() && done > 0) {
            0
        } else if p.scenario.nemesis() {
            sizes.messages / 8
        } else {
            fault_threshold(sizes.messages, sizes.faults, done)
        };
        if done < sizes.faults && confirmed >= threshold {
            let targets = Targets {
                children: &mut children,
                link: link.as_ref(),
                views: &mut views,
                index: done,
            };
            let record = inject(args, sizes, p, targets, started).await?;
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
        if p.scenario.poison() && poison::loop_seen(p.scenario, &views.consumer) {
            // Nothing stops the loop: the run ends here, its bound.
            eprintln!("harness: {label}: a message keeps crashing its consumer; ending the run");
            break;
        }
        if views.all_confirmed_applied(p.scenario) {
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
    let producer_finished = producer_status.is_some_and(|s| s.success());
    let (counts, verdict, poison_counts) = judge::judge(
        args,
        sizes,
        p,
        (&views.producer, &views.consumer),
        &faults,
        producer_finished,
    )
    .await?;
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
        poison: poison_counts,
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

impl Mode {
    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Short => "short",
            Mode::Long => "long",
        }
    }
}
