//! Poison messages (issue 14, item 3; loss-matrix row L10): a message whose handler crashes the
//! consumer is counted across restarts, by the broker's delivery count or by an attempt
//! counter that outlives the pipeline, and dead-lettered with its origin after
//! `PipelineConfig::max_deliveries` deliveries without running its handler again; every other
//! message is processed.
//!
//! A crash is simulated by aborting the task running the pipeline while the poison message's
//! handler hangs, then "restarting": the test's broker returns every unacked delivery to the
//! queue (as RabbitMQ does when a consumer's connection dies) and a new pipeline starts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::attempts::{AttemptCounter, InMemoryAttemptCounter};
use reliable_core::memory::InMemoryBroker;
use reliable_core::message::headers;
use reliable_core::pipeline::{handler_fn, DeadLetter, HandlerError, Pipeline, PipelineConfig};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{AckError, Acker, ConsumeError, Delivery, DeliverySource, Message, MessageId};
use tokio::sync::Notify;

/// A queue that counts deliveries like a quorum queue and returns unacked ones on a restart.
#[derive(Default)]
struct Queue {
    ready: VecDeque<(Message, u32)>,
    unacked: HashMap<MessageId, (Message, u32)>,
    acked: Vec<Message>,
    rejected: Vec<Message>,
}

#[derive(Clone, Default)]
struct Broker(Arc<Mutex<Queue>>);

impl Broker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.lock().unwrap()
    }
    fn publish(&self, payload: &str) {
        self.lock()
            .ready
            .push_back((Message::new(payload.to_owned()), 0));
    }
    /// The consumer died: its unacked deliveries go back to the head of the queue.
    fn restart(&self) {
        let mut q = self.lock();
        let back: Vec<_> = q.unacked.drain().map(|(_, v)| v).collect();
        for m in back {
            q.ready.push_front(m);
        }
    }
}

struct Source {
    broker: Broker,
    /// Whether deliveries carry the broker's count (a quorum queue) or not (Kafka).
    counts: bool,
}

#[async_trait]
impl DeliverySource for Source {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        let mut q = self.broker.lock();
        let Some((msg, count)) = q.ready.pop_front() else {
            return Ok(None);
        };
        let count = count + 1;
        q.unacked.insert(msg.id(), (msg.clone(), count));
        let acker = Box::new(Settle {
            broker: self.broker.clone(),
            id: msg.id(),
        });
        let mut d = Delivery::new(msg, acker)
            .with_redelivered(count > 1)
            .with_origin("q");
        if self.counts {
            d = d.with_delivery_count(count);
        }
        Ok(Some(d))
    }
    async fn close(&mut self) -> Result<(), ConsumeError> {
        Ok(())
    }
}

struct Settle {
    broker: Broker,
    id: MessageId,
}

impl Settle {
    fn take(&self) -> Result<(Message, u32), AckError> {
        self.broker
            .lock()
            .unacked
            .remove(&self.id)
            .ok_or(AckError::Stale {
                reason: "not unacked".into(),
            })
    }
}

#[async_trait]
impl Acker for Settle {
    async fn ack(&self) -> Result<(), AckError> {
        let (m, _) = self.take()?;
        self.broker.lock().acked.push(m);
        Ok(())
    }
    async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        if requeue {
            let m = self.take()?;
            self.broker.lock().ready.push_back(m);
            Ok(())
        } else {
            self.reject().await
        }
    }
    async fn reject(&self) -> Result<(), AckError> {
        let (m, _) = self.take()?;
        self.broker.lock().rejected.push(m);
        Ok(())
    }
}

/// What one scenario saw.
struct Outcome {
    broker: Broker,
    dead_letters: Vec<Message>,
    poison_runs: u32,
    restarts: u32,
    effects: HashMap<String, u32>,
}

/// Publishes a, b, poison, c and runs pipelines (restarting after each crash, at most
/// `max_restarts` times) until one ends on its own.
async fn scenario(
    counts: bool,
    counter: Option<Arc<dyn AttemptCounter>>,
    max_restarts: u32,
) -> Outcome {
    let broker = Broker::default();
    for p in ["a", "b", "poison", "c"] {
        broker.publish(p);
    }
    let dl_broker = InMemoryBroker::new();
    dl_broker.declare_queue("dlq");
    let effects = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let poison_runs = Arc::new(AtomicU32::new(0));
    let mut restarts = 0;
    loop {
        let crashed = Arc::new(Notify::new());
        let handler = {
            let (effects, poison_runs, crashed) =
                (effects.clone(), poison_runs.clone(), crashed.clone());
            handler_fn(move |msg: Message| {
                let (effects, poison_runs, crashed) =
                    (effects.clone(), poison_runs.clone(), crashed.clone());
                async move {
                    let body = String::from_utf8_lossy(msg.payload()).into_owned();
                    if body == "poison" {
                        // The process dies here: the test aborts the pipeline.
                        poison_runs.fetch_add(1, Ordering::SeqCst);
                        crashed.notify_one();
                        std::future::pending::<()>().await;
                    }
                    *effects.lock().unwrap().entry(body).or_default() += 1;
                    Ok::<(), HandlerError>(())
                }
            })
        };
        let dead_letter = DeadLetter::publish(
            Producer::new(dl_broker.transport(), ProducerConfig::default()),
            "dlq",
        );
        let config = PipelineConfig {
            concurrency: 1,
            max_deliveries: 3,
            ..PipelineConfig::default()
        };
        let mut pipeline = Pipeline::new(
            Source {
                broker: broker.clone(),
                counts,
            },
            handler,
            dead_letter,
        )
        .with_config(config);
        if let Some(c) = &counter {
            pipeline = pipeline.with_attempt_counter(c.clone());
        }
        let mut run = tokio::spawn(pipeline.run());
        tokio::select! {
            ended = &mut run => {
                ended.expect("pipeline task").expect("pipeline run");
                break;
            }
            () = crashed.notified() => {
                run.abort();
                let _ = run.await;
                broker.restart();
                restarts += 1;
                if restarts >= max_restarts {
                    break;
                }
            }
        }
    }
    let dead_letters = dl_broker.messages("dlq");
    let effects = effects.lock().unwrap().clone();
    Outcome {
        broker,
        dead_letters,
        poison_runs: poison_runs.load(Ordering::SeqCst),
        restarts,
        effects,
    }
}

fn assert_stopped_with_origin(o: &Outcome) {
    assert_eq!(
        o.poison_runs, 3,
        "the handler ran max_deliveries times, no more"
    );
    assert_eq!(o.restarts, 3);
    assert_eq!(
        o.dead_letters.len(),
        1,
        "the poison message is dead-lettered once"
    );
    let dl = &o.dead_letters[0];
    assert_eq!(dl.payload().as_ref(), b"poison");
    assert_eq!(dl.header(headers::ORIGIN_QUEUE), Some("q"));
    assert_eq!(dl.header(headers::DELIVERY_ATTEMPTS), Some("4"));
    let reason = dl.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    assert!(
        reason.contains("crashed its consumer 3 times"),
        "reason: {reason}"
    );
    for p in ["a", "b", "c"] {
        assert_eq!(o.effects.get(p), Some(&1), "{p} applied once");
    }
    let q = o.broker.lock();
    assert!(q.ready.is_empty() && q.unacked.is_empty());
    assert_eq!(
        q.acked.len(),
        4,
        "three applied, one dead-lettered then acked"
    );
}

#[tokio::test]
async fn the_broker_count_stops_a_message_that_crashes_its_consumer() {
    let o = scenario(true, None, 10).await;
    assert_stopped_with_origin(&o);
}

#[tokio::test]
async fn a_durable_attempt_counter_stops_it_where_the_broker_does_not_count() {
    let counter = Arc::new(InMemoryAttemptCounter::default());
    let o = scenario(false, Some(counter.clone()), 10).await;
    assert_stopped_with_origin(&o);
    let key = o.dead_letters[0].idempotency_key();
    assert_eq!(
        counter.count(&key),
        4,
        "a message stopped past the limit keeps its count"
    );
}

/// On Kafka a settled delivery is only an offset marked for the next commit: an unrelated crash
/// before that commit delivers the stopped poison message again. Its count must still stop it,
/// without running the handler (a fourth crash) and with a second dead-letter copy at most.
#[tokio::test]
async fn a_stopped_poison_message_delivered_again_before_its_commit_is_stopped_again() {
    let counter = Arc::new(InMemoryAttemptCounter::default());
    let o = scenario(false, Some(counter.clone()), 10).await;
    assert_stopped_with_origin(&o);
    let poison = o
        .broker
        .lock()
        .acked
        .iter()
        .find(|m| m.payload().as_ref() == b"poison")
        .cloned()
        .expect("the poison message was settled");
    o.broker.lock().ready.push_back((poison, 0));

    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let runs = runs.clone();
        handler_fn(move |_msg: Message| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let dl_broker = InMemoryBroker::new();
    dl_broker.declare_queue("dlq");
    let dead_letter = DeadLetter::publish(
        Producer::new(dl_broker.transport(), ProducerConfig::default()),
        "dlq",
    );
    Pipeline::new(
        Source {
            broker: o.broker.clone(),
            counts: false,
        },
        handler,
        dead_letter,
    )
    .with_config(PipelineConfig {
        concurrency: 1,
        max_deliveries: 3,
        ..PipelineConfig::default()
    })
    .with_attempt_counter(counter)
    .run()
    .await
    .expect("pipeline run");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler did not run again"
    );
    assert_eq!(dl_broker.messages("dlq").len(), 1, "dead-lettered again");
}

#[tokio::test]
async fn control_without_a_count_that_survives_the_crash_the_message_loops() {
    let o = scenario(false, None, 8).await;
    assert_eq!(o.restarts, 8);
    assert_eq!(o.poison_runs, 8, "redelivered and re-run on every restart");
    assert!(o.dead_letters.is_empty());
    assert_eq!(o.effects.get("c"), None, "stuck behind the poison message");
}

#[tokio::test(start_paused = true)]
async fn deliberate_requeues_do_not_count_as_crashes() {
    let broker = Broker::default();
    broker.publish("slow-dependency");
    let dl_broker = InMemoryBroker::new();
    dl_broker.declare_queue("dlq");
    let calls = Arc::new(AtomicU32::new(0));
    let handler = {
        let calls = calls.clone();
        handler_fn(move |_msg: Message| {
            let calls = calls.clone();
            async move {
                // Unavailable for the first 6 deliveries: 6 requeues, twice max_deliveries.
                if calls.fetch_add(1, Ordering::SeqCst) < 6 {
                    return Err(HandlerError::unavailable("database down"));
                }
                Ok(())
            }
        })
    };
    let config = PipelineConfig {
        concurrency: 1,
        max_deliveries: 3,
        requeue_delay: Duration::ZERO,
        ..PipelineConfig::default()
    };
    let stats = Pipeline::new(
        Source {
            broker: broker.clone(),
            counts: true,
        },
        handler,
        DeadLetter::publish(
            Producer::new(dl_broker.transport(), ProducerConfig::default()),
            "dlq",
        ),
    )
    .with_config(config)
    .run()
    .await
    .unwrap();
    assert_eq!(stats.requeued, 6);
    assert_eq!(stats.succeeded, 1);
    assert_eq!(stats.dead_lettered, 0);
    assert!(dl_broker.messages("dlq").is_empty());
}
