//! The recording side with the `metrics` feature: handles registered once per producer,
//! pipeline or dedupe layer, bumped on the hot path without allocating or looking anything up.

use std::fmt;
use std::time::{Duration, Instant};

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram};
use ::metrics::{Counter, Gauge, Histogram};

use super::*;
use crate::producer::{ResendCause, SendError};
use crate::transport::TopicPartition;

const TRANSPORT: &str = "transport";
const CAUSE: &str = "cause";

/// Sends the descriptions (Prometheus `# HELP`) to the recorder installed now.
fn describe() {
    describe_counter!(PUBLISHED_TOTAL, "Messages accepted by the producer");
    describe_counter!(CONFIRMED_TOTAL, "Messages the broker confirmed");
    describe_counter!(RESENT_TOTAL, "Messages sent again, by cause");
    describe_counter!(
        HANDED_BACK_TOTAL,
        "Messages handed back to the caller unconfirmed, by cause"
    );
    describe_gauge!(
        IN_FLIGHT,
        "Messages accepted and not yet confirmed or handed back"
    );
    describe_histogram!(
        CONFIRM_LATENCY_SECONDS,
        "Seconds from a message's first send to its confirm"
    );
    describe_counter!(
        CONSUMED_TOTAL,
        "Deliveries the pipeline took from its source"
    );
    describe_counter!(
        ACKED_TOTAL,
        "Deliveries handled (or skipped as duplicates) and acked"
    );
    describe_counter!(REQUEUED_TOTAL, "Deliveries nacked back to the broker");
    describe_counter!(DEAD_LETTERED_TOTAL, "Deliveries dead-lettered");
    describe_counter!(DEDUPE_HITS_TOTAL, "Duplicates skipped by DedupeLayer");
    describe_histogram!(
        HANDLER_LATENCY_SECONDS,
        "Seconds one handler attempt took (a batch call counts once per message)"
    );
    describe_gauge!(
        COMMIT_LAG,
        "Records of an owned partition beyond the consumer group's committed offset"
    );
}

/// The causes of [`HANDED_BACK_TOTAL`], in the order of [`ProducerMetrics::handed_back`].
const HANDED_BACK_CAUSES: [&str; 4] = [
    "refused",
    "attempts_exhausted",
    "deadline_exceeded",
    "other",
];

/// One producer's handles.
pub(crate) struct ProducerMetrics {
    published: Counter,
    confirmed: Counter,
    /// By [`ResendCause`], in declaration order.
    resent: [Counter; 4],
    /// By [`HANDED_BACK_CAUSES`].
    handed_back: [Counter; 4],
    in_flight: Gauge,
    confirm_latency: Histogram,
}

impl ProducerMetrics {
    /// Registers the handles of a producer over a `transport` transport.
    pub(crate) fn new(transport: &'static str) -> Self {
        describe();
        let resent =
            |cause: &'static str| counter!(RESENT_TOTAL, TRANSPORT => transport, CAUSE => cause);
        let handed_back = |cause: &'static str| counter!(HANDED_BACK_TOTAL, TRANSPORT => transport, CAUSE => cause);
        Self {
            published: counter!(PUBLISHED_TOTAL, TRANSPORT => transport),
            confirmed: counter!(CONFIRMED_TOTAL, TRANSPORT => transport),
            resent: [
                resent("nack"),
                resent("timeout"),
                resent("connection_lost"),
                resent("busy"),
            ],
            handed_back: HANDED_BACK_CAUSES.map(handed_back),
            in_flight: ::metrics::gauge!(IN_FLIGHT, TRANSPORT => transport),
            confirm_latency: ::metrics::histogram!(CONFIRM_LATENCY_SECONDS, TRANSPORT => transport),
        }
    }

    /// A message was accepted: published, and in flight until [`settled`](Self::settled).
    pub(crate) fn accepted(&self) {
        self.published.increment(1);
        self.in_flight.increment(1.0);
    }

    /// A message was sent again after `cause`.
    pub(crate) fn resent(&self, cause: ResendCause) {
        let i = match cause {
            ResendCause::Nack => 0,
            ResendCause::Timeout => 1,
            ResendCause::ConnectionLost => 2,
            ResendCause::Busy => 3,
        };
        self.resent[i].increment(1);
    }

    /// A message was confirmed `latency` after its first send.
    pub(crate) fn confirmed(&self, latency: Duration) {
        self.confirmed.increment(1);
        self.confirm_latency.record(latency.as_secs_f64());
    }

    /// A message was handed back with `err`.
    pub(crate) fn handed_back(&self, err: &SendError) {
        let i = match err {
            SendError::Refused { .. } => 0,
            SendError::AttemptsExhausted { .. } => 1,
            SendError::DeadlineExceeded { .. } => 2,
            _ => 3,
        };
        self.handed_back[i].increment(1);
    }

    /// A message was confirmed or handed back: no longer in flight.
    pub(crate) fn settled(&self) {
        self.in_flight.decrement(1.0);
    }
}

/// One pipeline's handles.
pub(crate) struct PipelineMetrics {
    consumed: Counter,
    acked: Counter,
    requeued: Counter,
    dead_lettered: Counter,
    handler_latency: Histogram,
}

impl PipelineMetrics {
    /// Registers the handles of a pipeline over a `transport` source.
    pub(crate) fn new(transport: &'static str) -> Self {
        describe();
        Self {
            consumed: counter!(CONSUMED_TOTAL, TRANSPORT => transport),
            acked: counter!(ACKED_TOTAL, TRANSPORT => transport),
            requeued: counter!(REQUEUED_TOTAL, TRANSPORT => transport),
            dead_lettered: counter!(DEAD_LETTERED_TOTAL, TRANSPORT => transport),
            handler_latency: ::metrics::histogram!(HANDLER_LATENCY_SECONDS, TRANSPORT => transport),
        }
    }

    /// `n` deliveries were taken from the source.
    pub(crate) fn consumed(&self, n: usize) {
        self.consumed.increment(n as u64);
    }

    /// A delivery was acked after its handler succeeded.
    pub(crate) fn acked(&self) {
        self.acked.increment(1);
    }

    /// A delivery was nacked back to the broker.
    pub(crate) fn requeued(&self) {
        self.requeued.increment(1);
    }

    /// A delivery was dead-lettered.
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.increment(1);
    }

    /// A handler call started with `timer` ended, for `messages` messages.
    pub(crate) fn handled(&self, timer: HandlerTimer, messages: usize) {
        let secs = timer.0.elapsed().as_secs_f64();
        match messages {
            0 => {}
            1 => self.handler_latency.record(secs),
            n => self.handler_latency.record_many(secs, n),
        }
    }
}

/// When a handler call started.
pub(crate) struct HandlerTimer(Instant);

impl HandlerTimer {
    /// Starts timing a handler call.
    pub(crate) fn start() -> Self {
        Self(Instant::now())
    }
}

/// One `DedupeLayer`'s handle (shared by its clones).
pub(crate) struct DedupeMetrics {
    hits: Counter,
}

impl DedupeMetrics {
    /// A duplicate was skipped.
    pub(crate) fn hit(&self) {
        self.hits.increment(1);
    }
}

impl Default for DedupeMetrics {
    /// Registers the handle with the recorder installed now.
    fn default() -> Self {
        describe();
        Self {
            hits: counter!(DEDUPE_HITS_TOTAL),
        }
    }
}

impl fmt::Debug for DedupeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupeMetrics")
    }
}

/// One partition's [`COMMIT_LAG`] series (`reliable_commit_lag{topic, partition}`), kept by a
/// consumer of an offset-based log for each partition it owns. Registered with the recorder
/// installed when it is created; setting it then costs one atomic store. Without the feature
/// `metrics` it is an empty type whose methods do nothing.
///
/// ```
/// use reliable_core::metrics::CommitLagGauge;
/// use reliable_core::TopicPartition;
///
/// let gauge = CommitLagGauge::new(&TopicPartition::new("orders", 0));
/// gauge.set(42); // 42 records beyond the last commit
/// gauge.set(0); // revoked, or caught up
/// ```
pub struct CommitLagGauge(Gauge);

impl CommitLagGauge {
    /// Registers the series of `partition` (labels `topic` and `partition`).
    pub fn new(partition: &TopicPartition) -> Self {
        describe();
        Self(::metrics::gauge!(
            COMMIT_LAG,
            "topic" => partition.topic.to_string(),
            "partition" => partition.partition.to_string()
        ))
    }

    /// Sets the lag, in records.
    pub fn set(&self, lag: u64) {
        // Exact up to 2^53 records, far beyond any partition.
        self.0.set(lag as f64);
    }
}

impl fmt::Debug for CommitLagGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitLagGauge")
    }
}
