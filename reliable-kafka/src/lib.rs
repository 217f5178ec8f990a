//! `reliable-kafka`: the Kafka adapter of `reliable`, over rdkafka.
//!
//! Re-exports the rdkafka version it is built against, so users wrap the same types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use rdkafka;
