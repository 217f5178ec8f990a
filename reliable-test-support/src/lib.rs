//! Hands tests a real broker, or says clearly why there is none.
//!
//! Where a broker comes from, in order:
//! 1. the environment: `RELIABLE_AMQP_URL`, `RELIABLE_KAFKA_BOOTSTRAP`;
//! 2. the defaults of `scripts/brokers up` (RabbitMQ on 127.0.0.1:5672, Kafka on
//!    127.0.0.1:19092-19094), when something answers there;
//! 3. with the `testcontainers` feature and a reachable Docker engine, a container started for
//!    this test process (one RabbitMQ, one single-broker Apache Kafka).
//!
//! When none answers: with `CI` set the test fails, saying how to start the brokers; locally
//! it prints why it skips and the test returns early. Use the [`require!`] macro for that.
//!
//! [`proxy::Proxy`] puts a TCP proxy the test controls between a client and a broker: it can
//! blackhole the link (a silent network), restore it, or reset every connection.
//!
//! ```no_run
//! # fn main() {
//! let url = reliable_test_support::require!(reliable_test_support::amqp_url());
//! # let _ = url;
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use reliable_core::redact::{host_and_path, redact_url};

#[cfg(feature = "testcontainers")]
mod containers;
pub mod links;
pub mod order;
pub mod proxy;

/// Environment variable naming the AMQP URL of the RabbitMQ broker the tests use.
pub const AMQP_URL_ENV: &str = "RELIABLE_AMQP_URL";
/// Environment variable naming the Kafka bootstrap servers the tests use.
pub const KAFKA_BOOTSTRAP_ENV: &str = "RELIABLE_KAFKA_BOOTSTRAP";
/// The AMQP URL of the RabbitMQ node that `scripts/brokers up` starts.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The bootstrap servers of the Kafka cluster that `scripts/brokers up` starts.
pub const DEFAULT_KAFKA_BOOTSTRAP: &str = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094";

const HOW_TO_START: &str = "start the project's brokers with `scripts/brokers up` and its \
     stores with `scripts/stores up` (or set RELIABLE_AMQP_URL / RELIABLE_KAFKA_BOOTSTRAP / \
     RELIABLE_REDIS_URL / RELIABLE_POSTGRES_URL)";

/// Environment variable naming the Redis URL of the store tests (`scripts/stores env`).
pub const REDIS_URL_ENV: &str = "RELIABLE_REDIS_URL";
/// Environment variable naming the PostgreSQL URL of the store tests (`scripts/stores env`).
pub const POSTGRES_URL_ENV: &str = "RELIABLE_POSTGRES_URL";

/// Why a test cannot have the broker it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub String);

/// Returns the value of `Ok`, or, for `Err(Missing)`: fails the test when `CI` is set, and
/// otherwise prints the reason and returns from the test.
#[macro_export]
macro_rules! require {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(missing) => {
                $crate::skip_or_fail(&missing);
                return;
            }
        }
    };
}

/// Fails (panics) when the `CI` environment variable is set; otherwise prints why the test is
/// skipped. Called by [`require!`].
pub fn skip_or_fail(missing: &Missing) {
    if std::env::var_os("CI").is_some() {
        panic!(
            "broker needed but missing in CI: {}; {HOW_TO_START}",
            missing.0
        );
    }
    eprintln!("SKIPPED: {}; {HOW_TO_START}", missing.0);
}

/// The AMQP URL of a reachable RabbitMQ broker.
pub fn amqp_url() -> Result<String, Missing> {
    let configured = std::env::var(AMQP_URL_ENV).ok();
    let url = configured
        .clone()
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
    match amqp_host_port(&url).and_then(|hp| reachable(&hp)) {
        Ok(()) => Ok(url),
        Err(why) => {
            #[cfg(feature = "testcontainers")]
            if configured.is_none() {
                if let Some(url) = containers::rabbitmq_url() {
                    return Ok(url);
                }
            }
            Err(Missing(format!(
                "no RabbitMQ at {}: {why}",
                redact_url(&url)
            )))
        }
    }
}

/// A reachable Kafka cluster.
#[derive(Debug, Clone)]
pub struct KafkaCluster {
    /// Bootstrap servers, comma separated.
    pub bootstrap: String,
    /// The ids of the brokers the cluster's metadata lists.
    pub brokers: Vec<i32>,
}

impl KafkaCluster {
    /// Creates topic `name` with one partition, replication factor 3 and
    /// `min.insync.replicas` 2, and returns the admin client (for deleting it afterwards).
    /// Panics, failing the test, when the topic cannot be created.
    pub async fn create_replicated_topic(&self, name: &str) -> AdminClient<DefaultClientContext> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap_or_else(|e| panic!("admin client for {}: {e}", self.bootstrap));
        let topic =
            NewTopic::new(name, 1, TopicReplication::Fixed(3)).set("min.insync.replicas", "2");
        let created = admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .unwrap_or_else(|e| panic!("create_topics request for {name}: {e}"));
        for result in created {
            if let Err((topic, code)) = result {
                panic!("creating topic {topic}: {code}");
            }
        }
        admin
    }
}

/// Creates topic `name` with one partition and replication factor 1 through a client made
/// from `config` (its `bootstrap.servers` and security settings), for one-broker clusters such
/// as the TLS broker of `scripts/tls-brokers`. Panics, failing the test, when it cannot.
pub async fn create_single_replica_topic(config: &ClientConfig, name: &str) {
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .unwrap_or_else(|e| panic!("admin client: {e}"));
    let created = admin
        .create_topics(
            [&NewTopic::new(name, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap_or_else(|e| panic!("create_topics request for {name}: {e}"));
    for result in created {
        if let Err((topic, code)) = result {
            panic!("creating topic {topic}: {code}");
        }
    }
}

/// A reachable Kafka cluster with at least `min_brokers` brokers registered.
pub fn kafka(min_brokers: usize) -> Result<KafkaCluster, Missing> {
    let configured = std::env::var(KAFKA_BOOTSTRAP_ENV).ok();
    let bootstrap = configured
        .clone()
        .unwrap_or_else(|| DEFAULT_KAFKA_BOOTSTRAP.to_owned());
    let found = kafka_brokers(&bootstrap);
    #[cfg(feature = "testcontainers")]
    if found.is_err() && configured.is_none() {
        if let Some(bootstrap) = containers::kafka_bootstrap() {
            return check_count(bootstrap.clone(), kafka_brokers(&bootstrap), min_brokers);
        }
    }
    let _ = configured;
    check_count(bootstrap, found, min_brokers)
}

fn check_count(
    bootstrap: String,
    found: Result<Vec<i32>, String>,
    min_brokers: usize,
) -> Result<KafkaCluster, Missing> {
    match found {
        Ok(brokers) if brokers.len() >= min_brokers => Ok(KafkaCluster { bootstrap, brokers }),
        Ok(brokers) => Err(Missing(format!(
            "Kafka at {bootstrap} has {} broker(s), this test needs {min_brokers} \
             (scripts/brokers up starts 3)",
            brokers.len()
        ))),
        Err(why) => Err(Missing(format!("no Kafka at {bootstrap}: {why}"))),
    }
}

fn kafka_brokers(bootstrap: &str) -> Result<Vec<i32>, String> {
    let first = bootstrap.split(',').next().unwrap_or_default();
    reachable(first)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    let meta = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(meta.brokers().iter().map(|b| b.id()).collect())
}

/// The socket address of an AMQP URL's host and port (5672 when the URL names none): the
/// upstream of a [`proxy::Proxy`] in front of that broker.
pub fn amqp_socket_addr(url: &str) -> Result<SocketAddr, Missing> {
    let host_port =
        amqp_host_port(url).map_err(|why| Missing(format!("{}: {why}", redact_url(url))))?;
    host_port
        .to_socket_addrs()
        .map_err(|e| Missing(format!("cannot resolve {host_port}: {e}")))?
        .next()
        .ok_or_else(|| Missing(format!("{host_port} has no address")))
}

fn amqp_host_port(url: &str) -> Result<String, String> {
    let (host_port, _) =
        host_and_path(url).ok_or_else(|| "not an amqp://host:port URL".to_owned())?;
    if host_port.contains(':') {
        Ok(host_port.to_owned())
    } else {
        Ok(format!("{host_port}:5672"))
    }
}

fn reachable(host_port: &str) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host_port}: {e}"))?
        .collect();
    let mut last = format!("{host_port} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// The URL of a reachable Redis: `RELIABLE_REDIS_URL`, else the server `scripts/stores up`
/// started (127.0.0.1:16379, password from `.stores/password`).
pub fn redis_url() -> Result<String, Missing> {
    store_url(REDIS_URL_ENV, |pw| {
        format!("redis://default:{pw}@127.0.0.1:16379/0")
    })
}

/// The URL of a reachable PostgreSQL: `RELIABLE_POSTGRES_URL`, else the cluster
/// `scripts/stores up` started (127.0.0.1:15432, database and user `reliable`).
pub fn postgres_url() -> Result<String, Missing> {
    store_url(POSTGRES_URL_ENV, |pw| {
        format!("postgres://reliable:{pw}@127.0.0.1:15432/reliable")
    })
}

/// The `host:port` of a `scheme://[user[:password]@]host:port/..` URL; `None` when it has
/// none, or when it cannot be told from the credentials (see [`host_and_path`]).
pub fn host_port(url: &str) -> Option<String> {
    host_and_path(url).map(|(host_port, _)| host_port.to_owned())
}

fn store_url(env: &str, default: impl Fn(&str) -> String) -> Result<String, Missing> {
    let url = match std::env::var(env) {
        Ok(url) => url,
        Err(_) => {
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stores/password");
            match std::fs::read_to_string(&file) {
                Ok(pw) => default(pw.trim()),
                Err(e) => {
                    return Err(Missing(format!(
                        "{env} is not set and {} cannot be read ({e})",
                        file.display()
                    )))
                }
            }
        }
    };
    let host_port = host_port(&url)
        .ok_or_else(|| Missing(format!("{env} is not a URL: {}", redact_url(&url))))?;
    reachable(&host_port)
        .map(|()| url.clone())
        .map_err(|why| Missing(format!("nothing answers at {}: {why}", redact_url(&url))))
}

/// A name unique to this test run, for queues and topics: `prefix-<pid>-<nanos>`.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_and_keeps_the_rest() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }

    #[test]
    fn urls_with_passwords_holding_delimiters_show_neither_part() {
        let mut leaks = Vec::new();
        let url = "postgres://app:pa/ss@127.0.0.1:1/shop";
        if redact_url(url).contains("pa/ss") {
            leaks.push(format!("{url} -> {}", redact_url(url)));
        }
        // Neither `Xq7` (before the delimiter) nor `Zk9` (after it) may show.
        for password in [
            "Xq7/Zk9", "Xq7?Zk9", "Xq7#Zk9", "Xq7@Zk9", "Xq7:Zk9", "Xq7%Zk9",
        ] {
            for scheme in ["amqp", "amqps", "redis", "rediss", "postgres", "postgresql"] {
                let url = format!("{scheme}://app:{password}@127.0.0.1:1/x");
                let shown = redact_url(&url);
                if shown.contains("Xq7") || shown.contains("Zk9") {
                    leaks.push(format!("redact {url} -> {shown}"));
                }
                let host = host_port(&url);
                if host.as_deref() != Some("127.0.0.1:1") {
                    leaks.push(format!("host_port {url} -> {host:?}"));
                }
                let host = amqp_host_port(&url);
                if host.as_deref() != Ok("127.0.0.1:1") {
                    leaks.push(format!("amqp_host_port {url} -> {host:?}"));
                }
            }
        }
        assert!(leaks.is_empty(), "{}", leaks.join("\n"));
    }

    #[test]
    fn amqp_host_port_defaults_the_port() {
        assert_eq!(amqp_host_port("amqp://u:p@h/%2f").unwrap(), "h:5672");
        assert_eq!(amqp_host_port("amqp://h:1234").unwrap(), "h:1234");
        assert!(amqp_host_port("h:1234").is_err());
    }

    #[test]
    fn a_closed_port_is_reported_missing() {
        // Port 1 on loopback: nothing listens there.
        assert!(reachable("127.0.0.1:1").is_err());
    }
}
