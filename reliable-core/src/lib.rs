//! `reliable-core`: the transport-agnostic heart of `reliable`.
//!
//! Confirm tracking, the reliable consumer pipeline, idempotency keys and an in-memory
//! transport live here; the broker adapters implement this crate's transport traits.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
