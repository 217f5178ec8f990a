//! Attempt counters: how the pipeline knows a message has crashed its consumer before, where the
//! broker does not count deliveries itself (loss-matrix row L10).
//!
//! A handler that aborts the process (a bug, out of memory) never reaches an outcome, so the
//! pipeline cannot settle its message: the broker delivers it again, to the restarted consumer,
//! which crashes again. A count kept in memory dies with each process, so it never grows. The
//! count must live where the restart finds it:
//!
//! * a RabbitMQ quorum queue counts returns itself (the `x-delivery-count` header, exposed as
//!   [`Delivery::delivery_count`](crate::Delivery::delivery_count));
//! * elsewhere (Kafka, classic queues) the pipeline keeps the count in an [`AttemptCounter`]:
//!   [`record_attempt`](AttemptCounter::record_attempt) **before** the handler runs, so a crash
//!   in the handler has already been counted, and [`clear`](AttemptCounter::clear) once the
//!   pipeline settled the message (acked, dead-lettered, or deliberately requeued), so what
//!   the counter holds is the run of deliveries that ended without an outcome. A message
//!   stopped past `max_deliveries` keeps its count (until the store's TTL): its settle may not
//!   be durable yet (a Kafka offset waits for the next commit), and a delivery after a crash
//!   must be stopped again, not run with a fresh count.
//!
//! The counter must survive the consumer process: [`InMemoryAttemptCounter`] serves tests and
//! single-process setups only; `reliable-stores` has durable ones (redb, Redis, PostgreSQL).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::idempotency::StoreError;
use crate::message::IdempotencyKey;

/// Counts the deliveries of each message that ended without an outcome; see the module docs.
///
/// Object safe: the pipeline holds it as `Arc<dyn AttemptCounter>`.
#[async_trait]
pub trait AttemptCounter: Send + Sync {
    /// Records one more delivery of `key`, durably, and returns the number recorded since the
    /// last [`clear`](Self::clear), this one included (1 on the first delivery).
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError>;

    /// Forgets `key`'s deliveries: the pipeline settled it. Idempotent.
    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError>;
}

#[async_trait]
impl<C: AttemptCounter + ?Sized> AttemptCounter for std::sync::Arc<C> {
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError> {
        (**self).record_attempt(key).await
    }
    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        (**self).clear(key).await
    }
}

/// An [`AttemptCounter`] in process memory. It dies with the process, so on its own it cannot
/// stop a message that crashes the process; share one instance across pipeline restarts in
/// tests, and use a durable counter in production.
#[derive(Debug, Default)]
pub struct InMemoryAttemptCounter {
    counts: Mutex<HashMap<IdempotencyKey, u32>>,
}

impl InMemoryAttemptCounter {
    /// The count recorded for `key` now (0 when none).
    pub fn count(&self, key: &IdempotencyKey) -> u32 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IdempotencyKey, u32>> {
        // A panic while holding the lock cannot leave a count half-written.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl AttemptCounter for InMemoryAttemptCounter {
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError> {
        let mut counts = self.lock();
        let n = counts.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        Ok(*n)
    }

    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.lock().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_until_cleared() {
        let c = InMemoryAttemptCounter::default();
        let k = IdempotencyKey::new("k").unwrap();
        assert_eq!(c.record_attempt(&k).await.unwrap(), 1);
        assert_eq!(c.record_attempt(&k).await.unwrap(), 2);
        c.clear(&k).await.unwrap();
        assert_eq!(c.count(&k), 0);
        assert_eq!(c.record_attempt(&k).await.unwrap(), 1);
        let dynamic: &dyn AttemptCounter = &c;
        dynamic.clear(&k).await.unwrap();
    }
}
