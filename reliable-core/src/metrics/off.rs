//! The recording side without the `metrics` feature: the same API as `on.rs`, as zero-sized
//! types and empty inline functions that compile to nothing.

use std::time::Duration;

use crate::producer::{ResendCause, SendError};
use crate::transport::TopicPartition;

/// One producer's handles: none.
pub(crate) struct ProducerMetrics;

impl ProducerMetrics {
    #[inline(always)]
    pub(crate) fn new(_transport: &'static str) -> Self {
        Self
    }
    #[inline(always)]
    pub(crate) fn accepted(&self) {}
    #[inline(always)]
    pub(crate) fn resent(&self, _cause: ResendCause) {}
    #[inline(always)]
    pub(crate) fn confirmed(&self, _latency: Duration) {}
    #[inline(always)]
    pub(crate) fn handed_back(&self, _err: &SendError) {}
    #[inline(always)]
    pub(crate) fn settled(&self) {}
}

/// One pipeline's handles: none.
pub(crate) struct PipelineMetrics;

impl PipelineMetrics {
    #[inline(always)]
    pub(crate) fn new(_transport: &'static str) -> Self {
        Self
    }
    #[inline(always)]
    pub(crate) fn consumed(&self, _n: usize) {}
    #[inline(always)]
    pub(crate) fn acked(&self) {}
    #[inline(always)]
    pub(crate) fn requeued(&self) {}
    #[inline(always)]
    pub(crate) fn dead_lettered(&self) {}
    #[inline(always)]
    pub(crate) fn handled(&self, _timer: HandlerTimer, _messages: usize) {}
}

/// No clock read without the feature.
pub(crate) struct HandlerTimer;

impl HandlerTimer {
    #[inline(always)]
    pub(crate) fn start() -> Self {
        Self
    }
}

/// One `DedupeLayer`'s handle: none.
#[derive(Debug, Default)]
pub(crate) struct DedupeMetrics;

impl DedupeMetrics {
    #[inline(always)]
    pub(crate) fn hit(&self) {}
}

/// One partition's [`COMMIT_LAG`](super::COMMIT_LAG) series (`reliable_commit_lag{topic,
/// partition}`), kept by a consumer of an offset-based log for each partition it owns. With the
/// feature `metrics` it is registered with the recorder installed when it is created and
/// setting it costs one atomic store; without the feature (as here) it is an empty type whose
/// methods do nothing.
///
/// ```
/// use reliable_core::metrics::CommitLagGauge;
/// use reliable_core::TopicPartition;
///
/// let gauge = CommitLagGauge::new(&TopicPartition::new("orders", 0));
/// gauge.set(42); // 42 records beyond the last commit
/// gauge.set(0); // revoked, or caught up
/// ```
#[derive(Debug)]
pub struct CommitLagGauge;

impl CommitLagGauge {
    /// Registers the series of `partition` (labels `topic` and `partition`): nothing here.
    #[inline(always)]
    pub fn new(_partition: &TopicPartition) -> Self {
        Self
    }

    /// Sets the lag, in records: nothing here.
    #[inline(always)]
    pub fn set(&self, _lag: u64) {}
}
