//! The [`Transport`] side of [`KafkaTransport`]: the ordered hand-off to librdkafka (the
//! submission), the wait for its delivery report (the attempt) and the ordering lane.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use reliable_core::transport::{Attempt, Submission};
use reliable_core::{Message, PublishError, Transport};
use tracing::Instrument;

use super::KafkaTransport;

#[async_trait]
impl Transport for KafkaTransport {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let span = self.publish_span(msg);
        async move { self.enqueue(msg)?.await }
            .instrument(span)
            .await
    }

    /// Enqueues `msg` into librdkafka when first polled (the submission) and returns the wait
    /// for its delivery report (the attempt); see the [module docs](crate::producer#order).
    fn submit(self: Arc<Self>, msg: Arc<Message>) -> Submission {
        let span = self.publish_span(&msg);
        let attempt_span = span.clone();
        Box::pin(
            async move {
                let delivery = self.enqueue(&msg)?;
                let attempt: Attempt = Box::pin(delivery.instrument(attempt_span));
                Ok(attempt)
            }
            .instrument(span),
        )
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

    /// Hands `msg` to librdkafka now (so the caller's order is librdkafka's enqueue order) and
    /// returns the wait for its delivery report. Errors are refusals at enqueue.
    fn enqueue(
        &self,
        msg: &Message,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let topic = self
            .topic_of(msg)
            .ok_or_else(|| PublishError::Unroutable {
                reason: "the message has no destination and the transport no default topic; set one with Message::with_destination or KafkaTransportBuilder::default_topic".into(),
            })?;
        let headers = msg
            .wire_headers()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let payload: &[u8] = msg.payload();
        let size = payload.len();
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(payload)
            .headers(headers);
        if let Some(key) = msg.routing_key() {
            record = record.key(key);
        }
        let (generation, producer) = self.current();
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| self.classify(generation, &e, size))?;
        let this = self.clone();
        // Cancel safe: dropping the future leaves the message to librdkafka, whose report then
        // goes nowhere; the core resends with the same id.
        Ok(async move {
            match delivery.await {
                Ok(Ok(report)) => {
                    tracing::trace!(
                        partition = report.partition,
                        offset = report.offset,
                        "delivered"
                    );
                    Ok(())
                }
                Ok(Err((e, _))) => {
                    let err = this.classify(generation, &e, size);
                    tracing::debug!(error = %err, "delivery failed");
                    Err(err)
                }
                Err(_) => Err(PublishError::ConnectionLost {
                    reason: "the producer was dropped before the delivery report".into(),
                }),
            }
        })
    }
}

/// The lane of a message to `topic` with record key `key` (`None`: one lane per topic). Lanes
/// only need to agree within one process.
pub(super) fn lane_of(topic: &str, key: Option<&str>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((topic, key))
}
