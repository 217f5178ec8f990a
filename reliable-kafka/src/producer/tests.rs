//! Unit tests of the Kafka transport.

use reliable_core::{Message, Transport};

use super::submit::lane_of;
use super::*;
use crate::config::producer_preset;

#[test]
fn wrapping_a_producer_validates_the_config_it_was_built_from() {
    let timeout = Duration::from_secs(5);
    let safe = producer_preset("127.0.0.1:1", timeout);
    let producer: FutureProducer = safe.create().unwrap();
    let t = KafkaTransport::from_producer(producer, &safe, timeout, &Safety::strict()).unwrap();
    assert_eq!(t.recommended_producer_config().confirm_timeout, timeout);

    let mut weak = ClientConfig::new();
    weak.set("bootstrap.servers", "127.0.0.1:1");
    let producer: FutureProducer = weak.create().unwrap();
    let err =
        KafkaTransport::from_producer(producer, &weak, timeout, &Safety::strict()).unwrap_err();
    assert!(err.to_string().contains("enable.idempotence=true"), "{err}");

    weak.set("acks", "0");
    let producer: FutureProducer = weak.create().unwrap();
    let err =
        KafkaTransport::from_producer(producer, &weak, timeout, &Safety::strict()).unwrap_err();
    assert!(matches!(err, Error::UnsafeConfig(_)), "{err}");
}

/// A transport on an address nothing listens on: building and enqueueing need no broker.
async fn offline(builder: KafkaTransportBuilder) -> KafkaTransport {
    builder.skip_topic_check().build().await.unwrap()
}

fn message_timeout(t: &KafkaTransport) -> Option<&str> {
    t.client_config().get("message.timeout.ms")
}

#[tokio::test]
async fn preserved_order_gives_librdkafka_the_whole_deadline() {
    let t = offline(KafkaTransport::builder("127.0.0.1:1")).await;
    assert_eq!(message_timeout(&t), Some("60000"));
    let core = t.recommended_producer_config();
    assert_eq!(core.order, SendOrder::Preserved);
    assert_eq!(
        core.confirm_timeout,
        Duration::from_secs(60) + DEADLINE_MARGIN
    );
    assert_eq!(core.deadline, core.confirm_timeout);
    assert!(core.backoff.min_delay >= DEADLINE_MARGIN);

    let t = offline(KafkaTransport::builder("127.0.0.1:1").deadline(Duration::from_secs(30))).await;
    assert_eq!(message_timeout(&t), Some("30000"));
    assert_eq!(
        t.recommended_producer_config().deadline,
        Duration::from_secs(30) + DEADLINE_MARGIN
    );
}

#[tokio::test]
async fn a_confirm_timeout_or_relaxed_order_bounds_each_attempt() {
    let t =
        offline(KafkaTransport::builder("127.0.0.1:1").confirm_timeout(Duration::from_secs(10)))
            .await;
    assert_eq!(message_timeout(&t), Some("9000"));
    let core = t.recommended_producer_config();
    assert_eq!(
        (core.order, core.confirm_timeout, core.deadline),
        (
            SendOrder::Preserved,
            Duration::from_secs(10),
            Duration::from_secs(60)
        )
    );

    let t = offline(KafkaTransport::builder("127.0.0.1:1").order(SendOrder::Relaxed)).await;
    assert_eq!(message_timeout(&t), Some("4500"));
    let core = t.recommended_producer_config();
    assert_eq!(
        core,
        ProducerConfig {
            order: SendOrder::Relaxed,
            ..ProducerConfig::default()
        }
    );
}

#[tokio::test]
async fn a_message_timeout_past_the_core_confirm_timeout_is_refused() {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("message.timeout.ms", "120000");
    let err = KafkaTransport::builder_from_config(config.clone())
        .skip_topic_check()
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("message.timeout.ms"), "{err}");
    // Within the deadline's bound it is the user's choice.
    config.set("message.timeout.ms", "30000");
    let t = offline(KafkaTransport::builder_from_config(config)).await;
    assert_eq!(message_timeout(&t), Some("30000"));
}

#[test]
fn lanes_follow_topic_and_key() {
    assert_eq!(lane_of("a", Some("k")), lane_of("a", Some("k")));
    assert_ne!(lane_of("a", Some("k")), lane_of("a", Some("j")));
    assert_ne!(lane_of("a", Some("k")), lane_of("b", Some("k")));
    assert_ne!(lane_of("a", None), lane_of("a", Some("")));
    assert_ne!(lane_of("ab", None), lane_of("a", Some("b")));
}

#[tokio::test]
async fn lane_uses_the_default_topic() {
    let t = offline(
        KafkaTransport::builder("127.0.0.1:1").default_topic(crate::TopicSpec::new("orders")),
    )
    .await;
    let keyed = Message::new("x").with_routing_key("k");
    assert_eq!(t.lane(&keyed), lane_of("orders", Some("k")));
    assert_eq!(
        t.lane(&keyed.clone().with_destination("other")),
        lane_of("other", Some("k"))
    );
    assert_eq!(t.lane(&Message::new("y")), lane_of("orders", None));
}

/// `submit` enqueues into librdkafka before it returns, so records land in call order, and the
/// delivery callback answers each attempt's completion. A refusal at enqueue is the
/// submission's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_enqueues_in_call_order_and_the_callback_answers() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Message as _, Offset, TopicPartitionList};
    use reliable_core::{Attempt, Completion, Submission};

    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("order", 1, 1).unwrap();
    let t = Arc::new(
        offline(
            KafkaTransport::builder(&mock.bootstrap_servers())
                .default_topic(crate::TopicSpec::new("order")),
        )
        .await,
    );
    let mut answers = Vec::new();
    for payload in ["submitted first", "submitted second"] {
        let (done, answer) = Completion::channel();
        let submission = t.clone().submit(Arc::new(Message::new(payload)), done);
        assert!(
            matches!(submission, Submission::Now(Ok(Attempt::Callback))),
            "{submission:?}"
        );
        answers.push(answer);
    }
    for answer in answers {
        answer.await.unwrap();
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "submission-order")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("order", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let m = consumer
            .poll(Duration::from_secs(10))
            .expect("the mock cluster returns both records")
            .unwrap();
        payloads.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
    }
    assert_eq!(payloads, ["submitted first", "submitted second"]);

    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", mock.bootstrap_servers());
    let refused = Arc::new(offline(KafkaTransport::builder_from_config(config)).await);
    let (done, _) = Completion::channel();
    let Submission::Now(Err(err)) = refused.submit(Arc::new(Message::new("x")), done) else {
        panic!("a message without a topic is refused at submission");
    };
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    t.close().await;
}

#[tokio::test]
async fn message_without_topic_is_unroutable() {
    let timeout = Duration::from_secs(5);
    let safe = producer_preset("127.0.0.1:1", timeout);
    let producer: FutureProducer = safe.create().unwrap();
    let t = KafkaTransport::from_producer(producer, &safe, timeout, &Safety::strict()).unwrap();
    let err = t.publish(&Message::new("x")).await.unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }));
}

/// librdkafka's MockCluster fails the idempotent producer's `InitProducerId` with
/// `CLUSTER_AUTHORIZATION_FAILED`, a fatal idempotence error: the transport rebuilds the
/// producer and the core producer's resend is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_idempotence_error_rebuilds_the_producer() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use reliable_core::producer::Producer;

    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("fatal", 1, 3).unwrap();
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
    );
    let timeout = Duration::from_secs(5);
    let config = producer_preset(&mock.bootstrap_servers(), timeout);
    let producer: FutureProducer = config.create().unwrap();
    let t = KafkaTransport::from_producer(producer, &config, timeout, &Safety::strict()).unwrap();

    let first = t
        .publish(&Message::new("a").with_destination("fatal"))
        .await;
    assert!(
        matches!(first, Err(PublishError::ConnectionLost { ref reason }) if reason.contains("rebuilt")),
        "{first:?}"
    );
    assert_eq!(t.rebuilds(), 1);
    let core = Producer::new(t.clone(), t.recommended_producer_config());
    let confirmed = core
        .send_confirmed(Message::new("b").with_destination("fatal"))
        .await
        .unwrap();
    assert_eq!(confirmed.attempts, 1);
    core.close().await;
    t.close().await;
}
