//! Typed messages (feature `serde`) through the in-memory broker and the Pipeline: a good JSON
//! message reaches the handler typed; a payload that does not decode is dead-lettered once,
//! with a reason that says so, without reaching the handler and without a retry or requeue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_core::backoff::BackoffPolicy;
use reliable_core::memory::InMemoryBroker;
use reliable_core::message::{headers, APPLICATION_JSON};
use reliable_core::pipeline::{
    handler_fn, json_handler, DeadLetter, HandlerBuilder, HandlerError, Pipeline, RetryLayer,
    RetryPolicy,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct OrderPaid {
    order: u64,
    amount_cents: u64,
    currency: String,
}

fn broker() -> InMemoryBroker {
    let b = InMemoryBroker::new();
    b.declare_queue("orders");
    b.declare_queue("orders.dlq");
    b
}

fn dead_letter(broker: &InMemoryBroker) -> DeadLetter {
    DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "orders.dlq",
    )
}

/// Retries transient failures (5 attempts): a decode failure must not use them.
fn retry() -> RetryLayer {
    RetryLayer::new(RetryPolicy {
        max_attempts: 5,
        backoff: BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            factor: 2.0,
            jitter: false,
        },
    })
}

#[tokio::test(start_paused = true)]
async fn good_json_reaches_the_handler_typed_and_garbage_is_dead_lettered_once() -> TestResult {
    let broker = broker();
    let t = broker.transport();
    let paid = OrderPaid {
        order: 42,
        amount_cents: 1999,
        currency: "EUR".into(),
    };
    let good = Message::json(&paid)?.with_destination("orders");
    // Not JSON at all, though it claims to be.
    let garbage = Message::new("{order: 43")
        .with_header(headers::CONTENT_TYPE, APPLICATION_JSON)
        .with_destination("orders");
    // Valid JSON of the wrong shape, without a content type (another client's message).
    let wrong_shape = Message::new(r#"{"order":"44"}"#).with_destination("orders");
    for m in [&good, &garbage, &wrong_shape] {
        t.publish(m).await?;
    }

    let seen = Arc::new(Mutex::new(Vec::<OrderPaid>::new()));
    let calls = seen.clone();
    let handler = HandlerBuilder::new(json_handler(move |paid: OrderPaid, _msg: Message| {
        let seen = calls.clone();
        async move {
            seen.lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .push(paid);
            Ok(())
        }
    }))
    .layer(retry())
    .build();
    let stats = Pipeline::new(
        broker.consumer("orders").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .run()
    .await?;

    let seen = seen.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(seen, [paid], "only the good message reaches the handler");
    assert_eq!(
        stats.received, 3,
        "each message delivered once: no redelivery"
    );
    assert_eq!(stats.succeeded, 1);
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.requeued, 0);
    assert_eq!(stats.held, 0);
    assert_eq!(broker.acked_count("orders"), 3);
    assert_eq!(broker.queue_len("orders") + broker.unacked_len("orders"), 0);

    let dlq = broker.messages("orders.dlq");
    assert_eq!(dlq.len(), 2, "each bad payload dead-lettered exactly once");
    for bad in [&garbage, &wrong_shape] {
        let copy = dlq
            .iter()
            .find(|m| m.id() == bad.id())
            .ok_or("bad payload not dead-lettered")?;
        assert_eq!(copy.payload(), bad.payload(), "the copy keeps the payload");
        let reason = copy
            .header(headers::DEAD_LETTER_REASON)
            .ok_or("no dead-letter reason")?;
        assert!(reason.contains("permanent"), "{reason}");
        assert!(reason.contains("could not decode"), "{reason}");
        assert!(reason.contains("OrderPaid"), "{reason}");
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn decode_json_with_question_mark_dead_letters_without_retrying() -> TestResult {
    let broker = broker();
    let t = broker.transport();
    let csv = Message::new("42,1999,EUR")
        .with_header(headers::CONTENT_TYPE, "text/csv")
        .with_destination("orders");
    t.publish(&csv).await?;

    let calls = Arc::new(Mutex::new(0u32));
    let counted = calls.clone();
    let handler = HandlerBuilder::new(handler_fn(move |msg: Message| {
        let counted = counted.clone();
        async move {
            *counted
                .lock()
                .map_err(|_| HandlerError::permanent("poisoned"))? += 1;
            let paid: OrderPaid = msg.decode_json()?;
            Err(HandlerError::permanent(format!("unexpected {paid:?}")))
        }
    }))
    .layer(retry())
    .build();
    let stats = Pipeline::new(
        broker.consumer("orders").end_when_drained(),
        handler,
        dead_letter(&broker),
    )
    .run()
    .await?;

    assert_eq!(*calls.lock().map_err(|_| "poisoned")?, 1, "no retry");
    assert_eq!(stats.received, 1);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.requeued, 0);
    let dlq = broker.messages("orders.dlq");
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0]
        .header(headers::DEAD_LETTER_REASON)
        .ok_or("no dead-letter reason")?;
    assert!(reason.contains("could not decode"), "{reason}");
    assert!(reason.contains("text/csv"), "{reason}");
    Ok(())
}
