//! Consumers: the SDK's manual-commit / manual-ack consumer under the pipeline with in-memory
//! dedupe, against raw consumers that do the SDK's per-message work by hand (the targets) and
//! against the bare raw ones (auto-commit, auto-ack; context).
//!
//! * Kafka, raw manual ([`kafka_raw_manual`]): librdkafka's at-least-once pattern, offsets
//!   stored after each message is handled and committed in the background, and each message's
//!   id decoded from its header.
//! * RabbitMQ, raw manual ([`amqp_raw_manual`]): manual acks with the SDK's prefetch, and each
//!   message's id decoded from its `message_id` property. Two ways to ack ([`RawAck`]): one
//!   `basic.ack` per delivery, as lapin's examples do (context), and `multiple=true` every 50
//!   deliveries, as a hand-tuned consumer does (the target's baseline: the stronger of the two).
//!
//! Every case's clock (and its CPU count) runs from the first message handled to the last.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use reliable_amqp::lapin::message::Delivery;
use reliable_amqp::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions,
};
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher, AmqpSettings};
use reliable_core::idempotency::{InMemoryIdempotencyStore, InMemoryStoreConfig};
use reliable_core::message::headers::MESSAGE_ID;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{DeliverySource, Message, MessageId, Transport};
use reliable_kafka::config::consumer_preset;
use reliable_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use reliable_kafka::rdkafka::message::{BorrowedMessage, Headers, Message as _};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering as KafkaOrdering, TopicSpec};
use tokio::sync::Notify;

use super::{stamp, BenchArgs, Mark, Report, Round, Sample, Tally};
use crate::child::{payload, KAFKA_PARTITIONS};
use crate::HarnessError;

const KAFKA: &str = "Kafka consumer";
const KAFKA_RAW: &str = "raw rdkafka StreamConsumer, auto-commit (no per-message work)";
const KAFKA_RAW_MANUAL: &str = "raw rdkafka StreamConsumer, offset stored after each message (enable.auto.offset.store=false, committed every 1 s), id decoded";
const KAFKA_SDK: &str =
    "SDK KafkaConsumer + pipeline, manual commit, in-memory dedupe, ordered per partition (default)";
const KAFKA_SDK_UNORDERED: &str =
    "SDK KafkaConsumer + pipeline, manual commit, in-memory dedupe, Ordering::Unordered";
const AMQP: &str = "RabbitMQ consumer, quorum queue";
const AMQP_RAW: &str = "raw lapin, auto-ack (no per-message work)";
const AMQP_RAW_EACH: &str =
    "raw lapin, manual ack, one per delivery (lapin's examples), SDK's prefetch, message_id decoded";
const AMQP_RAW_MULTIPLE: &str = "raw lapin, manual ack, multiple=true every 50 deliveries or when none is ready (hand-tuned), SDK's prefetch, message_id decoded";
const AMQP_SDK: &str = "SDK AmqpConsumer + pipeline, manual ack, in-memory dedupe";

/// librdkafka's `fetch.queue.backoff.ms` for every Kafka consumer case, raw and SDK. Its default
/// (1000 ms) pauses a partition's fetching for a second whenever the local queue passed
/// `queued.min.messages` (100,000 per partition), even once the application has drained it: a
/// consumer faster than the brokers then idles most of the time, and throughput swung between
/// ~0.27 M and ~2 M msg/s from round to round. The SDK's consumer preset sets 10 ms, which
/// keeps a fast consumer fed; the raw cases get the same.
const FETCH_QUEUE_BACKOFF_MS: &str = reliable_kafka::config::CONSUMER_FETCH_QUEUE_BACKOFF_MS;

/// How long a consumer case may take before it is called stuck.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

/// Counts handled messages; the clock and the CPU count run from the first to the last.
#[derive(Default)]
struct Count {
    handled: AtomicU64,
    first: OnceLock<Mark>,
    last: OnceLock<Mark>,
    done: Notify,
}

impl Count {
    fn one(&self, target: u64) {
        self.first.get_or_init(Mark::now);
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == target {
            let _ = self.last.set(Mark::now());
            self.done.notify_one();
        }
    }

    fn sample(&self, messages: u64) -> Result<Sample, HarnessError> {
        match (self.first.get(), self.last.get()) {
            (Some(first), Some(last)) => Ok(Sample::between(*first, *last, messages, Vec::new())),
            _ => Err(HarnessError::Setup(format!(
                "the consumer handled {} of {messages} messages",
                self.handled.load(Ordering::Relaxed)
            ))),
        }
    }
}

/// The SDK's message id of a Kafka record, decoded as the SDK does it: the `x-message-id`
/// header parsed as a UUID. A record without one fails the case (every record here was written
/// by the SDK).
fn kafka_id(record: &BorrowedMessage<'_>) -> Result<MessageId, HarnessError> {
    let value = record
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == MESSAGE_ID))
        .and_then(|h| h.value)
        .ok_or_else(|| setup(format!("a record without the `{MESSAGE_ID}` header")))?;
    std::str::from_utf8(value)
        .map_err(setup)?
        .parse::<MessageId>()
        .map_err(setup)
}

/// The SDK's message id of a RabbitMQ delivery, as a raw lapin user reads it: the
/// `message_id` property (which the SDK's publisher sets to the id) parsed as a UUID.
fn amqp_id(delivery: &Delivery) -> Result<MessageId, HarnessError> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .ok_or_else(|| setup("a delivery without the message_id property"))?
        .as_str()
        .parse::<MessageId>()
        .map_err(setup)
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

/// Raw rdkafka as most examples show it: auto-commit (librdkafka stores each offset as it
/// hands the message out, before it is handled) and nothing read from the message.
async fn kafka_raw(args: &BenchArgs, topic: &str, messages: u64) -> Result<Sample, HarnessError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
        .set("group.id", format!("{topic}-raw-{}", stamp_nanos()))
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
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

/// Raw rdkafka doing the SDK's per-message work the way an experienced user would, with the
/// SDK's consumer preset otherwise:
///
/// * **Commits: librdkafka's at-least-once pattern.** `enable.auto.offset.store=false` with
///   `enable.auto.commit=true`, `auto.commit.interval.ms=1000` (the SDK's commit interval), and
///   [`store_offset_from_message`](Consumer::store_offset_from_message) after each message is
///   handled: the background commit then carries only handled offsets, as the SDK's watermark
///   commit does. Chosen over `commit_message(CommitMode::Async)` per message (a commit request
///   per message, which no one tuning a consumer sends) or per batch (the same guarantee as
///   stored offsets, with more code).
/// * **The id of every message** decoded from its header ([`kafka_id`]).
///
/// Messages are handled one at a time, in order; there is no dedupe store (the SDK's is part of
/// what it costs).
async fn kafka_raw_manual(
    args: &BenchArgs,
    topic: &str,
    messages: u64,
) -> Result<Sample, HarnessError> {
    let mut config = consumer_preset(
        &args.brokers.kafka_bootstrap,
        &format!("{topic}-raw-manual-{}", stamp_nanos()),
    );
    config
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    let consumer: StreamConsumer = config.create().map_err(setup)?;
    consumer.subscribe(&[topic]).map_err(setup)?;
    let count = Count::default();
    let read = async {
        while count.handled.load(Ordering::Relaxed) < messages {
            let record = consumer.recv().await.map_err(setup)?;
            std::hint::black_box(kafka_id(&record)?);
            count.one(messages);
            consumer.store_offset_from_message(&record).map_err(setup)?;
        }
        Ok::<(), HarnessError>(())
    };
    tokio::time::timeout(CASE_TIMEOUT, read)
        .await
        .map_err(|_| setup("the raw manual-commit consumer case timed out"))??;
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
    let mut config = consumer_preset(&args.brokers.kafka_bootstrap, &group);
    config.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    let source = KafkaConsumer::builder_from_config(config)
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

/// Raw lapin as most examples show it: auto-ack (the broker forgets each message as it sends
/// it) and nothing read from the message.
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

/// How a raw lapin consumer acknowledges what it handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawAck {
    /// One `basic.ack` per delivery, awaited after it is handled: lapin's own examples.
    EachDelivery,
    /// `basic.ack` with `multiple=true` on every [`ACK_EVERY`]th delivery, and on the last one
    /// handled whenever no further delivery is ready (so a quiet queue leaves nothing unacked):
    /// what RabbitMQ's documentation advises to cut ack traffic, and what a hand-tuned consumer
    /// does.
    MultipleEvery,
}

/// Deliveries per `multiple=true` ack of [`RawAck::MultipleEvery`]: a quarter of the SDK's
/// prefetch (200), so the broker's window never runs dry waiting for an ack.
const ACK_EVERY: u32 = 50;

/// Acks `delivery` and every earlier one on its channel.
async fn ack_up_to(delivery: &Delivery) -> Result<(), HarnessError> {
    let options = BasicAckOptions { multiple: true };
    if delivery.ack(options).await.map_err(setup)? {
        Ok(())
    } else {
        Err(setup("an ack was refused (channel closed)"))
    }
}

/// Raw lapin doing the SDK's per-message work by hand: the SDK's prefetch (`basic.qos`),
/// manual acks as `acks` says, each after its delivery is handled, and the id of every message
/// decoded ([`amqp_id`]). Deliveries are handled one at a time; there is no dedupe store.
async fn amqp_raw_manual(
    args: &BenchArgs,
    queue: &str,
    messages: u64,
    prefetch: u16,
    acks: RawAck,
) -> Result<Sample, HarnessError> {
    let conn = Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
        .await
        .map_err(setup)?;
    let channel = conn.create_channel().await.map_err(setup)?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(setup)?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(setup)?;
    let count = Count::default();
    let read = async {
        // The last delivery handled but not acked yet, and how many are unacked up to it.
        let mut unacked: Option<(Delivery, u32)> = None;
        while count.handled.load(Ordering::Relaxed) < messages {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Some((last, _)) = unacked.take() {
                        ack_up_to(&last).await?;
                    }
                    consumer.next().await
                }
            };
            let delivery = match next {
                Some(delivery) => delivery.map_err(setup)?,
                None => return Err(setup("the raw consumer's stream ended")),
            };
            std::hint::black_box(amqp_id(&delivery)?);
            count.one(messages);
            match acks {
                RawAck::EachDelivery => {
                    let acked = delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(setup)?;
                    if !acked {
                        return Err(setup("an ack was refused (channel closed)"));
                    }
                }
                RawAck::MultipleEvery => {
                    let n = unacked.take().map_or(1, |(_, n)| n + 1);
                    if n >= ACK_EVERY {
                        ack_up_to(&delivery).await?;
                    } else {
                        unacked = Some((delivery, n));
                    }
                }
            }
        }
        if let Some((last, _)) = unacked.take() {
            ack_up_to(&last).await?;
        }
        Ok(())
    };
    tokio::time::timeout(CASE_TIMEOUT, read)
        .await
        .map_err(|_| setup("the raw manual-ack consumer case timed out"))??;
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
    let (mut raw_t, mut manual_t, mut sdk_t, mut unordered_t) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    let n = args.consume_messages;
    for round in Round::all(args.rounds) {
        for case in round.in_turn(&[0u8, 1, 2, 3]) {
            match case {
                0 => raw_t.add(round, kafka_raw(args, &topic, n).await?),
                1 => manual_t.add(round, kafka_raw_manual(args, &topic, n).await?),
                2 => {
                    let ordered =
                        kafka_sdk(args, &topic, &transport, n, KafkaOrdering::PerPartition);
                    sdk_t.add(round, ordered.await?);
                }
                _ => {
                    let unordered =
                        kafka_sdk(args, &topic, &transport, n, KafkaOrdering::Unordered);
                    unordered_t.add(round, unordered.await?);
                }
            }
        }
        eprintln!(
            "bench: Kafka consumer: raw auto-commit {:?}, raw manual {:?}, SDK {:?}, SDK unordered {:?}",
            raw_t.rounds(),
            manual_t.rounds(),
            sdk_t.rounds(),
            unordered_t.rounds()
        );
    }
    report.push(raw_t.result(KAFKA, KAFKA_RAW, None));
    report.push(manual_t.result(KAFKA, KAFKA_RAW_MANUAL, None));
    report.push(sdk_t.result(KAFKA, KAFKA_SDK, None));
    report.push(unordered_t.result(KAFKA, KAFKA_SDK_UNORDERED, None));
    report.target(
        "Kafka: SDK manual-commit consumer with dedupe (default ordering) / raw rdkafka storing offsets after handling and decoding the id",
        (KAFKA, KAFKA_SDK, None),
        (KAFKA, KAFKA_RAW_MANUAL, None),
        0.90,
    );
    report.target(
        "Kafka: SDK manual-commit consumer with dedupe (unordered) / raw rdkafka storing offsets after handling and decoding the id",
        (KAFKA, KAFKA_SDK_UNORDERED, None),
        (KAFKA, KAFKA_RAW_MANUAL, None),
        0.90,
    );
    report.context(
        "Kafka: SDK manual-commit consumer with dedupe (default ordering) / raw auto-commit",
        (KAFKA, KAFKA_SDK, None),
        (KAFKA, KAFKA_RAW, None),
    );
    report.context(
        "Kafka: raw storing offsets and decoding the id / raw auto-commit",
        (KAFKA, KAFKA_RAW_MANUAL, None),
        (KAFKA, KAFKA_RAW, None),
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
        let (mut raw_t, mut each_t, mut multiple_t, mut sdk_t) = (
            Tally::default(),
            Tally::default(),
            Tally::default(),
            Tally::default(),
        );
        let messages = args.amqp_messages;
        let prefetch = settings.prefetch();
        let publisher = AmqpPublisher::connect(&args.brokers.amqp_url, settings.clone()).await?;
        for round in Round::all(args.rounds) {
            for case in round.in_turn(&[0u8, 1, 2, 3]) {
                fill(publisher.clone(), messages, Some(&queue)).await?;
                match case {
                    0 => raw_t.add(round, amqp_raw(args, &queue, messages).await?),
                    1 => {
                        let s =
                            amqp_raw_manual(args, &queue, messages, prefetch, RawAck::EachDelivery);
                        each_t.add(round, s.await?);
                    }
                    2 => {
                        let s = amqp_raw_manual(
                            args,
                            &queue,
                            messages,
                            prefetch,
                            RawAck::MultipleEvery,
                        );
                        multiple_t.add(round, s.await?);
                    }
                    _ => {
                        let source = AmqpConsumer::connect_checked(
                            &args.brokers.amqp_url,
                            &spec,
                            settings.clone(),
                        )
                        .await?;
                        let s = sdk_pipeline(source, DeadLetter::BrokerReject, messages);
                        sdk_t.add(round, s.await?);
                    }
                }
            }
            eprintln!(
                "bench: RabbitMQ consumer: raw auto-ack {:?}, raw ack each {:?}, raw ack multiple {:?}, SDK {:?}",
                raw_t.rounds(),
                each_t.rounds(),
                multiple_t.rounds(),
                sdk_t.rounds()
            );
        }
        report.push(raw_t.result(AMQP, AMQP_RAW, None));
        report.push(each_t.result(AMQP, AMQP_RAW_EACH, None));
        report.push(multiple_t.result(AMQP, AMQP_RAW_MULTIPLE, None));
        report.push(sdk_t.result(AMQP, AMQP_SDK, None));
        report.target(
            "RabbitMQ: SDK manual-ack consumer with dedupe / raw lapin acking (multiple=true every 50) and decoding the id",
            (AMQP, AMQP_SDK, None),
            (AMQP, AMQP_RAW_MULTIPLE, None),
            0.90,
        );
        report.context(
            "RabbitMQ: SDK manual-ack consumer with dedupe / raw lapin acking each delivery and decoding the id",
            (AMQP, AMQP_SDK, None),
            (AMQP, AMQP_RAW_EACH, None),
        );
        report.context(
            "RabbitMQ: SDK manual-ack consumer with dedupe / raw auto-ack",
            (AMQP, AMQP_SDK, None),
            (AMQP, AMQP_RAW, None),
        );
        report.context(
            "RabbitMQ: raw acking (multiple=true every 50) and decoding the id / raw auto-ack",
            (AMQP, AMQP_RAW_MULTIPLE, None),
            (AMQP, AMQP_RAW, None),
        );
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    }
    report.notes.push(format!(
        "Consumers: {} Kafka messages ({KAFKA_PARTITIONS} partitions, a fresh group per case) and {} RabbitMQ messages per case, written by the SDK producer; throughput and client CPU from the first message handled to the last; the SDK runs PipelineConfig::default() (concurrency 16) and the preset's prefetch; every Kafka case with fetch.queue.backoff.ms {FETCH_QUEUE_BACKOFF_MS} (librdkafka's 1000 ms default idles a fast consumer); the raw manual cases handle one message at a time, store its offset (Kafka, committed every 1 s) or ack it (RabbitMQ, the SDK's prefetch; one ack per delivery, or multiple=true every 50 deliveries and whenever none is ready) and decode its id",
        args.consume_messages, args.amqp_messages
    ));
    Ok(())
}
