//! The librdkafka client under [`KafkaTransport`](super::KafkaTransport): a
//! [`ThreadedProducer`] whose delivery callback answers each attempt's
//! [`Completion`] directly (no future, no channel per message), or an application's
//! [`FutureProducer`] wrapped with [`KafkaTransport::from_producer`](super::KafkaTransport::from_producer).
//!
//! The callback runs on the client's polling thread. It answers confirms and the refusals whose
//! meaning is fixed by their code at once; a refusal that may stem from a fatal idempotence
//! error needs the transport (to check the client's fatal state and rebuild it), so it is
//! classified on a blocking task instead: a rebuild drops the old client, whose polling
//! thread must not be the one dropping it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::{Client as RdClient, ClientContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{
    DeliveryResult, FutureProducer, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use reliable_core::{Completion, PublishError};

use super::{Inner, KafkaTransport};

/// The transport a client's callback reports through, set once the transport exists.
pub(super) type Link = Arc<OnceLock<Weak<Inner>>>;

/// One attempt's state carried through librdkafka as the record's delivery opaque.
pub(super) struct Delivery {
    pub(super) done: Completion,
    /// The client generation the record was enqueued on (see `KafkaTransport::rebuild`).
    pub(super) generation: u64,
    pub(super) size: usize,
}

/// The client context: answers the completion of each delivery report, and follows whether
/// the client is connected.
pub(super) struct Reports {
    link: Link,
    /// Where refusals that need the transport are classified.
    runtime: Option<tokio::runtime::Handle>,
    /// [`UNKNOWN`], [`UP`] or [`DOWN`].
    connection: AtomicU8,
}

/// Nothing reported yet (no statistics, no delivery, no all-brokers-down error).
const UNKNOWN: u8 = 0;
/// A broker connection is up.
const UP: u8 = 1;
/// No broker connection is up.
const DOWN: u8 = 2;

impl Reports {
    /// Whether the client is connected: see [`Transport::connected`](reliable_core::Transport::connected)
    /// for the [`KafkaTransport`].
    fn connected(&self) -> Option<bool> {
        match self.connection.load(Ordering::Relaxed) {
            UP => Some(true),
            DOWN => Some(false),
            _ => None,
        }
    }
}

/// Whether any real broker connection (a configured bootstrap address or a broker learned from
/// metadata; not librdkafka's internal or logical brokers) is up in `stats`.
fn any_broker_up(stats: &Statistics) -> bool {
    stats
        .brokers
        .values()
        .any(|b| b.state == "UP" && (b.source == "learned" || b.source == "configured"))
}

impl ClientContext for Reports {
    /// librdkafka's statistics (every `statistics.interval.ms`): up when any broker
    /// connection is.
    fn stats(&self, statistics: Statistics) {
        let state = if any_broker_up(&statistics) { UP } else { DOWN };
        self.connection.store(state, Ordering::Relaxed);
    }

    /// Logs client-level errors, as rdkafka's default does; all brokers down means not
    /// connected until the next statistics or delivery say otherwise.
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connection.store(DOWN, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "librdkafka producer error; it reconnects on its own");
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        let Delivery {
            done,
            generation,
            size,
        } = *delivery;
        let error = match result {
            Ok(_) => {
                // A broker just acknowledged a record: connected.
                self.connection.store(UP, Ordering::Relaxed);
                return done.complete(Ok(()));
            }
            Err((error, _)) => error,
        };
        let Some(inner) = self.link.get().and_then(Weak::upgrade) else {
            return done.complete(Err(PublishError::ConnectionLost {
                reason: "the Kafka transport was dropped before the delivery report".into(),
            }));
        };
        let transport = KafkaTransport { inner };
        if let Some(err) = transport.classify_by_code(error, size) {
            tracing::debug!(error = %err, "delivery failed");
            done.complete(Err(err));
            if Arc::strong_count(&transport.inner) == 1 {
                // The last handle: dropping it here would drop the client from its own
                // polling thread.
                drop(std::thread::spawn(move || drop(transport)));
            }
            return;
        }
        let error = error.clone();
        let classify = move || {
            let err = transport.classify(generation, &error, size);
            tracing::debug!(error = %err, "delivery failed");
            done.complete(Err(err));
        };
        match &self.runtime {
            Some(rt) => drop(rt.spawn_blocking(classify)),
            None => drop(std::thread::spawn(classify)),
        }
    }
}

/// The client: ours, answering by callback, or the application's [`FutureProducer`].
#[derive(Clone)]
pub(super) enum Client {
    Callback(ThreadedProducer<Reports>),
    Future(FutureProducer),
}

impl Client {
    /// A client answering by callback, reporting through `link`.
    pub(super) fn create(config: &rdkafka::ClientConfig, link: Link) -> KafkaResult<Self> {
        let context = Reports {
            link,
            runtime: tokio::runtime::Handle::try_current().ok(),
            connection: AtomicU8::new(UNKNOWN),
        };
        config.create_with_context(context).map(Self::Callback)
    }

    pub(super) fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        match self {
            Self::Callback(p) => p.flush(timeout),
            Self::Future(p) => p.flush(timeout),
        }
    }

    pub(super) fn in_flight_count(&self) -> i32 {
        match self {
            Self::Callback(p) => p.in_flight_count(),
            Self::Future(p) => p.in_flight_count(),
        }
    }

    /// Whether the client is connected; `None` for an application's producer, whose
    /// context reports nothing to the transport.
    pub(super) fn connected(&self) -> Option<bool> {
        match self {
            Self::Callback(p) => p.client().context().connected(),
            Self::Future(_) => None,
        }
    }

    /// The client's fatal error, if it has one.
    pub(super) fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        match self {
            Self::Callback(p) => fatal_of(p.client()),
            Self::Future(p) => fatal_of(p.client()),
        }
    }
}

fn fatal_of<C: ClientContext>(client: &RdClient<C>) -> Option<(RDKafkaErrorCode, String)> {
    client.fatal_error()
}
