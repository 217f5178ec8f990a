//! Consumers: the classic raw ones (auto-commit, auto-ack) against the SDK's manual-commit /
//! manual-ack consumer under the pipeline with in-memory dedupe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reliable_amqp::lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher, AmqpSettings};
use reliable_core::idempotency::{InMemoryIdempotencyStore, InMemoryStoreConfig};
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{DeliverySource, Message, Transport};
use reliable_kafka::config::consumer_preset;
use reliable_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering as KafkaOrdering, TopicSpec};
use tokio::sync::Notify;

use super::{stamp, with_cpu, BenchArgs, Report, Round, Sample, Tally};
use crate::child::{payload, KAFKA_PARTITIONS};
use crate::HarnessError;

const KAFKA: &str = "Kafka consumer";
const KAFKA_RAW: &str = "raw rdkafka StreamConsumer, auto-commit";
const KAFKA_SDK: &str =
    "SDK KafkaConsumer + pipeline, manual commit, in-memory dedupe, ordered per partition (default)";
const KAFKA_SDK_UNORDERED: &str =
    "SDK KafkaConsumer + pipeline, manual commit, in-memory dedupe, Ordering::Unordered";
const AMQP: &str = "RabbitMQ consumer, quorum queue";
const AMQP_RAW: &str = "raw lapin, auto-ack";
const AMQP_SDK: &str = "SDK AmqpConsumer + pipeline, manual ack, in-memory dedupe";

/// How long a consumer case may take before it is called stuck.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

/// Counts handled messages; the clock runs from the first to the last.
#[derive(Default)]
struct Count {
    handled: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    done: Notify,
}

impl Count {
    fn one(&self, target: u64) {
        let now = Instant::now();
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(now);
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == target {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
            self.done.notify_one();
        }
    }

    fn sample(&self, messages: u64) -> Result<Sample, HarnessError> {
        let first = *self.first.lock().unwrap_or_else(|p| p.into_inner());
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        match (first, last) {
            (Some(first), Some(last)) => Ok(Sample::measured(messages, last - first, Vec::new())),
            _ => Err(HarnessError::Setup(format!(
                "the consumer handled {} of {messages} messages",
                self.handled.load(Ordering::Relaxed)
            ))),
        }
    }
}

/// The SDK pipeline over `source` with in-memory dedupe, until `messages` are handled.
async fn sdk_pipeline<S: DeliverySource + 'static>(
    source: S,
    dead_letter: DeadLetter,
    messages: u64,
) -> Result<Sample, HarnessError> {
    let count = Arc::new(Count::default());
    let effect = {
        let count = count.clone();
        handler_fn(move |_msg: Message| {
            let count = count.clone();
            async move {
                count.one(messages);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let handler = HandlerBuilder::new(effect)
        .layer(DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::new(
            InMemoryStoreConfig::default(),
        ))))
        .build();
    let done = count.clone();
    let pipeline = Pipeline::new(source, handler, dead_letter).run_until(async move {
        done.done.notified().await;
    });
    tokio::time::timeout(CASE_TIMEOUT, pipeline)
        .await
        .map_err(|_| setup("the SDK consumer case timed out"))??;
    count.sample(messages)
}

async fn kafka_raw(args: &BenchArgs, topic: &str, messages: u64) -> Result<Sample, HarnessError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
        .set("group.id", format!("{topic}-raw-{}", stamp_nanos()))
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(setup)?;
    consumer.subscribe(&[topic]).map_err(setup)?;
    let count = Count::default();
    let read = async {
        while count.handled.load(Ordering::Relaxed) < messages {
            consumer.recv().await.map_err(setup)?;
            count.one(messages);
        }
        Ok::<(), HarnessError>(())
    };
    tokio::time::timeout(CASE_TIMEOUT, read)
        .await
        .map_err(|_| setup("the raw consumer case timed out"))??;
    count.sample(messages)
}

async fn kafka_sdk(
    args: &BenchArgs,
    topic: &str,
    dlq: &KafkaTransport,
    messages: u64,
    ordering: KafkaOrdering,
) -> Result<Sample, HarnessError> {
    let group = format!("{topic}-sdk-{}", stamp_nanos());
    let source =
        KafkaConsumer::builder_from_config(consumer_preset(&args.brokers.kafka_bootstrap, &group))
            .subscribe(TopicSpec::new(topic).partitions(KAFKA_PARTITIONS))
            .ordering(ordering)
            .build()
            .await?;
    sdk_pipeline(source, dlq.dead_letter(format!("{topic}.dlq")), messages).await
}

fn stamp_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Fills a queue or topic through the SDK producer (so every message carries its id and key).
async fn fill(
    transport: impl Transport + 'static,
    messages: u64,
    routing_key: Option<&str>,
) -> Result<(), HarnessError> {
    let producer = Producer::new(
        transport,
        ProducerConfig {
            max_in_flight: 4096,
            ..ProducerConfig::default()
        },
    );
    let mut handles = Vec::with_capacity(messages as usize);
    for seq in 0..messages {
        let mut m = Message::new(payload(seq));
        if let Some(key) = routing_key {
            m = m.with_routing_key(key);
        }
        handles.push(producer.send(m).await?);
    }
    for h in handles {
        h.await?;
    }
    producer.close().await;
    Ok(())
}

async fn amqp_raw(args: &BenchArgs, queue: &str, messages: u64) -> Result<Sample, HarnessError> {
    let conn = Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
        .await
        .map_err(setup)?;
    let channel = conn.create_channel().await.map_err(setup)?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(setup)?;
    let count = Count::default();
    let read = async {
        while count.handled.load(Ordering::Relaxed) < messages {
            match consumer.next().await {
                Some(delivery) => {
                    delivery.map_err(setup)?;
                    count.one(messages);
                }
                None => return Err(setup("the raw consumer's stream ended")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(CASE_TIMEOUT, read)
        .await
        .map_err(|_| setup("the raw consumer case timed out"))??;
    let _ = conn.close(200, "done".into()).await;
    count.sample(messages)
}

/// Runs the consumer cases.
pub async fn run(args: &BenchArgs, report: &mut Report) -> Result<(), HarnessError> {
    // Kafka: one topic, filled once; every case reads it whole in a consumer group of its own.
    let topic = format!("bench-consume-{}", stamp());
    let dlq = format!("{topic}.dlq");
    let transport = KafkaTransport::builder(&args.brokers.kafka_bootstrap)
        .default_topic(TopicSpec::new(&topic).partitions(KAFKA_PARTITIONS))
        .topic(TopicSpec::new(&dlq))
        .build()
        .await?;
    fill(transport.clone(), args.consume_messages, None).await?;
    let (mut raw_t, mut sdk_t, mut unordered_t) =
        (Tally::default(), Tally::default(), Tally::default());
    let n = args.consume_messages;
    for round in Round::all(args.rounds) {
        for case in round.in_turn(&[0u8, 1, 2]) {
            match case {
                0 => raw_t.add(round, with_cpu(kafka_raw(args, &topic, n)).await?),
                1 => {
                    let ordered =
                        kafka_sdk(args, &topic, &transport, n, KafkaOrdering::PerPartition);
                    sdk_t.add(round, with_cpu(ordered).await?);
                }
                _ => {
                    let unordered =
                        kafka_sdk(args, &topic, &transport, n, KafkaOrdering::Unordered);
                    unordered_t.add(round, with_cpu(unordered).await?);
                }
            }
        }
        eprintln!(
            "bench: Kafka consumer: raw {:?}, SDK {:?}, SDK unordered {:?}",
            raw_t.rounds(),
            sdk_t.rounds(),
            unordered_t.rounds()
        );
    }
    report.push(raw_t.result(KAFKA, KAFKA_RAW, None));
    report.push(sdk_t.result(KAFKA, KAFKA_SDK, None));
    report.push(unordered_t.result(KAFKA, KAFKA_SDK_UNORDERED, None));
    report.target(
        "Kafka: SDK manual-commit consumer with dedupe (default ordering) / raw auto-commit",
        (KAFKA, KAFKA_SDK, None),
        (KAFKA, KAFKA_RAW, None),
        0.90,
    );
    report.target(
        "Kafka: SDK manual-commit consumer with dedupe (unordered) / raw auto-commit",
        (KAFKA, KAFKA_SDK_UNORDERED, None),
        (KAFKA, KAFKA_RAW, None),
        0.90,
    );

    // RabbitMQ: the queue is filled before each case (consuming empties it).
    let queue = format!("bench.consume.{}", stamp());
    let settings = AmqpSettings::safe();
    {
        let conn = Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
            .await
            .map_err(setup)?;
        let channel = conn.create_channel().await.map_err(setup)?;
        let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(
            format!("{queue}.dlx"),
            format!("{queue}.dlq"),
        ));
        topology::declare_queue(&channel, &spec).await?;
        let (mut raw_t, mut sdk_t) = (Tally::default(), Tally::default());
        let messages = args.amqp_messages;
        let publisher = AmqpPublisher::connect(&args.brokers.amqp_url, settings.clone()).await?;
        for round in Round::all(args.rounds) {
            for raw_case in round.in_turn(&[true, false]) {
                fill(publisher.clone(), messages, Some(&queue)).await?;
                if raw_case {
                    raw_t.add(round, with_cpu(amqp_raw(args, &queue, messages)).await?);
                } else {
                    let source = AmqpConsumer::connect_checked(
                        &args.brokers.amqp_url,
                        &spec,
                        settings.clone(),
                    )
                    .await?;
                    let s = with_cpu(sdk_pipeline(source, DeadLetter::BrokerReject, messages));
                    sdk_t.add(round, s.await?);
                }
            }
            eprintln!(
                "bench: RabbitMQ consumer: raw {:?}, SDK {:?}",
                raw_t.rounds(),
                sdk_t.rounds()
            );
        }
        report.push(raw_t.result(AMQP, AMQP_RAW, None));
        report.push(sdk_t.result(AMQP, AMQP_SDK, None));
        report.target(
            "RabbitMQ: SDK manual-ack consumer with dedupe / raw auto-ack",
            (AMQP, AMQP_SDK, None),
            (AMQP, AMQP_RAW, None),
            0.90,
        );
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    }
    report.notes.push(format!(
        "Consumers: {} Kafka messages ({KAFKA_PARTITIONS} partitions, a fresh group per case) and {} RabbitMQ messages per case, written by the SDK producer; throughput from the first message handled to the last; the SDK runs PipelineConfig::default() (concurrency 16) and the preset's prefetch",
        args.consume_messages, args.amqp_messages
    ));
    Ok(())
}
