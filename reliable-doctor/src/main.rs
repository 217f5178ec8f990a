//! `reliable`: the command-line tool of the reliable SDK. Its one subcommand, `doctor`, audits
//! a live RabbitMQ and Kafka for settings that can lose data (see the crate's library docs).
//!
//! Exit codes: 0 no `unsafe` finding, 1 at least one, 2 a usage or connection error.
//!
//! Kafka over TLS and SASL_SSL/SCRAM (`--kafka-security-protocol ssl|sasl_ssl`) needs the
//! `tls` feature: `cargo install --path reliable-doctor --features tls`.

mod kafka_args;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kafka_args::{KafkaSecurityArgs, PASSWORD_ENV};
use reliable_doctor::{audit, Options};

#[derive(Parser)]
#[command(
    name = "reliable",
    version,
    about = "Tools of the reliable messaging SDK"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Audit a live RabbitMQ and/or Kafka and report each setting that can lose data.
    ///
    /// Exit code 0: no unsafe finding; 1: at least one; 2: usage or connection error.
    ///
    /// A Kafka SASL password is read from the variable RELIABLE_KAFKA_SASL_PASSWORD or from
    /// --kafka-sasl-password-file, never from an argument.
    Doctor(DoctorArgs),
}

#[derive(clap::Args)]
struct DoctorArgs {
    /// AMQP URL of a RabbitMQ node (checked for reachability), e.g.
    /// amqp://user:password@host:5672/%2f
    #[arg(long, env = "RELIABLE_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// RabbitMQ management API, e.g. http://user:password@host:15672: queues and policies
    /// are read there (AMQP cannot list queues)
    #[arg(long, env = "RELIABLE_AMQP_MANAGEMENT_URL", hide_env_values = true)]
    management_url: Option<String>,
    /// Kafka bootstrap servers, e.g. host1:9092,host2:9092
    #[arg(long, env = "RELIABLE_KAFKA_BOOTSTRAP")]
    kafka_bootstrap: Option<String>,
    /// A Kafka consumer group whose committed offsets and lag to check (repeatable)
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// Also check every consumer group the Kafka cluster lists
    #[arg(long)]
    all_groups: bool,
    /// Only audit queues, topics and listed groups whose name starts with PREFIX
    #[arg(long, value_name = "PREFIX")]
    filter: Option<String>,
    /// Bound of each network call, in seconds
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout: u64,
    /// Print a JSON document instead of a table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka_security: KafkaSecurityArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; real usage errors exit with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let Command::Doctor(args) = cli.command;
    let password = match std::env::var(PASSWORD_ENV) {
        Ok(password) => Some(password),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return usage_error(format!("the variable {PASSWORD_ENV} is not UTF-8"));
        }
    };
    let kafka_security = match args.kafka_security.resolve(password) {
        Ok(security) => security,
        Err(message) => return usage_error(message),
    };
    let options = Options {
        amqp_url: args.amqp_url.filter(|s| !s.is_empty()),
        management_url: args.management_url.filter(|s| !s.is_empty()),
        kafka_bootstrap: args.kafka_bootstrap.filter(|s| !s.is_empty()),
        kafka_security,
        groups: args.groups,
        all_groups: args.all_groups,
        filter: args.filter,
        timeout: Duration::from_secs(args.timeout),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("reliable doctor: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(audit(&options)) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::from(u8::try_from(report.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("reliable doctor: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints the usage error `message` as clap prints its own, and exits with 2.
fn usage_error(message: String) -> ExitCode {
    eprintln!("error: {message}\n\nFor more information, try 'reliable doctor --help'.");
    ExitCode::from(2)
}
