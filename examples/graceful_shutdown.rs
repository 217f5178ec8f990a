//! A RabbitMQ consumer service that stops cleanly on SIGTERM or ctrl-c, in the order the
//! README gives ("Shutdown and health"):
//!
//! 1. `Pipeline::run_until(reliable::shutdown_signal())` stops taking deliveries, lets the
//!    handlers in progress finish (each attempt bounded by `TimeoutLayer`), settles them (ack,
//!    dead letter or requeue; held ones are nacked at once) and closes the consumer: the
//!    coalesced acks still pending go out, the consumer is cancelled and its channel closed, so
//!    RabbitMQ requeues the prefetched deliveries no handler started.
//! 2. `Producer::close()` (the producer the dead letters go through) waits for every pending
//!    confirm, bounded, then closes the publisher.
//!
//! Meanwhile a probe task prints `PipelineStatsHandle::health` and `Producer::health` every
//! few seconds, as a readiness / liveness endpoint would serve them.
//!
//! ```sh
//! eval "$(scripts/brokers env)"
//! RELIABLE_QUEUE=orders cargo run -p reliable --example graceful_shutdown   # ctrl-c to stop
//! ```
//!
//! Environment: `RELIABLE_AMQP_URL` (default: the broker of `scripts/brokers up`),
//! `RELIABLE_QUEUE` (default `orders`; declared as a quorum queue, with `<queue>.dlx` /
//! `<queue>.dlq` for dead letters), `RELIABLE_JOURNAL` (a file each applied payload is
//! appended to, one a line), `RELIABLE_WORK_MS` (simulated work per message after the journal entry, default 20).
//! `tests/graceful_shutdown.rs` runs this service as a child process and sends it SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use reliable::amqp::topology::{self, QueueSpec};
use reliable::amqp::{AmqpConsumer, AmqpPublisher, AmqpSettings};
use reliable::core::pipeline::{
    handler_fn, DeadLetter, HandlerBuilder, HandlerError, Pipeline, PipelineConfig, PipelineStats,
    TimeoutLayer,
};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the producer may take to settle what it holds after the pipeline stopped.
const CLOSE_BUDGET: Duration = Duration::from_secs(10);

/// What the service consumes, and how.
pub struct Service {
    /// The RabbitMQ URL.
    pub url: String,
    /// The queue consumed.
    pub queue: String,
    /// Where each applied payload is appended, one a line.
    pub journal: Option<PathBuf>,
    /// Simulated work per message.
    pub work: Duration,
}

impl Service {
    /// The service the environment describes (see the file's docs).
    pub fn from_env() -> Result<Self, BoxError> {
        let work = match std::env::var("RELIABLE_WORK_MS") {
            Ok(ms) => Duration::from_millis(ms.parse()?),
            Err(_) => Duration::from_millis(20),
        };
        Ok(Self {
            url: std::env::var("RELIABLE_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            queue: std::env::var("RELIABLE_QUEUE").unwrap_or_else(|_| "orders".to_owned()),
            journal: std::env::var_os("RELIABLE_JOURNAL").map(PathBuf::from),
            work,
        })
    }

    /// The dead-letter exchange of the queue.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// Declares the queue (quorum) and its dead-letter exchange and queue; idempotent.
    pub async fn declare(&self) -> Result<(), BoxError> {
        use reliable::amqp::lapin::{Connection, ConnectionProperties};
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let dlq = format!("{}.dlq", self.queue);
        topology::declare_dead_letter(&channel, &self.dead_letter_exchange(), &dlq).await?;
        topology::declare_queue(&channel, &QueueSpec::quorum(&self.queue)).await?;
        conn.close(200, "declared".into()).await?;
        Ok(())
    }

    /// Consumes until `shutdown` resolves (use [`reliable::shutdown_signal`]), then stops in
    /// order: drain and settle the pipeline, close the consumer, close the producer.
    pub async fn serve(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<PipelineStats, BoxError> {
        let settings = AmqpSettings::safe().with_prefetch(32)?;
        let publisher = AmqpPublisher::connect(&self.url, settings.clone()).await?;
        let producer = Producer::new(publisher, ProducerConfig::default());
        let source = AmqpConsumer::connect(&self.url, &self.queue, settings).await?;

        let (journal, work) = (self.journal.clone(), self.work);
        let handler = HandlerBuilder::new(handler_fn(move |msg: Message| {
            let journal = journal.clone();
            async move {
                // The effect first, then the rest of the work: a message whose effect is
                // applied is still in progress, unacked, until the handler returns.
                if let Some(path) = journal {
                    let line = [msg.payload().as_ref(), b"\n"].concat();
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .and_then(|mut f| f.write_all(&line))
                        .map_err(HandlerError::transient)?;
                }
                tokio::time::sleep(work).await;
                Ok(())
            }
        }))
        // Bounds the drain at shutdown: no attempt outlives this.
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .build();
        let dead_letter = DeadLetter::publish(producer.clone(), self.dead_letter_exchange());
        let pipeline = Pipeline::new(source, handler, dead_letter).with_config(PipelineConfig {
            concurrency: 4,
            batch_size: 4,
            ..PipelineConfig::default()
        });

        let probe = pipeline.stats();
        let probed = producer.clone();
        let probe_task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let (consumer, producer) = (probe.health(), probed.health().await);
                println!(
                    "health: ready {} in progress {} last delivery {:?} ago; producer in flight {} oldest unconfirmed {:?}",
                    consumer.is_ready(),
                    consumer.in_progress,
                    consumer.last_delivery_age,
                    producer.in_flight,
                    producer.oldest_unconfirmed_age,
                );
            }
        });

        // 1. Stop taking deliveries, finish and settle the ones in progress, close the consumer.
        let stats = pipeline.run_until(shutdown).await;
        probe_task.abort();
        // 2. Then the producer the pipeline used: every pending confirm, bounded.
        if tokio::time::timeout(CLOSE_BUDGET, producer.close())
            .await
            .is_err()
        {
            eprintln!("the producer did not settle within {CLOSE_BUDGET:?}; unconfirmed dead letters stay unacked and come back");
        }
        Ok(stats?)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let service = Service::from_env()?;
    service.declare().await?;
    println!(
        "consuming {}; SIGTERM or ctrl-c stops cleanly",
        service.queue
    );
    let stats = service.serve(reliable::shutdown_signal()).await?;
    println!("stopped cleanly: {stats:?}");
    Ok(())
}
