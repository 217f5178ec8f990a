//! W3C trace context across the real brokers (feature `otel`): a message sent under a producer
//! span through RabbitMQ (`AmqpPublisher`) and through Kafka (`KafkaTransport`) is consumed by a
//! pipeline with `TraceContextLayer`, and the consumer's `reliable.handle` span has the
//! producer span's trace id and that span as its (remote) parent. Controls in each test: a
//! message sent with no span current carries no `traceparent` and is handled in a new trace; a
//! garbage `traceparent` set by the caller is kept and does not fail the handler.
//!
//! The subscriber (a `tracing_opentelemetry` layer over an SDK tracer provider exporting to
//! memory) is process-global, installed once; the tests tell their spans apart by message id.
//! Needs `eval "$(scripts/brokers env)"`; under `CI` a missing broker fails the test.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reliable::amqp::lapin::{Connection, ConnectionProperties};
use reliable::amqp::topology::{self, QueueSpec};
use reliable::amqp::{AmqpConsumer, AmqpPublisher, AmqpSettings};
use reliable::core::pipeline::{
    handler_fn, DeadLetter, HandlerBuilder, HandlerError, Pipeline, TraceContextLayer,
};
use reliable::core::producer::Producer;
use reliable::core::trace_context::opentelemetry::trace::{
    SpanContext, TraceContextExt, TracerProvider as _,
};
use reliable::core::trace_context::TRACEPARENT;
use reliable::core::{DeliverySource, Message, MessageId};
use reliable::kafka::rdkafka::admin::{AdminClient, AdminOptions};
use reliable::kafka::rdkafka::client::DefaultClientContext;
use reliable::kafka::rdkafka::ClientConfig;
use reliable::kafka::{KafkaConsumer, KafkaTransport, TopicSpec};
use reliable_test_support::{amqp_url, kafka, require, unique_name};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The spans of every test in this binary, exported when they end.
fn exporter() -> &'static InMemorySpanExporter {
    static OTEL: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    let (exporter, _) = OTEL.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("reliable-test")));
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        (exporter, provider)
    });
    exporter
}

/// The OpenTelemetry span context of a `tracing` span.
fn ids(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// The `reliable.handle` span of message `id`.
fn handle_span(id: MessageId) -> SpanData {
    let id = id.to_string();
    exporter()
        .get_finished_spans()
        .expect("finished spans")
        .into_iter()
        .find(|s| {
            s.name == "reliable.handle"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "message_id" && kv.value.as_str() == id)
        })
        .unwrap_or_else(|| panic!("no reliable.handle span for {id}"))
}

/// The three messages of each test, as sent.
struct Sent {
    /// The producer span's context.
    parent: SpanContext,
    /// Sent under the producer span.
    traced: MessageId,
    /// Sent with no span current.
    untraced: MessageId,
    /// Sent under another span, with a garbage `traceparent` of the caller's.
    garbage: MessageId,
}

/// Sends the three messages through `producer`, `route` setting where each goes.
async fn send_three(producer: &Producer, route: impl Fn(Message) -> Message) -> Sent {
    let span = tracing::info_span!("checkout");
    let parent = ids(&span);
    assert!(parent.is_valid(), "the OpenTelemetry layer is installed");
    let traced = producer
        .send_confirmed(route(Message::new("traced")))
        .instrument(span)
        .await
        .expect("confirmed")
        .id;
    let untraced = producer
        .send_confirmed(route(Message::new("untraced")))
        .await
        .expect("confirmed")
        .id;
    let garbage = producer
        .send_confirmed(route(Message::new("garbage")).with_header(TRACEPARENT, "garbage"))
        .instrument(tracing::info_span!("checkout with a header of its own"))
        .await
        .expect("confirmed")
        .id;
    Sent {
        parent,
        traced,
        untraced,
        garbage,
    }
}

/// Runs a pipeline with [`TraceContextLayer`] over `source` until it has handled `count`
/// messages (30 s at most); returns them as the handler saw them.
async fn consume<S: DeliverySource + 'static>(
    source: S,
    dead_letter: DeadLetter,
    count: usize,
) -> Vec<Message> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let handler = HandlerBuilder::new(handler_fn(move |msg: Message| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(msg);
            Ok::<(), HandlerError>(())
        }
    }))
    .layer(TraceContextLayer::new())
    .build();
    let pipeline = Pipeline::new(source, handler, dead_letter);
    let stats = pipeline.stats();
    let done = async move {
        while stats.snapshot().succeeded < count as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stats = tokio::time::timeout(Duration::from_secs(30), pipeline.run_until(done))
        .await
        .expect("every message handled within 30 s")
        .expect("pipeline");
    assert_eq!(stats.dead_lettered, 0, "no handler call fails: {stats:?}");
    let seen = seen.lock().unwrap().clone();
    seen
}

/// The consumer side of [`Sent`]: headers as received and the handler spans' parents.
fn check(sent: &Sent, seen: &[Message]) {
    let header = |id: MessageId| {
        seen.iter()
            .find(|m| m.id() == id)
            .unwrap_or_else(|| panic!("message {id} consumed"))
            .header(TRACEPARENT)
            .map(str::to_owned)
    };
    let parent = &sent.parent;
    assert_eq!(
        header(sent.traced),
        Some(format!("00-{}-{}-01", parent.trace_id(), parent.span_id()))
    );
    assert_eq!(header(sent.untraced), None, "no span current: no header");
    assert_eq!(
        header(sent.garbage).as_deref(),
        Some("garbage"),
        "the caller's header wins"
    );

    let traced = handle_span(sent.traced);
    assert_eq!(traced.span_context.trace_id(), parent.trace_id());
    assert_eq!(traced.parent_span_id, parent.span_id());
    assert!(traced.parent_span_is_remote);
    for id in [sent.untraced, sent.garbage] {
        let span = handle_span(id);
        assert!(!span.parent_span_is_remote, "{id}: no remote parent");
        assert_ne!(span.span_context.trace_id(), parent.trace_id(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumer_span_continues_the_producer_trace() {
    let url = require!(amqp_url());
    exporter();
    let queue = unique_name("trace-amqp");
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("lapin");
    let channel = connection.create_channel().await.expect("channel");
    topology::declare_queue(&channel, &QueueSpec::quorum(&queue))
        .await
        .expect("declare");

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .expect("publisher");
    let producer = Producer::new(publisher, Default::default());
    let sent = send_three(&producer, |m| m.with_routing_key(&queue)).await;

    let source = AmqpConsumer::connect(&url, &queue, AmqpSettings::safe())
        .await
        .expect("consumer");
    // Never used: every handler call succeeds.
    let dead_letter = DeadLetter::publish(producer.clone(), "");
    let seen = consume(source, dead_letter, 3).await;
    check(&sent, &seen);

    producer.close().await;
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_span_continues_the_producer_trace() {
    let cluster = require!(kafka(3));
    exporter();
    let topic = unique_name("trace-kafka");
    let transport = KafkaTransport::builder(&cluster.bootstrap)
        .default_topic(TopicSpec::new(&topic))
        .build()
        .await
        .expect("transport (creates the topic)");
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let sent = send_three(&producer, |m| m.with_routing_key("k")).await;
    producer.close().await;

    let source = KafkaConsumer::builder(&cluster.bootstrap, &unique_name("trace-kafka-g"))
        .subscribe(TopicSpec::new(&topic))
        .build()
        .await
        .expect("consumer");
    // Never used: every handler call succeeds.
    let dead_letter = transport.dead_letter(format!("{topic}.dlq"));
    let seen = consume(source, dead_letter, 3).await;
    check(&sent, &seen);

    transport.close().await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .create()
        .expect("admin client");
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
}
