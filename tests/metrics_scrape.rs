//! The metrics as Prometheus scrapes them: the exporter serves on an ephemeral local port,
//! messages go through the in-memory broker, the producer and the pipeline, and the counters
//! scraped over HTTP equal what was sent, consumed, acked, dead-lettered and deduplicated.
//!
//! One test in this binary: the recorder is process-global and installed once.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use reliable::core::idempotency::InMemoryIdempotencyStore;
use reliable::core::memory::{DeliveryFault, InMemoryBroker, PublishFault};
use reliable::core::metrics;
use reliable::core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline,
};
use reliable::core::producer::{Producer, ProducerConfig};
use reliable::core::Message;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Messages the handler accepts, sent first (the duplicated delivery is one of them).
const GOOD: u64 = 20;
/// Messages the handler refuses for good: dead-lettered.
const BAD: u64 = 2;

/// A local port nobody listens on now (bound and released; the exporter binds it next).
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// One scrape: each sample's value by metric name and its labels.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the Prometheus text format (the subset the exporter writes: no escaped quotes or
/// commas inside label values, which our labels never have).
fn parse(text: &str) -> Result<Samples, String> {
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value: f64 = value.parse().map_err(|e| format!("{line:?}: {e}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        out.insert((name.to_owned(), labels), value);
    }
    Ok(out)
}

/// The sum of `name`'s samples carrying every label in `labels` (0 when there is none).
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(addr: SocketAddr) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let url = format!("http://{addr}/metrics");
    let body = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .and_then(|mut response| response.body_mut().read_to_string())
    })
    .await??;
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_counters_equal_what_was_sent_and_consumed() -> TestResult {
    let addr = free_port()?;
    // Before any producer or pipeline is built: they register their handles when built.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;

    let broker = InMemoryBroker::new();
    broker.declare_queue("orders");
    broker.declare_queue("orders.dlq");
    // The first delivery also comes back as a redelivered copy, which DedupeLayer skips.
    broker.inject_delivery_fault("orders", DeliveryFault::Duplicate);

    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    // The first publish is nacked once, then resent: resent{cause="nack"}.
    broker.inject_publish_fault(PublishFault::Nack);
    let msgs = (0..GOOD)
        .map(|i| format!("good {i}"))
        .chain((0..BAD).map(|i| format!("bad {i}")))
        .map(|p| Message::new(p).with_destination("orders"))
        .collect();
    let outcome = producer.send_many(msgs).await?.await;
    assert_eq!(outcome.confirmed, (GOOD + BAD) as usize);
    // No queue behind this destination: refused and handed back, handed_back{cause="refused"}.
    let nowhere = Message::new("lost").with_destination("nowhere");
    assert!(producer.send_confirmed(nowhere).await.is_err());

    let handler = HandlerBuilder::new(handler_fn(|msg: Message| async move {
        if msg.payload().starts_with(b"bad") {
            return Err(HandlerError::permanent("refused by the test"));
        }
        Ok(())
    }))
    .layer(DedupeLayer::new(Arc::new(
        InMemoryIdempotencyStore::default(),
    )))
    .build();
    let dead_letter = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "orders.dlq",
    );
    let source = broker.consumer("orders").end_when_drained();
    let stats = Pipeline::new(source, handler, dead_letter).run().await?;
    let consumed = GOOD + BAD + 1;
    assert_eq!(stats.received, consumed);
    assert_eq!(stats.dead_lettered, BAD);

    let text = scrape(addr).await?;
    let samples = parse(&text)?;
    let memory = [("transport", "memory")];
    let got = |name: &str| value(&samples, name, &memory);
    // The dead-letter copies go out through a producer too.
    let confirmed = (GOOD + BAD + BAD) as f64;
    assert_eq!(got(metrics::PUBLISHED_TOTAL), confirmed + 1.0, "{text}");
    assert_eq!(got(metrics::CONFIRMED_TOTAL), confirmed, "{text}");
    let by_cause = |name: &str, cause: &str| {
        value(&samples, name, &[("transport", "memory"), ("cause", cause)])
    };
    assert_eq!(by_cause(metrics::RESENT_TOTAL, "nack"), 1.0, "{text}");
    assert_eq!(got(metrics::RESENT_TOTAL), 1.0, "{text}");
    assert_eq!(
        by_cause(metrics::HANDED_BACK_TOTAL, "refused"),
        1.0,
        "{text}"
    );
    assert_eq!(got(metrics::HANDED_BACK_TOTAL), 1.0, "{text}");
    assert_eq!(got(metrics::IN_FLIGHT), 0.0, "{text}");
    assert_eq!(
        got("reliable_confirm_latency_seconds_count"),
        confirmed,
        "{text}"
    );
    assert_eq!(got(metrics::CONSUMED_TOTAL), consumed as f64, "{text}");
    assert_eq!(got(metrics::ACKED_TOTAL), (GOOD + 1) as f64, "{text}");
    assert_eq!(got(metrics::DEAD_LETTERED_TOTAL), BAD as f64, "{text}");
    assert_eq!(got(metrics::REQUEUED_TOTAL), 0.0, "{text}");
    assert_eq!(
        got("reliable_handler_latency_seconds_count"),
        consumed as f64,
        "{text}"
    );
    assert_eq!(
        value(&samples, metrics::DEDUPE_HITS_TOTAL, &[]),
        1.0,
        "{text}"
    );
    // Only the documented, low-cardinality labels: none names a message.
    for (name, labels) in samples.keys() {
        if name.starts_with("reliable_") {
            for key in labels.keys() {
                let known = ["transport", "cause", "quantile", "le"].contains(&key.as_str());
                assert!(known, "{name} has the label {key}");
            }
        }
    }
    Ok(())
}
