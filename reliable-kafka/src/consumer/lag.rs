//! Consumer lag per partition ([`KafkaConsumer::lag`](super::KafkaConsumer::lag)), the
//! pipeline's [`PipelineHealth::lag`](reliable_core::pipeline::PipelineHealth::lag) and the
//! `reliable_commit_lag{topic, partition}` gauge ([`CommitLagGauge`]).
//!
//! # What is counted
//!
//! For each partition this consumer owns: the partition's end offset minus the consumer
//! group's committed offset (never below 0), that is every record a restart of the group
//! would read again or for the first time: records not fetched yet, records held or handed out
//! and not yet committed.
//!
//! * **End offset**: the last stable offset under `isolation.level=read_committed`
//!   (librdkafka's default, which the preset keeps: records of open transactions are not
//!   counted), else the high watermark. librdkafka learns it from every fetch response and
//!   reports it in its statistics every `statistics.interval.ms` (the builder sets 1 s unless
//!   the config sets it; `0` turns statistics, and so the lag, off). No request is added.
//!   Statistics are served while the consumer is polled, which the pipeline does while it
//!   takes deliveries; a consumer not polled for longer than `max.poll.interval.ms` leaves its
//!   group anyway.
//! * **Committed offset**: the newer of this consumer's own last commit (known as soon as the
//!   commit returns) and the group's committed offset as librdkafka reports it (it reads it
//!   when a partition is assigned). While the group has no commit for a partition, the
//!   partition's log start offset, where the group starts reading
//!   (`auto.offset.reset=earliest`, the preset's); with `latest` (an opt-out) the lag of such
//!   a partition is unknown until the first commit.
//!
//! # Revoke
//!
//! A partition revoked or lost in a rebalance leaves the view at once, and its gauge series
//! is set to 0: the `metrics` facade cannot remove a series, and a lag left at its last value
//! would be counted twice once the partition's new owner reports it (a Prometheus exporter's
//! idle timeout drops series that stay unchanged). A partition's series is registered only
//! once its lag is first known.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::statistics::Statistics;
use rdkafka::ClientConfig;
use reliable_core::metrics::CommitLagGauge;
use reliable_core::transport::ConsumerLag;
use reliable_core::TopicPartition;

/// A live view of a [`KafkaConsumer`](super::KafkaConsumer)'s lag per owned partition; see
/// the [module docs](self) for what is counted. Cheap to clone; stays readable after the
/// consumer moved into a pipeline (and after it is dropped, then empty of news).
///
/// ```no_run
/// use reliable_kafka::{KafkaConsumer, TopicSpec};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let consumer = KafkaConsumer::builder("127.0.0.1:19092", "billing")
///     .subscribe(TopicSpec::new("orders"))
///     .build()
///     .await?;
/// let lag = consumer.lag(); // before the consumer moves into a Pipeline
/// // ... later, from a probe or a report:
/// for p in lag.partitions() {
///     println!("{}: {:?} records behind", p.partition, p.lag);
/// }
/// println!("total: {:?}", lag.total());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct KafkaLag(Arc<LagBook>);

impl KafkaLag {
    /// Per owned partition, in topic and partition order: its lag and the offsets behind it.
    pub fn partitions(&self) -> Vec<PartitionLag> {
        let book = &self.0;
        book.lock()
            .iter()
            .map(|(tp, entry)| PartitionLag {
                partition: tp.clone(),
                lag: entry.lag(book.from_log_start),
                end_offset: entry.end,
                committed: entry.committed,
            })
            .collect()
    }

    /// The lag summed over the owned partitions whose lag is known; `None` while none is
    /// (nothing assigned yet, or no statistics yet). [`partitions`](Self::partitions) says
    /// which ones are unknown.
    pub fn total(&self) -> Option<u64> {
        let book = &self.0;
        book.lock()
            .values()
            .filter_map(|entry| entry.lag(book.from_log_start))
            .reduce(u64::saturating_add)
    }
}

impl ConsumerLag for KafkaLag {
    fn total(&self) -> Option<u64> {
        KafkaLag::total(self)
    }
}

/// One owned partition's lag; see [`KafkaLag::partitions`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// `end_offset` minus the group's committed offset (the log start while the group has
    /// none), at least 0; `None` while either is unknown.
    pub lag: Option<u64>,
    /// The partition's end (last stable offset or high watermark, see the
    /// [module docs](self)) as librdkafka last reported it.
    pub end_offset: Option<i64>,
    /// The group's committed offset: this consumer's last commit, or what librdkafka read
    /// from the group at assignment. `None` while the group has no commit for it.
    pub committed: Option<i64>,
}

/// The lag state behind [`KafkaLag`], kept with the consumer's shared state.
#[derive(Debug)]
pub(super) struct LagBook {
    /// The end is the last stable offset (`read_committed`), else the high watermark.
    stable_end: bool,
    /// A partition without a commit is read from its log start (`auto.offset.reset`
    /// `earliest`).
    from_log_start: bool,
    parts: Mutex<BTreeMap<TopicPartition, Entry>>,
}

/// What is known of one owned partition.
#[derive(Debug, Default)]
struct Entry {
    end: Option<i64>,
    committed: Option<i64>,
    log_start: Option<i64>,
    /// Registered once the lag is first known.
    gauge: Option<CommitLagGauge>,
}

impl Entry {
    fn lag(&self, from_log_start: bool) -> Option<u64> {
        let end = self.end?;
        let from = match self.committed {
            Some(committed) => committed,
            None if from_log_start => self.log_start?,
            None => return None,
        };
        Some(u64::try_from(end.saturating_sub(from)).unwrap_or(0))
    }

    /// Sets the gauge of `tp` to the lag, once it is known.
    fn publish(&mut self, tp: &TopicPartition, from_log_start: bool) {
        if let Some(lag) = self.lag(from_log_start) {
            self.gauge
                .get_or_insert_with(|| CommitLagGauge::new(tp))
                .set(lag);
        }
    }
}

/// A librdkafka offset, `None` for its "invalid" and logical values (all negative).
fn known(offset: i64) -> Option<i64> {
    (offset >= 0).then_some(offset)
}

impl LagBook {
    /// An empty book for a consumer created from `config`.
    pub(super) fn new(config: &ClientConfig) -> Self {
        let stable_end = config
            .get("isolation.level")
            .is_none_or(|level| level.eq_ignore_ascii_case("read_committed"));
        let from_log_start = config.get("auto.offset.reset").is_none_or(|reset| {
            ["earliest", "smallest", "beginning"]
                .iter()
                .any(|e| reset.eq_ignore_ascii_case(e))
        });
        Self {
            stable_end,
            from_log_start,
            parts: Mutex::default(),
        }
    }

    /// The live view.
    pub(super) fn view(self: &Arc<Self>) -> KafkaLag {
        KafkaLag(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<TopicPartition, Entry>> {
        // Every critical section is a few map operations: the state stays consistent.
        self.parts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `parts` were assigned to this consumer.
    pub(super) fn assigned(&self, parts: impl IntoIterator<Item = TopicPartition>) {
        let mut book = self.lock();
        for tp in parts {
            book.entry(tp).or_default();
        }
    }

    /// `tp` was revoked or lost: it leaves the view and its series goes to 0.
    pub(super) fn revoked(&self, tp: &TopicPartition) {
        if let Some(entry) = self.lock().remove(tp) {
            if let Some(gauge) = entry.gauge {
                gauge.set(0);
            }
        }
    }

    /// This consumer committed `position` for `tp`.
    pub(super) fn committed(&self, tp: &TopicPartition, position: i64) {
        let mut book = self.lock();
        if let Some(entry) = book.get_mut(tp) {
            entry.committed = entry.committed.max(Some(position));
            entry.publish(tp, self.from_log_start);
        }
    }

    /// librdkafka's statistics arrived: the owned partitions' end, log start and committed
    /// offsets, and their gauges.
    pub(super) fn report(&self, stats: &Statistics) {
        let mut book = self.lock();
        for (tp, entry) in book.iter_mut() {
            let Some(p) = stats
                .topics
                .get(&*tp.topic)
                .and_then(|topic| topic.partitions.get(&tp.partition))
            else {
                continue;
            };
            let end = if self.stable_end {
                p.ls_offset
            } else {
                p.hi_offset
            };
            if let Some(end) = known(end) {
                entry.end = Some(end);
            }
            if let Some(start) = known(p.lo_offset) {
                entry.log_start = Some(start);
            }
            entry.committed = entry.committed.max(known(p.committed_offset));
            entry.publish(tp, self.from_log_start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(config: &[(&str, &str)]) -> Arc<LagBook> {
        let mut c = ClientConfig::new();
        for (k, v) in config {
            c.set(*k, *v);
        }
        Arc::new(LagBook::new(&c))
    }

    #[test]
    fn lag_is_end_minus_commit_and_unknown_until_both_are_known() {
        let book = book(&[]);
        let tp = TopicPartition::new("t", 0);
        book.assigned([tp.clone()]);
        let view = book.view();
        assert_eq!(view.total(), None);
        assert_eq!(view.partitions()[0].lag, None);
        {
            let mut parts = book.lock();
            let entry = parts.get_mut(&tp).unwrap();
            entry.end = Some(10);
            entry.log_start = Some(0);
        }
        assert_eq!(view.total(), Some(10), "no commit yet: from the log start");
        book.committed(&tp, 7);
        assert_eq!(view.total(), Some(3));
        book.committed(&tp, 5);
        assert_eq!(
            view.total(),
            Some(3),
            "an older position never moves it back"
        );
        book.revoked(&tp);
        assert_eq!(view.total(), None);
        assert!(view.partitions().is_empty());
    }

    #[test]
    fn latest_reset_leaves_an_uncommitted_partition_unknown() {
        let book = book(&[("auto.offset.reset", "latest")]);
        let tp = TopicPartition::new("t", 0);
        book.assigned([tp.clone()]);
        {
            let mut parts = book.lock();
            let entry = parts.get_mut(&tp).unwrap();
            entry.end = Some(10);
            entry.log_start = Some(0);
        }
        assert_eq!(book.view().total(), None);
        book.committed(&tp, 4);
        assert_eq!(book.view().total(), Some(6));
    }
}
