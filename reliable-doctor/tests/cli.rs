//! The `reliable` binary itself: `doctor --json` exits 1 on an unsafe topic and 0 when the
//! filter matches only a safe one; no broker named, or an unreachable one, is exit code 2 with
//! a message that shows no password.

mod common;

use std::process::{Command, Output};

use common::{create_topic, delete_topics};
use reliable_test_support::{require, unique_name};
use serde_json::Value;

/// Runs `reliable doctor ARGS` with none of the broker variables inherited.
fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reliable"))
        .arg("doctor")
        .args(args)
        .env_remove("RELIABLE_AMQP_URL")
        .env_remove("RELIABLE_AMQP_MANAGEMENT_URL")
        .env_remove("RELIABLE_KAFKA_BOOTSTRAP")
        .output()
        .expect("the reliable binary runs")
}

fn json_of(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is no JSON document ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[tokio::test]
async fn exit_code_is_1_on_an_unsafe_topic_and_0_on_safe_ones() {
    common::require_env_in_ci(&["RELIABLE_KAFKA_BOOTSTRAP"]);
    let cluster = require!(reliable_test_support::kafka(3));
    let bootstrap = cluster.bootstrap.clone();
    let prefix = format!("{}-", unique_name("doctor"));
    let unsafe_topic = format!("{prefix}unsafe-rf1");
    let safe_topic = format!("{prefix}safe");
    let admin = common::admin(&bootstrap);
    create_topic(&admin, &bootstrap, &unsafe_topic, 1, &[]).await;
    create_topic(
        &admin,
        &bootstrap,
        &safe_topic,
        3,
        &[("min.insync.replicas", "2")],
    )
    .await;

    let all = doctor(&[
        "--kafka-bootstrap",
        &bootstrap,
        "--filter",
        &prefix,
        "--json",
    ]);
    let safe = doctor(&[
        "--kafka-bootstrap",
        &bootstrap,
        "--filter",
        &safe_topic,
        "--json",
    ]);
    let table = doctor(&["--kafka-bootstrap", &bootstrap, "--filter", &prefix]);
    delete_topics(&admin, &[&unsafe_topic, &safe_topic]).await;

    assert_eq!(all.status.code(), Some(1), "{all:?}");
    let document = json_of(&all);
    assert_eq!(document["audited"]["topics"], 2);
    let findings = document["findings"].as_array().expect("findings array");
    assert!(
        findings.iter().any(|f| f["object"] == unsafe_topic.as_str()
            && f["check"] == "kafka-replication-below-3"
            && f["severity"] == "unsafe"),
        "{document:#}"
    );
    assert!(
        findings
            .iter()
            .all(|f| !f["object"].as_str().unwrap_or("").starts_with(&safe_topic)),
        "{document:#}"
    );

    assert_eq!(safe.status.code(), Some(0), "{safe:?}");
    let document = json_of(&safe);
    assert_eq!(document["audited"]["topics"], 1);
    assert_eq!(document["summary"]["unsafe"], 0);
    assert_eq!(document["findings"].as_array().map(Vec::len), Some(0));

    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("SEVERITY"), "{text}");
    assert!(text.contains("kafka-replication-below-3"), "{text}");
}

#[test]
fn no_broker_named_is_a_usage_error() {
    let output = doctor(&[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing to audit"), "{stderr}");
    assert!(stderr.contains("--kafka-bootstrap"), "{stderr}");
    let bad_flag = doctor(&["--no-such-flag"]);
    assert_eq!(bad_flag.status.code(), Some(2), "{bad_flag:?}");
}

#[test]
fn connection_errors_exit_2_without_the_password() {
    // Port 1 on loopback: nothing listens there.
    let output = doctor(&["--management-url", "http://ops:hunter2-pw@127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("management API"), "{stderr}");
    assert!(!stderr.contains("hunter2-pw"), "{stderr}");
    assert!(stderr.contains("ops:***@127.0.0.1:1"), "{stderr}");
}
