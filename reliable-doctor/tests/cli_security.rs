//! The binary's Kafka TLS and SASL options without a broker: contradictions and a missing
//! password are usage errors (exit 2); there is no password argument; a build without the
//! `tls` feature says to rebuild with it.

use std::process::{Command, Output};

/// Runs `reliable doctor ARGS` with none of the doctor's Kafka variables inherited.
fn doctor(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reliable"));
    command.arg("doctor").args(args);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("RELIABLE_KAFKA_") || name.starts_with("RELIABLE_AMQP") {
            command.env_remove(name);
        }
    }
    command.output().expect("the reliable binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn contradictions_and_a_missing_password_are_usage_errors() {
    // Port 1 on loopback: nothing listens there, and nothing is reached anyway.
    let ca_without_tls = doctor(&["--kafka-bootstrap", "127.0.0.1:1", "--kafka-ca", "/ca.pem"]);
    assert_eq!(ca_without_tls.status.code(), Some(2), "{ca_without_tls:?}");
    assert!(
        stderr(&ca_without_tls).contains("--kafka-security-protocol ssl or sasl_ssl"),
        "{}",
        stderr(&ca_without_tls)
    );

    let no_password = doctor(&[
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-security-protocol",
        "sasl_ssl",
        "--kafka-sasl-user",
        "app",
    ]);
    assert_eq!(no_password.status.code(), Some(2), "{no_password:?}");
    assert!(
        stderr(&no_password).contains("RELIABLE_KAFKA_SASL_PASSWORD"),
        "{}",
        stderr(&no_password)
    );

    // A password is never an argument (arguments show in `ps`).
    let argument = doctor(&[
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-sasl-password",
        "pw-in-ps",
    ]);
    assert_eq!(argument.status.code(), Some(2), "{argument:?}");

    let cert_without_key = doctor(&[
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-security-protocol",
        "ssl",
        "--kafka-client-cert",
        "/c.pem",
    ]);
    assert_eq!(cert_without_key.status.code(), Some(2));
    assert!(
        stderr(&cert_without_key).contains("--kafka-client-key"),
        "{}",
        stderr(&cert_without_key)
    );
}

#[cfg(not(feature = "tls"))]
#[test]
fn tls_without_the_feature_says_to_rebuild() {
    let output = doctor(&[
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-security-protocol",
        "ssl",
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("--features tls"),
        "{}",
        stderr(&output)
    );
}

#[cfg(feature = "tls")]
#[test]
fn a_missing_ca_file_is_named() {
    let output = doctor(&[
        "--kafka-bootstrap",
        "127.0.0.1:1",
        "--kafka-security-protocol",
        "ssl",
        "--kafka-ca",
        "/nonexistent/doctor-ca.pem",
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = stderr(&output);
    assert!(
        text.contains("ssl.ca.location") && text.contains("/nonexistent/doctor-ca.pem"),
        "{text}"
    );
}
