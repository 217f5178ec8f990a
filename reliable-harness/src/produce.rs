//! The producer child: sends `messages` sequence-numbered messages through the SDK's reliable
//! producer at a bounded rate and journals how each send resolved.
//!
//! Every send happens on the one task of [`run`], in sequence order: a restarted producer
//! replays its outbox first, then each tick's batch goes to `send_batch` in turn, and the
//! handles are kept and awaited elsewhere. Sequence order is therefore the send order the
//! checker holds the broker to (per record key on Kafka, per producer on RabbitMQ).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashSet;
use reliable_amqp::settings::{AmqpSettings, DataLoss};
use reliable_amqp::AmqpPublisher;
use reliable_core::outbox::Outbox;
use reliable_core::producer::{Producer, ProducerConfig, SendHandle, SendOrder};
use reliable_core::{Attempt, Completion, Message, MessageId, PublishError, Submission, Transport};
use reliable_kafka::config::Safety;
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{KafkaTransport, TopicSpec};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::child::{parse_payload, payload, record_key, ChildArgs, KAFKA_PARTITIONS};
use crate::journal::{Journal, ProducerView, Tail};
use crate::plan::{roles, Broker, Publish, Scenario};
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

/// The Kafka delivery deadline of the partition runs: longer than the partition (25 s) and
/// the leader election after it.
const KAFKA_PARTITION_DEADLINE: Duration = Duration::from_secs(120);

/// The RabbitMQ settings of the run's producer: the safe preset, or the classic unsafe
/// setting against the scenario's fault.
fn amqp_settings(scenario: Scenario, unsafe_producer: bool) -> AmqpSettings {
    if !unsafe_producer {
        return AmqpSettings::safe();
    }
    match scenario {
        Scenario::AmqpBadPublish => {
            AmqpSettings::safe().unsafe_allow_data_loss(DataLoss::NoMandatory)
        }
        Scenario::AmqpSilentNetwork | Scenario::AmqpClientPartition => {
            AmqpSettings::safe().unsafe_allow_data_loss(DataLoss::NoPublisherConfirms)
        }
        _ => AmqpSettings::classic_durable()
            .unsafe_allow_data_loss(DataLoss::NoPublisherConfirms)
            .unsafe_allow_data_loss(DataLoss::TransientMessages),
    }
}

/// How long one attempt may wait for its confirm: short where the link goes silent, so the
/// fault outlasts it many times over.
fn amqp_confirm_timeout(scenario: Scenario) -> Duration {
    match scenario {
        Scenario::AmqpSilentNetwork => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    }
}

/// Cuts the first attempt of some messages short (see [`Publish::cut_short`]): the attempt's
/// hand-off and wait for its confirm are dropped a few microseconds after the hand-off starts,
/// anywhere inside the transport, as a caller's timeout drops them. The core producer then
/// resends the message. Messages not cut go through the inner transport untouched, so the
/// producer's hand-off order (`submit`) and ordering lanes are the inner transport's.
struct CutShort {
    inner: Arc<dyn Transport>,
    scenario: Scenario,
    cut: DashSet<MessageId>,
}

impl CutShort {
    /// How long `msg`'s attempt may run, when it is the first attempt of a message to cut.
    fn cut_after(&self, msg: &Message) -> Option<Duration> {
        parse_payload(msg.payload())
            .and_then(|seq| Publish::cut_short(self.scenario, seq))
            .filter(|_| self.cut.insert(msg.id()))
    }
}

#[async_trait]
impl Transport for CutShort {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        match self.cut_after(msg) {
            Some(after) => tokio::time::timeout(after, self.inner.publish(msg))
                .await
                .unwrap_or(Err(PublishError::Timeout)),
            None => self.inner.publish(msg).await,
        }
    }

    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        let after = self.cut_after(&msg);
        let submission = Arc::clone(&self.inner).submit(msg, done);
        let Some(after) = after else {
            return submission;
        };
        // One budget for the hand-off and the confirm, as a publish had. A callback attempt is
        // cut by answering through a future instead: the producer then ignores the callback.
        let ends = Instant::now() + after;
        let cut = move |attempt: Attempt| {
            Attempt::Future(Box::pin(async move {
                match attempt {
                    Attempt::Future(confirm) => tokio::time::timeout_at(ends, confirm)
                        .await
                        .unwrap_or(Err(PublishError::Timeout)),
                    Attempt::Callback => {
                        tokio::time::sleep_until(ends).await;
                        Err(PublishError::Timeout)
                    }
                }
            }))
        };
        match submission {
            Submission::Now(result) => Submission::Now(result.map(cut)),
            Submission::Later(handing) => Submission::Later(Box::pin(async move {
                tokio::time::timeout_at(ends, handing)
                    .await
                    .unwrap_or(Err(PublishError::Timeout))
                    .map(cut)
            })),
        }
    }

    fn lane(&self, msg: &Message) -> u64 {
        self.inner.lane(msg)
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// The transport of the run, wrapped in the core producer (with the outbox when the run's role
/// asks for one).
async fn build(
    args: &ChildArgs,
    outbox: Option<Outbox>,
) -> Result<(Producer, Option<KafkaTransport>), HarnessError> {
    let unsafe_producer = roles(args.scenario, args.variant).unsafe_producer;
    let wrap = |transport: Arc<dyn Transport>, config: ProducerConfig| match outbox {
        Some(outbox) => Producer::with_outbox(transport, config, outbox),
        None => Producer::from_arc(transport, config),
    };
    match args.broker() {
        Broker::Amqp => {
            let confirm_timeout = amqp_confirm_timeout(args.scenario);
            let settings = amqp_settings(args.scenario, unsafe_producer)
                .with_confirm_timeout(confirm_timeout)
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            let publisher: Arc<dyn Transport> = Arc::new(
                AmqpPublisher::connect_cluster(&args.brokers.amqp_urls(), settings).await?,
            );
            let transport: Arc<dyn Transport> = if args.scenario == Scenario::AmqpBadPublish {
                Arc::new(CutShort {
                    inner: publisher,
                    scenario: args.scenario,
                    cut: DashSet::new(),
                })
            } else {
                publisher
            };
            let mut config = producer_config(confirm_timeout);
            if unsafe_producer && args.scenario == Scenario::AmqpBadPublish {
                // The control also shows what the order check sees when resends do not keep
                // the send order.
                config.order = SendOrder::Relaxed;
            }
            Ok((wrap(transport, config), None))
        }
        Broker::Kafka => {
            let spec = TopicSpec::new(&args.dest).partitions(KAFKA_PARTITIONS);
            let confirm_timeout = Duration::from_secs(10);
            let builder = if unsafe_producer {
                // Against a cut link the classic unsafe setting is acks=0 (a record counts
                // once written to the socket); against broker faults, acks=1.
                let acks = if args.scenario == Scenario::KafkaClientPartition {
                    "0"
                } else {
                    "1"
                };
                let mut config = ClientConfig::new();
                config
                    .set("bootstrap.servers", &args.brokers.kafka_bootstrap)
                    .set("acks", acks)
                    .set("enable.idempotence", "false");
                KafkaTransport::builder_from_config(config).safety(
                    Safety::strict()
                        .accept_data_loss_for("acks")
                        .accept_data_loss_for("enable.idempotence"),
                )
            } else {
                KafkaTransport::builder(&args.brokers.kafka_bootstrap)
            };
            // A broker fault (a leader killed and back, a partition) can outlast any
            // per-attempt timeout, so those runs keep the preset's timing: librdkafka owns each
            // record (retrying in order) for the whole delivery deadline; a record it gave up
            // on after a short timeout would be resent behind newer ones of its key, which the
            // order check counts.
            let preset_timing = matches!(
                args.scenario,
                Scenario::KafkaLeaderKill
                    | Scenario::KafkaPartition
                    | Scenario::KafkaClientPartition
                    | Scenario::KafkaNemesis
            );
            let builder = builder.default_topic(spec);
            let builder = if preset_timing {
                builder.deadline(KAFKA_PARTITION_DEADLINE)
            } else {
                builder.confirm_timeout(confirm_timeout)
            };
            let transport = builder.build().await?;
            let config = if preset_timing {
                ProducerConfig {
                    max_attempts: 100_000,
                    ..transport.recommended_producer_config()
                }
            } else {
                producer_config(confirm_timeout)
            };
            let producer = wrap(Arc::new(transport.clone()), config);
            Ok((producer, Some(transport)))
        }
    }
}

/// Journals how a send resolved.
fn track(
    pending: &mut JoinSet<std::io::Result<()>>,
    journal: &Arc<Journal>,
    seq: u64,
    handle: SendHandle,
) {
    let journal = journal.clone();
    let span = tracing::info_span!("harness.send", seq, message_id = %handle.id());
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
}

/// Message `seq` of the run: to the run's queue or topic (on Kafka with its record key, see
/// [`record_key`]), or, in `amqp-bad-publish`, one of the bad publishes (see [`Publish::of`]).
fn message(child: &ChildArgs, seq: u64) -> Result<Message, HarnessError> {
    let msg = Message::new(payload(seq)).with_idempotency_key(seq.to_string())?;
    if child.broker() == Broker::Kafka {
        return Ok(msg.with_routing_key(record_key(seq)));
    }
    let dest = &child.dest;
    Ok(match Publish::of(child.scenario, seq) {
        Publish::Good => msg.with_routing_key(dest),
        Publish::Unroutable => msg.with_routing_key(format!("{dest}.unroutable")),
        Publish::MissingExchange => msg
            .with_destination(format!("{dest}.missing-exchange"))
            .with_routing_key(dest),
    })
}

/// Runs the producer child to the end. A restarted producer (its journal already has entries)
/// first replays its outbox, if it has one, then goes on after the last message it accepted.
pub async fn run(args: ProduceArgs) -> Result<(), HarnessError> {
    let mut previous = ProducerView::default();
    Tail::new(&args.child.journal).read(|l| previous.apply(l))?;
    let journal = Arc::new(Journal::open(&args.child.journal)?);
    let outbox = if roles(args.child.scenario, args.child.variant).outbox {
        let path = args.child.journal.with_extension("outbox");
        Some(Outbox::open(&path).map_err(|e| HarnessError::Setup(e.to_string()))?)
    } else {
        None
    };
    // What the outbox holds from the previous process, by message id.
    let replay_seqs: HashMap<MessageId, u64> = match &outbox {
        Some(o) => o
            .pending()
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .iter()
            .filter_map(|m| parse_payload(m.payload()).map(|s| (m.id(), s)))
            .collect(),
        None => HashMap::new(),
    };
    let (producer, kafka) = build(&args.child, outbox).await?;
    let mut pending = JoinSet::new();
    let replayed = producer
        .replay_outbox()
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))?;
    if !replayed.is_empty() {
        tracing::warn!(
            messages = replayed.len(),
            "replaying the outbox of the previous producer"
        );
    }
    for handle in replayed {
        match replay_seqs.get(&handle.id()) {
            Some(&seq) => track(&mut pending, &journal, seq, handle),
            None => {
                tracing::warn!(message_id = %handle.id(), "replayed a message the harness did not write")
            }
        }
    }
    let rate = f64::from(args.rate.max(1));
    let tick = Duration::from_millis(10);
    let per_tick = rate * tick.as_secs_f64();
    let mut interval = tokio::time::interval(tick);
    // After a stall (the window was full during an outage) the rate stays bounded: no burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0;
    let mut seq = previous.next_seq();
    while seq < args.messages {
        interval.tick().await;
        owed += per_tick;
        let mut batch = Vec::new();
        while owed >= 1.0 && seq + (batch.len() as u64) < args.messages {
            owed -= 1.0;
            let n = seq + batch.len() as u64;
            batch.push(message(&args.child, n)?);
        }
        if batch.is_empty() {
            continue;
        }
        // One outbox commit per batch; the batch is accepted once `send_batch` returns.
        let handles = producer.send_batch(batch).await.map_err(|e| e.error)?;
        let first = seq;
        seq += handles.len() as u64;
        let accepted: Vec<String> = (first..seq).map(|s| format!("A {s}")).collect();
        journal.record_all(accepted.iter().map(String::as_str))?;
        for (i, handle) in handles.into_iter().enumerate() {
            track(&mut pending, &journal, first + i as u64, handle);
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
