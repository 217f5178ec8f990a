//! `reliable-core`: the transport-agnostic heart of `reliable`.
//!
//! Confirm tracking, the reliable consumer pipeline, idempotency keys and an in-memory
//! transport live here; the broker adapters implement this crate's transport traits.
//!
//! | module | what it is for | loss-matrix rows |
//! |---|---|---|
//! | [`message`] | message model, ids, idempotency key, header wire format | L8 |
//! | [`transport`] | the traits adapters implement: [`Transport`], [`DeliverySource`], [`Acker`] | — |
//! | [`producer`] | confirm tracking: pending map, timeout, resend, in-flight window, stats | L1, L2, L7 |
//! | [`pipeline`] | consumer pipeline: dedupe → handler → retry → dead letter → ack | L4, L8 |
//! | [`offsets`] | contiguous commit watermark per partition | L5 |
//! | [`idempotency`] | idempotency stores (reserve / complete / release) | L8 |
//! | [`attempts`] | delivery counts that survive a crashed consumer | L10 |
//! | [`backoff`] | exponential backoff with jitter | — |
//! | [`redact`] | credentials out of errors, logs and `Debug` views, for every crate | — |
//! | [`memory`] | in-memory broker with fault injection, for tests | — |
//! | [`metrics`] | metric names; with the feature `metrics`, recorded through the `metrics` crate | — |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attempts;
pub mod backoff;
pub mod idempotency;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod offsets;
#[cfg(feature = "outbox")]
pub mod outbox;
pub mod pipeline;
pub mod producer;
pub mod redact;
mod stats;
#[cfg(feature = "otel")]
pub mod trace_context;
pub mod transport;

pub use message::{IdempotencyKey, Message, MessageId};
pub use transport::{
    AckError, Acker, Attempt, Completion, ConsumeError, Delivery, DeliverySource, Position,
    PublishError, Submission, TopicPartition, Transport,
};
