//! Metric names and the one place that records them (feature `metrics`), through the
//! [`metrics`](https://docs.rs/metrics/0.24) crate facade: install any recorder (for example
//! `metrics-exporter-prometheus`) and the producer and the consumer pipeline report into it.
//!
//! | name | kind | labels | counted when |
//! |---|---|---|---|
//! | [`PUBLISHED_TOTAL`] `reliable_published_total` | counter | `transport` | a message was accepted by `Producer::send*` (as `ProducerStats::sent`) |
//! | [`CONFIRMED_TOTAL`] `reliable_confirmed_total` | counter | `transport` | the broker confirmed a message |
//! | [`RESENT_TOTAL`] `reliable_resent_total` | counter | `transport`, `cause`: `nack`, `timeout`, `connection_lost`, `busy` | a message was sent again |
//! | [`HANDED_BACK_TOTAL`] `reliable_handed_back_total` | counter | `transport`, `cause`: `refused`, `attempts_exhausted`, `deadline_exceeded`, `other` | a message was handed back to its caller unconfirmed |
//! | [`IN_FLIGHT`] `reliable_in_flight` | gauge | `transport` | messages accepted and not yet confirmed or handed back |
//! | [`CONFIRM_LATENCY_SECONDS`] `reliable_confirm_latency_seconds` | histogram | `transport` | first send to confirm, per confirmed message |
//! | [`CONSUMED_TOTAL`] `reliable_consumed_total` | counter | `transport` | the pipeline took a delivery from its source |
//! | [`ACKED_TOTAL`] `reliable_acked_total` | counter | `transport` | a handler succeeded (duplicates skipped included) and the delivery was acked |
//! | [`REQUEUED_TOTAL`] `reliable_requeued_total` | counter | `transport` | a delivery was nacked back to the broker |
//! | [`DEAD_LETTERED_TOTAL`] `reliable_dead_lettered_total` | counter | `transport` | a delivery was dead-lettered (copy confirmed, or rejected to the broker's dead letter) |
//! | [`DEDUPE_HITS_TOTAL`] `reliable_dedupe_hits_total` | counter | none | `DedupeLayer` skipped a duplicate |
//! | [`HANDLER_LATENCY_SECONDS`] `reliable_handler_latency_seconds` | histogram | `transport` | one handler attempt (a batch call counts once per message) |
//! | [`COMMIT_LAG`] `reliable_commit_lag` | gauge | `topic`, `partition` | records of a partition this consumer owns beyond the group's committed offset (Kafka; see [`CommitLagGauge`]) |
//!
//! `transport` is `amqp`, `kafka`, `memory` or `custom` (see
//! [`Transport::metrics_label`](crate::Transport::metrics_label)). No label ever carries a
//! message id, key or queue name. [`COMMIT_LAG`] is the one metric labelled by topic and
//! partition: lag is only useful per partition (one stuck partition hides in a sum), and the
//! series stay bounded by the partitions of the subscribed topics, each consumer reporting
//! only the ones it owns. So the number of series stays small and fixed.
//!
//! # Cost
//!
//! Without the feature nothing of this is compiled in beyond the names. With it, each
//! producer, pipeline and `DedupeLayer` registers its handles once, when it is built; after
//! that an event costs one branch on a handle (and, with a recorder, the recorder's atomic
//! add), with no allocation and no lookup; a handler call also costs one clock read. So **install the recorder before building
//! producers and pipelines**: handles registered earlier stay no-ops.
//!
//! ```
//! use reliable_core::metrics;
//!
//! assert_eq!(metrics::PUBLISHED_TOTAL, "reliable_published_total");
//! assert!(metrics::ALL.iter().all(|name| name.starts_with("reliable_")));
//! ```

/// Messages accepted by the producer. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::PUBLISHED_TOTAL, "reliable_published_total");
/// ```
pub const PUBLISHED_TOTAL: &str = "reliable_published_total";
/// Messages the broker confirmed. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::CONFIRMED_TOTAL, "reliable_confirmed_total");
/// ```
pub const CONFIRMED_TOTAL: &str = "reliable_confirmed_total";
/// Resends, by `cause`. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::RESENT_TOTAL, "reliable_resent_total");
/// ```
pub const RESENT_TOTAL: &str = "reliable_resent_total";
/// Messages handed back unconfirmed, by `cause`. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::HANDED_BACK_TOTAL, "reliable_handed_back_total");
/// ```
pub const HANDED_BACK_TOTAL: &str = "reliable_handed_back_total";
/// Messages accepted and not yet settled (gauge). See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::IN_FLIGHT, "reliable_in_flight");
/// ```
pub const IN_FLIGHT: &str = "reliable_in_flight";
/// First send to confirm, in seconds (histogram). See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::CONFIRM_LATENCY_SECONDS, "reliable_confirm_latency_seconds");
/// ```
pub const CONFIRM_LATENCY_SECONDS: &str = "reliable_confirm_latency_seconds";
/// Deliveries the pipeline took from its source. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::CONSUMED_TOTAL, "reliable_consumed_total");
/// ```
pub const CONSUMED_TOTAL: &str = "reliable_consumed_total";
/// Deliveries handled and acked. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::ACKED_TOTAL, "reliable_acked_total");
/// ```
pub const ACKED_TOTAL: &str = "reliable_acked_total";
/// Deliveries nacked back to the broker. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::REQUEUED_TOTAL, "reliable_requeued_total");
/// ```
pub const REQUEUED_TOTAL: &str = "reliable_requeued_total";
/// Deliveries dead-lettered. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::DEAD_LETTERED_TOTAL, "reliable_dead_lettered_total");
/// ```
pub const DEAD_LETTERED_TOTAL: &str = "reliable_dead_lettered_total";
/// Duplicates `DedupeLayer` skipped. See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::DEDUPE_HITS_TOTAL, "reliable_dedupe_hits_total");
/// ```
pub const DEDUPE_HITS_TOTAL: &str = "reliable_dedupe_hits_total";
/// One handler attempt, in seconds (histogram). See the [module docs](self).
///
/// ```
/// assert_eq!(reliable_core::metrics::HANDLER_LATENCY_SECONDS, "reliable_handler_latency_seconds");
/// ```
pub const HANDLER_LATENCY_SECONDS: &str = "reliable_handler_latency_seconds";
/// Records of an owned partition beyond the group's committed offset (gauge, labels `topic`
/// and `partition`). See the [module docs](self) and [`CommitLagGauge`].
///
/// ```
/// assert_eq!(reliable_core::metrics::COMMIT_LAG, "reliable_commit_lag");
/// ```
pub const COMMIT_LAG: &str = "reliable_commit_lag";

/// Every metric name above, for dashboards and tests.
///
/// ```
/// assert_eq!(reliable_core::metrics::ALL.len(), 13);
/// ```
pub const ALL: [&str; 13] = [
    PUBLISHED_TOTAL,
    CONFIRMED_TOTAL,
    RESENT_TOTAL,
    HANDED_BACK_TOTAL,
    IN_FLIGHT,
    CONFIRM_LATENCY_SECONDS,
    CONSUMED_TOTAL,
    ACKED_TOTAL,
    REQUEUED_TOTAL,
    DEAD_LETTERED_TOTAL,
    DEDUPE_HITS_TOTAL,
    HANDLER_LATENCY_SECONDS,
    COMMIT_LAG,
];

/// The `transport` label value for a transport or delivery source type, from its Rust path:
/// `amqp`, `kafka`, `memory`, else `custom`. Used by the default
/// [`Transport::metrics_label`](crate::Transport::metrics_label).
///
/// ```
/// use reliable_core::metrics::transport_label;
///
/// assert_eq!(transport_label("reliable_kafka::producer::KafkaTransport"), "kafka");
/// assert_eq!(transport_label("my_app::Wrapper"), "custom");
/// ```
pub fn transport_label(type_name: &str) -> &'static str {
    if type_name.starts_with("reliable_amqp::") {
        "amqp"
    } else if type_name.starts_with("reliable_kafka::") {
        "kafka"
    } else if type_name.starts_with("reliable_core::memory::") {
        "memory"
    } else {
        "custom"
    }
}

// The recording side: handles into the installed recorder (`on`), or nothing at all (`off`,
// the same API as empty inline functions, so call sites need no `cfg`).
#[cfg(not(feature = "metrics"))]
mod off;
#[cfg(feature = "metrics")]
mod on;

#[cfg(not(feature = "metrics"))]
pub(crate) use off::{DedupeMetrics, HandlerTimer, PipelineMetrics, ProducerMetrics};
#[cfg(feature = "metrics")]
pub(crate) use on::{DedupeMetrics, HandlerTimer, PipelineMetrics, ProducerMetrics};

// Public: recorded by adapters of offset-based logs (the Kafka consumer), outside this crate.
#[cfg(not(feature = "metrics"))]
pub use off::CommitLagGauge;
#[cfg(feature = "metrics")]
pub use on::CommitLagGauge;
