//! The negative control's consumer: the classic unsafe pattern. It journals the broker's order
//! as the safe consumer does (see [`source`](super::source)), as it reads each message.

use std::sync::Arc;
use std::time::Duration;

use reliable_amqp::settings::{AmqpSettings, DataLoss};
use reliable_core::DeliverySource;
use reliable_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use reliable_kafka::rdkafka::message::Message as _;
use reliable_kafka::rdkafka::ClientConfig;
use tokio::sync::mpsc;

use super::source::arrived;
use super::{connect_amqp, record, seen, Limiter};
use crate::child::{parse_payload, ChildArgs, KAFKA_SESSION_TIMEOUT};
use crate::journal::{log_line, Journal};
use crate::plan::{amqp_queue, roles, Broker};
use crate::HarnessError;

/// The classic unsafe consumer: a reader that acknowledges (auto-ack) or lets the client
/// commit (auto-commit) everything it buffers, and a worker applying effects from the buffer.
pub(super) async fn run_control(
    child: &ChildArgs,
    journal: Arc<Journal>,
    limiter: Arc<Limiter>,
) -> Result<(), HarnessError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let worker = {
        let journal = journal.clone();
        tokio::spawn(async move {
            while let Some(seq) = rx.recv().await {
                limiter.acquire().await;
                record(&journal, &format!("E {seq}"));
            }
        })
    };
    match child.broker() {
        Broker::Amqp => {
            let settings = AmqpSettings::safe().unsafe_allow_data_loss(DataLoss::AutoAck);
            let spec = amqp_queue(
                &child.dest,
                roles(child.scenario, child.variant).classic_queue,
            );
            let mut source = connect_amqp(child, &spec, settings).await;
            loop {
                match source.next().await {
                    Ok(Some(delivery)) => {
                        arrived(&journal, &delivery);
                        if let Some(seq) = seen(&journal, delivery.message().payload()) {
                            let _ = tx.send(seq);
                        }
                        // Auto-ack: the broker forgot the message when it sent it.
                        let _ = delivery.ack().await;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "control consumer lost its source; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        Broker::Kafka => {
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", &child.brokers.kafka_bootstrap)
                .set("group.id", child.group())
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "true")
                .set("auto.commit.interval.ms", "100")
                .set("auto.offset.reset", "earliest")
                .set(
                    "session.timeout.ms",
                    KAFKA_SESSION_TIMEOUT.as_millis().to_string(),
                )
                .create()
                .map_err(|e| HarnessError::Setup(format!("control consumer: {e}")))?;
            consumer
                .subscribe(&[&child.dest])
                .map_err(|e| HarnessError::Setup(format!("control consumer: {e}")))?;
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        let payload = m.payload().unwrap_or_default();
                        if let Some(seq) = parse_payload(payload) {
                            let key = m.key().map(String::from_utf8_lossy);
                            let line = log_line(seq, m.partition(), m.offset(), key.as_deref());
                            record(&journal, &line);
                        }
                        if let Some(seq) = seen(&journal, payload) {
                            let _ = tx.send(seq);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control consumer error; continuing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
    drop(tx);
    let _ = worker.await;
    Ok(())
}
