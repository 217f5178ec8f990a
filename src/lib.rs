//! `reliable`: loss-proof message delivery over RabbitMQ and Kafka.
//!
//! This facade re-exports the workspace's crates behind cargo features, in the way sqlx does:
//!
//! | module  | crate            | feature (default on) |
//! |---------|------------------|----------------------|
//! | [`core`]  | `reliable-core`  | always               |
//! | `amqp`  | `reliable-amqp`  | `amqp`               |
//! | `kafka` | `reliable-kafka` | `kafka`              |
//! | `core::outbox` | `reliable-core` | `outbox` (the crash-safe producer outbox, on redb) |
//! | `core::Message::json`, `core::pipeline::json_handler` | `reliable-core` | `serde` (off by default: typed JSON messages) |
//! | `core::metrics` | `reliable-core` | `metrics` (off by default: producer and pipeline metrics through the `metrics` crate) |
//! | `core::trace_context`, `core::pipeline::TraceContextLayer` | `reliable-core` | `otel` (off by default: W3C trace context carried on messages, for OpenTelemetry) |
//! | `stores` | `reliable-stores` | `redb-store`, `redis-store`, `postgres-store` (off by default: durable idempotency stores) |
//! | `amqp::tls`, `kafka::security` | `reliable-amqp`, `reliable-kafka` | `tls` (off by default: `amqps://` over rustls, Kafka `SSL`/`SASL_SSL` with SCRAM over OpenSSL, which needs libssl-dev to build) |
//!
//! [`shutdown_signal`] resolves on SIGTERM or ctrl-c: hand it to `Pipeline::run_until` for a
//! clean stop (README: "Shutdown and health").
//!
//! See the README for the loss matrix: every way a message gets lost between a producer and a
//! consumer, and which part of the SDK answers it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use reliable_core as core;

mod shutdown;
pub use shutdown::shutdown_signal;

#[cfg(feature = "amqp")]
pub use reliable_amqp as amqp;

#[cfg(feature = "kafka")]
pub use reliable_kafka as kafka;

#[cfg(any(
    feature = "redb-store",
    feature = "redis-store",
    feature = "postgres-store"
))]
pub use reliable_stores as stores;

/// The README's Rust code blocks, compiled as doctests.
///
/// Convention for README.md: every ```` ```rust ```` block is tagged `rust,no_run` (it needs
/// brokers, so it is compiled, not run) and is a complete item: its `use` lines spelled out and
/// its code inside a visible function taking what it needs (a URL, a handler, a batch) as
/// parameters and returning a `Result`, so it reads like application code and needs no hidden
/// `# ` lines. `scripts/test` compiles every block with every feature on
/// (`cargo test --workspace --doc --all-features`); with fewer features this item, and the
/// README's doctests with it, is left out. `tests/readme_links/` refuses an `ignore` block.
#[cfg(all(
    doctest,
    feature = "amqp",
    feature = "kafka",
    feature = "outbox",
    feature = "serde",
    feature = "tls",
    feature = "postgres-store",
    feature = "otel"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
