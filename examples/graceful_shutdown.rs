//! A consumer service, on RabbitMQ or Kafka, that stops cleanly on SIGTERM or ctrl-c, in the
//! order the README gives ("Shutdown and health"):
//!
//! 1. `Pipeline::run_until(reliable::shutdown_signal())` stops taking deliveries, lets the
//!    handlers in progress finish (each attempt bounded by `TimeoutLayer`), settles them (ack,
//!    dead letter or requeue; held ones are nacked at once) and closes the consumer. RabbitMQ:
//!    the coalesced acks still pending go out, the consumer is cancelled and its channel
//!    closed, so the broker requeues the prefetched deliveries no handler started. Kafka: the
//!    final offsets are committed (never past a record not yet handled) and the consumer
//!    leaves its group, so the next member gets the partitions at once.
//! 2. `Producer::close()` (the producer the dead letters go through) waits for every pending
//!    confirm, bounded, then closes the publisher (Kafka: flushes the client).
//!
//! Meanwhile a probe task prints `PipelineStatsHandle::health` and `Producer::health` every
//! few seconds, as a readiness / liveness endpoint would serve them.
//!
//! ```sh
//! eval "$(scripts/brokers env)"
//! RELIABLE_QUEUE=orders cargo run -p reliable --example graceful_shutdown   # ctrl-c to stop
//! RELIABLE_BROKER=kafka RELIABLE_TOPIC=orders cargo run -p reliable --example graceful_shutdown
//! ```
//!
//! Environment: `RELIABLE_BROKER` (`rabbitmq`, the default, or `kafka`), `RELIABLE_JOURNAL` (a
//! file each applied payload is appended to, one a line), `RELIABLE_WORK_MS` (simulated work per
//! message after the journal entry, default 20). RabbitMQ: `RELIABLE_AMQP_URL` (default: the
//! broker of `scripts/brokers up`), `RELIABLE_QUEUE` (default `orders`; declared as a quorum
//! queue, with `<queue>.dlx` / `<queue>.dlq` for dead letters). Kafka:
//! `RELIABLE_KAFKA_BOOTSTRAP` (default: the three brokers of `scripts/brokers up`),
//! `RELIABLE_TOPIC` (default `orders`; dead letters go to the topic `<topic>.dlq`; both are
//! created with replication factor 3 if missing), `RELIABLE_GROUP` (the consumer group, default
//! `orders-service`).
//!
//! `tests/graceful_shutdown.rs` (RabbitMQ) and `tests/graceful_shutdown_kafka.rs` run this
//! service as a child process and send it SIGTERM.

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
use reliable::core::{DeliverySource, Message};
use reliable::kafka::rdkafka::ClientConfig;
use reliable::kafka::{ensure_topic, KafkaConsumer, KafkaTransport, TopicSpec};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the producer may take to settle what it holds after the pipeline stopped.
const CLOSE_BUDGET: Duration = Duration::from_secs(10);

/// Where the service consumes from.
pub enum Broker {
    /// A RabbitMQ quorum queue; dead letters go through the exchange `<queue>.dlx` to the
    /// queue `<queue>.dlq`.
    RabbitMq {
        /// The RabbitMQ URL.
        url: String,
        /// The queue consumed.
        queue: String,
    },
    /// A Kafka topic read by a consumer group; dead letters go to the topic `<topic>.dlq`.
    Kafka {
        /// Bootstrap servers, comma separated.
        bootstrap: String,
        /// The topic consumed.
        topic: String,
        /// The consumer group whose committed offsets say where to resume.
        group: String,
    },
}

/// What the service consumes, and how.
pub struct Service {
    /// The broker and what is consumed there.
    pub broker: Broker,
    /// Where each applied payload is appended, one a line.
    pub journal: Option<PathBuf>,
    /// Simulated work per message.
    pub work: Duration,
}

impl Service {
    /// The service the environment describes (see the file's docs).
    pub fn from_env() -> Result<Self, BoxError> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let work = match std::env::var("RELIABLE_WORK_MS") {
            Ok(ms) => Duration::from_millis(ms.parse()?),
            Err(_) => Duration::from_millis(20),
        };
        let broker = match var("RELIABLE_BROKER", "rabbitmq").as_str() {
            "rabbitmq" | "amqp" => Broker::RabbitMq {
                url: var("RELIABLE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                queue: var("RELIABLE_QUEUE", "orders"),
            },
            "kafka" => Broker::Kafka {
                bootstrap: var(
                    "RELIABLE_KAFKA_BOOTSTRAP",
                    "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094",
                ),
                topic: var("RELIABLE_TOPIC", "orders"),
                group: var("RELIABLE_GROUP", "orders-service"),
            },
            other => {
                return Err(format!("RELIABLE_BROKER={other}: use `rabbitmq` or `kafka`").into())
            }
        };
        Ok(Self {
            broker,
            journal: std::env::var_os("RELIABLE_JOURNAL").map(PathBuf::from),
            work,
        })
    }

    /// The queue or topic consumed.
    pub fn source_name(&self) -> &str {
        match &self.broker {
            Broker::RabbitMq { queue, .. } => queue,
            Broker::Kafka { topic, .. } => topic,
        }
    }

    /// Where dead letters are published: the exchange `<queue>.dlx` (RabbitMQ) or the topic
    /// `<topic>.dlq` (Kafka).
    pub fn dead_letter_destination(&self) -> String {
        match &self.broker {
            Broker::RabbitMq { queue, .. } => format!("{queue}.dlx"),
            Broker::Kafka { topic, .. } => format!("{topic}.dlq"),
        }
    }

    /// Declares what is consumed and where dead letters go; idempotent. RabbitMQ: the quorum
    /// queue and its dead-letter exchange and queue. Kafka: the topic and `<topic>.dlq`
    /// (replication factor 3, `min.insync.replicas` 2; an existing topic is checked instead).
    pub async fn declare(&self) -> Result<(), BoxError> {
        match &self.broker {
            Broker::RabbitMq { url, queue } => {
                use reliable::amqp::lapin::{Connection, ConnectionProperties};
                let conn = Connection::connect(url, ConnectionProperties::default()).await?;
                let channel = conn.create_channel().await?;
                let dlq = format!("{queue}.dlq");
                topology::declare_dead_letter(&channel, &self.dead_letter_destination(), &dlq)
                    .await?;
                topology::declare_queue(&channel, &QueueSpec::quorum(queue)).await?;
                conn.close(200, "declared".into()).await?;
            }
            Broker::Kafka {
                bootstrap, topic, ..
            } => {
                let mut admin = ClientConfig::new();
                admin.set("bootstrap.servers", bootstrap);
                ensure_topic(&admin, &TopicSpec::new(topic)).await?;
                ensure_topic(&admin, &TopicSpec::new(self.dead_letter_destination())).await?;
            }
        }
        Ok(())
    }

    /// Consumes until `shutdown` resolves (use [`reliable::shutdown_signal`]), then stops in
    /// order: drain and settle the pipeline, close the consumer (RabbitMQ: pending acks, cancel;
    /// Kafka: final commit), close the producer.
    pub async fn serve(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<PipelineStats, BoxError> {
        match &self.broker {
            Broker::RabbitMq { url, queue } => {
                let settings = AmqpSettings::safe().with_prefetch(32)?;
                let publisher = AmqpPublisher::connect(url, settings.clone()).await?;
                let producer = Producer::new(publisher, ProducerConfig::default());
                let source = AmqpConsumer::connect(url, queue, settings).await?;
                self.run(source, producer, shutdown).await
            }
            Broker::Kafka {
                bootstrap,
                topic,
                group,
            } => {
                let dlq = KafkaTransport::builder(bootstrap)
                    .topic(TopicSpec::new(self.dead_letter_destination()))
                    .build()
                    .await?;
                let producer = Producer::new(dlq.clone(), dlq.recommended_producer_config());
                let source = KafkaConsumer::builder(bootstrap, group)
                    .subscribe(TopicSpec::new(topic))
                    .build()
                    .await?;
                self.run(source, producer, shutdown).await
            }
        }
    }

    /// The broker-independent part: the handler, the pipeline, the health probe and the stop
    /// order.
    async fn run<S: DeliverySource>(
        &self,
        source: S,
        producer: Producer,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<PipelineStats, BoxError> {
        let (journal, work) = (self.journal.clone(), self.work);
        let handler = HandlerBuilder::new(handler_fn(move |msg: Message| {
            let journal = journal.clone();
            async move {
                // The effect first, then the rest of the work: a message whose effect is
                // applied is still in progress, unsettled, until the handler returns.
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
        let dead_letter = DeadLetter::publish(producer.clone(), self.dead_letter_destination());
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
                    "health: ready {} in progress {} last delivery {:?} ago lag {:?}; producer connected {:?} in flight {} oldest unconfirmed {:?}",
                    consumer.is_ready(),
                    consumer.in_progress,
                    consumer.last_delivery_age,
                    consumer.lag,
                    producer.connected,
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
            eprintln!("the producer did not settle within {CLOSE_BUDGET:?}; unconfirmed dead letters stay unsettled and come back");
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
        service.source_name()
    );
    let stats = service.serve(reliable::shutdown_signal()).await?;
    println!("stopped cleanly: {stats:?}");
    Ok(())
}
