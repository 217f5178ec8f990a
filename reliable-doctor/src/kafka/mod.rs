//! Kafka: topics and partitions from the cluster's metadata, `min.insync.replicas` and
//! `unclean.leader.election.enable` from `DescribeConfigs` (which reports the broker's default
//! when the topic sets none), and consumer groups' committed offsets against the partitions'
//! watermarks. Internal topics (names starting with `__`) are skipped.
//!
//! With [`Options::kafka_security`], every client speaks TLS (and logs in with SASL/SCRAM)
//! through the SDK's [`KafkaSecurity`](reliable_kafka::KafkaSecurity), and the audit first
//! makes the SDK's connection check, so a CA that did not sign the brokers' certificates or a
//! wrong password is a typed [`DoctorError::KafkaSecurity`] at once, not a timeout.

pub mod checks;

use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use reliable_core::redact::{is_secret_key, redact_url, Scrubber};

use crate::{DoctorError, Finding, Options, Report};
use checks::{GroupPartition, PartitionView, Setting, TopicView};

/// Runs the Kafka part of the audit into `report`. rdkafka's metadata and offset calls block,
/// so the audit runs on a blocking thread.
pub(crate) async fn audit(
    bootstrap: &str,
    options: &Options,
    report: &mut Report,
) -> Result<(), DoctorError> {
    if options.kafka_security.is_some() {
        reliable_kafka::security::check_connection(&client_config(bootstrap, options))
            .await
            .map_err(|source| DoctorError::KafkaSecurity {
                bootstrap: redact_url(bootstrap),
                source,
            })?;
    }
    let runtime = tokio::runtime::Handle::current();
    let bootstrap = bootstrap.to_owned();
    let options = options.clone();
    let (audited, findings) =
        tokio::task::spawn_blocking(move || Audit::new(&bootstrap, &options)?.run(&runtime))
            .await
            .map_err(|e| DoctorError::Worker(e.to_string()))??;
    report.audited.topics += audited.0;
    report.audited.groups += audited.1;
    report.findings.extend(findings);
    Ok(())
}

struct Audit<'a> {
    bootstrap: &'a str,
    options: &'a Options,
    consumer: BaseConsumer,
    admin: AdminClient<DefaultClientContext>,
    /// The SASL user name and password, kept out of every error text.
    scrubber: Scrubber,
}

impl<'a> Audit<'a> {
    fn new(bootstrap: &'a str, options: &'a Options) -> Result<Self, DoctorError> {
        let config = client_config(bootstrap, options);
        let mut scrubber = Scrubber::default();
        for name in config.config_map().into_keys() {
            // `config_map` masks librdkafka's known secrets; read the real values.
            if let Some(value) = config.get(name).filter(|_| is_secret_key(name)) {
                scrubber.add(value);
            }
        }
        let consumer = config
            .create()
            .map_err(|e| kafka_error(bootstrap, &scrubber, "creating a client", e))?;
        let admin = config
            .create()
            .map_err(|e| kafka_error(bootstrap, &scrubber, "creating an admin client", e))?;
        Ok(Self {
            bootstrap,
            options,
            consumer,
            admin,
            scrubber,
        })
    }

    /// A [`DoctorError::Kafka`] for `step`, secrets scrubbed.
    fn error(&self, step: &'static str, e: impl std::fmt::Display) -> DoctorError {
        kafka_error(self.bootstrap, &self.scrubber, step, e)
    }

    /// Audits the topics, then the groups: (topics, groups) audited, and the findings.
    fn run(
        &self,
        runtime: &tokio::runtime::Handle,
    ) -> Result<((usize, usize), Vec<Finding>), DoctorError> {
        let timeout = self.options.timeout;
        let metadata = self
            .consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| self.error("reading the cluster's metadata", e))?;
        let mut topics: Vec<TopicView> = metadata
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__") && self.options.selects(t.name()))
            .map(|t| TopicView {
                name: t.name().to_owned(),
                partitions: t
                    .partitions()
                    .iter()
                    .map(|p| PartitionView {
                        id: p.id(),
                        leader: p.leader(),
                        replicas: p.replicas().len(),
                        isr: p.isr().len(),
                    })
                    .collect(),
                min_insync: None,
                unclean_election: None,
            })
            .collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let broker = metadata.brokers().first().map(|b| b.id());
        runtime.block_on(self.read_configs(&mut topics, broker))?;
        let mut findings: Vec<Finding> = topics.iter().flat_map(checks::check_topic).collect();
        let groups = self.groups()?;
        for group in &groups {
            findings.extend(checks::check_group(group, &self.committed(group, &topics)?));
        }
        Ok(((topics.len(), groups.len()), findings))
    }

    /// Fills each topic's settings from `DescribeConfigs`; a value the topic does not report
    /// is taken from broker `broker`'s configuration.
    async fn read_configs(
        &self,
        topics: &mut [TopicView],
        broker: Option<i32>,
    ) -> Result<(), DoctorError> {
        if topics.is_empty() {
            return Ok(());
        }
        let options = AdminOptions::new().request_timeout(Some(self.options.timeout));
        let specifiers: Vec<ResourceSpecifier<'_>> = topics
            .iter()
            .map(|t| ResourceSpecifier::Topic(t.name.as_str()))
            .collect();
        let described = self
            .admin
            .describe_configs(specifiers.iter(), &options)
            .await
            .map_err(|e| self.error("describing the topics' configs", e))?;
        let mut broker_defaults: Option<(Option<Setting>, Option<Setting>)> = None;
        for (topic, result) in topics.iter_mut().zip(described) {
            // A topic deleted meanwhile or not readable: its settings stay unknown and the
            // checks say so.
            let Ok(resource) = result else { continue };
            let read = |name: &str| {
                resource.get(name).and_then(|entry| {
                    entry.value.clone().map(|value| Setting {
                        value,
                        source: source_name(&entry.source).to_owned(),
                    })
                })
            };
            topic.min_insync = read("min.insync.replicas");
            topic.unclean_election = read("unclean.leader.election.enable");
            if topic.min_insync.is_none() || topic.unclean_election.is_none() {
                if broker_defaults.is_none() {
                    broker_defaults = Some(self.broker_defaults(broker, &options).await);
                }
                if let Some((min, unclean)) = &broker_defaults {
                    topic.min_insync = topic.min_insync.take().or_else(|| min.clone());
                    topic.unclean_election =
                        topic.unclean_election.take().or_else(|| unclean.clone());
                }
            }
        }
        Ok(())
    }

    /// The broker's `min.insync.replicas` and `unclean.leader.election.enable`.
    async fn broker_defaults(
        &self,
        broker: Option<i32>,
        options: &AdminOptions,
    ) -> (Option<Setting>, Option<Setting>) {
        let Some(id) = broker else {
            return (None, None);
        };
        let spec = [ResourceSpecifier::Broker(id)];
        let Ok(mut described) = self.admin.describe_configs(spec.iter(), options).await else {
            return (None, None);
        };
        let Some(Ok(resource)) = described.pop() else {
            return (None, None);
        };
        let read = |name: &str| {
            resource.get(name).and_then(|e| {
                e.value.clone().map(|value| Setting {
                    value,
                    source: format!("broker {id}"),
                })
            })
        };
        (
            read("min.insync.replicas"),
            read("unclean.leader.election.enable"),
        )
    }

    /// The groups to audit: those named, and with `all_groups` those the cluster lists.
    fn groups(&self) -> Result<Vec<String>, DoctorError> {
        let mut groups = self.options.groups.clone();
        if self.options.all_groups {
            let list = self
                .consumer
                .fetch_group_list(None, self.options.timeout)
                .map_err(|e| self.error("listing the consumer groups", e))?;
            groups.extend(
                list.groups()
                    .iter()
                    .map(|g| g.name().to_owned())
                    .filter(|name| self.options.selects(name)),
            );
        }
        groups.sort();
        groups.dedup();
        Ok(groups)
    }

    /// What `group` committed on every partition of `topics`, with the watermarks of the
    /// partitions it committed on.
    fn committed(
        &self,
        group: &str,
        topics: &[TopicView],
    ) -> Result<Vec<GroupPartition>, DoctorError> {
        let mut list = TopicPartitionList::new();
        for topic in topics {
            for p in &topic.partitions {
                list.add_partition(&topic.name, p.id);
            }
        }
        if list.count() == 0 {
            return Ok(Vec::new());
        }
        // A consumer with the group's id only reads its offsets: it never subscribes, so it
        // joins no group and moves no partition.
        let consumer: BaseConsumer = client_config(self.bootstrap, self.options)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| self.error("creating a group client", e))?;
        let committed = consumer
            .committed_offsets(list, self.options.timeout)
            .map_err(|e| self.error("reading committed offsets", e))?;
        let mut out = Vec::new();
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            };
            let watermarks = match offset {
                Some(_) => self
                    .consumer
                    .fetch_watermarks(element.topic(), element.partition(), self.options.timeout)
                    .ok(),
                None => None,
            };
            out.push(GroupPartition {
                topic: element.topic().to_owned(),
                partition: element.partition(),
                committed: offset,
                watermarks,
            });
        }
        Ok(out)
    }
}

/// The settings every client of the audit shares: the brokers, the timeout and the security.
fn client_config(bootstrap: &str, options: &Options) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set(
            "socket.timeout.ms",
            options.timeout.as_millis().clamp(10, 300_000).to_string(),
        )
        // Connection failures come back as errors of the calls; no log lines on stderr.
        .set("log_level", "0");
    if let Some(security) = &options.kafka_security {
        security.apply(&mut config);
    }
    config
}

fn source_name(source: &ConfigSource) -> &'static str {
    match source {
        ConfigSource::DynamicTopic => "topic",
        ConfigSource::DynamicBroker => "broker setting",
        ConfigSource::DynamicDefaultBroker => "cluster-wide broker setting",
        ConfigSource::StaticBroker => "broker default",
        ConfigSource::Default => "Kafka's default",
        ConfigSource::Unknown => "source unknown",
    }
}

fn kafka_error(
    bootstrap: &str,
    scrubber: &Scrubber,
    step: &'static str,
    e: impl std::fmt::Display,
) -> DoctorError {
    DoctorError::Kafka {
        bootstrap: redact_url(bootstrap),
        step,
        reason: scrubber.scrub(&e.to_string()),
    }
}
