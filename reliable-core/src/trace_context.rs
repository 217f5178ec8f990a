//! W3C trace context on messages (feature `otel`): the consumer's span continues the producer's
//! trace.
//!
//! * **Producer.** [`Producer::send`](crate::producer::Producer::send),
//!   [`send_batch`](crate::producer::Producer::send_batch),
//!   [`send_many`](crate::producer::Producer::send_many) and
//!   [`send_confirmed`](crate::producer::Producer::send_confirmed) write the OpenTelemetry
//!   context of the caller's current `tracing` span into each message as the [`TRACEPARENT`]
//!   header (and [`TRACESTATE`] when the trace state is not empty), in the caller's task, before
//!   the message is committed to an outbox or handed to the transport. A message that already
//!   carries a `traceparent` keeps it: the caller's choice wins, and resends, outbox replays
//!   and re-sends of handed-back messages keep the header they first had. Messages built
//!   elsewhere (say, written to an outbox by another process) get the same headers from
//!   [`Message::with_trace_context`] or [`inject`].
//! * **Consumer.** [`TraceContextLayer`](crate::pipeline::TraceContextLayer) runs each
//!   message's handler call inside a `reliable.handle` span whose OpenTelemetry parent is the
//!   context [`extract`]ed from those headers ([`handle_span`] makes that span for handlers
//!   that run their own loop).
//!
//! The context is read from `tracing` through `tracing-opentelemetry`, so what the application
//! must install is a tracer provider (`opentelemetry_sdk::trace::SdkTracerProvider` with an
//! exporter) and a `tracing_opentelemetry::layer()` on its `tracing` subscriber, with the same
//! versions as this crate (opentelemetry 0.33, tracing-opentelemetry 0.34): a layer from another
//! version is not found and nothing is injected. When the current span has no valid
//! OpenTelemetry span context (no subscriber, no OpenTelemetry layer, the span filtered out) the
//! context attached with the OpenTelemetry API (`opentelemetry::Context::current`) is used; if
//! that has none either, no header is written. Without a subscriber that costs a thread-local
//! read per send.
//!
//! The headers are plain user headers (lower-case names, UTF-8 values) and travel over every
//! transport; the format is the [W3C Trace Context](https://www.w3.org/TR/trace-context/)
//! recommendation, written and parsed by `opentelemetry_sdk`'s `TraceContextPropagator`.
//!
//! ```
//! use reliable_core::trace_context::opentelemetry::trace::TraceContextExt;
//! use reliable_core::trace_context::{self, TRACEPARENT};
//! use reliable_core::Message;
//!
//! // No tracer installed: nothing to inject, and the message is left as it was.
//! let msg = Message::new("paid").with_trace_context();
//! assert_eq!(msg.header(TRACEPARENT), None);
//!
//! // A context from elsewhere (another protocol's headers) is kept as given.
//! let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! let msg = Message::new("paid").with_header(TRACEPARENT, traceparent);
//! let parent = trace_context::extract(&msg);
//! assert_eq!(
//!     parent.span().span_context().trace_id().to_string(),
//!     "4bf92f3577b34da6a3ce929d0e0e4736"
//! );
//! ```

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::Message;

/// The OpenTelemetry API this module's signatures use (version 0.33); use it, or depend on the
/// same version, so that the [`Context`] types match.
pub use opentelemetry;

/// The W3C `traceparent` header: version, trace id, parent span id and flags, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C `tracestate` header: vendor-specific trace data; written only when not empty.
pub const TRACESTATE: &str = "tracestate";

/// The OpenTelemetry context of the current `tracing` span, or else the context attached with
/// the OpenTelemetry API. Its span context is invalid when neither has a span.
///
/// ```
/// use reliable_core::trace_context;
/// use reliable_core::trace_context::opentelemetry::trace::TraceContextExt;
///
/// // No subscriber and no tracer: no span.
/// assert!(!trace_context::current().span().span_context().is_valid());
/// ```
pub fn current() -> Context {
    let span = Span::current();
    if !span.is_disabled() {
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            return cx;
        }
    }
    Context::current()
}

/// Writes `cx`'s span context into `msg` as [`TRACEPARENT`] (and [`TRACESTATE`] when not
/// empty). Returns whether it did: not when `msg` already has a `traceparent` (kept as it is),
/// nor when `cx` has no valid span context.
///
/// ```
/// use reliable_core::trace_context::{self, opentelemetry::Context, TRACEPARENT};
/// use reliable_core::Message;
///
/// let mut msg = Message::new("paid");
/// assert!(!trace_context::inject(&mut msg, &Context::new()));
/// assert_eq!(msg.header(TRACEPARENT), None);
/// ```
pub fn inject(msg: &mut Message, cx: &Context) -> bool {
    if msg.header(TRACEPARENT).is_some() || !cx.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(msg));
    true
}

/// [`inject`] with the [`current`] context.
///
/// ```
/// use reliable_core::trace_context;
/// use reliable_core::Message;
///
/// let mut msg = Message::new("paid");
/// // No tracer installed here, so there is nothing to write.
/// assert!(!trace_context::inject_current(&mut msg));
/// ```
pub fn inject_current(msg: &mut Message) -> bool {
    inject(msg, &current())
}

/// What the producer does to every message it accepts: [`inject_current`], the current context
/// read once for the batch. Costs one `Span::current()` and a thread-local read when there is
/// no span.
pub(crate) fn inject_current_all(msgs: &mut [Message]) {
    let mut cx = None;
    for msg in msgs {
        if msg.header(TRACEPARENT).is_some() {
            continue;
        }
        let cx = cx.get_or_insert_with(current);
        if !cx.span().span_context().is_valid() {
            return;
        }
        inject(msg, cx);
    }
}

/// The context carried by `msg`'s [`TRACEPARENT`] and [`TRACESTATE`] headers, as a remote
/// parent. A message without them, or with a `traceparent` that does not parse, gives an empty
/// context (its span context is invalid); that is never an error.
///
/// ```
/// use reliable_core::trace_context::{self, TRACEPARENT};
/// use reliable_core::trace_context::opentelemetry::trace::TraceContextExt;
/// use reliable_core::Message;
///
/// let garbage = Message::new("x").with_header(TRACEPARENT, "not a trace");
/// assert!(!trace_context::extract(&garbage).span().span_context().is_valid());
///
/// let good = Message::new("x")
///     .with_header(TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// let cx = trace_context::extract(&good);
/// assert!(cx.span().span_context().is_remote());
/// assert_eq!(cx.span().span_context().span_id().to_string(), "00f067aa0ba902b7");
/// ```
pub fn extract(msg: &Message) -> Context {
    if msg.header(TRACEPARENT).is_none() {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(msg))
}

/// The `reliable.handle` span (an OpenTelemetry consumer span; fields `message_id` and
/// `idempotency_key`) whose OpenTelemetry parent is the context [`extract`]ed from `msg`. A
/// message without a valid `traceparent` gets a span with no remote parent: its parent is the
/// current span, if any, else it starts a new trace. This is the span
/// [`TraceContextLayer`](crate::pipeline::TraceContextLayer) runs each handler call in; use it
/// directly in a [`Handler::handle_batch`](crate::pipeline::Handler::handle_batch) of your own.
///
/// ```
/// use reliable_core::trace_context;
/// use reliable_core::Message;
/// use tracing::Instrument;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let msg = Message::new("paid");
/// async { /* apply the message */ }
///     .instrument(trace_context::handle_span(&msg))
///     .await;
/// # }
/// ```
pub fn handle_span(msg: &Message) -> Span {
    let span = tracing::info_span!(
        "reliable.handle",
        otel.kind = "consumer",
        message_id = %msg.id(),
        idempotency_key = %msg.idempotency_key(),
    );
    if !span.is_disabled() {
        let parent = extract(msg);
        if parent.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, where there is no trace to continue.
            let _ = span.set_parent(parent);
        }
    }
    span
}

impl Message {
    /// Adds the [`current`] OpenTelemetry context as the [`TRACEPARENT`] and [`TRACESTATE`]
    /// headers (feature `otel`), unless the message already has a `traceparent`; see
    /// [`inject`]. The producer does this itself for every message it is given; call it where
    /// a message is built in one span and sent from another (a queue of work, an outbox
    /// written elsewhere).
    ///
    /// ```
    /// use reliable_core::trace_context::TRACEPARENT;
    /// use reliable_core::Message;
    ///
    /// let msg = Message::new("paid").with_trace_context();
    /// assert_eq!(msg.header(TRACEPARENT), None); // no tracer installed in this example
    /// ```
    pub fn with_trace_context(mut self) -> Self {
        inject_current(&mut self);
        self
    }
}

/// Writes the propagator's fields as message headers; an empty value (a `tracestate` with no
/// entries) is left out.
struct HeaderInjector<'a>(&'a mut Message);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.set_header(key, value);
        }
    }
}

/// Reads the propagator's fields from message headers.
struct HeaderExtractor<'a>(&'a Message);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers().keys().map(String::as_str).collect()
    }
}
