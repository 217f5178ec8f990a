//! The [`DeliverySource`] side of [`AmqpConsumer`]: taking deliveries one at a time or in
//! batches (cancel safe), closing, and whether rejects reach a dead letter.

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::BasicCancelOptions;
use reliable_core::{ConsumeError, Delivery, DeliverySource};

use super::acker::SETTLE_TIMEOUT;
use super::channel::Current;
use super::{close_link, AmqpConsumer};
use crate::connect::retryable;
use crate::error::soft_error;
use crate::settings::QueueType;

pub(super) fn consume_error(error: &lapin::Error) -> ConsumeError {
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
        if let Some(lost) = self.deferred.take() {
            return Err(lost);
        }
        if self.current.is_none() {
            self.subscribe().await.map_err(|e| consume_error(&e))?;
        }
        let Some(current) = self.current.as_mut() else {
            return Err(ConsumeError::ConnectionLost {
                reason: "no consumer channel".to_owned(),
            });
        };
        // Cancel safe: lapin's stream takes a delivery only when it returns it.
        let item = current.consumer.next().await;
        let quorum = self.settings.queue_type() == QueueType::Quorum;
        let taken = current.take(item, &self.queue, quorum, &self.keys);
        if taken.is_err() {
            self.current = None;
        }
        taken.map(Some)
    }

    /// Waits for the first delivery as [`next`](DeliverySource::next) does (consuming again
    /// after a loss, with its errors), then adds, without waiting, up to `max - 1` deliveries
    /// lapin has already buffered for the channel: the batch is at most `max` (taken as 1
    /// when 0). Each is handed out as `next` hands it out (registered
    /// with the ack coalescer, redelivered flag, delivery count). When the channel's error or
    /// end comes next in the buffer, the batch is returned as it is and the loss
    /// ([`ConsumeError::ConnectionLost`]) is reported by the next call; the deliveries taken
    /// stay unacked on the lost channel, so the broker redelivers them. An empty batch only
    /// after [`close`](DeliverySource::close).
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let Some(first) = self.next().await? else {
            return Ok(Vec::new());
        };
        let max = max.max(1);
        let mut batch = Vec::with_capacity(max.min(usize::from(self.settings.prefetch())));
        batch.push(first);
        // No await point from here on, so a cancelled call loses nothing: each poll below
        // takes a delivery from lapin's buffer only when it returns it, and an item not
        // ready yet is left there (its wake-up registration is renewed by the next poll).
        let quorum = self.settings.queue_type() == QueueType::Quorum;
        while batch.len() < max {
            // `next` handed out the first delivery, so the channel is there.
            let Some(current) = self.current.as_mut() else {
                break;
            };
            let Some(item) = current.consumer.next().now_or_never() else {
                break;
            };
            match current.take(item, &self.queue, quorum, &self.keys) {
                Ok(delivery) => batch.push(delivery),
                Err(lost) => {
                    self.current = None;
                    self.deferred = Some(lost);
                    break;
                }
            }
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.closed = true;
        if let Some(current) = self.current.take() {
            let Current {
                link,
                consumer,
                acks,
                ..
            } = current;
            let _ = tokio::time::timeout(
                SETTLE_TIMEOUT,
                link.channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
            )
            .await;
            // Every ack asked for goes out before the channel closes.
            if let Some(acks) = acks {
                acks.close().await;
            }
            close_link(link, "consumer closed").await;
        }
        Ok(())
    }

    /// `true` only when [`dead_letter_route`](AmqpConsumer::dead_letter_route) is `Ok`; when
    /// `false`, logs why (the pipeline asks once, before it refuses `BrokerReject`).
    fn rejects_to_dead_letter(&self) -> bool {
        match &self.dead_letter {
            Ok(_) => true,
            Err(reason) => {
                tracing::warn!(queue = %self.queue, %reason, "rejects from this consumer are not known to reach a durable dead-letter queue");
                false
            }
        }
    }
}
