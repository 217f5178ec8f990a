//! TLS and SASL/SCRAM against the brokers of `scripts/tls-brokers` (feature `tls`): publish and
//! consume through the SDK over `amqps://`, Kafka `SSL` and Kafka `SASL_SSL` with
//! SCRAM-SHA-512; a CA that did not sign the brokers' certificates and a wrong password each
//! give their typed error, whose text names what to check and holds no secret.
//!
//! Needs `eval "$(scripts/tls-brokers env)"`. Under `CI` a missing variable fails the test;
//! locally the test prints `SKIPPED` and returns.
//!
//! The TLS Kafka is one broker, so its topics have replication factor 1, which the SDK's live
//! topic check refuses: the round trips create their topic here and build with the documented
//! opt-out `skip_topic_check()` (the builders then still make one metadata request that names
//! TLS and login failures). The error tests keep the topic check on, as production code would.

use std::time::Duration;

use reliable::amqp::lapin::tcp::OwnedTLSConfig;
use reliable::amqp::lapin::{Connection, ConnectionProperties};
use reliable::amqp::tls::TlsConfig;
use reliable::amqp::{AmqpConsumer, AmqpError, AmqpPublisher, AmqpSettings};
use reliable::core::producer::Producer;
use reliable::core::{DeliverySource, Message};
use reliable::kafka::rdkafka::ClientConfig;
use reliable::kafka::{
    Error as KafkaError, KafkaConsumer, KafkaSecurity, KafkaTransport, Scram, SecurityError,
    TopicError, TopicSpec,
};
use reliable_test_support::{require, unique_name, Missing};

/// A variable `scripts/tls-brokers env` prints.
fn var(name: &str) -> Result<String, Missing> {
    std::env::var(name).map_err(|_| {
        Missing(format!(
            "{name} is not set; start the TLS brokers with `scripts/tls-brokers up` and \
             `eval \"$(scripts/tls-brokers env)\"`"
        ))
    })
}

/// Makes `topic` (replication factor 1: the TLS Kafka has one broker) over `security`.
async fn create_topic(bootstrap: &str, security: &KafkaSecurity, topic: &str) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    security.apply(&mut config);
    reliable_test_support::create_single_replica_topic(&config, topic).await;
}

/// Produces 5 messages through the SDK and consumes them back, both over `security`.
async fn kafka_round_trip(bootstrap: &str, security: KafkaSecurity, prefix: &str) {
    let topic = unique_name(prefix);
    create_topic(bootstrap, &security, &topic).await;
    let transport = KafkaTransport::builder(bootstrap)
        .security(&security)
        .default_topic(TopicSpec::new(&topic))
        .skip_topic_check()
        .build()
        .await
        .expect("transport over TLS");
    let producer = Producer::new(transport.clone(), transport.recommended_producer_config());
    let mut sent = Vec::new();
    for i in 0..5 {
        let confirmed = producer
            .send_confirmed(Message::new(format!("{prefix} {i}")).with_routing_key("k"))
            .await
            .expect("confirmed");
        sent.push(confirmed.id);
    }
    producer.close().await;

    let mut consumer = KafkaConsumer::builder(bootstrap, &unique_name(prefix))
        .security(&security)
        .subscribe(TopicSpec::new(&topic))
        .skip_topic_check()
        .build()
        .await
        .expect("consumer over TLS");
    let mut seen = Vec::new();
    while seen.len() < sent.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a record within 30 s")
            .expect("consume")
            .expect("the consumer runs");
        seen.push(delivery.message().id());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ssl_publishes_and_consumes() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SSL_BOOTSTRAP"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    kafka_round_trip(&bootstrap, KafkaSecurity::ssl().ca_file(ca), "tls-ssl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_scram_publishes_and_consumes() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SASL_BOOTSTRAP"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    let user = require!(var("RELIABLE_KAFKA_SASL_USER"));
    let password = require!(var("RELIABLE_KAFKA_SASL_PASSWORD"));
    let security = KafkaSecurity::sasl_ssl(Scram::sha512(user, password)).ca_file(ca);
    kafka_round_trip(&bootstrap, security, "tls-sasl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unknown_ca_is_a_typed_tls_error() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SSL_BOOTSTRAP"));
    let other_ca = require!(var("RELIABLE_TLS_OTHER_CA"));
    let err = KafkaTransport::builder(&bootstrap)
        .security(&KafkaSecurity::ssl().ca_file(other_ca))
        .topic(TopicSpec::new(unique_name("tls-bad-ca")))
        .build()
        .await
        .expect_err("a CA that signed nothing must be refused");
    assert!(
        matches!(err, KafkaError::Security(SecurityError::Tls { .. })),
        "{err:?}"
    );
    let text = err.to_string();
    eprintln!("unknown CA (Kafka): {text}");
    assert!(text.contains("CA file"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_wrong_password_is_a_typed_authentication_error() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SASL_BOOTSTRAP"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    let user = require!(var("RELIABLE_KAFKA_SASL_USER"));
    let password = require!(var("RELIABLE_KAFKA_SASL_PASSWORD"));
    let wrong = format!("wrong-{password}");
    let security = KafkaSecurity::sasl_ssl(Scram::sha512(&user, &wrong)).ca_file(&ca);
    let started = std::time::Instant::now();
    let err = KafkaTransport::builder(&bootstrap)
        .security(&security)
        .topic(TopicSpec::new(unique_name("tls-bad-pw")))
        .build()
        .await
        .expect_err("a wrong password must be refused");
    assert!(
        matches!(
            err,
            KafkaError::Security(SecurityError::Authentication { .. })
        ),
        "{err:?}"
    );
    let shown = format!("{err} / {err:?}");
    eprintln!("wrong password (Kafka): {err}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(shown.contains("credentials"), "{shown}");
    assert!(
        !shown.contains(&wrong) && !shown.contains(&password),
        "{shown}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal must come at once, not as a timeout: {:?}",
        started.elapsed()
    );

    // The same consumer settings fail the same way.
    let err = KafkaConsumer::builder(&bootstrap, &unique_name("tls-bad-pw"))
        .security(&security)
        .subscribe(TopicSpec::new(unique_name("tls-bad-pw")))
        .skip_topic_check()
        .build()
        .await
        .expect_err("a wrong password must be refused");
    assert!(
        matches!(
            err,
            KafkaError::Security(SecurityError::Authentication { .. })
        ),
        "{err:?}"
    );

    // Control: the right password gets past the login to the topic check, which refuses the
    // single broker's replication factor 1.
    let topic = unique_name("tls-rf1");
    let right = KafkaSecurity::sasl_ssl(Scram::sha512(&user, &password)).ca_file(&ca);
    create_topic(&bootstrap, &right, &topic).await;
    let err = KafkaTransport::builder(&bootstrap)
        .security(&right)
        .topic(TopicSpec::new(&topic))
        .build()
        .await
        .expect_err("replication factor 1 is unsafe");
    assert!(
        matches!(err, KafkaError::Topic(TopicError::Unsafe { .. })),
        "{err:?}"
    );
}

/// A lapin connection over TLS trusting `ca`, for declaring the test's queue.
async fn lapin_connection(url: &str, ca: &str) -> Connection {
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(std::fs::read_to_string(ca).expect("CA file")),
    };
    let runtime = reliable::amqp::lapin::runtime::default_runtime().expect("runtime");
    Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime)
        .await
        .expect("lapin over amqps")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_publishes_and_consumes() {
    let url = require!(var("RELIABLE_AMQPS_URL"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    let queue = unique_name("tls-amqps");
    let connection = lapin_connection(&url, &ca).await;
    let channel = connection.create_channel().await.expect("channel");
    reliable::amqp::topology::declare_queue(
        &channel,
        &reliable::amqp::topology::QueueSpec::quorum(&queue),
    )
    .await
    .expect("declare");

    let settings = AmqpSettings::safe().with_tls(TlsConfig::ca_file(&ca).expect("CA"));
    let publisher = AmqpPublisher::connect(&url, settings.clone())
        .await
        .expect("publisher over amqps");
    let producer = Producer::new(publisher, Default::default());
    let mut sent = Vec::new();
    for i in 0..5 {
        let confirmed = producer
            .send_confirmed(Message::new(format!("amqps {i}")).with_routing_key(&queue))
            .await
            .expect("confirmed");
        sent.push(confirmed.id);
    }
    producer.close().await;

    let mut consumer = AmqpConsumer::connect(&url, &queue, settings)
        .await
        .expect("consumer over amqps");
    let mut seen = Vec::new();
    while seen.len() < sent.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("consume")
            .expect("the consumer runs");
        seen.push(delivery.message().id());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, sent);
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .map(|_| ());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_unknown_ca_is_a_typed_tls_error() {
    let url = require!(var("RELIABLE_AMQPS_URL"));
    let other_ca = require!(var("RELIABLE_TLS_OTHER_CA"));
    let settings = AmqpSettings::safe().with_tls(TlsConfig::ca_file(&other_ca).expect("CA"));
    let started = std::time::Instant::now();
    let err = AmqpPublisher::connect(&url, settings)
        .await
        .expect_err("a CA that signed nothing must be refused");
    assert!(matches!(err, AmqpError::Tls { .. }), "{err:?}");
    let shown = format!("{err} / {err:?}");
    eprintln!("unknown CA (RabbitMQ): {err}");
    assert!(shown.contains("CA file"), "{shown}");
    assert!(!shown.contains("guest:guest"), "{shown}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a certificate failure is not retried: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn amqps_settings_refuse_a_plain_url() {
    let ca = require!(var("RELIABLE_TLS_CA"));
    let settings = AmqpSettings::safe().with_tls(TlsConfig::ca_file(&ca).expect("CA"));
    let err = AmqpPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f", settings)
        .await
        .expect_err("TLS settings with amqp:// must be refused");
    assert!(matches!(err, AmqpError::TlsWithoutAmqps { .. }), "{err:?}");
}
