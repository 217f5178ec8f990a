//! The manual-ack consumer: implements the core's [`DeliverySource`] over a lapin consumer
//! (loss-matrix row L4).
//!
//! * Manual acks only (auto-ack needs the explicit [`DataLoss::AutoAck`](crate::DataLoss)
//!   opt-out); nothing is acked by the adapter — each [`Delivery`] is settled through its
//!   [`Acker`] by the pipeline, after the handler's outcome is final.
//! * `basic.qos` bounds the unacked deliveries per channel (the settings' prefetch).
//! * The broker's `redelivered` flag is exposed as [`Delivery::redelivered`].
//! * `nack(false)` / `reject()` drop the message to the queue's dead-letter exchange (see
//!   [`QueueSpec::with_dead_letter_exchange`](crate::topology::QueueSpec::with_dead_letter_exchange)).
//! * When the stream ends (consumer cancelled by the broker, channel or connection lost),
//!   [`next`](DeliverySource::next) returns the retryable [`ConsumeError::ConnectionLost`];
//!   the next call re-opens the channel (with backoff) and consumes again. Unacked
//!   deliveries of the lost channel are redelivered by the broker with `redelivered = true`.
//!
//! ```no_run
//! use reliable_amqp::consumer::AmqpConsumer;
//! use reliable_amqp::settings::AmqpSettings;
//! use reliable_core::DeliverySource;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut consumer = AmqpConsumer::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "orders.eu", AmqpSettings::safe()).await?;
//! while let Some(delivery) = consumer.next().await? {
//!     println!("{} redelivered={}", delivery.message().id(), delivery.redelivered());
//!     delivery.ack().await?; // after the work is done
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use reliable_core::{AckError, Acker, ConsumeError, Delivery, DeliverySource, Message, MessageId};

use crate::connect::{retryable, Link, Source};
use crate::error::{soft_error, AmqpError};
use crate::settings::AmqpSettings;

/// A manual-ack RabbitMQ consumer of one queue.
pub struct AmqpConsumer {
    source: Source,
    settings: AmqpSettings,
    queue: String,
    current: Option<(Link, lapin::Consumer)>,
    closed: bool,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("source", &self.source)
            .field("queue", &self.queue)
            .field("consuming", &self.current.is_some())
            .field("settings", &self.settings)
            .finish()
    }
}

impl AmqpConsumer {
    /// Connects to `url` and starts consuming `queue`. The adapter owns the connection and
    /// re-opens it after a loss. Credentials never appear in logs or errors. An unparsable
    /// URL fails at once with [`AmqpError::InvalidUrl`] (no connect attempt).
    pub async fn connect(
        url: &str,
        queue: &str,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        let source = Source::url(url)?.with_heartbeat(settings.heartbeat());
        Self::start(source, queue, settings).await
    }

    /// Consumes `queue` on channels opened on an existing connection.
    pub async fn from_connection(
        connection: Connection,
        queue: &str,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        Self::start(Source::Connection(Arc::new(connection)), queue, settings).await
    }

    async fn start(source: Source, queue: &str, settings: AmqpSettings) -> Result<Self, AmqpError> {
        let mut consumer = Self {
            source,
            settings,
            queue: queue.to_owned(),
            current: None,
            closed: false,
        };
        consumer
            .subscribe()
            .await
            .map_err(|e| AmqpError::classify("basic.consume", "queue", &consumer.queue, e))?;
        Ok(consumer)
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn subscribe(&mut self) -> Result<(), lapin::Error> {
        let prefetch = self.settings.prefetch();
        let link = self
            .source
            .open(self.settings.reconnect(), |channel| async move {
                channel
                    .basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
            })
            .await?;
        let options = BasicConsumeOptions {
            no_ack: !self.settings.manual_ack(),
            ..BasicConsumeOptions::default()
        };
        let consumer = link
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.queue, prefetch, channel = link.channel.id(), "AMQP consumer started");
        self.current = Some((link, consumer));
        Ok(())
    }

    fn to_delivery(delivery: lapin::message::Delivery) -> Delivery {
        let headers = text_headers(delivery.properties.headers().as_ref());
        let wire = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let message = match Message::from_wire(delivery.data.clone(), wire) {
            Ok(message) => message,
            Err(error) => {
                // Not produced through reliable: keep it deliverable, keyed by its AMQP
                // message-id when it has one (so deduplication still works for it).
                tracing::warn!(%error, "delivery without reliable's identity headers");
                let mut message = Message::new(delivery.data.clone());
                if let Some(id) = delivery.properties.message_id().as_ref() {
                    if let Ok(parsed) = id.as_str().parse::<MessageId>() {
                        message = message.with_id(parsed);
                    } else if let Ok(with_key) = message.clone().with_idempotency_key(id.as_str()) {
                        message = with_key;
                    }
                }
                for (name, value) in &headers {
                    message.set_header(name.as_str(), value.as_str());
                }
                message
            }
        }
        .with_destination(delivery.exchange.as_str())
        .with_routing_key(delivery.routing_key.as_str());
        tracing::trace!(message_id = %message.id(), redelivered = delivery.redelivered, "delivery");
        Delivery::new(
            message,
            Box::new(AmqpAcker {
                acker: delivery.acker,
            }),
        )
        .with_redelivered(delivery.redelivered)
    }
}

/// The text-valued headers of a delivery.
fn text_headers(table: Option<&FieldTable>) -> Vec<(String, String)> {
    table
        .map(|t| {
            t.inner()
                .iter()
                .filter_map(|(k, v)| match v {
                    AMQPValue::LongString(s) => Some((
                        k.to_string(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    )),
                    AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn consume_error(error: &lapin::Error) -> ConsumeError {
    if let Some((code, text)) = soft_error(error) {
        if !matches!(code, lapin::protocol::AMQPSoftError::RESOURCELOCKED) {
            return ConsumeError::Fatal { reason: text };
        }
    }
    if retryable(error) {
        ConsumeError::ConnectionLost {
            reason: error.to_string(),
        }
    } else {
        ConsumeError::Fatal {
            reason: error.to_string(),
        }
    }
}

#[async_trait]
impl DeliverySource for AmqpConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        if self.closed {
            return Ok(None);
        }
        if self.current.is_none() {
            self.subscribe().await.map_err(|e| consume_error(&e))?;
        }
        let Some((_, consumer)) = self.current.as_mut() else {
            return Err(ConsumeError::ConnectionLost {
                reason: "no consumer channel".to_owned(),
            });
        };
        match consumer.next().await {
            Some(Ok(delivery)) => Ok(Some(Self::to_delivery(delivery))),
            Some(Err(error)) => {
                self.current = None;
                tracing::warn!(queue = %self.queue, %error, "AMQP consumer lost; will consume again");
                Err(ConsumeError::ConnectionLost {
                    reason: error.to_string(),
                })
            }
            None => {
                self.current = None;
                tracing::warn!(queue = %self.queue, "AMQP consumer stream ended (cancelled or channel closed); will consume again");
                Err(ConsumeError::ConnectionLost {
                    reason: "the broker ended the consumer (cancelled, or its channel closed)"
                        .to_owned(),
                })
            }
        }
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.closed = true;
        if let Some((link, consumer)) = self.current.take() {
            // Each step is bounded: after a broker loss the answers may never come, and the
            // broker requeues unacked deliveries when the channel goes anyway.
            let _ = tokio::time::timeout(
                SETTLE_TIMEOUT,
                link.channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
            )
            .await;
            let _ = tokio::time::timeout(
                SETTLE_TIMEOUT,
                link.channel.close(200, "consumer closed".into()),
            )
            .await;
            if let Some(connection) = link.connection {
                let _ = tokio::time::timeout(
                    SETTLE_TIMEOUT,
                    connection.close(200, "consumer closed".into()),
                )
                .await;
            }
        }
        Ok(())
    }
}

/// The longest an ack, nack, reject or close step may wait for the connection.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settles one AMQP delivery; checks lapin's `Ok(false)` (already settled, or channel gone).
struct AmqpAcker {
    acker: lapin::Acker,
}

impl AmqpAcker {
    /// Runs one settle call, bounded by [`SETTLE_TIMEOUT`], and checks lapin's answer.
    async fn settle(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = lapin::Result<bool>>,
    ) -> Result<(), AckError> {
        let result = tokio::time::timeout(SETTLE_TIMEOUT, call)
            .await
            .map_err(|_| AckError::ConnectionLost {
                reason: format!("{operation}: no progress within {SETTLE_TIMEOUT:?}"),
            })?;
        match result {
            Ok(true) => Ok(()),
            Ok(false) if self.acker.poisoned() => Err(AckError::ConnectionLost {
                reason: format!("{operation}: the delivery's channel closed"),
            }),
            Ok(false) => Err(AckError::Stale {
                reason: format!("{operation}: the delivery was already settled"),
            }),
            Err(error) if retryable(&error) => Err(AckError::ConnectionLost {
                reason: format!("{operation}: {error}"),
            }),
            Err(error) => Err(AckError::Other {
                reason: format!("{operation}: {error}"),
            }),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.settle("basic.ack", self.acker.ack(BasicAckOptions::default()))
            .await
    }

    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        self.settle("basic.nack", self.acker.nack(options)).await
    }

    async fn reject(&self) -> Result<(), AckError> {
        self.settle(
            "basic.reject",
            self.acker.reject(BasicRejectOptions { requeue: false }),
        )
        .await
    }
}
