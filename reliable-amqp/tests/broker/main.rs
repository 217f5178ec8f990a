//! The adapter against the project's real RabbitMQ (`scripts/brokers up`).

#[path = "../common/mod.rs"]
mod common;
mod consume;
mod publish;

use std::time::Duration;

use reliable_amqp::AmqpConsumer;
use reliable_core::DeliverySource;

pub(crate) const NEXT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn next(consumer: &mut AmqpConsumer) -> reliable_core::Delivery {
    tokio::time::timeout(NEXT_TIMEOUT, consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer ok")
        .expect("stream open")
}
