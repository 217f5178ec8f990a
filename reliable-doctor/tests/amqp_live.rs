//! The RabbitMQ checks against the project's live node: deliberately unsafe queues are each
//! named with the right check; a safe quorum queue (by arguments, or by a policy) has none.
//! Needs `scripts/brokers up` (which enables the management plugin); under `CI` a missing
//! broker or variable fails the test.

mod common;

use common::{checks_on, options, Api};
use reliable_test_support::{require, unique_name};
use serde_json::json;

#[tokio::test]
async fn unsafe_queues_are_named_and_safe_ones_are_not() {
    common::require_env_in_ci(&["RELIABLE_AMQP_URL", common::MANAGEMENT_URL_ENV]);
    let amqp_url = require!(reliable_test_support::amqp_url());
    let management_url = require!(common::management_url());
    let api = Api::new(&management_url);
    let prefix = format!("{}-", unique_name("doctor"));
    let name = |what: &str| format!("{prefix}{what}");
    let dlx = name("dlx");

    api.put_queue(&name("classic-transient"), false, json!({}));
    api.put_queue(
        &name("quorum-no-dlx"),
        true,
        json!({"x-queue-type": "quorum", "x-delivery-limit": 1000}),
    );
    api.put_queue(
        &name("quorum-at-most-once"),
        true,
        json!({"x-queue-type": "quorum", "x-dead-letter-exchange": dlx,
               "x-delivery-limit": 1000}),
    );
    api.put_queue(
        &name("quorum-drop-head"),
        true,
        json!({"x-queue-type": "quorum", "x-dead-letter-exchange": dlx,
               "x-dead-letter-strategy": "at-least-once", "x-delivery-limit": 1000,
               "x-max-length": 10}),
    );
    api.put_queue(
        &name("safe"),
        true,
        json!({"x-queue-type": "quorum", "x-dead-letter-exchange": dlx,
               "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
               "x-delivery-limit": 1000}),
    );
    // The same safety from a policy: the queue itself declares only its type.
    let policy = name("policy");
    api.put_policy(
        &policy,
        &format!("^{}$", name("safe-by-policy")),
        json!({"dead-letter-exchange": dlx, "dead-letter-strategy": "at-least-once",
               "overflow": "reject-publish", "delivery-limit": 1000}),
    );
    api.put_queue(
        &name("safe-by-policy"),
        true,
        json!({"x-queue-type": "quorum"}),
    );

    let mut all = options(&prefix);
    all.amqp_url = Some(amqp_url.clone());
    all.management_url = Some(management_url.clone());
    let report = reliable_doctor::audit(&all).await;
    let mut safe_only = options(&name("safe"));
    safe_only.management_url = Some(management_url.clone());
    let safe_report = reliable_doctor::audit(&safe_only).await;

    // Clean up before asserting, so a failed assertion leaves nothing behind.
    for queue in [
        "classic-transient",
        "quorum-no-dlx",
        "quorum-at-most-once",
        "quorum-drop-head",
        "safe",
        "safe-by-policy",
    ] {
        api.delete_queue(&name(queue));
    }
    api.delete_policy(&policy);

    let report = report.expect("audit of the live RabbitMQ");
    let on = |queue: &str| checks_on(&report.findings, &name(queue));
    assert_eq!(report.audited.queues, 6, "{report:#?}");
    assert!(
        on("classic-transient").contains(&"amqp-queue-not-durable"),
        "{report:#?}"
    );
    assert!(
        on("classic-transient").contains(&"amqp-queue-not-quorum"),
        "{report:#?}"
    );
    assert_eq!(on("quorum-no-dlx"), ["amqp-queue-no-dead-letter"]);
    assert_eq!(on("quorum-at-most-once"), ["amqp-dead-letter-at-most-once"]);
    let drop_head = on("quorum-drop-head");
    assert!(
        drop_head.contains(&"amqp-queue-overflow-drops"),
        "{drop_head:?}"
    );
    assert!(
        drop_head.contains(&"amqp-dead-letter-at-most-once"),
        "at-least-once without reject-publish falls back: {drop_head:?}"
    );
    assert!(on("safe").is_empty(), "{:?}", on("safe"));
    assert!(
        on("safe-by-policy").is_empty(),
        "{:?}",
        on("safe-by-policy")
    );
    assert!(report.exit_code() == 1);
    assert!(
        !format!("{report:?}").contains("guest:guest"),
        "no password in the report"
    );

    let safe_report = safe_report.expect("audit of the safe queues");
    assert_eq!(safe_report.audited.queues, 2, "{safe_report:#?}");
    assert!(safe_report.findings.is_empty(), "{safe_report:#?}");
    assert_eq!(safe_report.exit_code(), 0);
}

#[tokio::test]
async fn amqp_without_management_says_queues_were_not_listed() {
    common::require_env_in_ci(&["RELIABLE_AMQP_URL"]);
    let amqp_url = require!(reliable_test_support::amqp_url());
    let mut opts = options("doctor-nothing-");
    opts.amqp_url = Some(amqp_url);
    let report = reliable_doctor::audit(&opts)
        .await
        .expect("the node is reachable");
    assert_eq!(report.findings.len(), 1, "{report:#?}");
    let finding = &report.findings[0];
    assert_eq!(finding.check, "amqp-queues-not-listed");
    assert_eq!(finding.severity, reliable_doctor::Severity::Info);
    assert_eq!(report.exit_code(), 0);
    assert!(!finding.object.contains(":guest@"), "{}", finding.object);
}

#[tokio::test]
async fn an_unreachable_node_is_an_error_without_the_password() {
    let mut opts = options("doctor-");
    // Port 1 on loopback: nothing listens there.
    opts.amqp_url = Some("amqp://app:s3cr3t-pw@127.0.0.1:1/%2f".into());
    let err = reliable_doctor::audit(&opts)
        .await
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(text.contains("did not accept an AMQP connection"), "{text}");
    assert!(!text.contains("s3cr3t-pw"), "{text}");
}
