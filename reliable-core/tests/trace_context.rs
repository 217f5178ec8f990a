//! W3C trace context through the in-memory broker (feature `otel`): every send path writes the
//! caller's span context as `traceparent`, and `TraceContextLayer` runs each handler call in a
//! `reliable.handle` span that continues that trace. Controls: no subscriber, or a subscriber
//! without the OpenTelemetry layer, writes no header; a garbage `traceparent` is kept as the
//! caller's choice and handled in a span that starts a new trace; `tracestate` travels too.
//!
//! Each test installs its own subscriber for its thread (current-thread runtimes), over an SDK
//! tracer provider that exports to memory.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reliable_core::memory::InMemoryBroker;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, Handler, HandlerBuilder, HandlerError, Pipeline, TraceContextLayer,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::trace_context::{self, TRACEPARENT, TRACESTATE};
use reliable_core::{Message, MessageId};
use tracing::subscriber::DefaultGuard;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A tracing subscriber with the OpenTelemetry layer, for this thread, exporting to memory.
struct Otel {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: DefaultGuard,
}

fn otel() -> Otel {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("reliable-test")));
    Otel {
        exporter,
        _provider: provider,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

/// The OpenTelemetry span context of a `tracing` span.
fn ids(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// The `reliable.handle` span of message `id`.
fn handle_span(spans: &[SpanData], id: MessageId) -> SpanData {
    let id = id.to_string();
    spans
        .iter()
        .find(|s| {
            s.name == "reliable.handle"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "message_id" && kv.value.as_str() == id)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no reliable.handle span for {id}"))
}

/// Consumes everything in `queue` through a pipeline with [`TraceContextLayer`]; returns the
/// messages as the handler saw them.
async fn consume(broker: &InMemoryBroker, queue: &str) -> Vec<Message> {
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
    let dead_letter = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    );
    let source = broker.consumer(queue).end_when_drained();
    let stats = Pipeline::new(source, handler, dead_letter)
        .run()
        .await
        .expect("pipeline");
    assert_eq!(stats.dead_lettered, 0, "no handler call fails: {stats:?}");
    let seen = seen.lock().unwrap().clone();
    seen
}

fn broker() -> InMemoryBroker {
    let broker = InMemoryBroker::new();
    broker.declare_queue("orders");
    broker.declare_queue("dlq");
    broker
}

fn order(i: u32) -> Message {
    Message::new(format!("order {i}")).with_destination("orders")
}

#[tokio::test]
async fn every_send_path_carries_the_callers_trace_to_the_handlers_span() -> TestResult {
    let otel = otel();
    let broker = broker();
    let producer = Producer::new(broker.transport(), ProducerConfig::default());

    let span = tracing::info_span!("checkout");
    let parent = ids(&span);
    assert!(parent.is_valid());
    let mut sent = Vec::new();
    async {
        sent.push(producer.send(order(0)).await?.await?.id);
        for handle in producer.send_batch(vec![order(1), order(2)]).await? {
            sent.push(handle.await?.id);
        }
        let batch = vec![order(3), order(4)];
        sent.extend(batch.iter().map(Message::id));
        assert_eq!(producer.send_many(batch).await?.await.confirmed, 2);
        sent.push(producer.send_confirmed(order(5)).await?.id);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .instrument(span)
    .await?;

    let seen = consume(&broker, "orders").await;
    assert_eq!(seen.len(), sent.len());
    let expected = format!("00-{}-{}-01", parent.trace_id(), parent.span_id());
    for msg in &seen {
        assert_eq!(msg.header(TRACEPARENT), Some(expected.as_str()));
        assert_eq!(msg.header(TRACESTATE), None, "empty trace state: no header");
    }
    let spans = otel.exporter.get_finished_spans()?;
    for id in sent {
        let handled = handle_span(&spans, id);
        assert_eq!(handled.span_context.trace_id(), parent.trace_id());
        assert_eq!(handled.parent_span_id, parent.span_id());
        assert!(handled.parent_span_is_remote);
    }
    Ok(())
}

#[tokio::test]
async fn handle_and_handle_batch_both_run_in_the_messages_trace() -> TestResult {
    let otel = otel();
    let span = tracing::info_span!("producer");
    let parent = ids(&span);
    let msgs: Vec<Message> = span.in_scope(|| {
        (0..3)
            .map(|i| Message::new(format!("m{i}")).with_trace_context())
            .collect()
    });
    let panicking = Message::new("boom").with_trace_context();
    let handler = HandlerBuilder::new(handler_fn(|msg: Message| async move {
        assert!(msg.payload().as_ref() != b"boom", "the handler panics");
        Ok::<(), HandlerError>(())
    }))
    .layer(TraceContextLayer::new())
    .build();

    handler.handle(&msgs[0]).await?;
    let batch = [&msgs[1], &panicking, &msgs[2]];
    let outcomes = handler.handle_batch(&batch).await;
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    assert!(outcomes[1].is_err(), "the panic fails only its own message");

    let spans = otel.exporter.get_finished_spans()?;
    for msg in &msgs {
        let handled = handle_span(&spans, msg.id());
        assert_eq!(handled.span_context.trace_id(), parent.trace_id());
        assert_eq!(handled.parent_span_id, parent.span_id());
    }
    // Messages built with no span current carry nothing.
    assert_eq!(
        Message::new("x").with_trace_context().header(TRACEPARENT),
        None
    );
    Ok(())
}

#[tokio::test]
async fn no_subscriber_or_no_otel_layer_writes_no_header() -> TestResult {
    let broker = broker();
    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    // No subscriber at all.
    producer
        .send_confirmed(order(0))
        .instrument(tracing::info_span!("no subscriber"))
        .await?;
    // A subscriber without the OpenTelemetry layer.
    {
        let _plain = tracing::subscriber::set_default(tracing_subscriber::registry());
        producer
            .send_confirmed(order(1))
            .instrument(tracing::info_span!("no otel layer"))
            .await?;
    }
    let seen = consume(&broker, "orders").await;
    assert_eq!(seen.len(), 2);
    for msg in seen {
        assert_eq!(msg.header(TRACEPARENT), None);
        assert_eq!(msg.header(TRACESTATE), None);
    }
    Ok(())
}

#[tokio::test]
async fn a_garbage_traceparent_is_kept_and_handled_in_a_new_trace() -> TestResult {
    let otel = otel();
    let broker = broker();
    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    let span = tracing::info_span!("checkout");
    let parent = ids(&span);
    let garbage = order(0).with_header(TRACEPARENT, "00-not-a-trace");
    let id = producer.send_confirmed(garbage).instrument(span).await?.id;

    let seen = consume(&broker, "orders").await;
    assert_eq!(
        seen[0].header(TRACEPARENT),
        Some("00-not-a-trace"),
        "the caller's header wins"
    );
    let handled = handle_span(&otel.exporter.get_finished_spans()?, id);
    assert!(!handled.parent_span_is_remote);
    assert_ne!(handled.span_context.trace_id(), parent.trace_id());
    Ok(())
}

#[tokio::test]
async fn tracestate_travels_with_the_trace() -> TestResult {
    let otel = otel();
    let broker = broker();
    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    // The producer's own span continues a remote trace that has a trace state.
    let upstream = Message::new("")
        .with_header(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header(TRACESTATE, "congo=t61rcWkgMzE");
    let span = tracing::info_span!("checkout");
    span.set_parent(trace_context::extract(&upstream))?;
    let parent = ids(&span);
    let id = producer.send_confirmed(order(0)).instrument(span).await?.id;

    let seen = consume(&broker, "orders").await;
    assert_eq!(seen[0].header(TRACESTATE), Some("congo=t61rcWkgMzE"));
    let handled = handle_span(&otel.exporter.get_finished_spans()?, id);
    assert_eq!(
        handled.span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(handled.parent_span_id, parent.span_id());
    assert_eq!(
        handled.span_context.trace_state().header(),
        "congo=t61rcWkgMzE"
    );
    Ok(())
}
