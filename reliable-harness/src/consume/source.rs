//! The broker's order, journaled where the consumer takes each delivery from its source: the
//! pipeline runs handlers concurrently, so the handlers' journal lines are in their own order,
//! not the broker's (the order check, `journal::order`, reads these lines).

use std::sync::Arc;

use async_trait::async_trait;
use reliable_core::transport::ConsumerLag;
use reliable_core::{ConsumeError, Delivery, DeliverySource};

use super::record;
use crate::child::parse_payload;
use crate::journal::{log_line, queue_line, Journal};

/// A delivery source that journals each delivery's place in the broker's order as it hands the
/// delivery out, before the pipeline gives it to a handler.
pub struct Journaled<S> {
    inner: S,
    journal: Arc<Journal>,
}

impl<S> Journaled<S> {
    /// Wraps `inner`, journaling to `journal`.
    pub fn new(inner: S, journal: Arc<Journal>) -> Self {
        Self { inner, journal }
    }
}

#[async_trait]
impl<S: DeliverySource> DeliverySource for Journaled<S> {
    // Cancel safe as the inner source is: nothing is awaited once a delivery is taken.
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        let next = self.inner.next().await;
        if let Ok(Some(delivery)) = &next {
            arrived(&self.journal, delivery);
        }
        next
    }

    /// The inner source's batch, each delivery journaled in the order it was taken.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let batch = self.inner.next_batch(max).await?;
        for delivery in &batch {
            arrived(&self.journal, delivery);
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.inner.close().await
    }

    fn rejects_to_dead_letter(&self) -> bool {
        self.inner.rejects_to_dead_letter()
    }

    fn metrics_label(&self) -> &'static str {
        self.inner.metrics_label()
    }

    fn consumer_lag(&self) -> Option<Arc<dyn ConsumerLag>> {
        self.inner.consumer_lag()
    }
}

/// Journals where `delivery` sat in the broker's order: its log position and record key where
/// it has one (Kafka), else its arrival with the broker's redelivered flag (RabbitMQ: the
/// journal's line order is the arrival order, as one task takes the deliveries). Payloads the
/// harness never wrote have no order to check.
pub fn arrived(journal: &Journal, delivery: &Delivery) {
    let Some(seq) = parse_payload(delivery.message().payload()) else {
        return;
    };
    let line = match delivery.position() {
        Some(p) => log_line(
            seq,
            p.partition.partition,
            p.offset,
            delivery.message().routing_key(),
        ),
        None => queue_line(seq, delivery.redelivered()),
    };
    record(journal, &line);
}
