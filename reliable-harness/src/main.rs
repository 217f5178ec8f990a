//! `reliable-harness`: the produce–consume–validate fault harness.
//!
//! `reliable-harness run --mode short|long` prepares a queue or topic per scenario run, starts a
//! producer process and a consumer process (this binary again, as `produce` and `consume`),
//! injects the scenario's faults on schedule (kill -9 of RabbitMQ, of the Kafka partition
//! leader, SIGKILL of the consumer), drains, and checks the journals the processes wrote: lost,
//! unexpected, duplicated deliveries, duplicate effects, unresolved publishes, and first copies
//! out of order (per record key on Kafka, per producer on RabbitMQ). Every scenario
//! runs with the SDK's safe settings and as a negative control with the classic unsafe ones.
//! Results go to `results.json` and `results.md` in `--out`; the exit code is 0 only when every
//! verdict holds. `scripts/faults` runs it against the project's brokers.

mod bench;
mod bench_outbox;
mod child;
mod consume;
mod journal;
mod plan;
mod poison;
mod produce;
mod report;
mod run;

use clap::{Parser, Subcommand};

/// Why the harness could not run (a scenario's findings are results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A broker is not reachable.
    #[error("{broker} is not reachable ({detail}); start the brokers with `scripts/brokers up`")]
    BrokerUnavailable {
        /// Which broker.
        broker: &'static str,
        /// The client's error.
        detail: String,
    },
    /// A broker control command failed.
    #[error("`{command}` failed: {detail}")]
    Script {
        /// The command.
        command: String,
        /// What happened.
        detail: String,
    },
    /// Setting up a client or the run failed.
    #[error("setup failed: {0}")]
    Setup(String),
    /// A journal or process operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A RabbitMQ adapter error.
    #[error(transparent)]
    Amqp(#[from] reliable_amqp::AmqpError),
    /// A Kafka adapter error.
    #[error(transparent)]
    Kafka(#[from] reliable_kafka::Error),
    /// The producer refused a send.
    #[error(transparent)]
    Send(#[from] reliable_core::producer::SendError),
    /// A message could not be built.
    #[error(transparent)]
    Message(#[from] reliable_core::message::MessageFormatError),
    /// The consumer pipeline stopped.
    #[error(transparent)]
    Pipeline(#[from] reliable_core::pipeline::PipelineError),
}

#[derive(Parser, Debug)]
#[command(
    name = "reliable-harness",
    version,
    about = "Fault harness: kill -9 brokers and consumers, count what was lost"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs the scenarios and writes the results.
    Run(run::RunArgs),
    /// The SDK against raw lapin / rdkafka and Kafka's Java producer, on the real brokers.
    Bench(bench::BenchArgs),
    /// Producer throughput with and without the durable outbox, against the real brokers.
    BenchOutbox(bench_outbox::BenchArgs),
    /// (child process) Resident memory per pending message.
    #[command(hide = true)]
    BenchMemory(bench::MemoryArgs),
    /// (child process) The producer of one scenario run.
    #[command(hide = true)]
    Produce(produce::ProduceArgs),
    /// (child process) The consumer of one scenario run.
    #[command(hide = true)]
    Consume(consume::ConsumeArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reliable-harness: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Run(args) => run::run(args).await,
            // On a worker thread, like an application's own tasks (spawns from there go to
            // the worker's local queue instead of waking another thread each time).
            Cmd::Bench(args) => tokio::spawn(bench::run(args))
                .await
                .unwrap_or_else(|e| Err(HarnessError::Setup(e.to_string()))),
            Cmd::BenchMemory(args) => bench::memory_child(args).await.map(|()| true),
            Cmd::BenchOutbox(args) => bench_outbox::run(args).await.map(|()| true),
            Cmd::Produce(args) => produce::run(args).await.map(|()| true),
            Cmd::Consume(args) => consume::run(args).await.map(|()| true),
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("reliable-harness: some verdicts failed (see the table above)");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("reliable-harness: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
