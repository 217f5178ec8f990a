//! Producer behaviour over the in-memory broker, in paused time.

use std::time::Duration;

use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, PublishError};
use tokio::time::Instant;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn config() -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(30),
        max_attempts: 5,
        max_in_flight: 8,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            factor: 2.0,
            jitter: true,
        },
    }
}

fn setup() -> (InMemoryBroker, Producer) {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), config());
    (broker, producer)
}

fn msg() -> Message {
    Message::new("payload").with_destination("q")
}

#[tokio::test(start_paused = true)]
async fn confirm_timeout_resends_with_the_same_id_and_key() -> TestResult {
    let (broker, producer) = setup();
    broker.inject_publish_fault(PublishFault::LoseMessage);
    let m = msg();
    let confirmed = producer.send_confirmed(m.clone()).await?;
    assert_eq!(confirmed.attempts, 2);
    assert_eq!(broker.publish_log(), vec![m.id(), m.id()]);
    let stored = broker.messages("q");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id(), m.id());
    assert_eq!(stored[0].idempotency_key(), m.idempotency_key());
    let stats = producer.stats();
    assert_eq!(stats.resent.timeout, 1);
    assert_eq!((stats.sent, stats.confirmed, stats.failed), (1, 1, 0));
    assert!(stats.confirm_latency_p50 >= Some(Duration::from_secs(1)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn nack_and_connection_loss_are_resent_and_counted_by_cause() -> TestResult {
    let (broker, producer) = setup();
    broker.inject_publish_fault(PublishFault::Nack);
    broker.inject_publish_fault(PublishFault::ConnectionLost { stored: false });
    broker.inject_publish_fault(PublishFault::Fail(PublishError::Busy {
        reason: "queue full".into(),
    }));
    let confirmed = producer.send_confirmed(msg()).await?;
    assert_eq!(confirmed.attempts, 4);
    let stats = producer.stats();
    assert_eq!(
        (
            stats.resent.nack,
            stats.resent.connection_lost,
            stats.resent.busy
        ),
        (1, 1, 1)
    );
    assert_eq!(stats.attempts, 4);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn unroutable_is_handed_back_without_resend() -> TestResult {
    let (broker, producer) = setup();
    let m = Message::new("x").with_destination("unbound");
    let err = producer
        .send_confirmed(m.clone())
        .await
        .err()
        .ok_or("unroutable message was confirmed")?;
    assert!(matches!(
        &err,
        SendError::Refused {
            source: PublishError::Unroutable { .. },
            attempts: 1,
            ..
        }
    ));
    assert_eq!(err.into_message(), Some(m));
    assert_eq!(broker.publish_log().len(), 1);
    assert_eq!(producer.stats().failed, 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded() -> TestResult {
    let (broker, producer) = setup();
    for _ in 0..5 {
        broker.inject_publish_fault(PublishFault::Nack);
    }
    let err = producer
        .send_confirmed(msg())
        .await
        .err()
        .ok_or("confirmed despite nacks")?;
    assert!(matches!(
        err,
        SendError::AttemptsExhausted { attempts: 5, .. }
    ));
    assert_eq!(broker.queue_len("q"), 0);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_silent_broker_cannot_hang_a_publish_past_the_deadline() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    for _ in 0..1000 {
        broker.inject_publish_fault(PublishFault::DropConfirm);
    }
    let producer = Producer::new(
        broker.transport(),
        ProducerConfig {
            max_attempts: u32::MAX,
            deadline: Duration::from_secs(10),
            ..config()
        },
    );
    let start = Instant::now();
    let err = producer
        .send_confirmed(msg())
        .await
        .err()
        .ok_or("confirmed without confirm")?;
    assert!(start.elapsed() <= Duration::from_secs(10));
    assert!(matches!(
        err,
        SendError::DeadlineExceeded {
            last_error: PublishError::Timeout,
            ..
        }
    ));
    assert!(err.message().is_some());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_window_bounds_messages_in_flight() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    broker.inject_publish_fault(PublishFault::Delay(Duration::from_secs(5)));
    broker.inject_publish_fault(PublishFault::Delay(Duration::from_secs(5)));
    let producer = Producer::new(
        broker.transport(),
        ProducerConfig {
            max_in_flight: 2,
            confirm_timeout: Duration::from_secs(10),
            ..config()
        },
    );
    let h1 = producer.send(msg()).await?;
    let h2 = producer.send(msg()).await?;
    let third = producer.send(msg());
    tokio::pin!(third);
    let blocked = tokio::time::timeout(Duration::from_secs(1), &mut third).await;
    assert!(
        blocked.is_err(),
        "third send got a slot while two were in flight"
    );
    assert_eq!(producer.stats().in_flight, 2);
    let old = producer.unconfirmed(Duration::from_millis(500));
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(|u| u.attempts == 1));
    let h3 = third.await?;
    assert!(Instant::now() >= old[0].first_sent + Duration::from_secs(5));
    h1.await?;
    h2.await?;
    h3.await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn flush_waits_and_close_refuses_new_messages() -> TestResult {
    let (broker, producer) = setup();
    for _ in 0..3 {
        broker.inject_publish_fault(PublishFault::Delay(Duration::from_millis(200)));
    }
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(producer.send(msg()).await?);
    }
    producer.flush().await;
    assert_eq!(producer.stats().in_flight, 0);
    assert_eq!(broker.queue_len("q"), 3);
    producer.close().await;
    let m = msg();
    let err = producer
        .send(m.clone())
        .await
        .err()
        .ok_or("closed producer accepted a message")?;
    assert!(matches!(err, SendError::Closed { .. }));
    assert_eq!(err.into_message(), Some(m));
    for h in handles {
        h.await?;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn lost_connection_during_confirm_wait_is_resent() -> TestResult {
    let (broker, producer) = setup();
    broker.inject_publish_fault(PublishFault::DropConfirm);
    let handle = producer.send(msg()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.lose_connection();
    let confirmed = handle.await?;
    assert_eq!(confirmed.attempts, 2);
    assert_eq!(producer.stats().resent.connection_lost, 1);
    // Stored by the first attempt and by the resend: the consumer's dedupe absorbs it.
    assert_eq!(broker.queue_len("q"), 2);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_unrepresentable_deadline_means_no_deadline_and_attempts_still_bound_it() -> TestResult {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(
        broker.transport(),
        ProducerConfig {
            deadline: Duration::MAX,
            ..config()
        },
    );
    // A resend after a lost confirm works with no deadline at all.
    broker.inject_publish_fault(PublishFault::LoseMessage);
    assert_eq!(producer.send_confirmed(msg()).await?.attempts, 2);
    // With every attempt nacked, max_attempts settles it and hands the message back.
    for _ in 0..5 {
        broker.inject_publish_fault(PublishFault::Nack);
    }
    let m = msg();
    match producer.send_confirmed(m.clone()).await {
        Err(SendError::AttemptsExhausted {
            message, attempts, ..
        }) => {
            assert_eq!(attempts, 5);
            assert_eq!(message.id(), m.id());
        }
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
    Ok(())
}
