//! The RabbitMQ rules on queues as the management API lists them (no broker needed).

use serde_json::json;

use super::checks::{check_queues, NodeInfo, PolicyInfo, QueueInfo};

fn queue(name: &str, durable: bool, kind: &str, arguments: serde_json::Value) -> QueueInfo {
    serde_json::from_value(json!({
        "name": name, "vhost": "/", "durable": durable, "auto_delete": false,
        "exclusive": false, "type": kind, "arguments": arguments,
    }))
    .expect("a queue as /api/queues lists it")
}

fn safe_arguments() -> serde_json::Value {
    json!({"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx",
           "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
           "x-delivery-limit": 1000})
}

fn ids(queues: &[QueueInfo], policies: &[PolicyInfo], major: Option<u32>) -> Vec<String> {
    let node = NodeInfo {
        major_version: major,
    };
    check_queues(queues, policies, &[], &node)
        .into_iter()
        .map(|f| f.check)
        .collect()
}

#[test]
fn a_safe_quorum_queue_has_no_finding() {
    assert!(ids(
        &[queue("q", true, "quorum", safe_arguments())],
        &[],
        Some(3)
    )
    .is_empty());
}

#[test]
fn a_policy_supplies_what_the_arguments_lack() {
    let mut q = queue("q", true, "quorum", json!({"x-queue-type": "quorum"}));
    q.policy = Some("safe".into());
    let policy: PolicyInfo = serde_json::from_value(json!({
        "name": "safe", "vhost": "/", "pattern": "^q$", "apply-to": "queues", "priority": 0,
        "definition": {"dead-letter-exchange": "dlx", "dead-letter-strategy": "at-least-once",
                       "overflow": "reject-publish", "delivery-limit": 1000},
    }))
    .expect("a policy as /api/policies lists it");
    assert!(ids(
        std::slice::from_ref(&q),
        std::slice::from_ref(&policy),
        Some(3)
    )
    .is_empty());
    // The same policy in another vhost does not apply.
    let mut elsewhere = policy;
    elsewhere.vhost = "other".into();
    let found = ids(&[q], &[elsewhere], Some(3));
    assert!(
        found.contains(&"amqp-queue-no-dead-letter".to_owned()),
        "{found:?}"
    );
}

#[test]
fn temporary_queues_are_info_and_durable_temporary_ones_unsafe() {
    let mut reply = queue("amq.gen-1", false, "classic", json!({}));
    reply.exclusive = true;
    assert_eq!(ids(&[reply], &[], None), ["amqp-queue-transient"]);
    let mut durable = queue("work", true, "quorum", safe_arguments());
    durable.auto_delete = true;
    assert_eq!(ids(&[durable], &[], None), ["amqp-queue-auto-delete"]);
}

#[test]
fn streams_skip_the_dead_letter_checks() {
    let stream = queue("s", true, "stream", json!({"x-queue-type": "stream"}));
    assert!(ids(&[stream], &[], Some(3)).is_empty());
}

#[test]
fn delivery_limits_depend_on_the_version() {
    let mut arguments = safe_arguments();
    arguments["x-delivery-limit"] = json!(-1);
    let minus_one = queue("q", true, "quorum", arguments);
    assert_eq!(
        ids(std::slice::from_ref(&minus_one), &[], Some(3)),
        ["amqp-quorum-no-delivery-limit"]
    );
    assert!(ids(&[minus_one], &[], Some(4)).is_empty());
    // No dead-letter exchange: 4.x drops past its implicit limit of 20, so it is unsafe.
    let bare = queue("q", true, "quorum", json!({"x-queue-type": "quorum"}));
    let node = |major| NodeInfo {
        major_version: Some(major),
    };
    let severity = |major| {
        check_queues(std::slice::from_ref(&bare), &[], &[], &node(major))
            .into_iter()
            .find(|f| f.check == "amqp-queue-no-dead-letter")
            .map(|f| f.severity)
    };
    assert_eq!(severity(3), Some(crate::Severity::Warning));
    assert_eq!(severity(4), Some(crate::Severity::Unsafe));
}

#[test]
fn silent_drops_are_unsafe() {
    let classic = queue(
        "c",
        true,
        "classic",
        json!({"x-message-ttl": 1000, "x-max-length": 5, "x-expires": 60000}),
    );
    assert_eq!(
        ids(&[classic], &[], Some(3)),
        [
            "amqp-queue-not-quorum",
            "amqp-queue-no-dead-letter",
            "amqp-queue-overflow-drops",
            "amqp-queue-message-ttl",
            "amqp-queue-expires"
        ]
    );
}
