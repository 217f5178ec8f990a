//! [`PipelineStatsHandle::health`]: a small snapshot of a consumer pipeline for readiness and
//! liveness probes.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::PipelineStatsHandle;

/// Where a pipeline run is; see [`PipelineHealth::state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PipelineState {
    /// [`Pipeline::run_until`](super::Pipeline::run_until) has not started.
    NotStarted,
    /// Taking and handling deliveries.
    Running,
    /// The shutdown signal fired, the source ended or failed: no new deliveries are taken;
    /// the ones in progress are being settled and the source closed.
    Draining,
    /// The run is over: everything taken was settled and the source closed.
    Stopped,
}

/// What a consumer pipeline can say about its health now; see
/// [`PipelineStatsHandle::health`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PipelineHealth {
    /// Where the run is.
    pub state: PipelineState,
    /// Deliveries taken and not yet settled (acked, dead-lettered or requeued): in the
    /// handler, or held while a dependency is unavailable.
    pub in_progress: u64,
    /// Deliveries taken since the start.
    pub received: u64,
    /// Time since the last delivery was taken (`None` before the first). On a queue that is
    /// known to be busy, a long silence means the consumer is stuck or disconnected; on a
    /// quiet queue it means nothing.
    pub last_delivery_age: Option<Duration>,
    /// Records beyond the consumer group's last commit, summed over the partitions this
    /// consumer owns ([`ConsumerLag::total`](crate::transport::ConsumerLag::total), from the
    /// source's [`consumer_lag`](crate::DeliverySource::consumer_lag)). `None` for sources
    /// that cannot tell (RabbitMQ, the in-memory broker) and, on Kafka, until the client has
    /// reported the offsets of an owned partition. A lag that grows while
    /// [`in_progress`](Self::in_progress) stays flat means the consumer is falling behind;
    /// per partition, see the Kafka consumer's own view (`KafkaConsumer::lag`).
    pub lag: Option<u64>,
}

impl PipelineHealth {
    /// Ready for traffic: the pipeline is running (not yet draining for a shutdown).
    pub fn is_ready(&self) -> bool {
        self.state == PipelineState::Running
    }
}

/// The live state behind [`PipelineHealth`], kept with the pipeline's counters.
pub(super) struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last delivery taken, plus 1 (0: none yet).
    last_delivery: AtomicU64,
    state: AtomicU8,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            started: Instant::now(),
            last_delivery: AtomicU64::new(0),
            state: AtomicU8::new(0),
        }
    }

    /// Deliveries were taken now.
    pub(super) fn delivered(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_delivery.store(ms + 1, Ordering::Relaxed);
    }

    /// The run moved on to `state`.
    pub(super) fn set(&self, state: PipelineState) {
        let code = match state {
            PipelineState::NotStarted => 0,
            PipelineState::Running => 1,
            PipelineState::Draining => 2,
            PipelineState::Stopped => 3,
        };
        self.state.store(code, Ordering::Release);
    }

    fn state(&self) -> PipelineState {
        match self.state.load(Ordering::Acquire) {
            0 => PipelineState::NotStarted,
            1 => PipelineState::Running,
            2 => PipelineState::Draining,
            _ => PipelineState::Stopped,
        }
    }

    fn last_delivery_age(&self) -> Option<Duration> {
        match self.last_delivery.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

impl PipelineStatsHandle {
    /// A snapshot for readiness and liveness probes: the run's state, deliveries in progress,
    /// the time since the last one was taken and the source's lag. Take the handle with
    /// [`Pipeline::stats`](super::Pipeline::stats) before running the pipeline.
    ///
    /// ```
    /// use reliable_core::memory::InMemoryBroker;
    /// use reliable_core::pipeline::*;
    /// use reliable_core::Message;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let broker = InMemoryBroker::new();
    /// broker.declare_queue("orders");
    /// let handler = HandlerBuilder::new(handler_fn(|_msg: Message| async { Ok(()) })).build();
    /// let pipeline = Pipeline::new(broker.consumer("orders"), handler, DeadLetter::BrokerReject);
    /// let probe = pipeline.stats(); // hand this to the HTTP probe handler
    ///
    /// let health = probe.health();
    /// assert_eq!(health.state, PipelineState::NotStarted);
    /// let ready = health.is_ready(); // readiness: false until running, false once draining
    /// assert!(!ready && health.in_progress == 0);
    /// assert_eq!(health.lag, None); // a queue: the broker knows its backlog, not the consumer
    /// # }
    /// ```
    pub fn health(&self) -> PipelineHealth {
        let stats = self.snapshot();
        let settled = stats.succeeded + stats.dead_lettered + stats.requeued;
        PipelineHealth {
            state: self.0.activity.state(),
            in_progress: stats.received.saturating_sub(settled),
            received: stats.received,
            last_delivery_age: self.0.activity.last_delivery_age(),
            lag: self.0.lag.as_ref().and_then(|lag| lag.total()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::memory::InMemoryBroker;
    use crate::pipeline::*;
    use crate::{Message, Transport};

    #[tokio::test(start_paused = true)]
    async fn health_follows_the_run_from_start_to_shutdown() {
        let broker = InMemoryBroker::new();
        broker.declare_queue("q");
        let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel();
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let gate = release.clone();
        let handler = handler_fn(move |_msg: Message| {
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                let _ = entered.send(());
                gate.notified().await;
                Ok(())
            }
        });
        let pipeline = Pipeline::new(broker.consumer("q"), handler, DeadLetter::BrokerReject);
        let probe = pipeline.stats();
        let before = probe.health();
        assert_eq!(before.state, PipelineState::NotStarted);
        assert_eq!(before.last_delivery_age, None);

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(pipeline.run_until(async move {
            let _ = stopped.await;
        }));
        broker
            .transport()
            .publish(&Message::new("a").with_destination("q"))
            .await
            .expect("published");
        inside.recv().await.expect("handler entered");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let busy = probe.health();
        assert!(busy.is_ready());
        assert_eq!((busy.received, busy.in_progress), (1, 1));
        let age = busy.last_delivery_age.expect("a delivery was taken");
        assert!(age >= Duration::from_secs(5), "{age:?}");

        let _ = stop.send(());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let draining = probe.health();
        assert_eq!(draining.state, PipelineState::Draining);
        assert!(!draining.is_ready());
        assert_eq!(draining.in_progress, 1, "the handler still holds it");

        release.notify_waiters();
        run.await.expect("joined").expect("clean run");
        let done = probe.health();
        assert_eq!(done.state, PipelineState::Stopped);
        assert_eq!(done.in_progress, 0);
        assert_eq!(broker.acked_count("q"), 1);
    }

    /// A lag some other part of the test sets.
    struct Fixed(std::sync::atomic::AtomicU64);

    impl crate::transport::ConsumerLag for Fixed {
        fn total(&self) -> Option<u64> {
            Some(self.0.load(std::sync::atomic::Ordering::Relaxed))
        }
    }

    /// The in-memory consumer, reporting the lag of `Fixed`.
    struct Lagging(crate::memory::InMemoryConsumer, std::sync::Arc<Fixed>);

    #[async_trait::async_trait]
    impl crate::DeliverySource for Lagging {
        async fn next(&mut self) -> Result<Option<crate::Delivery>, crate::ConsumeError> {
            self.0.next().await
        }

        async fn close(&mut self) -> Result<(), crate::ConsumeError> {
            self.0.close().await
        }

        fn consumer_lag(&self) -> Option<std::sync::Arc<dyn crate::transport::ConsumerLag>> {
            Some(self.1.clone())
        }
    }

    #[tokio::test]
    async fn health_reads_the_lag_of_a_source_that_knows_it_live() {
        use crate::DeliverySource as _;

        let broker = InMemoryBroker::new();
        broker.declare_queue("q");
        let handler = || handler_fn(|_msg: Message| async { Ok(()) });
        let lag = std::sync::Arc::new(Fixed(5.into()));
        let source = Lagging(broker.consumer("q"), lag.clone());
        let pipeline = Pipeline::new(source, handler(), DeadLetter::BrokerReject);
        let probe = pipeline.stats();
        assert_eq!(probe.health().lag, Some(5));
        lag.0.store(2, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            probe.health().lag,
            Some(2),
            "read when asked, not when built"
        );

        // Negative control: a source that cannot tell says so.
        let plain = Pipeline::new(broker.consumer("q"), handler(), DeadLetter::BrokerReject);
        assert!(broker.consumer("q").consumer_lag().is_none());
        assert_eq!(plain.stats().health().lag, None);
    }
}
