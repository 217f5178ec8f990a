//! Producer behaviour over the in-memory broker, in paused time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::{InMemoryBroker, PublishFault};
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, PublishError, Transport};
use tokio::sync::Semaphore;
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
        ..ProducerConfig::default()
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
    let old = producer.unconfirmed(Duration::from_millis(500)).await;
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

/// Confirms publishes on command: each permit added to `confirms` confirms one waiting
/// publish, oldest first.
#[derive(Clone)]
struct Gate {
    confirms: Arc<Semaphore>,
}

impl Gate {
    fn new() -> Self {
        Self {
            confirms: Arc::new(Semaphore::new(0)),
        }
    }

    /// Confirms the next `n` publishes.
    fn confirm(&self, n: usize) {
        self.confirms.add_permits(n);
    }

    /// Confirms one publish every 10 ms, `n` times, in a task.
    fn confirm_one_by_one(&self, n: usize) -> tokio::task::JoinHandle<()> {
        let gate = self.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                tokio::time::sleep(Duration::from_millis(10)).await;
                gate.confirm(1);
            }
        })
    }
}

#[async_trait]
impl Transport for Gate {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        match self.confirms.acquire().await {
            Ok(permit) => {
                permit.forget();
                Ok(())
            }
            Err(_) => Err(PublishError::ConnectionLost {
                reason: "gate closed".into(),
            }),
        }
    }
}

/// A window of 4 and long attempt timeouts: only the gate settles messages.
fn gated(gate: &Gate) -> Producer {
    Producer::new(
        gate.clone(),
        ProducerConfig {
            max_in_flight: 4,
            confirm_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(120),
            ..config()
        },
    )
}

/// Lets spawned tasks run until they wait (paused time advances by a millisecond).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_waiting_for_window_space_does_not_deadlock_close() -> TestResult {
    let gate = Gate::new();
    let producer = gated(&gate);
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(producer.send(msg()).await?);
    }
    let batch = tokio::spawn({
        let p = producer.clone();
        async move { p.send_batch(vec![msg(), msg()]).await }
    });
    settle().await;
    let close = tokio::spawn({
        let p = producer.clone();
        async move { p.close().await }
    });
    settle().await;
    let _confirms = gate.confirm_one_by_one(6);
    let (batch, close) =
        tokio::time::timeout(Duration::from_secs(1), async { (batch.await, close.await) })
            .await
            .map_err(|_| "send_batch and close deadlocked")?;
    close?;
    match batch? {
        Ok(handles) => {
            for h in handles {
                h.await?;
            }
        }
        Err(e) => {
            assert!(matches!(e.error, SendError::Closed { .. }), "{e}");
            assert_eq!(e.rest.len(), 1, "the whole batch is handed back");
        }
    }
    for h in first {
        h.await?;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn two_batches_larger_than_the_window_together_both_finish() -> TestResult {
    let gate = Gate::new();
    let producer = gated(&gate);
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(producer.send(msg()).await?);
    }
    let batch = |p: &Producer| {
        let p = p.clone();
        tokio::spawn(async move { p.send_batch(vec![msg(), msg(), msg()]).await })
    };
    let a = batch(&producer);
    settle().await;
    let b = batch(&producer);
    settle().await;
    let _confirms = gate.confirm_one_by_one(10);
    let (a, b) = tokio::time::timeout(Duration::from_secs(1), async { (a.await, b.await) })
        .await
        .map_err(|_| "two batches deadlocked on the window")?;
    for handles in [a??, b??] {
        assert_eq!(handles.len(), 3);
        for h in handles {
            h.await?;
        }
    }
    for h in first {
        h.await?;
    }
    assert_eq!(producer.stats().confirmed, 10);
    Ok(())
}

/// Dropping the last `Producer` clone cancels nothing: messages in flight are still settled
/// and their handles resolve, confirmed or with the message handed back.
#[tokio::test(start_paused = true)]
async fn dropping_the_last_producer_clone_still_settles_messages_in_flight() -> TestResult {
    let gate = Gate::new();
    let producer = Producer::new(gate.clone(), config());
    let confirmed = producer.send(msg()).await?;
    let m = msg();
    let handed_back = producer.send(m.clone()).await?;
    drop(producer);
    gate.confirm(1);
    assert_eq!(confirmed.await?.attempts, 1);
    let err = handed_back
        .await
        .err()
        .ok_or("confirmed without a confirm")?;
    assert!(
        matches!(
            err,
            SendError::AttemptsExhausted { .. } | SendError::DeadlineExceeded { .. }
        ),
        "{err}"
    );
    assert_eq!(err.into_message(), Some(m));
    Ok(())
}

/// Confirms after 100 ms; counts closes and the publishes unfinished when close was called.
#[derive(Clone, Default)]
struct Closable {
    publishing: Arc<AtomicUsize>,
    closes: Arc<AtomicUsize>,
    publishing_at_close: Arc<AtomicUsize>,
    hang_on_close: bool,
}

#[async_trait]
impl Transport for Closable {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.publishing.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    async fn close(&self) {
        self.closes.fetch_add(1, Ordering::SeqCst);
        self.publishing_at_close
            .fetch_add(self.publishing.load(Ordering::SeqCst), Ordering::SeqCst);
        if self.hang_on_close {
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn close_closes_the_transport_once_after_the_flush() -> TestResult {
    let transport = Closable::default();
    let producer = Producer::new(transport.clone(), config());
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(producer.send(msg()).await?);
    }
    producer.close().await;
    assert_eq!(
        transport.closes.load(Ordering::SeqCst),
        1,
        "transport closed"
    );
    assert_eq!(
        transport.publishing_at_close.load(Ordering::SeqCst),
        0,
        "closed only after every message settled"
    );
    producer.clone().close().await;
    assert_eq!(transport.closes.load(Ordering::SeqCst), 1, "closed once");
    for h in handles {
        h.await?;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn close_is_bounded_when_the_transport_close_hangs() -> TestResult {
    let transport = Closable {
        hang_on_close: true,
        ..Closable::default()
    };
    let producer = Producer::new(transport.clone(), config());
    let handle = producer.send(msg()).await?;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), producer.close())
        .await
        .map_err(|_| "close hung on the transport")?;
    // The flush takes the 100 ms confirm; the transport's close gets one confirm timeout.
    assert!(
        start.elapsed() <= Duration::from_millis(100) + config().confirm_timeout,
        "{:?}",
        start.elapsed()
    );
    handle.await?;
    Ok(())
}
