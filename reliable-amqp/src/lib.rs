//! `reliable-amqp`: the RabbitMQ adapter of `reliable`, over lapin.
//!
//! | module | what it is for | loss-matrix rows |
//! |---|---|---|
//! | [`settings`] | presets, refusal of lossy overrides, the loud opt-out | L1-L4 (invariant 7) |
//! | [`topology`] | durable exchanges, quorum/classic durable queues, dead-letter, live check | L3 |
//! | [`publisher`] | confirm-mode publisher implementing the core's `Transport`; transactions | L1, L2 |
//! | [`consumer`] | manual-ack consumer implementing the core's `DeliverySource` | L4 |
//! | [`Nodes`] | the node URLs of one cluster; failover to another node when one is lost | L13 |
//! | [`tls`] | `amqps://` with a CA of your own or a client certificate (feature `tls`) | |
//!
//! Re-exports the lapin version it is built against, so users wrap the same types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connect;
pub mod consumer;
pub mod error;
pub mod publisher;
pub mod settings;
pub mod tls;
pub mod topology;

pub use connect::Nodes;
pub use consumer::AmqpConsumer;
pub use error::{AmqpError, NodeListError};
pub use lapin;
pub use publisher::{AmqpPublisher, Refused};
pub use settings::{AmqpSettings, DataLoss, PublishMode, QueueType, UnsafeSetting};
