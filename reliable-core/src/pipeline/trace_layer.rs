//! [`TraceContextLayer`] (feature `otel`): each handler call continues the trace its message
//! was sent in.

use async_trait::async_trait;
use tracing::Instrument;

use super::handler::handle_caught;
use super::{Handler, HandlerError, Layer};
use crate::message::Message;
use crate::trace_context;

/// Runs each message's handler call inside a `reliable.handle` span whose OpenTelemetry parent
/// is the W3C trace context the message carries (its `traceparent` and `tracestate` headers,
/// written by the producer; see [`trace_context`](crate::trace_context)). The span's fields
/// are `message_id` and `idempotency_key`, and it is an OpenTelemetry consumer span.
///
/// A message without a `traceparent`, or with one that does not parse, is handled all the
/// same, in a span with no remote parent (it starts a new trace unless a span is current);
/// the layer never fails a message. Without an OpenTelemetry layer on the `tracing` subscriber
/// the span is a plain `tracing` span.
///
/// Everything inside the layer runs in the span. In a batch
/// ([`Handler::handle_batch`]) each message gets its own span, so the layers inside it and the
/// handler see the batch's messages one at a time, concurrently (as the default `handle_batch`
/// does; a panic fails only its message). Put a [`DedupeLayer`](super::DedupeLayer) after it
/// (outside it) to keep the dedupe layer's one store round trip per batch; the dedupe step
/// itself then runs outside the message's trace.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use reliable_core::idempotency::InMemoryIdempotencyStore;
/// use reliable_core::pipeline::{
///     handler_fn, DedupeLayer, HandlerBuilder, HandlerError, RetryLayer, RetryPolicy,
///     TimeoutLayer, TraceContextLayer,
/// };
/// use reliable_core::Message;
///
/// let handler = HandlerBuilder::new(handler_fn(|msg: Message| async move {
///     tracing::info!(bytes = msg.payload().len(), "order applied"); // in the producer's trace
///     Ok::<(), HandlerError>(())
/// }))
/// .layer(TimeoutLayer::new(Duration::from_secs(30)))
/// .layer(RetryLayer::new(RetryPolicy::default()))
/// .layer(TraceContextLayer::new())
/// .layer(DedupeLayer::new(Arc::new(InMemoryIdempotencyStore::default())))
/// .build();
/// # let _ = handler;
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer {
    _private: (),
}

impl TraceContextLayer {
    /// The layer; it has no settings.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<H: Handler> Layer<H> for TraceContextLayer {
    type Handler = TraceContext<H>;
    fn layer(&self, inner: H) -> TraceContext<H> {
        TraceContext { inner }
    }
}

/// The handler made by [`TraceContextLayer`].
#[derive(Clone, Debug)]
pub struct TraceContext<H> {
    inner: H,
}

#[async_trait]
impl<H: Handler> Handler for TraceContext<H> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        let span = trace_context::handle_span(msg);
        self.inner.handle(msg).instrument(span).await
    }

    /// Each message through the inner [`handle`](Handler::handle) in its own span,
    /// concurrently; a panic becomes that message's permanent failure.
    async fn handle_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        futures::future::join_all(msgs.iter().map(|msg| {
            let span = trace_context::handle_span(msg);
            handle_caught(&self.inner, msg).instrument(span)
        }))
        .await
    }
}
