//! [`Producer::send_many`]: one handle per batch, resolving to the confirmed count and the
//! messages handed back, in send order, with nothing lost (paused time, in-memory broker).

use std::time::Duration;

use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, PublishError};

fn config() -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(30),
        max_in_flight: 64,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            factor: 2.0,
            jitter: false,
        },
        ..ProducerConfig::default()
    }
}

fn batch(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{i}")).with_destination("q"))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_batch_resolves_to_its_confirmed_count_and_the_messages_handed_back_in_order() {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), config());
    // The 3rd and 7th publishes (messages 3 and 7) are refused for good, the 8th is nacked
    // once (resent), the 10th loses its confirm (resent after the timeout).
    for i in 1..=10 {
        broker.inject_publish_fault(match i {
            3 | 7 => PublishFault::Fail(PublishError::Unroutable {
                reason: "test".into(),
            }),
            8 => PublishFault::Nack,
            10 => PublishFault::DropConfirm,
            _ => PublishFault::Delay(Duration::ZERO),
        });
    }
    let msgs = batch(20);
    let ids: Vec<_> = msgs.iter().map(Message::id).collect();
    let outcome = producer.send_many(msgs).await.unwrap().await;
    assert_eq!(outcome.confirmed, 18);
    let back: Vec<_> = outcome
        .handed_back
        .iter()
        .map(|e| {
            assert!(matches!(e, SendError::Refused { .. }), "{e}");
            e.message().map(Message::id)
        })
        .collect();
    assert_eq!(back, vec![Some(ids[2]), Some(ids[6])]);
    assert!(!outcome.all_confirmed());
    assert_eq!(
        broker.queue_len("q"),
        18 + 1,
        "the dropped confirm's copy is stored too"
    );
    assert_eq!(producer.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_batch_handle_cancels_nothing() {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), config());
    drop(producer.send_many(batch(50)).await.unwrap());
    producer.flush().await;
    assert_eq!(broker.queue_len("q"), 50);
    assert_eq!(producer.stats().confirmed, 50);
}

#[tokio::test(start_paused = true)]
async fn a_batch_larger_than_the_window_is_handed_back_whole() {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), config());
    let err = producer.send_many(batch(65)).await.unwrap_err();
    assert!(matches!(err.error, SendError::BatchTooLarge { .. }));
    assert_eq!(err.rest.len(), 64);
    let empty = producer.send_many(Vec::new()).await.unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.await.confirmed, 0);
}
