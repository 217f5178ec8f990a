//! Sequences in a batch: deliveries a source names by one sequence (Kafka's per-partition or
//! per-key runs) are handled one at a time, in order, and a failure in a sequence is settled
//! before the deliveries after it run; different sequences and unsequenced deliveries still
//! overlap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::memory::{InMemoryBroker, InMemoryConsumer};
use reliable_core::pipeline::{
    handler_fn, DeadLetter, HandlerError, Pipeline, PipelineConfig, PipelineStats,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{ConsumeError, Delivery, DeliverySource, Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Hands out the in-memory queue's deliveries with the sequence named by the payload's first
/// letter (`a3` is in sequence `a`); payloads starting with `-` get none.
struct Sequenced(InMemoryConsumer);

fn sequence_of(msg: &Message) -> Option<u64> {
    match msg.payload().first() {
        Some(b'-') | None => None,
        Some(&letter) => Some(u64::from(letter)),
    }
}

#[async_trait]
impl DeliverySource for Sequenced {
    async fn next(&mut self) -> Result<Option<Delivery>, ConsumeError> {
        Ok(self.next_batch(1).await?.pop())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, ConsumeError> {
        let batch = self.0.next_batch(max).await?;
        Ok(batch
            .into_iter()
            .map(|d| match sequence_of(d.message()) {
                Some(seq) => d.with_sequence(seq),
                None => d,
            })
            .collect())
    }

    async fn close(&mut self) -> Result<(), ConsumeError> {
        self.0.close().await
    }
}

/// What the handler saw: the order handlers started in, per sequence, and the most handlers
/// of one sequence running at once.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<SeenInner>>);

#[derive(Default)]
struct SeenInner {
    started: HashMap<u8, Vec<String>>,
    running: HashMap<u8, usize>,
    most_at_once: HashMap<u8, usize>,
    all_running: usize,
    most_overall: usize,
}

impl Seen {
    fn start(&self, msg: &Message) {
        let text = String::from_utf8_lossy(msg.payload()).into_owned();
        let group = msg.payload().first().copied().unwrap_or(b'?');
        if let Ok(mut s) = self.0.lock() {
            s.started.entry(group).or_default().push(text);
            let n = {
                let r = s.running.entry(group).or_default();
                *r += 1;
                *r
            };
            let most = s.most_at_once.entry(group).or_default();
            *most = (*most).max(n);
            s.all_running += 1;
            s.most_overall = s.most_overall.max(s.all_running);
        }
    }

    fn end(&self, msg: &Message) {
        let group = msg.payload().first().copied().unwrap_or(b'?');
        if let Ok(mut s) = self.0.lock() {
            if let Some(r) = s.running.get_mut(&group) {
                *r -= 1;
            }
            s.all_running -= 1;
        }
    }

    fn started(&self, group: u8) -> Vec<String> {
        self.0
            .lock()
            .map(|s| s.started.get(&group).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn most_at_once(&self, group: u8) -> usize {
        self.0
            .lock()
            .map(|s| s.most_at_once.get(&group).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn most_overall(&self) -> usize {
        self.0.lock().map(|s| s.most_overall).unwrap_or(0)
    }
}

fn names(group: char, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{group}{i}")).collect()
}

/// Publishes sequences `a`, `b`, `c` of `n` messages each, interleaved, plus `n`
/// unsequenced ones.
async fn publish_interleaved(broker: &InMemoryBroker, n: usize) -> TestResult {
    broker.declare_queue("q");
    broker.declare_queue("dlq");
    let t = broker.transport();
    for i in 0..n {
        for group in ['a', 'b', 'c', '-'] {
            t.publish(&Message::new(format!("{group}{i}")).with_destination("q"))
                .await?;
        }
    }
    Ok(())
}

async fn run<H: reliable_core::pipeline::Handler + 'static>(
    broker: &InMemoryBroker,
    handler: H,
    requeue_delay: Duration,
) -> Result<PipelineStats, Box<dyn std::error::Error>> {
    let dead_letter = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    );
    Ok(Pipeline::new(
        Sequenced(broker.consumer("q").end_when_drained()),
        handler,
        dead_letter,
    )
    .with_config(PipelineConfig {
        concurrency: 64,
        batch_size: 64,
        requeue_delay,
        ..PipelineConfig::default()
    })
    .run()
    .await?)
}

/// A handler that takes a few milliseconds (a different time per message, so that handlers
/// running side by side would finish out of order) and records what it saw.
fn slow(seen: Seen) -> impl reliable_core::pipeline::Handler {
    handler_fn(move |m: Message| {
        let seen = seen.clone();
        async move {
            seen.start(&m);
            let wait = 1 + (m.payload().iter().map(|&b| u64::from(b)).sum::<u64>() % 7);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            seen.end(&m);
            Ok(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_sequence_is_handled_one_at_a_time_in_order_while_others_overlap() -> TestResult {
    let broker = InMemoryBroker::new();
    publish_interleaved(&broker, 12).await?;
    let seen = Seen::default();
    let stats = run(&broker, slow(seen.clone()), Duration::from_secs(30)).await?;
    assert_eq!(stats.succeeded, 48);
    assert_eq!(broker.acked_count("q"), 48);
    for group in ['a', 'b', 'c'] {
        assert_eq!(
            seen.started(group as u8),
            names(group, 12),
            "order of {group}"
        );
        assert_eq!(seen.most_at_once(group as u8), 1, "overlap in {group}");
    }
    // The unsequenced deliveries and the three sequences still ran side by side.
    assert!(seen.most_at_once(b'-') > 1);
    assert!(seen.most_overall() > 3);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_is_dead_lettered_before_the_rest_of_its_sequence_runs() -> TestResult {
    let broker = InMemoryBroker::new();
    publish_interleaved(&broker, 8).await?;
    let dead_lettered_at_start = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let seen = dead_lettered_at_start.clone();
    let probe = broker.clone();
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        let probe = probe.clone();
        async move {
            let text = String::from_utf8_lossy(m.payload()).into_owned();
            if let Ok(mut s) = seen.lock() {
                s.insert(text.clone(), probe.queue_len("dlq"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            if text == "a3" {
                return Err(HandlerError::permanent("a3 is poison"));
            }
            Ok(())
        }
    });
    let stats = run(&broker, handler, Duration::from_secs(30)).await?;
    assert_eq!(stats.succeeded, 31);
    assert_eq!(stats.dead_lettered, 1);
    let at_start = dead_lettered_at_start
        .lock()
        .map(|s| s.clone())
        .map_err(|_| "poisoned")?;
    for later in 4..8 {
        assert_eq!(
            at_start.get(&format!("a{later}")),
            Some(&1),
            "a{later} ran before a3 was dead-lettered"
        );
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn after_a_requeue_the_rest_of_the_sequence_goes_back_behind_it_without_running() -> TestResult
{
    let broker = InMemoryBroker::new();
    publish_interleaved(&broker, 6).await?;
    let failed_once = Arc::new(Mutex::new(false));
    let seen = Seen::default();
    let log = seen.clone();
    let handler = handler_fn(move |m: Message| {
        let failed_once = failed_once.clone();
        let log = log.clone();
        async move {
            log.start(&m);
            log.end(&m);
            if &m.payload()[..] == b"a2" {
                let mut failed = failed_once
                    .lock()
                    .map_err(|_| HandlerError::permanent("lock"))?;
                if !*failed {
                    *failed = true;
                    return Err(HandlerError::unavailable("a dependency is down"));
                }
            }
            Ok(())
        }
    });
    // No hold: the unavailable delivery is requeued at once.
    let stats = run(&broker, handler, Duration::ZERO).await?;
    assert_eq!(broker.acked_count("q"), 24);
    // a2 requeued, a3..a5 handed back behind it.
    assert_eq!(stats.requeued, 4);
    // Each of a3..a5 ran once, after it came back: none ran before a2's requeue. The order
    // they come back in is the source's (the in-memory queue puts a requeue at its head; the
    // Kafka consumer keeps the sequence's order).
    let started = seen.started(b'a');
    assert_eq!(started[..3], names('a', 3)[..]);
    let mut rest = started[3..].to_vec();
    rest.sort();
    assert_eq!(rest, ["a2", "a3", "a4", "a5"]);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_held_delivery_holds_back_only_its_own_sequence() -> TestResult {
    let broker = InMemoryBroker::new();
    publish_interleaved(&broker, 8).await?;
    let begun = tokio::time::Instant::now();
    let started_at = Arc::new(Mutex::new(HashMap::<String, Duration>::new()));
    let log = started_at.clone();
    let handler = handler_fn(move |m: Message| {
        let log = log.clone();
        async move {
            let text = String::from_utf8_lossy(m.payload()).into_owned();
            if text == "a1" && begun.elapsed() < Duration::from_secs(5) {
                return Err(HandlerError::unavailable("a dependency is down for 5 s"));
            }
            if let Ok(mut l) = log.lock() {
                l.entry(text).or_insert(begun.elapsed());
            }
            Ok(())
        }
    });
    let stats = run(&broker, handler, Duration::from_secs(30)).await?;
    assert_eq!(stats.succeeded, 32);
    assert_eq!(stats.requeued, 0);
    let started_at = started_at
        .lock()
        .map(|l| l.clone())
        .map_err(|_| "poisoned")?;
    let a1 = started_at["a1"];
    assert!(a1 >= Duration::from_secs(5));
    for later in 2..8 {
        assert!(
            started_at[&format!("a{later}")] >= a1,
            "a{later} ran before a1"
        );
    }
    for name in names('b', 8).into_iter().chain(names('c', 8)) {
        assert!(
            started_at[&name] < a1,
            "{name} waited for another sequence's held delivery"
        );
    }
    Ok(())
}
