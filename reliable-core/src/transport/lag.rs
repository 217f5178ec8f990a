//! [`ConsumerLag`]: how far a consumer is behind its log, shared by a delivery source with the
//! pipeline's health ([`PipelineHealth::lag`](crate::pipeline::PipelineHealth::lag)).

/// A live view of how many records a consumer has not committed yet, readable from any thread
/// while the consumer runs. A [`DeliverySource`](super::DeliverySource) that knows its lag
/// hands one out through [`consumer_lag`](super::DeliverySource::consumer_lag); the
/// [`Pipeline`](crate::pipeline::Pipeline) takes it when it is built, so the health snapshot
/// still reads it after the source moved into the running pipeline.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use reliable_core::transport::ConsumerLag;
///
/// /// A lag some other part of the program keeps up to date.
/// struct Counted(AtomicU64);
///
/// impl ConsumerLag for Counted {
///     fn total(&self) -> Option<u64> {
///         Some(self.0.load(Ordering::Relaxed))
///     }
/// }
///
/// let lag: Arc<dyn ConsumerLag> = Arc::new(Counted(AtomicU64::new(7)));
/// assert_eq!(lag.total(), Some(7));
/// ```
pub trait ConsumerLag: Send + Sync + 'static {
    /// Records beyond the consumer group's last commit, summed over the partitions this
    /// consumer owns now; `None` while no owned partition's lag is known (nothing assigned
    /// yet, or the client has not reported its offsets yet). Must be cheap and must not
    /// block: it reads what the consumer already keeps.
    fn total(&self) -> Option<u64>;
}
