//! Send order: messages one task sends reach the broker in that order, also across resends
//! (`SendOrder::Preserved`), with controls that show the inversions the alternatives make.

use std::sync::Arc;
use std::time::Duration;

use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::producer::{Producer, ProducerConfig, SendOrder};
use reliable_core::{Message, PublishError, Transport};

const QUEUE: &str = "orders";

fn config(order: SendOrder) -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(60),
        max_attempts: 100,
        max_in_flight: 64,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            factor: 2.0,
            jitter: true,
        },
        order,
    }
}

fn numbered(seq: u64) -> Message {
    Message::new(seq.to_string()).with_destination(QUEUE)
}

/// Sequence numbers of the queue's messages, in queue order.
fn queue_order(broker: &InMemoryBroker) -> Vec<u64> {
    broker
        .messages(QUEUE)
        .iter()
        .map(|m| {
            std::str::from_utf8(m.payload())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX)
        })
        .collect()
}

/// First copies that sit behind a later message, and later copies (duplicates).
fn inversions(order: &[u64]) -> (usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let (mut late, mut duplicates, mut highest) = (0, 0, None);
    for &seq in order {
        if !seen.insert(seq) {
            duplicates += 1;
            continue;
        }
        if highest.is_some_and(|h| h > seq) {
            late += 1;
        }
        highest = highest.max(Some(seq));
    }
    (late, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_sending_at_full_speed_keeps_its_order() -> Result<(), Box<dyn std::error::Error>>
{
    const N: u64 = 20_000;
    let broker = InMemoryBroker::new();
    broker.declare_queue(QUEUE);
    let producer = Producer::new(broker.transport(), config(SendOrder::Preserved));
    let mut handles = Vec::new();
    for seq in 0..N {
        handles.push(producer.send(numbered(seq)).await?);
    }
    for h in handles {
        h.await?;
    }
    producer.close().await;
    let order = queue_order(&broker);
    assert_eq!(order.len() as u64, N);
    assert_eq!(inversions(&order), (0, 0));
    Ok(())
}

/// Control: the hand-off the producer used before, a task per message calling `publish`,
/// lets the runtime pick the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_task_per_message_reorders() -> Result<(), Box<dyn std::error::Error>> {
    const N: u64 = 20_000;
    let broker = InMemoryBroker::new();
    broker.declare_queue(QUEUE);
    let transport = Arc::new(broker.transport());
    let mut tasks = Vec::new();
    for seq in 0..N {
        let transport = transport.clone();
        tasks.push(tokio::spawn(async move {
            transport.publish(&numbered(seq)).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (late, _) = inversions(&queue_order(&broker));
    println!("task per message: {late} of {N} first copies out of order");
    assert!(late > 0, "the control saw no inversion");
    Ok(())
}

/// Sends `n` messages from one task while faults hit: in every thousand, one message starts a burst
/// of refusals at hand-off (a full client queue), or a silent link that swallows every publish
/// until the connection is declared lost 50 ms later. Returns the queue order.
async fn send_through_faults(
    order: SendOrder,
    n: u64,
) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let broker = InMemoryBroker::new();
    broker.declare_queue(QUEUE);
    let producer = Producer::new(broker.transport(), config(order));
    let mut handles = Vec::new();
    for seq in 0..n {
        match seq % 1_000 {
            100 => {
                for _ in 0..3 {
                    broker.inject_publish_fault(PublishFault::Fail(PublishError::Busy {
                        reason: "injected full queue".into(),
                    }));
                }
            }
            500 => {
                // Everything written from here on is lost until the connection drops.
                broker.go_silent();
                let b = broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    b.lose_connection();
                });
            }
            700 => {
                for _ in 0..2 {
                    broker.inject_publish_fault(PublishFault::Nack);
                }
            }
            _ => {}
        }
        handles.push(producer.send(numbered(seq)).await?);
    }
    for h in handles {
        h.await?;
    }
    producer.close().await;
    Ok(queue_order(&broker))
}

/// Runs [`send_through_faults`] with 5,000 messages, checks that every one is in the queue and
/// returns how many first copies landed out of order.
async fn late_through_faults(order: SendOrder) -> Result<usize, Box<dyn std::error::Error>> {
    const N: u64 = 5_000;
    let queue = send_through_faults(order, N).await?;
    let (late, duplicates) = inversions(&queue);
    println!("{order:?}: {late} out of order, {duplicates} duplicates");
    assert_eq!(queue.len() - duplicates, N as usize, "a message is missing");
    Ok(late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_keep_the_send_order() -> Result<(), Box<dyn std::error::Error>> {
    assert_eq!(late_through_faults(SendOrder::Preserved).await?, 0);
    Ok(())
}

/// Control: relaxed resends land behind newer messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_relaxed_resends_land_behind_newer_messages(
) -> Result<(), Box<dyn std::error::Error>> {
    let late = late_through_faults(SendOrder::Relaxed).await?;
    assert!(late > 0, "the control saw no inversion");
    Ok(())
}

/// A lane that cannot recover (its first message is refused again and again) holds the
/// messages behind it, and each of them is still handed back by its deadline: nothing waits
/// for its turn forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_behind_a_failing_resend_are_handed_back_by_their_deadline(
) -> Result<(), Box<dyn std::error::Error>> {
    let broker = InMemoryBroker::new();
    broker.declare_queue(QUEUE);
    for _ in 0..1_000 {
        broker.inject_publish_fault(PublishFault::Fail(PublishError::Busy {
            reason: "injected full queue".into(),
        }));
    }
    let deadline = Duration::from_millis(300);
    let producer = Producer::new(
        broker.transport(),
        ProducerConfig {
            deadline,
            ..config(SendOrder::Preserved)
        },
    );
    let started = tokio::time::Instant::now();
    let mut handles = Vec::new();
    for seq in 0..20 {
        handles.push(producer.send(numbered(seq)).await?);
    }
    for h in handles {
        let outcome = tokio::time::timeout(deadline * 3, h).await?;
        assert!(
            matches!(
                outcome,
                Err(reliable_core::producer::SendError::DeadlineExceeded { .. })
            ),
            "{outcome:?}"
        );
    }
    assert!(started.elapsed() < deadline * 3);
    assert_eq!(broker.queue_len(QUEUE), 0);
    producer.close().await;
    Ok(())
}
