//! An in-memory broker implementing both sides of the transport traits, with fault injection.
//!
//! Meant for tests — ours and yours: run your handlers and producers against it, inject the
//! faults real brokers produce and check that nothing is lost or applied twice. It behaves like
//! a queue broker with confirms and manual acks:
//!
//! * queues are declared with [`InMemoryBroker::declare_queue`]; a message goes to the queue
//!   named by its [destination](crate::Message::destination) (or [`DEFAULT_QUEUE`] when it has
//!   none); a message for an undeclared queue is refused as
//!   [`PublishError::Unroutable`] (like AMQP `mandatory`);
//! * [`InMemoryTransport`] stores the message and confirms at once unless a fault is
//!   injected;
//! * [`InMemoryConsumer`] hands out deliveries competing with other consumers of the queue;
//!   unacked deliveries come back (flagged redelivered) when nacked with requeue or when the
//!   consumer's session crashes.
//!
//! # Faults
//!
//! | fault | how to inject | what happens |
//! |---|---|---|
//! | drop the confirm | [`PublishFault::DropConfirm`] | message stored, `publish` never resolves |
//! | lose the message | [`PublishFault::LoseMessage`] | message not stored, `publish` never resolves |
//! | nack | [`PublishFault::Nack`] | not stored, [`PublishError::Nacked`] |
//! | any refusal | [`PublishFault::Fail`] | not stored, the given error |
//! | delay | [`PublishFault::Delay`] | stored, confirmed after the delay |
//! | connection lost during publish | [`PublishFault::ConnectionLost`] | stored or not, [`PublishError::ConnectionLost`] |
//! | message size limit | [`InMemoryBroker::set_max_message_size`] | [`PublishError::TooLarge`] |
//! | duplicate delivery | [`DeliveryFault::Duplicate`] | the next delivery is also requeued as a redelivery |
//! | consumer crash mid-handler | [`DeliveryFault::CrashMidHandler`] or [`InMemoryBroker::crash_consumers`] | unacked deliveries are requeued as redeliveries; the crashed session's acks fail with [`AckError::ConnectionLost`] |
//! | silent link | [`InMemoryBroker::go_silent`], ended by `lose_connection` | publishes swallowed (not stored, not confirmed) until the connection loss fails them |
//! | connection loss | [`InMemoryBroker::lose_connection`] | publishes waiting for a confirm fail with `ConnectionLost`, every consumer session crashes |
//!
//! Publish faults are queued and consumed one per publish, in order.
//!
//! ```
//! use reliable_core::memory::{InMemoryBroker, PublishFault};
//! use reliable_core::{Message, PublishError, Transport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let broker = InMemoryBroker::new();
//! broker.declare_queue("orders");
//! let transport = broker.transport();
//! broker.inject_publish_fault(PublishFault::Nack);
//!
//! let msg = Message::new("x").with_destination("orders");
//! assert!(matches!(transport.publish(&msg).await, Err(PublishError::Nacked { .. })));
//! assert_eq!(transport.publish(&msg).await, Ok(()));
//! assert_eq!(broker.queue_len("orders"), 1);
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};

mod transport;

pub use transport::InMemoryTransport;

use crate::message::{Message, MessageId};
use crate::transport::{AckError, Acker, ConsumeError, Delivery, DeliverySource, PublishError};

/// The queue a message without a destination goes to.
pub const DEFAULT_QUEUE: &str = "default";

/// A fault applied to one publish.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishFault {
    /// Store the message but never confirm it.
    DropConfirm,
    /// Neither store nor confirm the message.
    LoseMessage,
    /// Refuse with [`PublishError::Nacked`] (not stored).
    Nack,
    /// Refuse with the given error (not stored).
    Fail(PublishError),
    /// Store the message and confirm after the delay.
    Delay(Duration),
    /// Fail with [`PublishError::ConnectionLost`]; `stored` says whether the broker kept the
    /// message anyway (the confirm was lost, not the message).
    ConnectionLost {
        /// Whether the message reached the queue.
        stored: bool,
    },
}

/// A fault applied to one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryFault {
    /// Deliver the next message and also requeue a copy flagged redelivered.
    Duplicate,
    /// Deliver the next message, then crash the consumer session at once: the delivery is
    /// requeued as a redelivery while the handler still runs, and its ack fails.
    CrashMidHandler,
}

/// The in-memory broker. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct InMemoryBroker {
    inner: Arc<BrokerInner>,
}

#[derive(Default)]
struct BrokerInner {
    state: Mutex<State>,
    /// Woken on every change consumers may wait for, while one waits (see `waiting`).
    changed: Notify,
    /// Consumers between their look for a delivery and the end of their wait for a change:
    /// `changed` is notified only when there is one, so a publish with nobody waiting costs no
    /// notification. A consumer counts itself before it looks (the look takes the lock); a
    /// change is made under the lock and the count read after it, so a change the look missed
    /// always sees the consumer counted.
    waiting: AtomicUsize,
    /// Bumped when the connection is lost, failing publishes that wait for a confirm.
    connection: watch::Sender<u64>,
}

/// A map with a fast hasher (queue names, delivery tags).
type FxHashMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

#[derive(Default)]
struct State {
    queues: FxHashMap<String, Queue>,
    publish_faults: VecDeque<PublishFault>,
    max_message_size: Option<usize>,
    publish_log: Vec<MessageId>,
    /// Set by [`InMemoryBroker::go_silent`]: publishes are swallowed.
    silent: bool,
    /// Attempts whose confirm never comes (a dropped confirm, a swallowed publish), answered
    /// with a connection loss by [`InMemoryBroker::lose_connection`].
    held: Vec<crate::transport::Completion>,
    next_tag: u64,
    /// Bumped on each consumer crash; unacked deliveries of older sessions are void.
    session: u64,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<(Message, bool)>,
    unacked: FxHashMap<u64, Message>,
    faults: VecDeque<DeliveryFault>,
    acked: u64,
    rejected: Vec<Message>,
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("InMemoryBroker")
            .field("queues", &st.queues.keys().collect::<Vec<_>>())
            .field("publishes", &st.publish_log.len())
            .finish_non_exhaustive()
    }
}

impl InMemoryBroker {
    /// An empty broker with no queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the consumers waiting for a change, if any. Call after the change, with the lock
    /// released.
    fn changed(&self) {
        if self.inner.waiting.load(Ordering::SeqCst) > 0 {
            self.inner.changed.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (each update is a few field
        // writes), so poisoning is ignored.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Declares a queue (idempotent).
    pub fn declare_queue(&self, name: &str) {
        self.lock().queues.entry(name.to_owned()).or_default();
    }

    /// A producer-side transport for this broker.
    pub fn transport(&self) -> InMemoryTransport {
        InMemoryTransport {
            broker: self.clone(),
        }
    }

    /// A consumer of `queue`. Its `next` waits for messages until the pipeline stops it.
    pub fn consumer(&self, queue: &str) -> InMemoryConsumer {
        self.declare_queue(queue);
        InMemoryConsumer {
            broker: self.clone(),
            queue: queue.into(),
            end_when_drained: false,
            closed: false,
        }
    }

    /// Queues a fault for a coming publish (one fault per publish, in order).
    pub fn inject_publish_fault(&self, fault: PublishFault) {
        self.lock().publish_faults.push_back(fault);
    }

    /// Queues a fault for a coming delivery from `queue` (one fault per delivery, in order).
    pub fn inject_delivery_fault(&self, queue: &str, fault: DeliveryFault) {
        self.lock()
            .queues
            .entry(queue.to_owned())
            .or_default()
            .faults
            .push_back(fault);
    }

    /// Refuses messages larger than `limit` bytes with [`PublishError::TooLarge`].
    pub fn set_max_message_size(&self, limit: Option<usize>) {
        self.lock().max_message_size = limit;
    }

    /// Crashes every consumer session: all unacked deliveries of all queues are requeued as
    /// redeliveries and their later acks fail. Consumers keep consuming (a reconnect).
    pub fn crash_consumers(&self) {
        let mut st = self.lock();
        st.session += 1;
        for q in st.queues.values_mut() {
            requeue_unacked(q);
        }
        drop(st);
        self.changed();
    }

    /// Loses the connection: publishes waiting for a confirm fail with
    /// [`PublishError::ConnectionLost`] and every consumer session crashes. Ends a
    /// [silence](Self::go_silent).
    pub fn lose_connection(&self) {
        let held = {
            let mut st = self.lock();
            st.silent = false;
            std::mem::take(&mut st.held)
        };
        for done in held {
            done.complete(Err(PublishError::ConnectionLost {
                reason: "connection lost while waiting for the confirm".into(),
            }));
        }
        self.inner.connection.send_modify(|epoch| *epoch += 1);
        self.crash_consumers();
    }

    /// The link goes silent (no FIN, no RST): every publish from now on is swallowed, neither
    /// stored nor confirmed, until [`lose_connection`](Self::lose_connection) fails them all, as
    /// a heartbeat timeout would. Injected publish faults wait meanwhile.
    pub fn go_silent(&self) {
        self.lock().silent = true;
    }

    /// Messages ready for delivery in `queue`.
    pub fn queue_len(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Messages delivered from `queue` and not settled yet.
    pub fn unacked_len(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.unacked.len())
    }

    /// Snapshot of the messages ready in `queue`, in delivery order.
    pub fn messages(&self, queue: &str) -> Vec<Message> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.ready.iter().map(|(m, _)| m.clone()).collect())
            .unwrap_or_default()
    }

    /// Deliveries from `queue` acknowledged so far.
    pub fn acked_count(&self, queue: &str) -> u64 {
        self.lock().queues.get(queue).map_or(0, |q| q.acked)
    }

    /// Messages rejected (or nacked without requeue) from `queue`.
    pub fn rejected(&self, queue: &str) -> Vec<Message> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.rejected.clone())
            .unwrap_or_default()
    }

    /// The id of every publish attempt the broker saw, in order (faulted ones included).
    pub fn publish_log(&self) -> Vec<MessageId> {
        self.lock().publish_log.clone()
    }

    fn settle(&self, queue: &str, tag: u64, session: u64, how: Settle) -> Result<(), AckError> {
        let mut st = self.lock();
        let current = st.session;
        let q = st.queues.get_mut(queue).ok_or_else(|| AckError::Other {
            reason: format!("queue {queue} does not exist"),
        })?;
        if session != current {
            return Err(AckError::ConnectionLost {
                reason: "consumer session crashed".into(),
            });
        }
        let msg = q.unacked.remove(&tag).ok_or_else(|| AckError::Stale {
            reason: format!("delivery tag {tag} is not outstanding"),
        })?;
        match how {
            Settle::Ack => q.acked += 1,
            Settle::Requeue => q.ready.push_front((msg, true)),
            Settle::Drop => q.rejected.push(msg),
        }
        drop(st);
        self.changed();
        Ok(())
    }
}

fn requeue_unacked(q: &mut Queue) {
    let mut tags: Vec<u64> = q.unacked.keys().copied().collect();
    tags.sort_unstable_by(|a, b| b.cmp(a));
    for tag in tags {
        if let Some(m) = q.unacked.remove(&tag) {
            q.ready.push_front((m, true));
        }
    }
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    Drop,
}

/// The consumer side of [`InMemoryBroker`]: a [`DeliverySource`] for one queue.
#[derive(Debug)]
pub struct InMemoryConsumer {
    broker: InMemoryBroker,
    /// Shared with the ackers of its deliveries.
    queue: Arc<str>,
    end_when_drained: bool,
    closed: bool,
}

impl InMemoryConsumer {
    /// Makes `next` return `Ok(None)` once the queue has nothing ready and nothing unacked —
    /// handy for tests and benchmarks that publish first and then consume everything.
    pub fn end_when_drained(mut self) -> Self {
        self.end_when_drained = true;
        self
    }

    /// The queue this consumer reads.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn try_take(&self) -> Option<Option<Delivery>> {
        let mut st = self.broker.lock();
        st.next_tag += 1;
        let tag = st.next_tag;
        let session = st.session;
        let q = st.queues.get_mut(&*self.queue)?;
        let Some((msg, redelivered)) = q.ready.pop_front() else {
            return (self.end_when_drained && q.unacked.is_empty()).then_some(None);
        };
        let fault = q.faults.pop_front();
        q.unacked.insert(tag, msg.clone());
        match fault {
            Some(DeliveryFault::Duplicate) => q.ready.push_back((msg.clone(), true)),
            Some(DeliveryFault::CrashMidHandler) => {
                st.session += 1;
                for q in st.queues.values_mut() {
                    requeue_unacked(q);
                }
            }
            None => {}
        }
        let acker = InMemoryAcker {
            broker: self.broker.clone(),
            queue: Arc::clone(&self.queue),
            tag,
            session,
        };
        Some(Some(
            Delivery::new(msg, Box::new(acker)).with_redelivered(redelivered),
        ))
    }
}

#[async_trait]
impl DeliverySource for InMemoryConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        loop {
            if self.closed {
                return Ok(None);
            }
            let inner = &self.broker.inner;
            let changed = inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Counted until the wait ends (or this future is dropped), from before the look.
            let waiting = Waiting::count(&inner.waiting);
            if let Some(d) = self.try_take() {
                drop(waiting);
                if d.is_some() {
                    self.broker.changed();
                }
                return Ok(d);
            }
            changed.await;
            drop(waiting);
        }
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let Some(first) = self.next().await? else {
            return Ok(Vec::new());
        };
        let mut batch = Vec::with_capacity(max.clamp(1, 1024));
        batch.push(first);
        // What is ready now, without waiting: no await point past the first delivery, so a
        // cancelled call loses nothing.
        while batch.len() < max {
            match self.try_take() {
                Some(Some(d)) => batch.push(d),
                _ => break,
            }
        }
        if batch.len() > 1 {
            self.broker.changed();
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.closed = true;
        Ok(())
    }
}

/// One consumer counted in [`BrokerInner::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settles one in-memory delivery.
struct InMemoryAcker {
    broker: InMemoryBroker,
    queue: Arc<str>,
    tag: u64,
    session: u64,
}

#[async_trait]
impl Acker for InMemoryAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.broker
            .settle(&self.queue, self.tag, self.session, Settle::Ack)
    }

    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        let how = if requeue {
            Settle::Requeue
        } else {
            Settle::Drop
        };
        self.broker.settle(&self.queue, self.tag, self.session, how)
    }

    async fn reject(&self) -> Result<(), AckError> {
        self.broker
            .settle(&self.queue, self.tag, self.session, Settle::Drop)
    }
}

#[cfg(test)]
mod tests;
