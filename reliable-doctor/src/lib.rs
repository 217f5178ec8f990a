//! `reliable doctor`: audits a live RabbitMQ and Kafka and reports every setting that can lose
//! data (the broker rows of the loss matrix in `docs/design.md`: L3, L6, L9, L10).
//!
//! The binary (`reliable doctor ...`) is a thin shell over [`audit`]: it parses the command
//! line into [`Options`], runs the audit and prints the [`Report`] as a table or as JSON. The
//! checks themselves live in [`amqp`] (RabbitMQ, through the management HTTP API) and [`kafka`]
//! (rdkafka's metadata, `DescribeConfigs` and committed offsets), each with a pure part that
//! takes what the broker said and returns [`Finding`]s, so they can be tested without a broker.
//!
//! ```no_run
//! # async fn run() -> Result<(), reliable_doctor::DoctorError> {
//! let options = reliable_doctor::Options {
//!     kafka_bootstrap: Some("127.0.0.1:19092".into()),
//!     ..Default::default()
//! };
//! let report = reliable_doctor::audit(&options).await?;
//! print!("{}", report.to_table());
//! std::process::exit(report.exit_code());
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod amqp;
mod error;
pub mod kafka;
pub mod report;

pub use error::DoctorError;
pub use report::{Audited, Report, Summary};

/// What to audit, and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The AMQP URL of a RabbitMQ node: its reachability is checked.
    pub amqp_url: Option<String>,
    /// The RabbitMQ management API (`http://user:password@host:15672`): queues and policies
    /// are listed there, since AMQP alone cannot list queues.
    pub management_url: Option<String>,
    /// Kafka bootstrap servers, comma separated.
    pub kafka_bootstrap: Option<String>,
    /// TLS and SASL/SCRAM for the Kafka clients; `None` is plaintext. Needs the `tls` feature
    /// (else the audit fails with [`DoctorError::TlsNotBuilt`]). A TLS handshake or login the
    /// cluster refuses is [`DoctorError::KafkaSecurity`].
    pub kafka_security: Option<reliable_kafka::KafkaSecurity>,
    /// Kafka consumer groups whose committed offsets and lag are checked.
    pub groups: Vec<String>,
    /// Also check every consumer group the cluster lists.
    pub all_groups: bool,
    /// Only audit queues, topics and listed groups whose name starts with this prefix.
    pub filter: Option<String>,
    /// The bound of each network call.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            amqp_url: None,
            management_url: None,
            kafka_bootstrap: None,
            kafka_security: None,
            groups: Vec::new(),
            all_groups: false,
            filter: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// Whether an object called `name` passes [`Options::filter`].
    pub fn selects(&self, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|prefix| name.starts_with(prefix))
    }
}

/// Which broker a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Broker {
    /// RabbitMQ.
    Rabbitmq,
    /// Kafka.
    Kafka,
}

impl Broker {
    /// The name shown in the table and the JSON document.
    pub fn as_str(self) -> &'static str {
        match self {
            Broker::Rabbitmq => "rabbitmq",
            Broker::Kafka => "kafka",
        }
    }
}

/// How bad a finding is. Ordered from worst to mildest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The setting loses (or silently drops) messages; the exit code is 1.
    Unsafe,
    /// Weaker than the SDK's safe presets, or loses data only together with another fault.
    Warning,
    /// Worth knowing; nothing is lost by it.
    Info,
}

impl Severity {
    /// The name shown in the table and the JSON document.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Unsafe => "unsafe",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One setting or state that can lose data (or that the audit could not see).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The broker it was found on.
    pub broker: Broker,
    /// The queue (`name`, or `vhost/name` outside vhost `/`), topic, partition (`topic/N`) or group (`group/topic/N`).
    pub object: String,
    /// The check's stable kebab-case id, e.g. `kafka-min-insync-below-2`.
    pub check: String,
    /// How bad it is.
    pub severity: Severity,
    /// What it means, in one sentence.
    pub meaning: String,
    /// What to do about it, in one sentence.
    pub action: String,
}

impl Finding {
    /// A finding; `meaning` and `action` are one sentence each.
    pub fn new(
        broker: Broker,
        object: impl Into<String>,
        check: &str,
        severity: Severity,
        meaning: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Self {
            broker,
            object: object.into(),
            check: check.to_owned(),
            severity,
            meaning: meaning.into(),
            action: action.into(),
        }
    }
}

/// Audits what `options` names and returns every finding, worst first. Call it inside a
/// Tokio runtime (either flavour): the blocking client calls run on its blocking threads.
///
/// Fails with [`DoctorError::NothingToAudit`] when no broker is named,
/// [`DoctorError::TlsNotBuilt`] when Kafka security is asked of a build without the `tls`
/// feature, and with a connection error when a named broker cannot be reached or refuses the
/// audit's requests (a refused TLS handshake or login: [`DoctorError::KafkaSecurity`]).
pub async fn audit(options: &Options) -> Result<Report, DoctorError> {
    let wants_amqp = options.amqp_url.is_some() || options.management_url.is_some();
    if !wants_amqp && options.kafka_bootstrap.is_none() {
        return Err(DoctorError::NothingToAudit);
    }
    if options.kafka_bootstrap.is_some()
        && options.kafka_security.is_some()
        && !cfg!(feature = "tls")
    {
        return Err(DoctorError::TlsNotBuilt);
    }
    let mut report = Report::default();
    if wants_amqp {
        amqp::audit(options, &mut report).await?;
    }
    if let Some(bootstrap) = &options.kafka_bootstrap {
        kafka::audit(bootstrap, options, &mut report).await?;
    }
    report.sort();
    Ok(report)
}
