//! The main demo: publish through the SDK to RabbitMQ and to Kafka, wait for every confirm,
//! consume everything back through the SDK's consumer pipeline (dedupe -> handler -> ack or
//! commit), and print what was confirmed and what was consumed.
//!
//! Run it with `scripts/demo` (starts the brokers first), or `cargo run --example demo` when
//! they already run. Connection settings come from `RELIABLE_AMQP_URL` and
//! `RELIABLE_KAFKA_BOOTSTRAP` (defaults: the brokers of `scripts/brokers up`).
//! Optional argument: how many messages to send to each broker (default 1000).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliable::amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable::amqp::{AmqpConsumer, AmqpPublisher, AmqpSettings};
use reliable::core::idempotency::InMemoryIdempotencyStore;
use reliable::core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, Pipeline, PipelineStats,
};
use reliable::core::producer::{Producer, ProducerStats};
use reliable::core::{DeliverySource, Message};
use reliable::kafka::{KafkaConsumer, KafkaTransport, TopicSpec};

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

/// What one broker's half of the demo saw.
struct Tally {
    producer: ProducerStats,
    consumer: PipelineStats,
    distinct: usize,
    duplicates_skipped: u64,
    elapsed: Duration,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {:>5}  confirmed {:>5}  resent {:>3}  failed {:>3}  received {:>5}  \
             consumed {:>5} (duplicates skipped {})  lost {:>3}  p50 confirm {:?}  ({:.2?})",
            self.producer.sent,
            self.producer.confirmed,
            self.producer.resent.total(),
            self.producer.failed,
            self.consumer.received,
            self.distinct,
            self.duplicates_skipped,
            (self.producer.confirmed as usize).saturating_sub(self.distinct),
            self.producer.confirm_latency_p50.unwrap_or_default(),
            self.elapsed
        )
    }
}

#[tokio::main]
async fn main() -> DemoResult<()> {
    let count: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|_| format!("not a message count: {n}"))?,
        None => 1000,
    };
    let run = std::process::id();
    let amqp_url = std::env::var("RELIABLE_AMQP_URL")
        .unwrap_or_else(|_| reliable_test_support::DEFAULT_AMQP_URL.to_owned());
    let bootstrap = std::env::var("RELIABLE_KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| reliable_test_support::DEFAULT_KAFKA_BOOTSTRAP.to_owned());

    // RabbitMQ: a durable quorum queue, confirms + mandatory + persistent messages.
    let queue = format!("reliable-demo-{run}");
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(
        "reliable-demo.dlx",
        "reliable-demo.dlq",
    ));
    let started = Instant::now();
    let settings = AmqpSettings::safe();
    let publisher = AmqpPublisher::connect(&amqp_url, settings.clone()).await?;
    {
        let conn = lapin_connection(&amqp_url).await?;
        let channel = conn.create_channel().await?;
        // Rejected (poison) messages go to the dead-letter exchange, never to nowhere.
        // declare_queue declares the dead-letter exchange and queue and binds them too.
        topology::declare_queue(&channel, &spec).await?;
    }
    let producer = Producer::new(publisher, Default::default());
    let messages = (0..count).map(|i| Message::new(format!("{run}-{i}")).with_routing_key(&queue));
    let producer_stats = send_all(&producer, messages).await?;
    // Checks at start that the queue dead-letters, at least once, to a bound durable queue:
    // only then may a poison message be rejected to the broker.
    let source = AmqpConsumer::connect_checked(&amqp_url, &spec, settings).await?;
    // A poison message is rejected to the queue's dead-letter exchange.
    let rabbit = consume(source, producer_stats, started).await?;
    println!("RabbitMQ  {rabbit}");
    {
        use reliable::amqp::lapin::options::QueueDeleteOptions;
        let conn = lapin_connection(&amqp_url).await?;
        let channel = conn.create_channel().await?;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }

    // Kafka: a topic checked for RF 3 / min.insync.replicas 2 / no unclean election; an
    // acks=all idempotent producer; a consumer that commits only processed offsets.
    let topic = TopicSpec::new("reliable-demo").partitions(3);
    let started = Instant::now();
    let transport = KafkaTransport::builder(&bootstrap)
        .topic(topic.clone())
        .topic(TopicSpec::new("reliable-demo.dlq"))
        .build()
        .await?;
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let messages = (0..count).map(|i| {
        Message::new(format!("{run}-{i}"))
            .with_destination("reliable-demo")
            .with_routing_key(format!("customer-{}", i % 16))
    });
    let producer_stats = send_all(&producer, messages).await?;
    let source = KafkaConsumer::builder(&bootstrap, &format!("reliable-demo-{run}"))
        .subscribe(topic)
        .build()
        .await?;
    // Kafka has no broker-side dead letter: poison messages go to a topic through a confirmed
    // publish, and their offsets are committed only after that.
    let dead_letter = transport.dead_letter("reliable-demo.dlq");
    let kafka = consume_matching(
        source,
        dead_letter,
        producer_stats,
        started,
        format!("{run}-"),
    )
    .await?;
    transport.close().await;
    println!("Kafka     {kafka}");

    if rabbit.distinct < rabbit.producer.confirmed as usize
        || kafka.distinct < kafka.producer.confirmed as usize
    {
        return Err("a confirmed message was not consumed back".into());
    }
    Ok(())
}

async fn lapin_connection(url: &str) -> DemoResult<reliable::amqp::lapin::Connection> {
    use reliable::amqp::lapin::{Connection, ConnectionProperties};
    Ok(Connection::connect(url, ConnectionProperties::default()).await?)
}

/// Sends every message through the reliable producer and waits for all confirms.
async fn send_all(
    producer: &Producer,
    messages: impl Iterator<Item = Message>,
) -> DemoResult<ProducerStats> {
    let mut handles = Vec::new();
    for message in messages {
        handles.push(producer.send(message).await?);
    }
    for handle in handles {
        if let Err(e) = handle.await {
            eprintln!("handed back: {e}");
        }
    }
    let stats = producer.stats();
    producer.close().await;
    Ok(stats)
}

async fn consume(
    source: impl DeliverySource + 'static,
    producer: ProducerStats,
    started: Instant,
) -> DemoResult<Tally> {
    consume_matching(
        source,
        DeadLetter::BrokerReject,
        producer,
        started,
        String::new(),
    )
    .await
}

/// Runs the consumer pipeline until every confirmed message whose payload starts with
/// `prefix` was handled once (or nothing new came for 30 s).
async fn consume_matching(
    source: impl DeliverySource + 'static,
    dead_letter: DeadLetter,
    producer: ProducerStats,
    started: Instant,
    prefix: String,
) -> DemoResult<Tally> {
    let want = producer.confirmed as usize;
    let seen: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let progress = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (seen, progress) = (seen.clone(), progress.clone());
        handler_fn(move |message: Message| {
            let (seen, progress, prefix) = (seen.clone(), progress.clone(), prefix.clone());
            async move {
                if message.payload().starts_with(prefix.as_bytes()) {
                    if let Ok(mut seen) = seen.lock() {
                        seen.insert(message.payload().to_vec());
                    }
                    progress.notify_one();
                }
                Ok(())
            }
        })
    };
    let dedupe = DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default()));
    let handler = HandlerBuilder::new(handler).layer(dedupe.clone()).build();
    let done = {
        let seen = seen.clone();
        async move {
            loop {
                let count = seen.lock().map(|s| s.len()).unwrap_or(want);
                if count >= want {
                    return;
                }
                let waited = tokio::time::timeout(Duration::from_secs(30), progress.notified());
                if waited.await.is_err() {
                    return;
                }
            }
        }
    };
    let consumer = Pipeline::new(source, handler, dead_letter)
        .run_until(done)
        .await?;
    let distinct = seen.lock().map(|s| s.len()).unwrap_or_default();
    Ok(Tally {
        producer,
        consumer,
        distinct,
        duplicates_skipped: dedupe.duplicates(),
        elapsed: started.elapsed(),
    })
}
