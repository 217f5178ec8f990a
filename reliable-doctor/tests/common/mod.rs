//! What the live tests share: the brokers (from `eval "$(scripts/brokers env)"`), a small
//! management API client to create and delete queues and policies, and Kafka topic helpers.

#![allow(dead_code)] // each test binary uses a part of it

use std::time::{Duration, Instant};

use base64::Engine as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use reliable_doctor::{Finding, Options};
use reliable_test_support::Missing;
use serde_json::{json, Value};

/// The variable `scripts/brokers env` sets for the management API.
pub const MANAGEMENT_URL_ENV: &str = "RELIABLE_AMQP_MANAGEMENT_URL";
/// The management API `scripts/brokers up` starts.
pub const DEFAULT_MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";

/// Under `CI`, every broker variable must be set (`scripts/test` evals `scripts/brokers env`):
/// a missing one fails the test rather than letting it fall back or skip.
pub fn require_env_in_ci(vars: &[&str]) {
    if std::env::var_os("CI").is_none() {
        return;
    }
    let missing: Vec<&str> = vars
        .iter()
        .copied()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "CI is set but {} missing: run `eval \"$(scripts/brokers env)\"` (scripts/test does)",
        missing.join(", ")
    );
}

/// The management API's URL: `RELIABLE_AMQP_MANAGEMENT_URL`, else the default when it
/// answers.
pub fn management_url() -> Result<String, Missing> {
    let url =
        std::env::var(MANAGEMENT_URL_ENV).unwrap_or_else(|_| DEFAULT_MANAGEMENT_URL.to_owned());
    let api = Api::new(&url);
    match api.call("GET", "api/overview", None) {
        Ok(_) => Ok(url),
        Err(why) => Err(Missing(format!(
            "no RabbitMQ management API at {}: {why} (scripts/brokers up enables it)",
            reliable_core::redact::redact_url(&url)
        ))),
    }
}

/// A minimal management API client for the tests' fixtures.
pub struct Api {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client for `http://user:password@host:port`.
    pub fn new(url: &str) -> Self {
        let parsed = url::Url::parse(url).expect("management URL parses");
        let auth = format!(
            "{}:{}",
            parsed.username(),
            parsed.password().unwrap_or_default()
        );
        let base = format!(
            "{}://{}:{}/",
            parsed.scheme(),
            parsed.host_str().unwrap_or("127.0.0.1"),
            parsed.port_or_known_default().unwrap_or(15672)
        );
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self {
            base,
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(auth)
            ),
            agent,
        }
    }

    /// Sends `method path` with an optional JSON body; an error for any status >= 400.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(), String> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("PUT", Some(body)) => self
                .agent
                .put(&url)
                .header("Authorization", &self.auth)
                .send_json(body),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            _ => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(format!("{method} {path}: HTTP {status}"));
        }
        Ok(())
    }

    /// Declares queue `name` in vhost `/` with `durable` and `arguments`.
    pub fn put_queue(&self, name: &str, durable: bool, arguments: Value) {
        let body = json!({"durable": durable, "auto_delete": false, "arguments": arguments});
        self.call("PUT", &format!("api/queues/%2f/{name}"), Some(body))
            .unwrap_or_else(|e| panic!("declaring queue {name}: {e}"));
    }

    /// Sets policy `name` in vhost `/` on queues matching `pattern`.
    pub fn put_policy(&self, name: &str, pattern: &str, definition: Value) {
        let body = json!({"pattern": pattern, "definition": definition,
                          "apply-to": "queues", "priority": 100});
        self.call("PUT", &format!("api/policies/%2f/{name}"), Some(body))
            .unwrap_or_else(|e| panic!("setting policy {name}: {e}"));
    }

    /// Deletes queue `name` of vhost `/` (errors ignored: cleanup).
    pub fn delete_queue(&self, name: &str) {
        let _ = self.call("DELETE", &format!("api/queues/%2f/{name}"), None);
    }

    /// Deletes policy `name` of vhost `/` (errors ignored: cleanup).
    pub fn delete_policy(&self, name: &str) {
        let _ = self.call("DELETE", &format!("api/policies/%2f/{name}"), None);
    }
}

/// An admin client for `bootstrap`.
pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client")
}

/// Creates one-partition topic `name` with replication factor `rf` and topic `configs`, and
/// waits until every replica is in sync (so no leaderless moment shows in the audit).
pub async fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    bootstrap: &str,
    name: &str,
    rf: i32,
    configs: &[(&str, &str)],
) {
    let mut topic = NewTopic::new(name, 1, TopicReplication::Fixed(rf));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let created = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap_or_else(|e| panic!("create_topics {name}: {e}"));
    for result in created {
        if let Err((topic, code)) = result {
            panic!("creating topic {topic}: {code}");
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let start = Instant::now();
    loop {
        let ready = consumer
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics().first().map(|t| {
                    t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.leader() >= 0 && p.isr().len() == p.replicas().len())
                })
            })
            .unwrap_or(false);
        if ready {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "topic {name} got no leader and full ISR within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes `topics` (errors ignored: cleanup).
pub async fn delete_topics(admin: &AdminClient<DefaultClientContext>, topics: &[&str]) {
    let _ = admin.delete_topics(topics, &AdminOptions::new()).await;
}

/// Options auditing only objects whose name starts with `prefix`.
pub fn options(prefix: &str) -> Options {
    Options {
        filter: Some(prefix.to_owned()),
        timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

/// The check ids found on exactly `object`.
pub fn checks_on<'a>(findings: &'a [Finding], object: &str) -> Vec<&'a str> {
    findings
        .iter()
        .filter(|f| f.object == object)
        .map(|f| f.check.as_str())
        .collect()
}
