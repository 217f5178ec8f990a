//! The producer child: sends `messages` sequence-numbered messages through the SDK's reliable
//! producer at a bounded rate and journals how each send resolved.

use std::sync::Arc;
use std::time::Duration;

use reliable_amqp::settings::{AmqpSettings, DataLoss};
use reliable_amqp::AmqpPublisher;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Message;
use reliable_kafka::config::Safety;
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaTransport, TopicSpec};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::child::{payload, ChildArgs, KAFKA_PARTITIONS};
use crate::journal::Journal;
use crate::plan::{roles, Broker};
use crate::HarnessError;

/// Producer child options.
#[derive(clap::Args, Clone, Debug)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub child: ChildArgs,
    /// Messages to send.
    #[arg(long)]
    pub messages: u64,
    /// Messages per second.
    #[arg(long)]
    pub rate: u32,
}

/// The core producer's limits for the harness: a broker restart must not exhaust them, so every
/// send resolves by confirmation (or, past five minutes, by a reported failure).
fn producer_config(confirm_timeout: Duration) -> ProducerConfig {
    ProducerConfig {
        confirm_timeout,
        deadline: Duration::from_secs(300),
        max_attempts: 100_000,
        ..ProducerConfig::default()
    }
}

async fn build(args: &ChildArgs) -> Result<(Producer, Option<KafkaTransport>), HarnessError> {
    let unsafe_producer = roles(args.scenario, args.variant).unsafe_producer;
    match args.broker() {
        Broker::Amqp => {
            let settings = if unsafe_producer {
                AmqpSettings::classic_durable()
                    .unsafe_allow_data_loss(DataLoss::NoPublisherConfirms)
                    .unsafe_allow_data_loss(DataLoss::TransientMessages)
            } else {
                AmqpSettings::safe()
            };
            let confirm_timeout = Duration::from_secs(5);
            let settings = settings
                .with_confirm_timeout(confirm_timeout)
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            let publisher = AmqpPublisher::connect(&args.brokers.amqp_url, settings).await?;
            Ok((
                Producer::new(publisher, producer_config(confirm_timeout)),
                None,
            ))
        }
        Broker::Kafka => {
            let spec = TopicSpec::new(&args.dest).partitions(KAFKA_PARTITIONS);
            let confirm_timeout = Duration::from_secs(10);
            let builder = if unsafe_producer {
                let mut config = ClientConfig::new();
                config
                    .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
                    .set("acks", "1")
                    .set("enable.idempotence", "false");
                KafkaTransport::builder_from_config(config).safety(
                    Safety::strict()
                        .accept_data_loss_for("acks")
                        .accept_data_loss_for("enable.idempotence"),
                )
            } else {
                KafkaTransport::builder(&args.brokers.kafka_bootstrap)
            };
            let transport = builder
                .default_topic(spec)
                .confirm_timeout(confirm_timeout)
                .build()
                .await?;
            let producer = Producer::new(transport.clone(), producer_config(confirm_timeout));
            Ok((producer, Some(transport)))
        }
    }
}

/// Runs the producer child to the end.
pub async fn run(args: ProduceArgs) -> Result<(), HarnessError> {
    let journal = Arc::new(Journal::open(&args.child.journal)?);
    let (producer, kafka) = build(&args.child).await?;
    let rate = f64::from(args.rate.max(1));
    let tick = Duration::from_millis(10);
    let per_tick = rate * tick.as_secs_f64();
    let mut interval = tokio::time::interval(tick);
    // After a stall (the window was full during an outage) the rate stays bounded: no burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = JoinSet::new();
    let mut owed = 0.0;
    let mut seq = 0;
    while seq < args.messages {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 && seq < args.messages {
            owed -= 1.0;
            let mut msg = Message::new(payload(seq)).with_idempotency_key(seq.to_string())?;
            if args.child.broker() == Broker::Amqp {
                msg = msg.with_routing_key(&args.child.dest);
            }
            let span = tracing::info_span!("harness.send", seq, message_id = %msg.id());
            let handle = producer.send(msg).instrument(span.clone()).await?;
            let journal = journal.clone();
            pending.spawn(
                async move {
                    let line = match handle.await {
                        Ok(_) => format!("C {seq}"),
                        Err(e) => {
                            tracing::warn!(error = %e, "send handed back");
                            format!("F {seq} {}", e.to_string().replace('\n', " "))
                        }
                    };
                    journal.record(&line)
                }
                .instrument(span),
            );
            seq += 1;
        }
        while let Some(done) = pending.try_join_next() {
            done.map_err(|e| HarnessError::Setup(e.to_string()))??;
        }
    }
    while let Some(done) = pending.join_next().await {
        done.map_err(|e| HarnessError::Setup(e.to_string()))??;
    }
    let resent = producer.stats().resent.total();
    producer.close().await;
    if let Some(transport) = kafka {
        transport.close().await;
    }
    journal.record(&format!("DONE {seq} {resent}"))?;
    Ok(())
}
