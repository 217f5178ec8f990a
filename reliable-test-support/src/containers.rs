//! Brokers from testcontainers, for machines with a Docker engine. Each is started once per
//! test process and kept until it exits.

use std::sync::OnceLock;

use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
use testcontainers_modules::rabbitmq::RabbitMq;
use testcontainers_modules::testcontainers::runners::SyncRunner;
use testcontainers_modules::testcontainers::Container;

static RABBIT: OnceLock<Option<(Container<RabbitMq>, String)>> = OnceLock::new();
static KAFKA: OnceLock<Option<(Container<Kafka>, String)>> = OnceLock::new();

/// The URL of a RabbitMQ container, or `None` when no Docker engine answers.
pub(crate) fn rabbitmq_url() -> Option<String> {
    RABBIT
        .get_or_init(|| {
            let container = RabbitMq::default().start().ok()?;
            let port = container.get_host_port_ipv4(5672).ok()?;
            Some((
                container,
                format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            ))
        })
        .as_ref()
        .map(|(_, url)| url.clone())
}

/// The bootstrap address of a single-broker Kafka container, or `None` without Docker.
pub(crate) fn kafka_bootstrap() -> Option<String> {
    KAFKA
        .get_or_init(|| {
            let container = Kafka::default().start().ok()?;
            let port = container.get_host_port_ipv4(KAFKA_PORT).ok()?;
            Some((container, format!("127.0.0.1:{port}")))
        })
        .as_ref()
        .map(|(_, bootstrap)| bootstrap.clone())
}
