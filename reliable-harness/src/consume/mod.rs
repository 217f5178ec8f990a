//! The consumer child: consumes the scenario's queue or topic until it is killed, journaling
//! every delivery and every effect.
//!
//! * Safe: the SDK's manual-ack / manual-commit consumer under the core [`Pipeline`], with a
//!   [`DedupeLayer`] over an [`Inbox`]: the effect and its idempotency key are one journal
//!   record, so they commit together and survive the process (the inbox pattern).
//! * Control: the classic pattern — auto-ack (RabbitMQ) or auto-commit with the automatic
//!   offset store (Kafka), a reader filling an in-memory buffer and a worker applying effects
//!   from it, no dedupe.
//! * Poison scenarios run the safe consumer in both variants: its handler aborts the process
//!   on the messages planned to crash and fails permanently on those planned to fail
//!   ([`Fate`]); the safe run counts deliveries in a redb attempt counter beside the journal,
//!   the control counts nowhere that survives a crash.
//!
//! Both apply effects at the same bounded rate (below the producer's), so a backlog exists
//! whenever a fault strikes, and both journal the broker's order where they take each delivery
//! from the broker, before any handler runs ([`source`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::QueueSpec;
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::attempts::AttemptCounter;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, Handler, HandlerBuilder, HandlerError, Pipeline,
    PipelineConfig,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Message;
use reliable_kafka::config::consumer_preset;
use reliable_kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
use reliable_stores::{RedbStore, RedbStoreConfig};
use tokio::time::Instant;

use crate::child::{parse_payload, ChildArgs, KAFKA_PARTITIONS, KAFKA_SESSION_TIMEOUT};
use crate::journal::{ConsumerView, Journal, Tail};
use crate::plan::{amqp_dead_letter, amqp_queue, roles, Broker};
use crate::poison::{Fate, POISON_MAX_DELIVERIES};
use crate::HarnessError;
use control::run_control;
pub use inbox::Inbox;
use source::Journaled;

mod control;
mod inbox;
mod source;

/// Consumer child options.
#[derive(clap::Args, Clone, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub child: ChildArgs,
    /// Effects applied per second, at most.
    #[arg(long)]
    pub capacity: u32,
}

/// Spaces effects evenly at a fixed rate across concurrent handlers.
#[derive(Debug)]
pub struct Limiter {
    next: Mutex<Instant>,
    period: Duration,
}

impl Limiter {
    /// A limiter of `per_second` permits per second (at least 1).
    pub fn new(per_second: u32) -> Self {
        Self {
            next: Mutex::new(Instant::now()),
            period: Duration::from_secs(1) / per_second.max(1),
        }
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + self.period;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// A journal write failed: the process cannot record what it does, so it stops (the
/// orchestrator restarts it; the unacknowledged message is delivered again).
fn journal_failed(e: &std::io::Error) -> ! {
    tracing::error!(error = %e, "consumer journal write failed; exiting");
    std::process::exit(3)
}

/// Appends `line`, or ends the process when the journal cannot be written.
fn record(journal: &Journal, line: &str) {
    if let Err(e) = journal.record(line) {
        journal_failed(&e);
    }
}

/// Journals a delivery; returns its sequence number, or `None` (journaled as foreign).
fn seen(journal: &Journal, payload: &[u8]) -> Option<u64> {
    match parse_payload(payload) {
        Some(seq) => {
            record(journal, &format!("D {seq}"));
            Some(seq)
        }
        None => {
            let shown = String::from_utf8_lossy(&payload[..payload.len().min(40)])
                .replace(['\n', '\r'], " ");
            record(journal, &format!("X {shown}"));
            None
        }
    }
}

/// Runs the consumer child until it is killed.
pub async fn run(args: ConsumeArgs) -> Result<(), HarnessError> {
    let child = &args.child;
    let mut view = ConsumerView::default();
    Tail::new(&child.journal).read(|l| view.apply(l))?;
    let journal = Arc::new(Journal::open(&child.journal)?);
    journal.record(&format!("START {}", std::process::id()))?;
    let limiter = Arc::new(Limiter::new(args.capacity));
    if roles(child.scenario, child.variant).unsafe_consumer {
        run_control(child, journal, limiter).await
    } else {
        run_safe(child, journal, limiter, &view).await
    }
}

async fn run_safe(
    child: &ChildArgs,
    journal: Arc<Journal>,
    limiter: Arc<Limiter>,
    view: &ConsumerView,
) -> Result<(), HarnessError> {
    let inbox = Arc::new(Inbox::new(journal.clone(), view));
    let effect = {
        let (inbox, limiter) = (inbox.clone(), limiter.clone());
        handler_fn(move |msg: Message| {
            let (inbox, limiter) = (inbox.clone(), limiter.clone());
            async move {
                // Foreign payloads were journaled on delivery and have no effect.
                if let Some(seq) = parse_payload(msg.payload()) {
                    limiter.acquire().await;
                    if let Err(e) = inbox.apply(seq) {
                        journal_failed(&e);
                    }
                }
                Ok::<(), HandlerError>(())
            }
        })
    };
    let deduped = Arc::new(
        HandlerBuilder::new(effect)
            .layer(DedupeLayer::new(inbox))
            .build(),
    );
    let scenario = child.scenario;
    let source_journal = journal.clone();
    let handler = handler_fn(move |msg: Message| {
        let (journal, deduped) = (journal.clone(), deduped.clone());
        async move {
            let seq = seen(&journal, msg.payload());
            // Poison scenarios: the delivery is journaled first, so the checker counts the
            // crashes each message caused.
            match seq.map(|s| Fate::of(scenario, s)) {
                Some(Fate::Crash) => std::process::abort(),
                Some(Fate::Fail) => {
                    return Err(HandlerError::permanent("the message is invalid (planned)"))
                }
                Some(Fate::Apply) | None => {}
            }
            deduped.handle(&msg).await
        }
    });
    let poison = child.scenario.poison();
    let config = if poison {
        // One handler at a time: a crash then leaves no innocent message counted without an
        // outcome (with 32, the same neighbours could be caught by every crash of a poison
        // message and be dead-lettered with it).
        PipelineConfig {
            concurrency: 1,
            max_deliveries: POISON_MAX_DELIVERIES,
            ..PipelineConfig::default()
        }
    } else {
        PipelineConfig {
            concurrency: 32,
            ..PipelineConfig::default()
        }
    };
    let counter = if roles(child.scenario, child.variant).attempt_counter {
        // Next to the journal, so every restarted consumer of the run finds the counts.
        let path = child.journal.with_file_name("attempts.redb");
        let store = RedbStore::open(&path, RedbStoreConfig::default())
            .map_err(|e| HarnessError::Setup(format!("attempt counter {}: {e}", path.display())))?;
        Some(Arc::new(store) as Arc<dyn AttemptCounter>)
    } else {
        None
    };
    match child.broker() {
        Broker::Amqp => {
            // The no-confirm control of the broker kill writes transient messages to a classic
            // durable queue (a quorum queue would persist them anyway); read it with otherwise
            // safe settings.
            let settings = if roles(child.scenario, child.variant).classic_queue {
                AmqpSettings::classic_durable()
            } else {
                AmqpSettings::safe()
            };
            // Outside the poison scenarios the effect handler never fails (a journal failure
            // ends the process instead), so nothing is dead-lettered; the route must still be
            // loss-free for the pipeline to start.
            let classic = roles(child.scenario, child.variant).classic_queue;
            let source =
                connect_amqp(child, &amqp_queue(&child.dest, classic), settings.clone()).await;
            let source = Journaled::new(source, source_journal);
            let dead_letter = if classic || poison {
                // A published copy carries the origin headers the poison checker reads.
                let publisher =
                    AmqpPublisher::connect_cluster(&child.brokers.amqp_urls(), settings).await?;
                let exchange = amqp_dead_letter(&child.dest).exchange().to_owned();
                DeadLetter::publish(
                    Producer::new(publisher, ProducerConfig::default()),
                    exchange,
                )
            } else {
                DeadLetter::BrokerReject
            };
            let mut pipeline = Pipeline::new(source, handler, dead_letter).with_config(config);
            if let Some(counter) = counter {
                pipeline = pipeline.with_attempt_counter(counter);
            }
            let stats = pipeline.run().await?;
            tracing::info!(?stats, "pipeline ended");
        }
        Broker::Kafka => {
            let mut client = consumer_preset(&child.brokers.kafka_bootstrap, &child.group());
            client.set(
                "session.timeout.ms",
                KAFKA_SESSION_TIMEOUT.as_millis().to_string(),
            );
            if poison {
                // Static membership: a consumer restarted after a crash takes its
                // predecessor's place at once instead of waiting out its session.
                client.set("group.instance.id", format!("{}-member", child.group()));
            }
            let source = KafkaConsumer::builder_from_config(client)
                .subscribe(TopicSpec::new(&child.dest).partitions(KAFKA_PARTITIONS))
                .build()
                .await?;
            let source = Journaled::new(source, source_journal);
            // Kafka has no broker-side dead letter, so poison records go to a topic through a
            // confirmed publish (only in the poison scenarios: elsewhere the effect handler
            // never fails).
            let dlq = format!("{}.dlq", child.dest);
            let dlq_transport = KafkaTransport::builder(&child.brokers.kafka_bootstrap)
                .topic(TopicSpec::new(&dlq))
                .build()
                .await?;
            let mut pipeline =
                Pipeline::new(source, handler, dlq_transport.dead_letter(dlq)).with_config(config);
            if let Some(counter) = counter {
                pipeline = pipeline.with_attempt_counter(counter);
            }
            let stats = pipeline.run().await?;
            tracing::info!(?stats, "pipeline ended");
        }
    }
    Ok(())
}

/// Connects, retrying while the broker is unreachable (a consumer restarted during an outage).
async fn connect_amqp(child: &ChildArgs, spec: &QueueSpec, settings: AmqpSettings) -> AmqpConsumer {
    loop {
        match AmqpConsumer::connect_cluster_checked(
            &child.brokers.amqp_urls(),
            spec,
            settings.clone(),
        )
        .await
        {
            Ok(consumer) => return consumer,
            Err(e) => {
                tracing::warn!(error = %e, "consumer cannot connect yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limiter_spaces_permits_at_its_rate() {
        let limiter = Limiter::new(100);
        let start = Instant::now();
        for _ in 0..50 {
            limiter.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(490) && took < Duration::from_millis(520),
            "{took:?}"
        );
    }
}
