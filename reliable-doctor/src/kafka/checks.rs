//! The Kafka checks: what the cluster's metadata, `DescribeConfigs` and a group's committed
//! offsets say, turned into findings (row L6 of the loss matrix, and L5's committed offsets).
//! Pure functions, so the rules are tested without a cluster.

use crate::{Broker, Finding, Severity};

/// One partition as the cluster's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// The partition number.
    pub id: i32,
    /// The leader's broker id; negative when the partition has none.
    pub leader: i32,
    /// How many replicas it has.
    pub replicas: usize,
    /// How many replicas are in sync.
    pub isr: usize,
}

/// A topic setting and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The value, as the broker reports it.
    pub value: String,
    /// `topic` when set on the topic, otherwise which default it is (`broker default`, ...).
    pub source: String,
}

/// One topic: its partitions and the settings the checks read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicView {
    /// The topic's name.
    pub name: String,
    /// Its partitions.
    pub partitions: Vec<PartitionView>,
    /// `min.insync.replicas`; `None` when it could not be read.
    pub min_insync: Option<Setting>,
    /// `unclean.leader.election.enable`; `None` when it could not be read.
    pub unclean_election: Option<Setting>,
}

/// The checks of one topic.
pub fn check_topic(topic: &TopicView) -> Vec<Finding> {
    let mut out = Vec::new();
    let name = topic.name.as_str();
    let finding = |object: String, check: &str, severity, meaning: String, action: &str| {
        Finding::new(Broker::Kafka, object, check, severity, meaning, action)
    };
    if let Some(rf) = topic.partitions.iter().map(|p| p.replicas).min() {
        if rf < 3 {
            let severity = if rf < 2 {
                Severity::Unsafe
            } else {
                Severity::Warning
            };
            out.push(finding(
                name.into(),
                "kafka-replication-below-3",
                severity,
                format!(
                    "replication factor {rf}: losing {} broker(s) loses acknowledged records \
                     or blocks acks=all writes",
                    rf.saturating_sub(1).max(1)
                ),
                "raise it to 3 (kafka-reassign-partitions), or create the topic again with \
                 RF 3",
            ));
        }
    }
    let min_insync = topic
        .min_insync
        .as_ref()
        .and_then(|s| s.value.trim().parse::<usize>().ok().map(|v| (v, s)));
    match min_insync {
        Some((value, setting)) if value < 2 => out.push(finding(
            name.into(),
            "kafka-min-insync-below-2",
            Severity::Unsafe,
            format!(
                "min.insync.replicas {value} ({}): acks=all is confirmed by the leader alone, \
                 which loses the record if it dies next",
                setting.source
            ),
            "set min.insync.replicas=2 on the topic (kafka-configs --alter)",
        )),
        Some(_) => {}
        None => out.push(finding(
            name.into(),
            "kafka-config-unreadable",
            Severity::Warning,
            "min.insync.replicas could not be read, so it was not checked".into(),
            "grant DescribeConfigs on the topic to the auditing user and run the doctor again",
        )),
    }
    if let Some(setting) = &topic.unclean_election {
        if setting.value.trim().eq_ignore_ascii_case("true") {
            out.push(finding(
                name.into(),
                "kafka-unclean-election-enabled",
                Severity::Unsafe,
                format!(
                    "unclean.leader.election.enable=true ({}): an out-of-sync replica can \
                     become leader and drop acknowledged records",
                    setting.source
                ),
                "set unclean.leader.election.enable=false on the topic and the brokers",
            ));
        }
    }
    for p in &topic.partitions {
        let object = format!("{name}/{}", p.id);
        if p.leader < 0 {
            out.push(finding(
                object.clone(),
                "kafka-partition-no-leader",
                Severity::Unsafe,
                "the partition has no leader: it accepts no writes and serves no reads".into(),
                "bring its replicas' brokers back; check the controller's log",
            ));
        }
        if let Some((min, _)) = min_insync {
            if p.isr < min {
                out.push(finding(
                    object,
                    "kafka-isr-below-min-insync",
                    Severity::Unsafe,
                    format!(
                        "{} in-sync replica(s), fewer than min.insync.replicas {min}: acks=all \
                         writes fail and the data lives on fewer copies than required",
                        p.isr
                    ),
                    "bring the lagging or lost replicas' brokers back (or reassign the \
                     partition)",
                ));
            }
        }
    }
    out
}

/// What a consumer group has committed on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The committed offset; `None` when the group has committed none.
    pub committed: Option<i64>,
    /// The partition's low and high watermarks, when read.
    pub watermarks: Option<(i64, i64)>,
}

/// The checks of one consumer group over the partitions of the audited topics.
pub fn check_group(group: &str, partitions: &[GroupPartition]) -> Vec<Finding> {
    let mut out = Vec::new();
    let consumed: Vec<&str> = {
        let mut topics: Vec<&str> = partitions
            .iter()
            .filter(|p| p.committed.is_some())
            .map(|p| p.topic.as_str())
            .collect();
        topics.dedup();
        topics
    };
    if consumed.is_empty() {
        out.push(Finding::new(
            Broker::Kafka,
            group,
            "kafka-group-no-committed-offsets",
            Severity::Warning,
            "the group has committed no offset on the audited topics: on restart it starts at \
             auto.offset.reset (with latest, it skips what arrived meanwhile)",
            "check the group name and that its consumers commit (the SDK commits after each \
             handled record)",
        ));
        return out;
    }
    for p in partitions {
        if !consumed.contains(&p.topic.as_str()) {
            continue;
        }
        let object = format!("{group}/{}/{}", p.topic, p.partition);
        match (p.committed, p.watermarks) {
            (None, _) => out.push(Finding::new(
                Broker::Kafka,
                object,
                "kafka-group-partition-uncommitted",
                Severity::Warning,
                "the group consumes this topic but committed no offset on this partition: it \
                 starts at auto.offset.reset there",
                "set auto.offset.reset=earliest for the group's consumers, and check that the \
                 partition is assigned",
            )),
            (Some(committed), Some((low, high))) => {
                if committed < low {
                    out.push(Finding::new(
                        Broker::Kafka,
                        object.clone(),
                        "kafka-group-offset-before-log-start",
                        Severity::Unsafe,
                        format!(
                            "committed offset {committed} is below the log start {low}: \
                             {} record(s) were deleted by retention before the group read them",
                            low - committed
                        ),
                        "raise the topic's retention above the group's worst lag, and make \
                         the consumers keep up",
                    ));
                }
                let lag = high - committed;
                if lag > 0 {
                    out.push(Finding::new(
                        Broker::Kafka,
                        object,
                        "kafka-group-lag",
                        Severity::Info,
                        format!("lag {lag}: high watermark {high}, committed offset {committed}"),
                        "nothing, unless the lag keeps growing: then add consumers (up to the \
                         partition count)",
                    ));
                }
            }
            (Some(_), None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(rf: usize, isr: usize, min: &str, unclean: &str) -> TopicView {
        let setting = |v: &str| {
            Some(Setting {
                value: v.into(),
                source: "topic".into(),
            })
        };
        TopicView {
            name: "t".into(),
            partitions: vec![PartitionView {
                id: 0,
                leader: 1,
                replicas: rf,
                isr,
            }],
            min_insync: setting(min),
            unclean_election: setting(unclean),
        }
    }

    fn checks(findings: &[Finding]) -> Vec<&str> {
        findings.iter().map(|f| f.check.as_str()).collect()
    }

    #[test]
    fn a_safe_topic_has_no_finding() {
        assert!(check_topic(&topic(3, 3, "2", "false")).is_empty());
    }

    #[test]
    fn each_unsafe_setting_is_named() {
        assert_eq!(
            checks(&check_topic(&topic(1, 1, "1", "false"))),
            ["kafka-replication-below-3", "kafka-min-insync-below-2"]
        );
        assert_eq!(
            checks(&check_topic(&topic(3, 1, "2", "true"))),
            [
                "kafka-unclean-election-enabled",
                "kafka-isr-below-min-insync"
            ]
        );
        let mut leaderless = topic(3, 3, "2", "false");
        leaderless.partitions[0].leader = -1;
        assert_eq!(
            checks(&check_topic(&leaderless)),
            ["kafka-partition-no-leader"]
        );
    }

    #[test]
    fn group_lag_gaps_and_retention_losses() {
        let p = |partition, committed, marks| GroupPartition {
            topic: "t".into(),
            partition,
            committed,
            watermarks: marks,
        };
        assert_eq!(
            checks(&check_group("g", &[p(0, None, None)])),
            ["kafka-group-no-committed-offsets"]
        );
        let found = check_group(
            "g",
            &[
                p(0, Some(10), Some((0, 10))),
                p(1, Some(5), Some((0, 8))),
                p(2, None, None),
                p(3, Some(2), Some((4, 9))),
            ],
        );
        assert_eq!(
            checks(&found),
            [
                "kafka-group-lag",
                "kafka-group-partition-uncommitted",
                "kafka-group-offset-before-log-start",
                "kafka-group-lag"
            ]
        );
        assert_eq!(found[0].object, "g/t/1");
    }
}
