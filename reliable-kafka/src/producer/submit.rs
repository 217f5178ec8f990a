//! The [`Transport`] side of [`KafkaTransport`]: the ordered hand-off to librdkafka (the
//! submission, answered by the client's delivery callback) and the ordering lane.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, FutureRecord};
use reliable_core::transport::{Attempt, Submission};
use reliable_core::{Completion, Message, PublishError, Transport};
use tracing::Instrument;

use super::client::{Client, Delivery};
use super::KafkaTransport;

#[async_trait]
impl Transport for KafkaTransport {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let span = self.publish_span(msg);
        async move {
            let (done, answer) = Completion::channel();
            match self.enqueue(msg, done)? {
                Attempt::Callback => answer.await,
                Attempt::Future(delivery) => delivery.await,
            }
        }
        .instrument(span)
        .await
    }

    /// Enqueues `msg` into librdkafka now (the submission; see the
    /// [module docs](crate::producer#order)); the delivery callback answers `done`.
    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        Submission::Now(self.enqueue(&msg, done))
    }

    /// A stable hash of the message's topic and record key: one key always lands in one
    /// partition, so its messages keep their order while other keys go on. Messages without a
    /// key (spread over partitions by librdkafka) share one lane per topic.
    fn lane(&self, msg: &Message) -> u64 {
        lane_of(self.topic_of(msg).unwrap_or_default(), msg.routing_key())
    }

    /// Flushes librdkafka's queue; see [`KafkaTransport::close`].
    async fn close(&self) {
        KafkaTransport::close(self).await;
    }

    /// Whether any of the client's broker connections is up: from librdkafka's statistics
    /// (every `statistics.interval.ms`, which the builder sets to 1 s unless the config sets
    /// it), set to `false` at once by librdkafka's all-brokers-down error and to `true` by
    /// each confirmed delivery. `None` until the first of these, and always for a transport
    /// over an application's producer ([`KafkaTransport::from_producer`]).
    fn connected(&self) -> Option<bool> {
        self.current().1.connected()
    }
}

impl KafkaTransport {
    /// The topic `msg` goes to: its destination, or the default topic.
    fn topic_of<'a>(&'a self, msg: &'a Message) -> Option<&'a str> {
        msg.destination().or(self.inner.default_topic.as_deref())
    }

    fn publish_span(&self, msg: &Message) -> tracing::Span {
        let topic = self.topic_of(msg).unwrap_or_default();
        tracing::debug_span!("reliable.kafka.publish", message_id = %msg.id(), topic)
    }

    /// Hands `msg` to librdkafka now (so the caller's order is librdkafka's enqueue order).
    /// Our client answers `done` from its delivery callback; an application's
    /// `FutureProducer` answers through the returned future. Errors are refusals at enqueue.
    fn enqueue(&self, msg: &Message, done: Completion) -> Result<Attempt, PublishError> {
        let Some(topic) = self.topic_of(msg) else {
            done.dismiss();
            return Err(PublishError::Unroutable {
                reason: "the message has no destination and the transport no default topic; set one with Message::with_destination or KafkaTransportBuilder::default_topic".into(),
            });
        };
        let headers = msg
            .wire_headers()
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let payload: &[u8] = msg.payload();
        let size = payload.len();
        let (generation, client) = self.current();
        match client {
            Client::Callback(producer) => {
                let delivery = Box::new(Delivery {
                    done,
                    generation,
                    size,
                });
                let mut record = BaseRecord::with_opaque_to(topic, delivery)
                    .payload(payload)
                    .headers(headers);
                if let Some(key) = msg.routing_key() {
                    record = record.key(key);
                }
                match producer.send(record) {
                    Ok(()) => Ok(Attempt::Callback),
                    Err((e, record)) => {
                        record.delivery_opaque.done.dismiss();
                        Err(self.classify(generation, &e, size))
                    }
                }
            }
            Client::Future(producer) => {
                done.dismiss();
                let mut record = FutureRecord::<str, [u8]>::to(topic)
                    .payload(payload)
                    .headers(headers);
                if let Some(key) = msg.routing_key() {
                    record = record.key(key);
                }
                let delivery = producer
                    .send_result(record)
                    .map_err(|(e, _)| self.classify(generation, &e, size))?;
                let this = self.clone();
                // Cancel safe: dropping the future leaves the message to librdkafka, whose
                // report then goes nowhere; the core resends with the same id.
                Ok(Attempt::Future(Box::pin(async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => {
                            let err = this.classify(generation, &e, size);
                            tracing::debug!(error = %err, "delivery failed");
                            Err(err)
                        }
                        Err(_) => Err(PublishError::ConnectionLost {
                            reason: "the producer was dropped before the delivery report".into(),
                        }),
                    }
                })))
            }
        }
    }
}

/// The lane of a message to `topic` with record key `key` (`None`: one lane per topic). Lanes
/// only need to agree within one process.
pub(super) fn lane_of(topic: &str, key: Option<&str>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((topic, key))
}
