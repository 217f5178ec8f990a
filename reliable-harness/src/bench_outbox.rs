//! `reliable-harness bench-outbox`: the SDK producer's throughput against the real brokers with
//! and without the durable outbox, measured in the same run, in the same batches.
//!
//! Each case sends `--messages` 100-byte messages with `send_batch` in batches of `--batch`
//! (one outbox commit per batch) through a fresh producer and waits for every confirm; cases
//! alternate (without, with, without, with, ...) for `--rounds` rounds so drift hits both
//! alike, and the best round of each counts. Results: `bench-outbox.json` and `bench-outbox.md`
//! in `--out`.

use std::path::PathBuf;
use std::time::Instant;

use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpPublisher, AmqpSettings};
use reliable_core::outbox::Outbox;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Message;
use reliable_kafka::{KafkaTransport, TopicSpec};
use serde::Serialize;

use crate::child::{payload, BrokerArgs, KAFKA_PARTITIONS};
use crate::plan::Broker;
use crate::HarnessError;

/// Options of `bench-outbox`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Messages per case and round.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Messages per `send_batch` (and per outbox commit).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Rounds per case (the best one counts).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Where the results go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Where the brokers are.
    #[command(flatten)]
    pub brokers: BrokerArgs,
}

/// One broker's figures.
#[derive(Debug, Serialize)]
struct Row {
    broker: Broker,
    without_outbox_msgs_per_s: f64,
    with_outbox_msgs_per_s: f64,
    /// without / with: how many times slower the outbox makes the producer.
    slowdown: f64,
}

async fn producer(
    broker: Broker,
    args: &BenchArgs,
    dest: &str,
    outbox: Option<Outbox>,
) -> Result<Producer, HarnessError> {
    let config = ProducerConfig {
        max_in_flight: 4096,
        ..ProducerConfig::default()
    };
    Ok(match broker {
        Broker::Amqp => {
            let p = AmqpPublisher::connect(&args.brokers.amqp_url, AmqpSettings::safe()).await?;
            match outbox {
                Some(o) => Producer::with_outbox(p, config, o),
                None => Producer::new(p, config),
            }
        }
        Broker::Kafka => {
            let t = KafkaTransport::builder(&args.brokers.kafka_bootstrap)
                .default_topic(TopicSpec::new(dest).partitions(KAFKA_PARTITIONS))
                .build()
                .await?;
            let config = ProducerConfig {
                confirm_timeout: t.recommended_producer_config().confirm_timeout,
                ..config
            };
            match outbox {
                Some(o) => Producer::with_outbox(t, config, o),
                None => Producer::new(t, config),
            }
        }
    })
}

/// Sends the messages and returns messages per second.
async fn case(
    broker: Broker,
    args: &BenchArgs,
    dest: &str,
    outbox: Option<PathBuf>,
) -> Result<f64, HarnessError> {
    let outbox = match &outbox {
        Some(path) => Some(Outbox::open(path).map_err(|e| HarnessError::Setup(e.to_string()))?),
        None => None,
    };
    let producer = producer(broker, args, dest, outbox).await?;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(args.messages as usize);
    let mut seq = 0;
    while seq < args.messages {
        let n = (args.messages - seq).min(args.batch as u64);
        let batch: Vec<Message> = (seq..seq + n)
            .map(|s| {
                let m = Message::new(payload(s));
                if broker == Broker::Amqp {
                    m.with_routing_key(dest)
                } else {
                    m
                }
            })
            .collect();
        handles.extend(producer.send_batch(batch).await.map_err(|e| e.error)?);
        seq += n;
    }
    for h in handles {
        h.await?;
    }
    let took = started.elapsed();
    producer.close().await;
    Ok(args.messages as f64 / took.as_secs_f64().max(1e-9))
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> Result<(), HarnessError> {
    std::fs::create_dir_all(&args.out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let queue = format!("bench.outbox.{stamp}");
    let topic = format!("bench-outbox-{stamp}");
    let conn = Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| HarnessError::BrokerUnavailable {
            broker: "RabbitMQ",
            detail: e.to_string(),
        })?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?;
    topology::declare_queue(&channel, &QueueSpec::quorum(&queue)).await?;
    let mut rows = Vec::new();
    for broker in [Broker::Amqp, Broker::Kafka] {
        let dest = if broker == Broker::Amqp {
            &queue
        } else {
            &topic
        };
        let (mut without, mut with) = (0.0_f64, 0.0_f64);
        for round in 0..args.rounds {
            without = without.max(case(broker, &args, dest, None).await?);
            let path = args.out.join(format!("bench-{stamp}-{round}.outbox"));
            with = with.max(case(broker, &args, dest, Some(path.clone())).await?);
            let _ = std::fs::remove_file(&path);
            eprintln!(
                "bench-outbox: {broker:?} round {}: best without {without:.0}/s, with {with:.0}/s",
                round + 1
            );
        }
        rows.push(Row {
            broker,
            without_outbox_msgs_per_s: without.round(),
            with_outbox_msgs_per_s: with.round(),
            slowdown: (without / with.max(1e-9) * 100.0).round() / 100.0,
        });
    }
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    let mut md = format!(
        "SDK producer, {} x 100-byte messages per case, `send_batch` of {}, best of {} rounds, cases alternating in one run:\n\n| broker | without outbox (msg/s) | with outbox (msg/s) | slowdown (without / with) |\n|---|---:|---:|---:|\n",
        args.messages, args.batch, args.rounds
    );
    for r in &rows {
        md.push_str(&format!(
            "| {:?} | {} | {} | {:.2}x |\n",
            r.broker, r.without_outbox_msgs_per_s, r.with_outbox_msgs_per_s, r.slowdown
        ));
    }
    std::fs::write(
        args.out.join("bench-outbox.json"),
        serde_json::to_string_pretty(&rows).map_err(|e| HarnessError::Setup(e.to_string()))?,
    )?;
    std::fs::write(args.out.join("bench-outbox.md"), &md)?;
    println!("{md}");
    Ok(())
}
