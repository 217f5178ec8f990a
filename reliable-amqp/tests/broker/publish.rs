//! Publishing: confirms, returns, classified nacks, settings and topology.

use futures::future::join_all;
use reliable_amqp::error::AmqpError;
use reliable_amqp::lapin::ExchangeKind;
use reliable_amqp::settings::{AmqpSettings, DataLoss, QueueType};
use reliable_amqp::topology::{self, Overflow, QueueSpec};
use reliable_amqp::AmqpPublisher;
use reliable_core::message::headers;
use reliable_core::{Message, PublishError, Transport};
use reliable_test_support::{require, unique_name};

use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publish_resolves_ok_and_the_message_is_in_the_queue() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-confirmed");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let messages: Vec<Message> = (0..50)
        .map(|i| Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue))
        .collect();
    let results = join_all(messages.iter().map(|m| publisher.publish(m))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(common::wait_for_count(&conn, &queue, 50).await, 50);

    // On the wire: persistent, message id as property and header; no key header, since each
    // key is its message id (the default).
    let got = common::get_one(&ch, &queue).await.expect("a message");
    let props = &got.delivery.properties;
    assert_eq!(*props.delivery_mode(), Some(2));
    let id = props.message_id().as_ref().expect("message-id").to_string();
    assert!(messages.iter().any(|m| m.id_text() == id));
    let table = props.headers().as_ref().expect("headers");
    assert!(table.contains_key(headers::MESSAGE_ID));
    assert!(!table.contains_key(headers::IDEMPOTENCY_KEY));
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_refused_with_the_message_handed_back() {
    let url = require!(reliable_test_support::amqp_url());
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let msg = Message::new(&b"nobody listens"[..]).with_routing_key(unique_name("no-such-queue"));
    let id = msg.id();
    let refused = publisher.send(msg).await.expect_err("must not be Ok");
    assert!(
        matches!(refused.error, PublishError::Unroutable { .. }),
        "{:?}",
        refused.error
    );
    assert!(!refused.error.is_retryable());
    assert_eq!(refused.message.id(), id, "the same message comes back");
}

/// Many concurrent publishes, routable and unroutable interleaved on one channel: confirms
/// resolve in batches (multiple-acks) and lapin attaches returns to whichever confirm resolves
/// next, so only matching by message id gives each publish its own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_matched_to_their_publish_by_message_id_under_concurrency() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-mixed");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let nowhere = unique_name("amqp-nowhere");

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let messages: Vec<(bool, Message)> = (0..400)
        .map(|i| {
            let routable = i % 3 != 0;
            let key = if routable { &queue } else { &nowhere };
            (
                routable,
                Message::new(format!("m{i}").into_bytes()).with_routing_key(key),
            )
        })
        .collect();
    let results = join_all(messages.iter().map(|(_, m)| publisher.publish(m))).await;
    let mut routed = 0;
    for ((routable, msg), result) in messages.iter().zip(&results) {
        if *routable {
            assert_eq!(result, &Ok(()), "routable {} must be confirmed", msg.id());
            routed += 1;
        } else {
            assert!(
                matches!(result, Err(PublishError::Unroutable { .. })),
                "unroutable {} got {result:?}",
                msg.id()
            );
        }
    }
    assert_eq!(common::wait_for_count(&conn, &queue, routed).await, routed);
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_with_reject_publish_is_a_classified_nack() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-full");
    // Classic queues enforce the limit exactly (quorum queues apply it approximately).
    let spec = QueueSpec::classic_durable(&queue).with_max_length(2, Overflow::RejectPublish);
    topology::declare_queue(&ch, &spec).await.unwrap();

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let mut results = Vec::new();
    for i in 0..4 {
        let msg = Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue);
        results.push(publisher.publish(&msg).await);
    }
    assert_eq!(results[..2], [Ok(()), Ok(())]);
    for r in &results[2..] {
        assert!(matches!(r, Err(PublishError::Nacked { .. })), "{r:?}");
        assert!(r.as_ref().unwrap_err().is_retryable());
    }
    assert_eq!(common::count(&conn, &queue).await, 2);
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_overrides_are_typed_errors_and_live_checks_speak_plainly() {
    let url = require!(reliable_test_support::amqp_url());
    let err = AmqpSettings::safe()
        .with_publisher_confirms(false)
        .unwrap_err();
    assert_eq!((err.setting, err.value), ("publisher_confirms", "false"));
    assert!(err.to_string().contains("unsafe_allow_data_loss"));
    let err = QueueSpec::quorum("q")
        .with_queue_type(QueueType::ClassicTransient)
        .unwrap_err();
    assert_eq!(err.setting, "queue_type");

    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-classic");
    topology::declare_queue(&ch, &QueueSpec::classic_durable(&queue))
        .await
        .unwrap();
    // Exists and matches.
    topology::verify_queue(&conn, &QueueSpec::classic_durable(&queue))
        .await
        .unwrap();
    // Exists, but classic where quorum is expected: PRECONDITION_FAILED in plain words.
    match topology::verify_queue(&conn, &QueueSpec::quorum(&queue)).await {
        Err(AmqpError::SettingsMismatch {
            kind,
            name,
            broker_says,
        }) => {
            assert_eq!((kind, name.as_str()), ("queue", queue.as_str()));
            assert!(broker_says.contains("x-queue-type"), "{broker_says}");
        }
        other => panic!("expected SettingsMismatch, got {other:?}"),
    }
    // Missing: not created by the check.
    let missing = unique_name("amqp-missing");
    assert!(matches!(
        topology::verify_queue(&conn, &QueueSpec::quorum(&missing)).await,
        Err(AmqpError::QueueMissing { .. })
    ));
    assert!(matches!(
        topology::verify_queue(&conn, &QueueSpec::quorum(&missing)).await,
        Err(AmqpError::QueueMissing { .. })
    ));
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_errors_or_debug() {
    let url = require!(reliable_test_support::amqp_url());
    let bad = url.replacen("guest:guest", "guest:wr0ng-s3cret", 1);
    assert_ne!(bad, url, "test needs the default credentials in the URL");
    let err = AmqpPublisher::connect(
        &bad,
        AmqpSettings::safe()
            .with_reconnect(reliable_amqp::settings::ReconnectPolicy {
                max_attempts: 1,
                ..Default::default()
            })
            .unwrap(),
    )
    .await
    .expect_err("wrong password");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("wr0ng-s3cret"), "{text}");

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let debug = format!("{publisher:?}");
    assert!(!debug.contains("guest:guest"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_connection_and_exchange_topology_publish_through_bindings() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let exchange = unique_name("amqp-ex");
    let queue = unique_name("amqp-bound");
    topology::declare_exchange(&ch, &exchange, ExchangeKind::Direct)
        .await
        .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    topology::bind_queue(&ch, &queue, &exchange, "eu")
        .await
        .unwrap();

    let (own, _) = common::open(&url).await;
    let publisher = AmqpPublisher::from_connection(own, AmqpSettings::safe())
        .await
        .unwrap()
        .with_default_exchange(&exchange);
    publisher
        .publish(&Message::new(&b"eu"[..]).with_routing_key("eu"))
        .await
        .unwrap();
    let us = publisher
        .publish(&Message::new(&b"us"[..]).with_routing_key("us"))
        .await;
    assert!(matches!(us, Err(PublishError::Unroutable { .. })), "{us:?}");
    assert_eq!(common::wait_for_count(&conn, &queue, 1).await, 1);
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_batches_and_report_unroutable_members() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-tx");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();

    let publisher = AmqpPublisher::connect(&url, AmqpSettings::transactional())
        .await
        .unwrap();
    let mut batch: Vec<Message> = (0..10)
        .map(|i| Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue))
        .collect();
    batch.push(Message::new(&b"lost?"[..]).with_routing_key(unique_name("nowhere")));
    let results = publisher.publish_batch(&batch).await;
    assert!(results[..10].iter().all(Result::is_ok), "{results:?}");
    assert!(
        matches!(results[10], Err(PublishError::Unroutable { .. })),
        "{results:?}"
    );
    // Per message, through the Transport trait.
    publisher
        .publish(&Message::new(&b"single"[..]).with_routing_key(&queue))
        .await
        .unwrap();
    assert_eq!(common::wait_for_count(&conn, &queue, 11).await, 11);

    // Confirm-mode publishers refuse batches instead of silently not transacting.
    let confirming = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let r = confirming.publish_batch(&batch[..1]).await;
    assert!(matches!(r[0], Err(PublishError::Fatal { .. })));
    common::delete(&conn, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loud_opt_out_is_the_only_way_to_lossy_settings() {
    let url = require!(reliable_test_support::amqp_url());
    let settings = AmqpSettings::safe()
        .unsafe_allow_data_loss(DataLoss::NonDurableQueues)
        .unsafe_allow_data_loss(DataLoss::TransientMessages);
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-transient");
    let spec = QueueSpec::from_settings(&queue, &settings);
    assert_eq!(spec.queue_type(), QueueType::ClassicTransient);
    topology::declare_queue(&ch, &spec).await.unwrap();
    let publisher = AmqpPublisher::connect(&url, settings).await.unwrap();
    publisher
        .publish(&Message::new(&b"x"[..]).with_routing_key(&queue))
        .await
        .unwrap();
    let got = common::get_one(&ch, &queue).await.expect("a message");
    assert_eq!(*got.delivery.properties.delivery_mode(), Some(1));
    common::delete(&conn, &[&queue]).await;
}
