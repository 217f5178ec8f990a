//! `reliable doctor` against the TLS Kafka of `scripts/tls-brokers` (feature `tls`): over SSL
//! and over SASL_SSL/SCRAM-SHA-512 it reads the cluster and names a replication-factor-1 topic
//! (exit 1); a CA that did not sign the broker's certificate and a wrong password each exit 2
//! with the SDK's typed TLS or authentication message and no password in the output; plaintext
//! against the SSL listener exits 2 too (the control: a failed connection is seen as one).
//!
//! Needs `eval "$(scripts/tls-brokers env)"`. Under `CI` a missing variable fails the test;
//! locally the test prints `SKIPPED` and returns. The TLS Kafka is one broker, so the topics
//! made here have replication factor 1.

use std::process::{Command, Output};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use reliable_kafka::{KafkaSecurity, Scram};
use reliable_test_support::{require, unique_name, Missing};
use serde_json::Value;

/// The variables the doctor reads, none of them inherited from the test's environment.
const DOCTOR_VARS: &[&str] = &[
    "RELIABLE_AMQP_URL",
    "RELIABLE_AMQP_MANAGEMENT_URL",
    "RELIABLE_KAFKA_BOOTSTRAP",
    "RELIABLE_KAFKA_SECURITY_PROTOCOL",
    "RELIABLE_KAFKA_CA",
    "RELIABLE_KAFKA_CLIENT_CERT",
    "RELIABLE_KAFKA_CLIENT_KEY",
    "RELIABLE_KAFKA_SASL_MECHANISM",
    "RELIABLE_KAFKA_SASL_USER",
    "RELIABLE_KAFKA_SASL_PASSWORD",
    "RELIABLE_KAFKA_SASL_PASSWORD_FILE",
];

/// A variable `scripts/tls-brokers env` prints.
fn var(name: &str) -> Result<String, Missing> {
    std::env::var(name).map_err(|_| {
        Missing(format!(
            "{name} is not set; start the TLS brokers with `scripts/tls-brokers up` and \
             `eval \"$(scripts/tls-brokers env)\"`"
        ))
    })
}

/// Runs `reliable doctor ARGS` with `env` as its only doctor variables.
fn doctor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reliable"));
    command.arg("doctor").args(args);
    for name in DOCTOR_VARS {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .output()
        .expect("the reliable binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Makes one-partition `topic` with replication factor 1 over `security`.
async fn create_topic(bootstrap: &str, security: &KafkaSecurity, topic: &str) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    security.apply(&mut config);
    reliable_test_support::create_single_replica_topic(&config, topic).await;
}

/// Deletes `topic` over `security` (errors ignored: cleanup).
async fn delete_topic(bootstrap: &str, security: &KafkaSecurity, topic: &str) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    security.apply(&mut config);
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
}

/// Checks that `output` is an audit that read `topic` and named its replication factor 1.
fn assert_rf1_named(output: &Output, topic: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", text(output));
    let document: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON document ({e}): {}", text(output)));
    assert_eq!(document["audited"]["topics"], 1, "{document:#}");
    let findings = document["findings"].as_array().expect("findings array");
    assert!(
        findings.iter().any(|f| f["object"] == topic
            && f["check"] == "kafka-replication-below-3"
            && f["severity"] == "unsafe"),
        "{document:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_audit_reads_the_cluster_and_a_foreign_ca_or_plaintext_exits_2() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SSL_BOOTSTRAP"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    let other_ca = require!(var("RELIABLE_TLS_OTHER_CA"));
    let topic = unique_name("doctor-ssl-rf1");
    let security = KafkaSecurity::ssl().ca_file(&ca);
    create_topic(&bootstrap, &security, &topic).await;

    let ssl = [
        "--kafka-bootstrap",
        &bootstrap,
        "--filter",
        &topic,
        "--json",
    ];
    let audited = doctor(
        &[
            &ssl[..],
            &["--kafka-security-protocol", "ssl", "--kafka-ca", &ca],
        ]
        .concat(),
        &[],
    );
    // The same through the variables.
    let from_env = doctor(
        &ssl,
        &[
            ("RELIABLE_KAFKA_SECURITY_PROTOCOL", "SSL"),
            ("RELIABLE_KAFKA_CA", &ca),
        ],
    );
    let foreign_ca = doctor(
        &[
            &ssl[..],
            &["--kafka-security-protocol", "ssl", "--kafka-ca", &other_ca],
        ]
        .concat(),
        &[],
    );
    // Control: the SSL listener does not answer a plaintext client.
    let plaintext = doctor(&[&ssl[..], &["--timeout", "5"]].concat(), &[]);
    delete_topic(&bootstrap, &security, &topic).await;

    assert_rf1_named(&audited, &topic);
    assert_rf1_named(&from_env, &topic);

    assert_eq!(foreign_ca.status.code(), Some(2), "{}", text(&foreign_ca));
    let stderr = String::from_utf8_lossy(&foreign_ca.stderr);
    eprintln!("foreign CA: {stderr}");
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    assert!(stderr.contains("--kafka-ca"), "{stderr}");

    assert_eq!(plaintext.status.code(), Some(2), "{}", text(&plaintext));
    let stderr = String::from_utf8_lossy(&plaintext.stderr);
    eprintln!("plaintext against SSL: {stderr}");
    assert!(stderr.contains("could not be audited"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_audit_reads_the_cluster_and_a_wrong_password_exits_2_unshown() {
    let bootstrap = require!(var("RELIABLE_KAFKA_SASL_BOOTSTRAP"));
    let ca = require!(var("RELIABLE_TLS_CA"));
    let user = require!(var("RELIABLE_KAFKA_SASL_USER"));
    let password = require!(var("RELIABLE_KAFKA_SASL_PASSWORD"));
    let topic = unique_name("doctor-sasl-rf1");
    let security = KafkaSecurity::sasl_ssl(Scram::sha512(&user, &password)).ca_file(&ca);
    create_topic(&bootstrap, &security, &topic).await;

    let sasl = [
        "--kafka-bootstrap",
        &bootstrap,
        "--kafka-security-protocol",
        "sasl_ssl",
        "--kafka-ca",
        &ca,
        "--filter",
        &topic,
        "--json",
    ];
    let audited = doctor(
        &[&sasl[..], &["--kafka-sasl-user", &user]].concat(),
        &[("RELIABLE_KAFKA_SASL_PASSWORD", &password)],
    );
    // The user from its variable, the password from a file.
    let file = std::env::temp_dir().join(unique_name("doctor-sasl-password"));
    std::fs::write(&file, format!("{password}\n")).expect("password file");
    let path = file.to_string_lossy().into_owned();
    let from_file = doctor(
        &[&sasl[..], &["--kafka-sasl-password-file", &path]].concat(),
        &[("RELIABLE_KAFKA_SASL_USER", &user)],
    );
    let _ = std::fs::remove_file(&file);
    let wrong = format!("wrong-{password}");
    let refused = doctor(
        &[&sasl[..], &["--kafka-sasl-user", &user]].concat(),
        &[("RELIABLE_KAFKA_SASL_PASSWORD", &wrong)],
    );
    delete_topic(&bootstrap, &security, &topic).await;

    assert_rf1_named(&audited, &topic);
    assert_rf1_named(&from_file, &topic);

    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let shown = text(&refused);
    eprintln!("wrong password: {shown}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(shown.contains("credentials"), "{shown}");
    // (The test user is called `reliable`, like the binary, so its absence cannot be asserted
    // here; the SDK's redaction of user names has its own tests.)
    assert!(
        !shown.contains(&password) && !shown.contains(&wrong),
        "{shown}"
    );
}
