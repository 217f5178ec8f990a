//! `reliable-amqp`: the RabbitMQ adapter of `reliable`, over lapin.
//!
//! Re-exports the lapin version it is built against, so users wrap the same types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use lapin;
