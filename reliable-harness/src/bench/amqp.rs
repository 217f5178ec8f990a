//! RabbitMQ producers: raw lapin against the SDK, confirms against transactions.

use std::time::Instant;

use futures::FutureExt;
use reliable_amqp::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use reliable_amqp::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use reliable_amqp::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpPublisher, AmqpSettings, PublishMode, QueueType};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Message;

use super::{stamp, through_producer, windowed, BenchArgs, Mark, Report, Round, Sample, Tally};

/// The cases of a window comparison and of the slow comparison, for [`Round::in_turn`].
const RAW_CASE: u8 = 0;
const IDENTITY_CASE: u8 = 1;
const SDK_CASE: u8 = 2;
const TX_CASE: u8 = 0;
const TX_BATCH_CASE: u8 = 1;
const EACH_CASE: u8 = 2;
use crate::child::payload;
use crate::HarnessError;

/// The case names, as they appear in the tables.
pub const RAW: &str = "raw lapin, confirm window";
/// The SDK producer with a confirm window.
pub const SDK: &str = "SDK, confirm window";
const SDK_TX: &str = "SDK, transaction per message";
const SDK_TX_BATCH: &str = "SDK, transaction per batch";
const RAW_EACH: &str = "raw lapin, waiting for each confirm";
const RAW_IDENTITY: &str =
    "raw lapin + the SDK's message id property and header (a fresh id per message)";

/// The group name of a queue type's cases.
pub fn group(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Quorum => "RabbitMQ, quorum queue",
        _ => "RabbitMQ, classic durable queue",
    }
}

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

async fn connect(args: &BenchArgs) -> Result<Connection, HarnessError> {
    Connection::connect(&args.brokers.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| HarnessError::BrokerUnavailable {
            broker: "RabbitMQ",
            detail: e.to_string(),
        })
}

fn settings(queue_type: QueueType, mode: PublishMode) -> Result<AmqpSettings, HarnessError> {
    Ok(AmqpSettings::safe()
        .with_queue_type(queue_type)
        .map_err(|e| HarnessError::Setup(e.to_string()))?
        .with_publish_mode(mode))
}

/// Persistent; with `identity`, also the message id property and the identity headers the SDK
/// writes, to tell what carrying them costs from what the SDK itself costs. Called once per
/// message: with `identity`, each gets an id of its own (a UUIDv7 generated for it), as the
/// SDK's messages do.
fn properties(identity: bool) -> BasicProperties {
    let properties = BasicProperties::default().with_delivery_mode(2);
    if !identity {
        return properties;
    }
    let message = Message::new(Vec::new());
    let mut table = FieldTable::default();
    for (name, value) in &message.wire_headers() {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    properties
        .with_message_id(ShortString::from(message.id_text().as_str()))
        .with_headers(table)
}

/// Raw lapin: persistent, mandatory publishes on a confirm-mode channel with at most `window`
/// unconfirmed at once (`window` 1: waiting for each confirm).
pub async fn raw(
    args: &BenchArgs,
    queue: &str,
    messages: u64,
    window: usize,
    identity: bool,
) -> Result<Sample, HarnessError> {
    let conn = connect(args).await?;
    let channel = conn.create_channel().await.map_err(setup)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(setup)?;
    let publish = |seq: u64| {
        let channel: Channel = channel.clone();
        let props = properties(identity);
        async move {
            channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload(seq),
                    props,
                )
                .await
        }
    };
    let sample = windowed(messages, window, |seq, permit| {
        let confirm = publish(seq);
        async move {
            let confirm = confirm.await.map_err(setup)?;
            Ok(async move {
                let confirmation = confirm.await.map_err(|e| e.to_string())?;
                drop(permit);
                if confirmation.is_ack() && confirmation.take_message().is_none() {
                    Ok(())
                } else {
                    Err("nacked or returned".to_owned())
                }
            }
            .boxed())
        }
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
    sample
}

/// The SDK's producer over its RabbitMQ publisher, `window` = `max_in_flight`.
pub async fn sdk(
    args: &BenchArgs,
    queue: &str,
    messages: u64,
    window: usize,
    settings: AmqpSettings,
) -> Result<Sample, HarnessError> {
    let publisher = AmqpPublisher::connect(&args.brokers.amqp_url, settings).await?;
    let producer = Producer::new(
        publisher,
        ProducerConfig {
            max_in_flight: window,
            ..ProducerConfig::default()
        },
    );
    through_producer(producer, messages, |seq| {
        Message::new(payload(seq)).with_routing_key(queue)
    })
    .await
}

/// The SDK's publisher in transaction mode, one `tx.commit` per batch of `batch`; latencies
/// are per commit.
async fn sdk_tx_batch(
    args: &BenchArgs,
    queue: &str,
    messages: u64,
    batch: usize,
    queue_type: QueueType,
) -> Result<Sample, HarnessError> {
    let publisher = AmqpPublisher::connect(
        &args.brokers.amqp_url,
        settings(queue_type, PublishMode::Transactions)?,
    )
    .await?;
    let message = |seq| Message::new(payload(seq)).with_routing_key(queue);
    let check = |results: Vec<Result<(), reliable_core::PublishError>>| {
        results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map_err(|e| HarnessError::Setup(format!("a transaction failed: {e}")))
    };
    check(publisher.publish_batch(&[message(u64::MAX)]).await)?;
    let mut latencies_us = Vec::new();
    let started = Mark::now();
    let mut seq = 0;
    while seq < messages {
        let n = (messages - seq).min(batch as u64);
        let msgs: Vec<Message> = (seq..seq + n).map(message).collect();
        let sent = Instant::now();
        check(publisher.publish_batch(&msgs).await)?;
        latencies_us.push(sent.elapsed().as_micros() as u64);
        seq += n;
    }
    Ok(started.sample(messages, latencies_us))
}

async fn purge(channel: &Channel, queue: &str) -> Result<(), HarnessError> {
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .map_err(setup)?;
    Ok(())
}

/// Runs the RabbitMQ producer cases for classic and quorum queues.
pub async fn run(args: &BenchArgs, report: &mut Report) -> Result<(), HarnessError> {
    let conn = connect(args).await?;
    let channel = conn.create_channel().await.map_err(setup)?;
    let stamp = stamp();
    for queue_type in [QueueType::ClassicDurable, QueueType::Quorum] {
        let g = group(queue_type);
        let queue = format!("bench.producer.{queue_type:?}.{stamp}").to_lowercase();
        let spec = match queue_type {
            QueueType::Quorum => QueueSpec::quorum(&queue),
            _ => QueueSpec::classic_durable(&queue),
        };
        topology::declare_queue(&channel, &spec).await?;
        let confirms = settings(queue_type, PublishMode::Confirms)?;
        let mut windows = args.windows.clone();
        if !windows.contains(&args.window) {
            windows.push(args.window);
            windows.sort_unstable();
        }
        for &window in &windows {
            let (mut raw_t, mut sdk_t) = (Tally::default(), Tally::default());
            let mut identity_t = Tally::default();
            let cases: &[u8] = if window == args.window {
                &[RAW_CASE, IDENTITY_CASE, SDK_CASE]
            } else {
                &[RAW_CASE, SDK_CASE]
            };
            for round in Round::all(args.rounds) {
                for case in round.in_turn(cases) {
                    let n = args.amqp_messages;
                    match case {
                        RAW_CASE => {
                            let s = raw(args, &queue, n, window, false).await?;
                            raw_t.add(round, s);
                        }
                        IDENTITY_CASE => {
                            let s = raw(args, &queue, n, window, true).await?;
                            identity_t.add(round, s);
                        }
                        _ => {
                            let s = sdk(args, &queue, n, window, confirms.clone());
                            sdk_t.add(round, s.await?);
                        }
                    }
                    purge(&channel, &queue).await?;
                }
            }
            eprintln!(
                "bench: {g}, window {window}: raw {:?}, SDK {:?}",
                raw_t.rounds(),
                sdk_t.rounds()
            );
            report.push(raw_t.result(g, RAW, Some(window)));
            report.push(identity_t.result(g, RAW_IDENTITY, Some(window)));
            report.push(sdk_t.result(g, SDK, Some(window)));
        }
        let (mut tx, mut tx_batch, mut each) =
            (Tally::default(), Tally::default(), Tally::default());
        let transactions = settings(queue_type, PublishMode::Transactions)?;
        for round in Round::all(args.rounds) {
            for case in round.in_turn(&[TX_CASE, TX_BATCH_CASE, EACH_CASE]) {
                match case {
                    TX_CASE => {
                        let n = args.slow_messages;
                        let s = sdk(args, &queue, n, args.window, transactions.clone());
                        tx.add(round, s.await?);
                    }
                    TX_BATCH_CASE => {
                        let n = args.amqp_messages;
                        let s = sdk_tx_batch(args, &queue, n, args.tx_batch, queue_type);
                        tx_batch.add(round, s.await?);
                    }
                    _ => {
                        let s = raw(args, &queue, args.slow_messages, 1, false);
                        each.add(round, s.await?);
                    }
                }
                purge(&channel, &queue).await?;
            }
        }
        report.push(tx.result(g, SDK_TX, None));
        report.cases.push(tx_batch.result(
            g,
            &format!("{SDK_TX_BATCH} of {}", args.tx_batch),
            None,
        ));
        report.push(each.result(g, RAW_EACH, Some(1)));
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let w = Some(args.window);
        report.target(
            &format!(
                "{g}: SDK / raw lapin carrying the SDK's identity, window {}",
                args.window
            ),
            (g, SDK, w),
            (g, RAW_IDENTITY, w),
            0.97,
        );
        report.context(
            &format!(
                "{g}: SDK / raw lapin without the identity, window {}",
                args.window
            ),
            (g, SDK, w),
            (g, RAW, w),
        );
        report.target(
            &format!(
                "{g}: SDK confirms (window {}) / SDK transaction per message",
                args.window
            ),
            (g, SDK, w),
            (g, SDK_TX, None),
            10.0,
        );
    }
    let _ = conn.close(200, "done".into()).await;
    report.notes.push(format!(
        "RabbitMQ: persistent messages, mandatory, publisher confirms (or tx.select), {} messages per windowed case, {} per slow case; latency of the transaction-per-batch case is per commit",
        args.amqp_messages, args.slow_messages
    ));
    Ok(())
}
