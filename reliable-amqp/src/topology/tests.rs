//! Declaration arguments and the dead-letter classification (no broker needed; the broker
//! tests in `tests/dead_letter.rs` read the same arguments back from RabbitMQ).

use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;

use super::dead_letter::route_of;
use super::*;
use crate::settings::QueueType;

fn text(args: &FieldTable, key: &str) -> Option<String> {
    match args.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

fn int(args: &FieldTable, key: &str) -> Option<i64> {
    match args.inner().get(key) {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        _ => None,
    }
}

#[test]
fn every_quorum_queue_declares_an_explicit_delivery_limit() {
    let args = QueueSpec::quorum("q").arguments();
    assert_eq!(text(&args, "x-queue-type").as_deref(), Some("quorum"));
    assert_eq!(int(&args, "x-delivery-limit"), Some(DEFAULT_DELIVERY_LIMIT));
    // Nothing about dead-lettering without a dead-letter exchange.
    assert!(!args.contains_key("x-dead-letter-strategy") && !args.contains_key("x-overflow"));
    // Classic queues reject the argument.
    let classic = QueueSpec::classic_durable("c").arguments();
    assert!(!classic.contains_key("x-delivery-limit"));
    assert_eq!(QueueSpec::classic_durable("c").delivery_limit(), None);
}

#[test]
fn a_dead_lettering_quorum_queue_dead_letters_at_least_once() {
    for spec in [
        QueueSpec::quorum("q").with_dead_letter(DeadLetterTarget::new("dlx", "dlq")),
        QueueSpec::quorum("q").with_dead_letter_exchange("dlx"),
    ] {
        let args = spec.arguments();
        assert_eq!(
            text(&args, "x-dead-letter-exchange").as_deref(),
            Some("dlx")
        );
        assert_eq!(
            text(&args, "x-dead-letter-strategy").as_deref(),
            Some("at-least-once")
        );
        assert_eq!(text(&args, "x-overflow").as_deref(), Some("reject-publish"));
        assert_eq!(int(&args, "x-delivery-limit"), Some(DEFAULT_DELIVERY_LIMIT));
        assert_eq!(spec.at_most_once_because(), None);
    }
    // A length limit keeps its own overflow; reject-publish-dlx makes it at most once.
    let limited = QueueSpec::quorum("q")
        .with_dead_letter_exchange("dlx")
        .with_max_length(10, Overflow::RejectPublishDlx);
    assert_eq!(
        text(&limited.arguments(), "x-overflow").as_deref(),
        Some("reject-publish-dlx")
    );
    assert!(limited.at_most_once_because().is_some());
    // Classic queues have no at-least-once strategy.
    let classic = QueueSpec::classic_durable("c").with_dead_letter_exchange("dlx");
    assert!(!classic.arguments().contains_key("x-dead-letter-strategy"));
    assert!(classic.at_most_once_because().is_some());
}

#[test]
fn delivery_limits_that_drop_at_the_first_requeue_are_refused() {
    for limit in [i64::MIN, -1, 0] {
        let err = QueueSpec::quorum("q")
            .with_delivery_limit(limit)
            .unwrap_err();
        assert_eq!(err.setting, "delivery_limit");
        assert!(err.to_string().contains("RabbitMQ 3.x"), "{err}");
    }
    let spec = QueueSpec::quorum("q").with_delivery_limit(5).unwrap();
    assert_eq!(int(&spec.arguments(), "x-delivery-limit"), Some(5));
}

#[test]
fn a_target_routes_every_message_only_when_its_binding_matches_them_all() {
    let fanout = DeadLetterTarget::new("dlx", "dlq");
    assert_eq!(fanout.exchange_kind(), ExchangeKind::Fanout);
    assert_eq!(
        (fanout.binding_key(), fanout.routes_every_message()),
        ("", true)
    );
    let direct = DeadLetterTarget::new("dlx", "dlq").with_routing_key("dead");
    assert_eq!(direct.exchange_kind(), ExchangeKind::Direct);
    assert_eq!(
        (direct.binding_key(), direct.routes_every_message()),
        ("dead", true)
    );
    let topic_without_key =
        DeadLetterTarget::new("dlx", "dlq").with_exchange_kind(ExchangeKind::Topic);
    assert!(!topic_without_key.routes_every_message());
    let spec = QueueSpec::quorum("q").with_dead_letter(direct.clone());
    assert_eq!(
        text(&spec.arguments(), "x-dead-letter-routing-key").as_deref(),
        Some("dead")
    );
    assert_eq!(spec.dead_letter_target(), Some(direct));
}

#[test]
fn the_declaration_alone_tells_which_routes_a_reject_may_rely_on() {
    let dlq = DeadLetterTarget::new("dlx", "dlq");
    assert!(route_of(&QueueSpec::quorum("q").with_dead_letter(dlq.clone())).is_ok());
    let cases = [
        (QueueSpec::quorum("q"), "no dead-letter exchange"),
        (
            QueueSpec::quorum("q").with_dead_letter_exchange("dlx"),
            "names no dead-letter queue",
        ),
        (
            QueueSpec::quorum("q").with_dead_letter(
                DeadLetterTarget::new("dlx", "dlq").with_exchange_kind(ExchangeKind::Direct),
            ),
            "routing key",
        ),
        (
            QueueSpec::classic_durable("q").with_dead_letter(dlq.clone()),
            "at most once",
        ),
        (
            QueueSpec::quorum("q").with_dead_letter(
                dlq.clone().with_queue(QueueSpec::from_settings(
                    "dlq",
                    &crate::AmqpSettings::safe()
                        .unsafe_allow_data_loss(crate::DataLoss::NonDurableQueues),
                )),
            ),
            "not durable",
        ),
    ];
    for (spec, why) in cases {
        let err = route_of(&spec).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
        assert!(err.contains("DeadLetter::publish"), "{err}");
    }
    // A dead-letter routing key set after the target follows into the binding.
    let spec = QueueSpec::quorum("q")
        .with_dead_letter(
            DeadLetterTarget::new("dlx", "dlq").with_exchange_kind(ExchangeKind::Direct),
        )
        .with_dead_letter_routing_key("dead");
    let target = route_of(&spec).unwrap();
    assert_eq!(target.binding_key(), "dead");
    assert_eq!(spec.queue_type(), QueueType::Quorum);
}
