//! Property tests of the core's guarantees under random fault interleavings (paused time).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use reliable_core::backoff::BackoffPolicy;
use reliable_core::idempotency::InMemoryIdempotencyStore;
use reliable_core::memory::{DeliveryFault, InMemoryBroker, PublishFault};
use reliable_core::offsets::OffsetTracker;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline, PipelineConfig,
    RetryLayer, RetryPolicy,
};
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, MessageId, PublishError, TopicPartition, Transport};

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

fn publish_fault() -> impl Strategy<Value = Option<PublishFault>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(PublishFault::DropConfirm)),
        1 => Just(Some(PublishFault::LoseMessage)),
        2 => Just(Some(PublishFault::Nack)),
        1 => any::<bool>().prop_map(|stored| Some(PublishFault::ConnectionLost { stored })),
        1 => (0u64..3_000).prop_map(|ms| Some(PublishFault::Delay(Duration::from_millis(ms)))),
        1 => Just(Some(PublishFault::Fail(PublishError::Busy { reason: "full".into() }))),
        1 => Just(Some(PublishFault::Fail(PublishError::Unroutable { reason: "no route".into() }))),
    ]
}

const DEADLINE: Duration = Duration::from_secs(20);

fn attempts_of(outcome: &Result<reliable_core::producer::Confirmed, SendError>) -> Option<u32> {
    match outcome {
        Ok(c) => Some(c.attempts),
        Err(SendError::Refused { attempts, .. })
        | Err(SendError::AttemptsExhausted { attempts, .. })
        | Err(SendError::DeadlineExceeded { attempts, .. }) => Some(*attempts),
        Err(_) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Under random nacks, lost confirms, delays, refusals and connection losses, every message
    /// ends confirmed (and is in the queue) or handed back unchanged in an error, within the
    /// deadline; every attempt reuses the message's id.
    #[test]
    fn every_message_is_confirmed_or_handed_back(
        n in 1usize..12,
        faults in prop::collection::vec(publish_fault(), 0..48),
        losses in prop::collection::vec(0u64..15_000, 0..3),
        max_attempts in 1u32..7,
        window in 1usize..5,
    ) {
        let rt = runtime();
        rt.block_on(async {
            let broker = InMemoryBroker::new();
            broker.declare_queue("q");
            for f in faults.into_iter().flatten() {
                broker.inject_publish_fault(f);
            }
            for at in losses {
                let b = broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(at)).await;
                    b.lose_connection();
                });
            }
            let producer = Producer::new(broker.transport(), ProducerConfig {
                confirm_timeout: Duration::from_secs(2),
                deadline: DEADLINE,
                max_attempts,
                max_in_flight: window,
                backoff: BackoffPolicy {
                    min_delay: Duration::from_millis(50),
                    max_delay: Duration::from_secs(1),
                    factor: 2.0,
                    jitter: true,
                },
                ..ProducerConfig::default()
            });
            let msgs: Vec<Message> = (0..n)
                .map(|i| Message::new(format!("m{i}")).with_destination("q").with_header("i", i.to_string()))
                .collect();
            let mut handles = Vec::new();
            for m in &msgs {
                match producer.send(m.clone()).await {
                    Ok(h) => handles.push(h),
                    Err(e) => prop_assert!(false, "send refused on an open producer: {e}"),
                }
            }
            let mut outcomes = Vec::new();
            for h in handles {
                outcomes.push(h.await);
            }

            let sent: BTreeSet<MessageId> = msgs.iter().map(Message::id).collect();
            let mut log_counts: HashMap<MessageId, u32> = HashMap::new();
            for id in broker.publish_log() {
                prop_assert!(sent.contains(&id), "an attempt used an id never sent: {id}");
                *log_counts.entry(id).or_default() += 1;
            }
            let stored: BTreeSet<MessageId> = broker.messages("q").iter().map(Message::id).collect();
            for (m, outcome) in msgs.iter().zip(&outcomes) {
                prop_assert_eq!(attempts_of(outcome), log_counts.get(&m.id()).copied(),
                    "every attempt of {} reached the transport with its id", m.id());
                match outcome {
                    Ok(c) => {
                        prop_assert_eq!(c.id, m.id());
                        prop_assert!(stored.contains(&m.id()), "confirmed but not in the queue");
                        prop_assert!(c.latency <= DEADLINE);
                    }
                    Err(e) => {
                        prop_assert_eq!(e.message(), Some(m), "error must hand the message back unchanged");
                        match e {
                            SendError::Refused { source, .. } => prop_assert!(!source.is_retryable()),
                            SendError::AttemptsExhausted { attempts, .. } => prop_assert_eq!(*attempts, max_attempts),
                            SendError::DeadlineExceeded { elapsed, .. } => prop_assert!(*elapsed <= DEADLINE),
                            other => prop_assert!(false, "unexpected error {other}"),
                        }
                    }
                }
            }
            let stats = producer.stats();
            prop_assert_eq!(stats.confirmed + stats.failed, n as u64);
            prop_assert_eq!(stats.in_flight, 0);
            prop_assert_eq!(stats.confirmed, outcomes.iter().filter(|o| o.is_ok()).count() as u64);
            Ok(())
        })?;
    }

    /// Whatever the completion order and the gaps between offsets, the committable position
    /// never passes an unfinished offset and equals the model's.
    #[test]
    fn offset_watermark_never_passes_an_unfinished_offset(
        ops in prop::collection::vec((any::<bool>(), 1i64..4, any::<prop::sample::Index>()), 1..200),
    ) {
        let tracker = OffsetTracker::new();
        let tp = TopicPartition::new("t", 3);
        let mut next = 100i64;
        let mut tracked: Vec<i64> = Vec::new();
        let mut unfinished: BTreeSet<i64> = BTreeSet::new();
        for (track, gap, pick) in ops {
            if track || unfinished.is_empty() {
                next += gap;
                tracker.track(&tp, next);
                tracked.push(next);
                unfinished.insert(next);
            } else {
                let all: Vec<i64> = unfinished.iter().copied().collect();
                let off = all[pick.index(all.len())];
                prop_assert!(tracker.complete(&tp, off).is_ok());
                unfinished.remove(&off);
                prop_assert!(tracker.complete(&tp, off).is_err(), "double completion accepted");
            }
            let w = tracker.committable(&tp);
            let expected = unfinished.first().copied().or(tracked.last().map(|l| l + 1));
            prop_assert_eq!(w, expected);
            if let Some(w) = w {
                for off in tracked.iter().filter(|o| **o < w) {
                    prop_assert!(!unfinished.contains(off), "watermark {} passed unfinished {}", w, off);
                }
            }
        }
    }

    /// Under random duplicate deliveries, consumer crashes mid-handler, resent copies and
    /// transient failures, each key's effect happens exactly once and nothing is dead-lettered.
    #[test]
    fn dedupe_applies_each_key_once(
        copies in prop::collection::vec(1usize..4, 1..8),
        faults in prop::collection::vec(prop_oneof![
            3 => Just(None),
            1 => Just(Some(DeliveryFault::Duplicate)),
            1 => Just(Some(DeliveryFault::CrashMidHandler)),
        ], 0..24),
        flaky in prop::collection::vec(0usize..3, 8),
        concurrency in 1usize..5,
        work_ms in 0u64..50,
    ) {
        let rt = runtime();
        rt.block_on(async {
            let broker = InMemoryBroker::new();
            broker.declare_queue("q");
            broker.declare_queue("dlq");
            for f in faults.into_iter().flatten() {
                broker.inject_delivery_fault("q", f);
            }
            let transport = broker.transport();
            for (k, n) in copies.iter().enumerate() {
                for _ in 0..*n {
                    // Distinct message ids, one business key: what a resend or a re-publish makes.
                    let m = Message::new(format!("k{k}"))
                        .with_destination("q")
                        .with_idempotency_key(format!("key-{k}"));
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    };
                    if let Err(e) = transport.publish(&m).await {
                        return Err(TestCaseError::fail(e.to_string()));
                    }
                }
            }
            let effects: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
            let failures: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
            let (e, f) = (effects.clone(), failures.clone());
            let user = handler_fn(move |m: Message| {
                let (e, f) = (e.clone(), f.clone());
                let flaky = flaky.clone();
                async move {
                    let key = m.idempotency_key().to_string();
                    tokio::time::sleep(Duration::from_millis(work_ms)).await;
                    {
                        let mut f = f.lock().map_err(|_| HandlerError::permanent("poisoned"))?;
                        let seen = f.entry(key.clone()).or_default();
                        let k: usize = key.trim_start_matches("key-").parse().unwrap_or(0);
                        if *seen < flaky[k % flaky.len()] {
                            *seen += 1;
                            return Err(HandlerError::transient("flaky"));
                        }
                    }
                    *e.lock().map_err(|_| HandlerError::permanent("poisoned"))?.entry(key).or_default() += 1;
                    Ok(())
                }
            });
            let handler = HandlerBuilder::new(user)
                .layer(RetryLayer::new(RetryPolicy {
                    max_attempts: 100,
                    backoff: BackoffPolicy {
                        min_delay: Duration::from_millis(10),
                        max_delay: Duration::from_millis(100),
                        factor: 2.0,
                        jitter: true,
                    },
                }))
                .layer(DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default())))
                .build();
            let dl = DeadLetter::publish(Producer::new(broker.transport(), ProducerConfig::default()), "dlq");
            let result = Pipeline::new(broker.consumer("q").end_when_drained(), handler, dl)
                .with_config(PipelineConfig { concurrency, ..PipelineConfig::default() })
                .run()
                .await;
            prop_assert!(result.is_ok(), "{:?}", result);
            let effects = effects.lock().map(|m| m.clone()).unwrap_or_default();
            for k in 0..copies.len() {
                prop_assert_eq!(effects.get(&format!("key-{k}")).copied(), Some(1), "key-{} effect count", k);
            }
            prop_assert_eq!(effects.len(), copies.len());
            prop_assert!(broker.messages("dlq").is_empty());
            prop_assert_eq!(broker.queue_len("q") + broker.unacked_len("q"), 0);
            Ok(())
        })?;
    }
}
