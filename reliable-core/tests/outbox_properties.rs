//! Property test of invariant 10 under random faults and random handle fates (feature `outbox`,
//! paused time): a message leaves the outbox only when it is confirmed or its caller received it
//! back; every other message stays and is what the next replay sends.
#![cfg(feature = "outbox")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::outbox::Outbox;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, MessageId, PublishError, Transport};

/// Records the ids whose publish the broker confirmed: exactly the messages the producer
/// confirms (a confirm that arrives is never turned into a timeout).
struct Recording {
    inner: reliable_core::memory::InMemoryTransport,
    confirmed: Arc<Mutex<BTreeSet<MessageId>>>,
}

#[async_trait]
impl Transport for Recording {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let result = self.inner.publish(msg).await;
        if result.is_ok() {
            if let Ok(mut confirmed) = self.confirmed.lock() {
                confirmed.insert(msg.id());
            }
        }
        result
    }
}

/// What the test does with a message's handle.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Awaits it: the caller receives the outcome.
    Await,
    /// Drops it right after the send.
    DropAtOnce,
    /// Drops it unread once the message is settled.
    DropSettled,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        Just(Fate::Await),
        Just(Fate::DropAtOnce),
        Just(Fate::DropSettled)
    ]
}

fn publish_fault() -> impl Strategy<Value = Option<PublishFault>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(PublishFault::DropConfirm)),
        1 => Just(Some(PublishFault::LoseMessage)),
        2 => Just(Some(PublishFault::Nack)),
        1 => any::<bool>().prop_map(|stored| Some(PublishFault::ConnectionLost { stored })),
        1 => (0u64..3_000).prop_map(|ms| Some(PublishFault::Delay(Duration::from_millis(ms)))),
        1 => Just(Some(PublishFault::Fail(PublishError::Unroutable { reason: "no route".into() }))),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a test runtime: {e}"),
    }
}

/// The outbox's ids once its writer has caught up with the removals (they are not waited
/// for): the first state equal to `expected` that still holds 100 ms later (a removal still
/// on its way would land in that time), or the last state after 5 s.
fn settled_outbox(outbox: &Outbox, expected: &BTreeSet<MessageId>) -> BTreeSet<MessageId> {
    let ids = || -> BTreeSet<MessageId> {
        outbox
            .pending()
            .map(|p| p.iter().map(Message::id).collect())
            .unwrap_or_default()
    };
    for _ in 0..1000 {
        if &ids() == expected {
            std::thread::sleep(Duration::from_millis(100));
            return ids();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ids()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the faults and whatever happens to the handles, the outbox ends up holding
    /// exactly the messages neither confirmed nor received back, and a replay sends exactly
    /// those: nothing is lost, nothing received is sent again.
    #[test]
    fn only_confirmed_or_received_messages_leave_the_outbox(
        fates in prop::collection::vec(fate(), 1..8),
        faults in prop::collection::vec(publish_fault(), 0..32),
        max_attempts in 1u32..5,
        window in 1usize..4,
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let outbox = Outbox::open(dir.path().join("o")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let rt = runtime();
        rt.block_on(async {
            let broker = InMemoryBroker::new();
            broker.declare_queue("q");
            for f in faults.into_iter().flatten() {
                broker.inject_publish_fault(f);
            }
            let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
            let transport = Recording { inner: broker.transport(), confirmed: confirmed.clone() };
            let producer = Producer::with_outbox(transport, ProducerConfig {
                confirm_timeout: Duration::from_secs(2),
                deadline: Duration::from_secs(20),
                max_attempts,
                max_in_flight: window,
                backoff: BackoffPolicy {
                    min_delay: Duration::from_millis(50),
                    max_delay: Duration::from_secs(1),
                    factor: 2.0,
                    jitter: true,
                },
                ..ProducerConfig::default()
            }, outbox.clone());

            let mut awaited = Vec::new();
            let mut dropped_later = Vec::new();
            let mut all = BTreeSet::new();
            for (i, fate) in fates.iter().enumerate() {
                let m = Message::new(format!("m{i}")).with_destination("q");
                all.insert(m.id());
                let handle = match producer.send(m).await {
                    Ok(h) => h,
                    Err(e) => return Err(TestCaseError::fail(format!("send refused: {e}"))),
                };
                match fate {
                    Fate::Await => awaited.push(handle),
                    Fate::DropAtOnce => drop(handle),
                    Fate::DropSettled => dropped_later.push(handle),
                }
            }
            let mut received = BTreeSet::new();
            for h in awaited {
                let id = h.id();
                if let Err(e) = h.await {
                    prop_assert!(e.message().is_some(), "handed back without the message: {e}");
                    received.insert(id);
                }
            }
            // Every message settled, and every delivery task finished with it.
            producer.flush().await;
            drop(dropped_later);

            let confirmed = confirmed.lock().map(|c| c.clone()).unwrap_or_default();
            prop_assert!(confirmed.is_disjoint(&received));
            let expected: BTreeSet<MessageId> = all
                .iter()
                .filter(|id| !confirmed.contains(id) && !received.contains(id))
                .copied()
                .collect();
            let kept = settled_outbox(&outbox, &expected);
            prop_assert_eq!(&kept, &expected, "the outbox holds what is neither confirmed nor received");

            let replayed: BTreeSet<MessageId> = match producer.replay_outbox().await {
                Ok(handles) => handles.iter().map(|h| h.id()).collect(),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            prop_assert_eq!(replayed, expected, "a replay sends exactly the kept messages");
            Ok(())
        })?;
    }
}
