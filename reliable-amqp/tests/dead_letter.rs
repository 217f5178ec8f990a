//! Loss paths on the consume side (issue 14, loss-matrix row L9), against the real RabbitMQ:
//! `DeadLetter::BrokerReject` only where the consumed queue provably dead-letters to a durable
//! queue, at least once; and the quorum-queue arguments the SDK declares for RabbitMQ 4.x
//! delivery limits.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliable_amqp::error::AmqpError;
use reliable_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions};
use reliable_amqp::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use reliable_amqp::lapin::{Connection, ExchangeKind};
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::pipeline::{
    handler_fn, DeadLetter, Handler, HandlerError, Pipeline, PipelineError, PipelineStats,
};
use reliable_core::{Message, Transport};
use reliable_test_support::{require, unique_name};

/// The delivery limit the SDK declares on its quorum queues.
const SDK_DELIVERY_LIMIT: i64 = 1_000;

/// A handler that fails every message for good, counting its calls.
fn always_poison(calls: Arc<AtomicU32>) -> impl Handler + 'static {
    handler_fn(move |_msg: Message| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(HandlerError::permanent("cannot parse"))
        }
    })
}

/// Runs `pipeline` until `done` holds or 5 s pass, then shuts it down.
async fn run_until<H: Handler + 'static>(
    pipeline: Pipeline<AmqpConsumer, H>,
    done: impl Fn(&PipelineStats) -> bool + Send + 'static,
) -> Result<PipelineStats, PipelineError> {
    let stats = pipeline.stats();
    let shutdown = async move {
        for _ in 0..100 {
            if done(&stats.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), pipeline.run_until(shutdown))
        .await
        .expect("the pipeline ends within 30 s")
}

async fn publish(url: &str, queue: &str, payload: &str) -> Message {
    let publisher = AmqpPublisher::connect(url, AmqpSettings::safe())
        .await
        .expect("publisher");
    let msg = Message::new(payload.to_owned()).with_routing_key(queue);
    publisher.publish(&msg).await.expect("confirmed");
    msg
}

async fn delete_exchange(conn: &Connection, exchange: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Re-declares `queue` (durable) with exactly `args` on a throwaway channel: `Ok` only if the
/// broker holds the queue with equivalent arguments (RabbitMQ answers 406 otherwise).
async fn redeclare(
    conn: &Connection,
    queue: &str,
    args: &[(&str, AMQPValue)],
) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert(ShortString::from(*k), v.clone());
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let result = ch
        .queue_declare(queue.into(), options, table)
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = ch.close(200, "checked".into()).await;
    result
}

/// Publishes a poison message to `queue` and runs a `BrokerReject` pipeline over a plain
/// consumer of it: the pipeline refuses with the typed error before taking any delivery, and
/// the message stays in its queue (then deleted).
async fn assert_broker_reject_refused(url: &str, conn: &Connection, queue: &str) {
    publish(url, queue, "poison").await;
    let calls = Arc::new(AtomicU32::new(0));
    let source = AmqpConsumer::connect(url, queue, AmqpSettings::safe())
        .await
        .unwrap();
    let result = run_until(
        Pipeline::new(
            source,
            always_poison(calls.clone()),
            DeadLetter::BrokerReject,
        ),
        |s| s.dead_lettered > 0,
    )
    .await;
    assert!(
        matches!(result, Err(PipelineError::NoBrokerDeadLetter)),
        "expected the typed refusal, got {result:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no delivery was taken");
    assert_eq!(
        common::wait_for_count(conn, queue, 1).await,
        1,
        "the poison message is still in its queue"
    );
    common::delete(conn, &[queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_reject_over_a_queue_without_a_dead_letter_exchange_is_refused_before_any_delivery()
{
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-none");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    assert_broker_reject_refused(&url, &conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_reject_over_a_dead_letter_exchange_without_a_bound_queue_is_refused() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-unbound");
    let dlx = unique_name("dl-unbound-dlx");
    // The exchange exists, but no queue is bound to it: a dead-lettered message goes nowhere.
    topology::declare_exchange(&ch, &dlx, ExchangeKind::Fanout)
        .await
        .unwrap();
    topology::declare_queue(
        &ch,
        &QueueSpec::quorum(&queue).with_dead_letter_exchange(&dlx),
    )
    .await
    .unwrap();
    assert_broker_reject_refused(&url, &conn, &queue).await;
    delete_exchange(&conn, &dlx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_declared_quorum_queues_carry_a_delivery_limit_and_at_least_once_dead_lettering() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-args");
    let plain = unique_name("dl-args-plain");
    let dlx = unique_name("dl-args-dlx");
    let dlq = unique_name("dl-args-dlq");
    topology::declare_dead_letter(&ch, &dlx, &dlq)
        .await
        .unwrap();
    topology::declare_queue(
        &ch,
        &QueueSpec::quorum(&queue).with_dead_letter_exchange(&dlx),
    )
    .await
    .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&plain))
        .await
        .unwrap();

    // Read back: a re-declare with exactly these arguments is accepted.
    let expected = [
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(&dlx)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(SDK_DELIVERY_LIMIT),
        ),
    ];
    redeclare(&conn, &queue, &expected)
        .await
        .expect("the declared arguments are the expected ones");
    let limit_only = [
        ("x-queue-type", text("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(SDK_DELIVERY_LIMIT),
        ),
    ];
    redeclare(&conn, &plain, &limit_only)
        .await
        .expect("a plain quorum queue has an explicit delivery limit");
    redeclare(&conn, &dlq, &limit_only)
        .await
        .expect("so does the dead-letter queue");

    // And each of them is really set: one changed or missing argument is a 406.
    for (changed, name) in [
        (1, "x-dead-letter-exchange"),
        (2, "x-dead-letter-strategy"),
        (3, "x-overflow"),
        (4, "x-delivery-limit"),
    ] {
        let mut args = expected.to_vec();
        args.remove(changed);
        let err = redeclare(&conn, &queue, &args)
            .await
            .expect_err("a missing argument must not be accepted");
        assert!(
            err.contains("PRECONDITION_FAILED") && err.contains(name),
            "{err}"
        );
    }
    let mut args = expected.to_vec();
    args[4].1 = AMQPValue::LongLongInt(20);
    let err = redeclare(&conn, &queue, &args).await.unwrap_err();
    assert!(err.contains("x-delivery-limit"), "{err}");
    common::delete(&conn, &[&queue, &plain, &dlq]).await;
    delete_exchange(&conn, &dlx).await;
}

/// A poison message (a handler error, and a panicking handler) on a quorum queue declared with
/// a dead-letter target and consumed through `connect_checked`: rejected, and in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_on_a_checked_quorum_queue_ends_in_the_dead_letter_queue() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-checked");
    let dlx = unique_name("dl-checked-dlx");
    let dlq = unique_name("dl-checked-dlq");
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(&dlx, &dlq));
    // Declares the dead-letter exchange, the dead-letter queue and their binding too.
    topology::declare_queue(&ch, &spec).await.unwrap();
    let poison = publish(&url, &queue, "poison").await;
    let panics = publish(&url, &queue, "panic").await;
    let good = publish(&url, &queue, "good").await;

    let source = AmqpConsumer::connect_checked(&url, &spec, AmqpSettings::safe())
        .await
        .unwrap();
    let route = source.dead_letter_route().expect("a verified route");
    assert_eq!(
        (route.exchange(), route.dead_letter_queue()),
        (dlx.as_str(), dlq.as_str())
    );
    let handler = handler_fn(|msg: Message| async move {
        match msg.payload().as_ref() {
            b"poison" => Err(HandlerError::permanent("cannot parse")),
            b"panic" => panic!("handler bug"),
            _ => Ok(()),
        }
    });
    let stats = run_until(
        Pipeline::new(source, handler, DeadLetter::BrokerReject),
        |s| s.dead_lettered == 2 && s.succeeded == 1,
    )
    .await
    .expect("BrokerReject is accepted over a verified route");
    assert_eq!((stats.dead_lettered, stats.succeeded), (2, 1), "{stats:?}");

    assert_eq!(
        common::wait_for_count(&conn, &dlq, 2).await,
        2,
        "both in the DLQ"
    );
    let mut dead = Vec::new();
    while let Some(got) = common::get_one(&ch, &dlq).await {
        let id = got
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        dead.push(id.expect("message id"));
    }
    dead.sort();
    let mut expected = vec![poison.id_text().to_string(), panics.id_text().to_string()];
    expected.sort();
    assert_eq!(dead, expected);
    assert_eq!(common::wait_for_count(&conn, &queue, 0).await, 0);
    let _ = good;
    common::delete(&conn, &[&queue, &dlq]).await;
    delete_exchange(&conn, &dlx).await;
}

/// A queue the user declared (not through the SDK) with a dead-letter exchange that nothing is
/// bound to: the checked consumer binds the named dead-letter queue, so the route is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_consumer_binds_the_named_dead_letter_queue_before_consuming() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-bind");
    let dlx = unique_name("dl-bind-dlx");
    let dlq = unique_name("dl-bind-dlq");
    topology::declare_exchange(&ch, &dlx, ExchangeKind::Fanout)
        .await
        .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&dlq))
        .await
        .unwrap();
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(&dlx, &dlq));
    // Declared by hand with the spec's arguments: no binding from the exchange to the DLQ.
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        spec.arguments(),
    )
    .await
    .unwrap();
    let poison = publish(&url, &queue, "poison").await;

    let calls = Arc::new(AtomicU32::new(0));
    let source = AmqpConsumer::connect_checked(&url, &spec, AmqpSettings::safe())
        .await
        .unwrap();
    let stats = run_until(
        Pipeline::new(
            source,
            always_poison(calls.clone()),
            DeadLetter::BrokerReject,
        ),
        |s| s.dead_lettered == 1,
    )
    .await
    .unwrap();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(common::wait_for_count(&conn, &dlq, 1).await, 1);
    let got = common::get_one(&ch, &dlq).await.expect("in the DLQ");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(poison.id_text().to_string())
    );
    common::delete(&conn, &[&queue, &dlq]).await;
    delete_exchange(&conn, &dlx).await;
}

/// Where the consumer cannot show that a reject reaches a durable queue at least once, it
/// still consumes, but `BrokerReject` is refused before any delivery is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_consumer_refuses_broker_reject_where_dead_lettering_is_unverified_or_at_most_once(
) {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let dlx = unique_name("dl-weak-dlx");
    let dlq = unique_name("dl-weak-dlq");
    let none = QueueSpec::quorum(unique_name("dl-weak-none"));
    let exchange_only =
        QueueSpec::quorum(unique_name("dl-weak-xonly")).with_dead_letter_exchange(&dlx);
    // Classic queues dead-letter at most once (no publisher confirms inside the broker).
    let classic = QueueSpec::classic_durable(unique_name("dl-weak-classic"))
        .with_dead_letter(DeadLetterTarget::new(&dlx, &dlq));
    let cases = [
        (&none, "no dead-letter exchange"),
        (&exchange_only, "names no dead-letter queue"),
        (&classic, "at most once"),
    ];
    for (spec, why) in cases {
        topology::declare_queue(&ch, spec).await.unwrap();
        publish(&url, spec.name(), "poison").await;
        let source = AmqpConsumer::connect_checked(&url, spec, AmqpSettings::safe())
            .await
            .unwrap();
        let reason = source
            .dead_letter_route()
            .expect_err("not verified")
            .to_string();
        assert!(reason.contains(why), "{}: {reason}", spec.name());
        assert!(
            reason.contains("DeadLetter::publish"),
            "says what to do: {reason}"
        );
        let calls = Arc::new(AtomicU32::new(0));
        let result = run_until(
            Pipeline::new(
                source,
                always_poison(calls.clone()),
                DeadLetter::BrokerReject,
            ),
            |s| s.dead_lettered > 0,
        )
        .await;
        assert!(
            matches!(result, Err(PipelineError::NoBrokerDeadLetter)),
            "{}: {result:?}",
            spec.name()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no delivery was taken");
        assert_eq!(common::wait_for_count(&conn, spec.name(), 1).await, 1);
        common::delete(&conn, &[spec.name()]).await;
    }
    common::delete(&conn, &[&dlq]).await;
    delete_exchange(&conn, &dlx).await;
}

/// The queue on the broker does not dead-letter where its declaration says: the checked
/// consumer fails with a typed error before it consumes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_consumer_fails_before_consuming_when_the_queue_lacks_its_dead_letter_exchange() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("dl-lacks");
    let dlx = unique_name("dl-lacks-dlx");
    let dlq = unique_name("dl-lacks-dlq");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    publish(&url, &queue, "poison").await;
    let claimed = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(&dlx, &dlq));
    match AmqpConsumer::connect_checked(&url, &claimed, AmqpSettings::safe()).await {
        Err(AmqpError::SettingsMismatch {
            name, broker_says, ..
        }) => {
            assert_eq!(name, queue);
            assert!(
                broker_says.contains("x-dead-letter-exchange"),
                "{broker_says}"
            );
        }
        other => panic!("expected SettingsMismatch, got {other:?}"),
    }
    // Nothing was consumed: the message is ready, and was never delivered.
    assert_eq!(common::wait_for_count(&conn, &queue, 1).await, 1);
    let got = common::get_one(&ch, &queue).await.expect("still there");
    assert!(!got.delivery.redelivered, "never delivered before");
    common::delete(&conn, &[&queue, &dlq]).await;
    delete_exchange(&conn, &dlx).await;
}

#[test]
fn delivery_limits_that_drop_messages_are_refused() {
    assert_eq!(topology::DEFAULT_DELIVERY_LIMIT, SDK_DELIVERY_LIMIT);
    for limit in [-1, 0] {
        let err = QueueSpec::quorum("q")
            .with_delivery_limit(limit)
            .unwrap_err();
        assert_eq!(err.setting, "delivery_limit");
    }
    assert!(QueueSpec::quorum("q").with_delivery_limit(50).is_ok());
}
