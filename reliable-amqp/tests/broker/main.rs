//! The adapter against the project's real RabbitMQ (`scripts/brokers up`).

#[path = "../common/mod.rs"]
mod common;
mod consume;
mod publish;
