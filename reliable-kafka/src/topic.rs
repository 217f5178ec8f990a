//! The live topic safety check (loss-matrix row L6): [`ensure_topic`] creates a topic with safe
//! replication settings, or verifies an existing one against the running cluster.
//!
//! A topic is safe when every partition has at least [`TopicSpec::replication_factor`] replicas
//! (metadata), `min.insync.replicas` is at least [`TopicSpec::min_insync_replicas`] and
//! `unclean.leader.election.enable` is `false` (`describe_configs`, which includes the broker
//! defaults the topic inherits). Otherwise a confirmed `acks=all` write can live on one broker
//! only, or a stale replica can become leader, and a broker crash loses confirmed messages.
//! A partition whose in-sync replica set is below `min.insync.replicas` *right now* is logged at
//! `warn` level (writes to it fail until a follower catches up) and reported in
//! [`TopicStatus::under_min_isr`].
//!
//! ```no_run
//! use reliable_kafka::topic::{ensure_topic, TopicSpec};
//! use reliable_kafka::rdkafka::ClientConfig;
//!
//! # async fn demo() -> Result<(), reliable_kafka::topic::TopicError> {
//! let mut client = ClientConfig::new();
//! client.set("bootstrap.servers", "127.0.0.1:19092");
//! let status = ensure_topic(&client, &TopicSpec::new("orders").partitions(6)).await?;
//! println!("orders: created={} rf={}", status.created, status.replication_factor);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use rdkafka::ClientConfig;

use crate::config::redact;
use crate::security::{self, SecurityError};

/// How a topic must look. Defaults: 1 partition, replication factor 3, `min.insync.replicas` 2,
/// `unclean.leader.election.enable=false`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// The topic's name.
    pub name: String,
    /// Partitions when the topic is created (an existing topic keeps its count).
    pub partitions: i32,
    /// The least replicas every partition must have (at least 2).
    pub replication_factor: i32,
    /// The least `min.insync.replicas` (at least 2, at most the replication factor).
    pub min_insync_replicas: i32,
    /// Broker request timeout for the admin calls.
    pub timeout: Duration,
}

impl TopicSpec {
    /// The safe defaults for topic `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            partitions: 1,
            replication_factor: 3,
            min_insync_replicas: 2,
            timeout: Duration::from_secs(15),
        }
    }

    /// Sets the partition count used when creating the topic.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets the required replication factor (at least 2).
    pub fn replication_factor(mut self, replication_factor: i32) -> Self {
        self.replication_factor = replication_factor;
        self
    }

    /// Sets the required `min.insync.replicas` (at least 2).
    pub fn min_insync_replicas(mut self, min_insync_replicas: i32) -> Self {
        self.min_insync_replicas = min_insync_replicas;
        self
    }
}

/// One unsafe property of an existing topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicProblem {
    /// The setting: `replication.factor`, `min.insync.replicas` or
    /// `unclean.leader.election.enable`.
    pub setting: &'static str,
    /// What the cluster has.
    pub actual: String,
    /// What is required.
    pub required: String,
    /// How it loses data.
    pub why: &'static str,
}

impl fmt::Display for TopicProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is {} (required: {}): {}",
            self.setting, self.actual, self.required, self.why
        )
    }
}

/// Why [`ensure_topic`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic exists with settings that lose confirmed messages when a broker fails. Alter
    /// the topic (`kafka-configs --alter`, partition reassignment) or recreate it.
    #[error("topic `{topic}` is unsafe: {}; alter or recreate the topic", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unsafe {
        /// The topic.
        topic: String,
        /// Every unsafe setting found.
        problems: Vec<TopicProblem>,
    },
    /// The requested spec itself is unsafe or impossible (replication factor or
    /// `min.insync.replicas` below 2, or `min.insync.replicas` above the replication factor).
    #[error("topic spec for `{topic}` is invalid: {reason}")]
    InvalidSpec {
        /// The topic.
        topic: String,
        /// What is wrong.
        reason: String,
    },
    /// The cluster could not be asked (unreachable, not authorized, timed out). Check
    /// `bootstrap.servers`, credentials and the brokers, then retry.
    #[error("could not check topic `{topic}` on the cluster: {reason}; check bootstrap.servers, credentials and the brokers")]
    Admin {
        /// The topic.
        topic: String,
        /// What the client reported (credentials redacted).
        reason: String,
    },
    /// The cluster refused the client's TLS handshake or login: see [`SecurityError`] for what
    /// to check.
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// What [`ensure_topic`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicStatus {
    /// Whether this call created the topic.
    pub created: bool,
    /// Partition count.
    pub partitions: usize,
    /// The smallest replica count over the partitions.
    pub replication_factor: usize,
    /// The topic's effective `min.insync.replicas`.
    pub min_insync_replicas: i32,
    /// Partitions whose in-sync replica set is below `min.insync.replicas` now.
    pub under_min_isr: Vec<i32>,
}

/// The connection and security settings of `config` that an admin client needs.
pub(crate) fn admin_config(config: &ClientConfig) -> ClientConfig {
    let mut admin = ClientConfig::new();
    for name in config.config_map().into_keys() {
        // `config_map` masks secrets; copy the real values.
        let Some(value) = config.get(name) else {
            continue;
        };
        let keep = name == "bootstrap.servers"
            || name == "metadata.broker.list"
            || name == "client.id"
            || name.starts_with("security.")
            || name.starts_with("sasl.")
            || name.starts_with("ssl.")
            || name.starts_with("socket.")
            || name.starts_with("broker.");
        if keep {
            admin.set(name, value);
        }
    }
    // Metadata requests for a missing topic must not create it with the broker's defaults.
    admin.set("allow.auto.create.topics", "false");
    admin
}

/// Creates topic `spec.name` with safe settings, or verifies the existing topic against the live
/// cluster; see the module docs. `client` supplies the connection settings
/// (`bootstrap.servers`, security); other settings in it are ignored. With TLS or SASL
/// settings, a refused handshake or login is [`TopicError::Security`].
pub async fn ensure_topic(
    client: &ClientConfig,
    spec: &TopicSpec,
) -> Result<TopicStatus, TopicError> {
    let topic = spec.name.clone();
    let invalid = |reason: String| TopicError::InvalidSpec {
        topic: topic.clone(),
        reason,
    };
    if spec.replication_factor < 2 {
        return Err(invalid(format!(
            "replication factor {} keeps a single copy; use at least 2 (3 recommended)",
            spec.replication_factor
        )));
    }
    if spec.min_insync_replicas < 2 || spec.min_insync_replicas > spec.replication_factor {
        return Err(invalid(format!(
            "min.insync.replicas {} must be between 2 and the replication factor {}",
            spec.min_insync_replicas, spec.replication_factor
        )));
    }
    if spec.partitions < 1 {
        return Err(invalid(format!(
            "{} partitions; use at least 1",
            spec.partitions
        )));
    }
    // A TLS or login failure is named as such, not left to end in a metadata timeout.
    security::probe(client).await?;
    let cfg = admin_config(client);
    let admin_err = |reason: String| TopicError::Admin {
        topic: topic.clone(),
        reason: redact(&cfg, reason),
    };
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(cfg.create().map_err(|e| admin_err(e.to_string()))?);

    let mut created = false;
    if fetch_topic(&admin, &topic, spec.timeout)
        .await
        .map_err(&admin_err)?
        .is_none()
    {
        let min_isr = spec.min_insync_replicas.to_string();
        let new = NewTopic::new(
            &topic,
            spec.partitions,
            TopicReplication::Fixed(spec.replication_factor),
        )
        .set("min.insync.replicas", &min_isr)
        .set("unclean.leader.election.enable", "false");
        let opts = AdminOptions::new()
            .request_timeout(Some(spec.timeout))
            .operation_timeout(Some(spec.timeout));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| admin_err(e.to_string()))?;
        for result in results {
            match result {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(admin_err(format!("create_topics failed: {code}"))),
            }
        }
        if created {
            tracing::info!(topic = %topic, partitions = spec.partitions, rf = spec.replication_factor, min_isr = spec.min_insync_replicas, "created topic");
        }
    }

    // The new topic's metadata can lag its creation for a moment.
    let mut partitions = None;
    for _ in 0..50 {
        if let Some(p) = fetch_topic(&admin, &topic, spec.timeout)
            .await
            .map_err(&admin_err)?
            .filter(|p| !p.is_empty())
        {
            partitions = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let partitions = partitions
        .ok_or_else(|| admin_err("topic metadata did not appear after creation".into()))?;

    // A broker that has not yet applied a just-created topic answers without its entries.
    let mut resource = None;
    for _ in 0..25 {
        let r = describe(&admin, &topic, spec.timeout)
            .await
            .map_err(&admin_err)?;
        let complete = REQUIRED_CONFIGS
            .iter()
            .all(|n| r.get(n).is_some_and(|e| e.value.is_some()));
        resource = Some(r);
        if complete {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resource = resource.ok_or_else(|| admin_err("describe_configs returned nothing".into()))?;
    let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());

    let mut problems = Vec::new();
    let rf = partitions.iter().map(|p| p.replicas).min().unwrap_or(0);
    if (rf as i64) < i64::from(spec.replication_factor) {
        problems.push(TopicProblem {
            setting: "replication.factor",
            actual: rf.to_string(),
            required: format!(">= {}", spec.replication_factor),
            why: "too few copies: losing the broker(s) holding them loses confirmed messages",
        });
    }
    let min_isr_text = value("min.insync.replicas").unwrap_or_else(|| "unknown".into());
    let min_isr: i32 = min_isr_text.parse().unwrap_or(0);
    if min_isr < spec.min_insync_replicas {
        problems.push(TopicProblem {
            setting: "min.insync.replicas",
            actual: min_isr_text,
            required: format!(">= {}", spec.min_insync_replicas),
            why: "an acks=all write is confirmed while only the leader has it; a leader crash then loses it",
        });
    }
    let unclean = value("unclean.leader.election.enable").unwrap_or_else(|| "unknown".into());
    if unclean != "false" {
        problems.push(TopicProblem {
            setting: "unclean.leader.election.enable",
            actual: unclean,
            required: "false".into(),
            why: "an out-of-sync replica may become leader and truncate confirmed messages",
        });
    }
    if !problems.is_empty() {
        return Err(TopicError::Unsafe { topic, problems });
    }

    let under_min_isr: Vec<i32> = partitions
        .iter()
        .filter(|p| (p.isr as i64) < i64::from(min_isr))
        .map(|p| p.id)
        .collect();
    for p in &partitions {
        if (p.isr as i64) < i64::from(min_isr) {
            tracing::warn!(topic = %topic, partition = p.id, isr = p.isr, min_isr, "partition is below min.insync.replicas now; acks=all writes to it fail until a follower catches up");
        }
    }
    Ok(TopicStatus {
        created,
        partitions: partitions.len(),
        replication_factor: rf,
        min_insync_replicas: min_isr,
        under_min_isr,
    })
}

/// The topic configs the check reads.
const REQUIRED_CONFIGS: [&str; 2] = ["min.insync.replicas", "unclean.leader.election.enable"];

/// The topic's effective configuration (its own settings and the broker defaults it inherits).
async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<ConfigResource, String> {
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "describe_configs returned nothing".to_owned())?
        .map_err(|code| format!("describe_configs failed: {code}"))
}

/// What the check needs of one partition.
struct PartitionInfo {
    id: i32,
    replicas: usize,
    isr: usize,
}

/// The topic's partitions, `None` when it does not exist.
async fn fetch_topic(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<Vec<PartitionInfo>>, String> {
    let admin = admin.clone();
    let name = topic.to_owned();
    let metadata: Metadata =
        tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(Some(&name), timeout))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None => Ok(Some(
            t.partitions()
                .iter()
                .map(|p| PartitionInfo {
                    id: p.id(),
                    replicas: p.replicas().len(),
                    isr: p.isr().len(),
                })
                .collect(),
        )),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Ok(None)
        }
        Some(RDKafkaErrorCode::LeaderNotAvailable) => Ok(Some(Vec::new())),
        Some(code) => Err(format!("metadata for the topic failed: {code}")),
    }
}
