//! The main demo: publish to RabbitMQ and to Kafka, wait for every confirm, consume everything
//! back, and print what was confirmed and what was consumed.
//!
//! Run it with `scripts/demo` (starts the brokers first), or `cargo run --example demo` when
//! they already run. Connection settings come from `RELIABLE_AMQP_URL` and
//! `RELIABLE_KAFKA_BOOTSTRAP` (defaults: the brokers of `scripts/brokers up`).
//! Optional argument: how many messages to send to each broker (default 1000).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

/// What one broker's half of the demo saw.
struct Tally {
    sent: usize,
    confirmed: usize,
    consumed: usize,
    elapsed: Duration,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {:>6}  confirmed {:>6}  consumed {:>6}  lost {:>3}  ({:.2?})",
            self.sent,
            self.confirmed,
            self.consumed,
            self.confirmed.saturating_sub(self.consumed),
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
    let run = format!("{}", std::process::id());
    let amqp_url = std::env::var("RELIABLE_AMQP_URL")
        .unwrap_or_else(|_| reliable_test_support::DEFAULT_AMQP_URL.to_owned());
    let bootstrap = std::env::var("RELIABLE_KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| reliable_test_support::DEFAULT_KAFKA_BOOTSTRAP.to_owned());

    let rabbit = rabbitmq(&amqp_url, &run, count).await?;
    println!("RabbitMQ  {rabbit}");
    let kafka = kafka(&bootstrap, &run, count).await?;
    println!("Kafka     {kafka}");
    if rabbit.consumed < rabbit.confirmed || kafka.consumed < kafka.confirmed {
        return Err("a confirmed message was not consumed back".into());
    }
    Ok(())
}

async fn rabbitmq(url: &str, run: &str, count: usize) -> DemoResult<Tally> {
    let started = Instant::now();
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let queue = format!("reliable-demo-{run}");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let mut confirms = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{run}-{i}");
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    id.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(id.as_str().into()),
                )
                .await?,
        );
    }
    let mut confirmed = 0;
    for confirm in confirms {
        let confirmation = confirm.await?;
        if confirmation.is_ack() && confirmation.take_message().is_none() {
            confirmed += 1;
        }
    }

    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = HashSet::new();
    while seen.len() < confirmed {
        let next = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
        let Ok(Some(delivery)) = next else { break };
        let delivery = delivery?;
        seen.insert(delivery.data.clone());
        delivery.ack(BasicAckOptions::default()).await?;
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "demo done".into()).await?;
    Ok(Tally {
        sent: count,
        confirmed,
        consumed: seen.len(),
        elapsed: started.elapsed(),
    })
}

async fn kafka(bootstrap: &str, run: &str, count: usize) -> DemoResult<Tally> {
    let started = Instant::now();
    let topic = "reliable-demo";
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?
        .brokers()
        .len();
    let replication = brokers.min(3) as i32;
    let min_isr = (replication - 1).max(1).to_string();
    let new_topic = NewTopic::new(topic, 3, TopicReplication::Fixed(replication))
        .set("min.insync.replicas", &min_isr);
    for result in admin
        .create_topics(&[new_topic], &AdminOptions::new())
        .await?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("creating {name}: {code}").into()),
        }
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    let sends = (0..count).map(|i| {
        let producer = &producer;
        async move {
            let id = format!("{run}-{i}");
            producer
                .send(
                    FutureRecord::to(topic).key(&id).payload(&id),
                    Duration::from_secs(30),
                )
                .await
                .is_ok()
        }
    });
    let confirmed = futures::future::join_all(sends)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reliable-demo-{run}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let prefix = format!("{run}-");
    let mut seen = HashSet::new();
    while seen.len() < confirmed {
        let next = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await;
        let Ok(message) = next else { break };
        if let Some(payload) = message?.payload() {
            if payload.starts_with(prefix.as_bytes()) {
                seen.insert(payload.to_vec());
            }
        }
    }
    Ok(Tally {
        sent: count,
        confirmed,
        consumed: seen.len(),
        elapsed: started.elapsed(),
    })
}
