//! Attempts answered by callback ([`Completion`]): only the answer to the attempt in flight
//! counts, a dropped completion means a resend, and an attempt nobody answers is bounded by
//! the confirm timeout and the deadline (paused time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::backoff::BackoffPolicy;
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Attempt, Completion, Message, PublishError, Submission, Transport};

/// Keeps every attempt's completion for the test to answer (or drop) by hand.
#[derive(Default)]
struct Held {
    attempts: Mutex<Vec<Option<Completion>>>,
}

impl Held {
    fn count(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    /// Answers attempt `n` (1-based).
    fn answer(&self, n: usize, result: Result<(), PublishError>) {
        let done = self.attempts.lock().unwrap()[n - 1].take();
        done.expect("attempt not answered yet").complete(result);
    }

    /// Drops attempt `n`'s completion without an answer.
    fn drop_attempt(&self, n: usize) {
        drop(self.attempts.lock().unwrap()[n - 1].take());
    }
}

#[async_trait]
impl Transport for Held {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        Err(PublishError::Fatal {
            reason: "the producer submits".into(),
        })
    }

    fn submit(self: Arc<Self>, _msg: Arc<Message>, done: Completion) -> Submission {
        self.attempts.lock().unwrap().push(Some(done));
        Submission::Now(Ok(Attempt::Callback))
    }
}

fn config() -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(10),
        max_attempts: 10,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            factor: 1.0,
            jitter: false,
        },
        ..ProducerConfig::default()
    }
}

/// Lets the driver run for `d` of (paused) time.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_confirm_of_an_attempt_that_timed_out_is_ignored() {
    let transport = Arc::new(Held::default());
    let producer = Producer::from_arc(transport.clone(), config());
    let mut handle = producer.send(Message::new("x")).await.unwrap();
    run_for(Duration::from_millis(10)).await;
    assert_eq!(transport.count(), 1);

    // Attempt 1 times out after 1 s; the resend goes out 100 ms later.
    run_for(Duration::from_millis(1_200)).await;
    assert_eq!(transport.count(), 2, "the timed-out attempt is resent");

    // Attempt 1's confirm arrives late: it is not attempt 2's answer.
    transport.answer(1, Ok(()));
    run_for(Duration::from_millis(10)).await;
    assert!(
        futures::poll!(&mut handle).is_pending(),
        "a late answer to a superseded attempt must not settle the message"
    );

    // Attempt 2 is nacked: a third attempt, whose confirm settles the message.
    transport.answer(
        2,
        Err(PublishError::Nacked {
            reason: "test".into(),
        }),
    );
    run_for(Duration::from_millis(200)).await;
    assert_eq!(transport.count(), 3);
    transport.answer(3, Ok(()));
    let confirmed = handle.await.unwrap();
    assert_eq!(confirmed.attempts, 3);
    assert_eq!(producer.stats().resent.timeout, 1);
    assert_eq!(producer.stats().resent.nack, 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_dropped_without_an_answer_is_resent() {
    let transport = Arc::new(Held::default());
    let producer = Producer::from_arc(transport.clone(), config());
    let handle = producer.send(Message::new("x")).await.unwrap();
    run_for(Duration::from_millis(10)).await;
    transport.drop_attempt(1);
    run_for(Duration::from_millis(200)).await;
    assert_eq!(
        transport.count(),
        2,
        "resent at once, not after the timeout"
    );
    transport.answer(2, Ok(()));
    assert_eq!(handle.await.unwrap().attempts, 2);
    assert_eq!(producer.stats().resent.connection_lost, 1);
}

#[tokio::test(start_paused = true)]
async fn an_attempt_nobody_answers_ends_by_the_deadline() {
    let transport = Arc::new(Held::default());
    let producer = Producer::from_arc(
        transport.clone(),
        ProducerConfig {
            max_attempts: 100,
            ..config()
        },
    );
    let started = tokio::time::Instant::now();
    let handle = producer.send(Message::new("x")).await.unwrap();
    let err = handle.await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, SendError::DeadlineExceeded { .. }),
        "handed back by its deadline: {err}"
    );
    assert!(elapsed <= Duration::from_secs(10), "{elapsed:?}");
    // One attempt per confirm timeout plus backoff, within the 10 s deadline.
    assert!(
        (8..=10).contains(&transport.count()),
        "{}",
        transport.count()
    );
    assert_eq!(
        err.into_message().map(|m| m.payload().to_vec()),
        Some(b"x".to_vec())
    );
}
