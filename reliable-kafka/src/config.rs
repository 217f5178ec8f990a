//! Safe client settings (loss-matrix rows L5 and L7; invariant 7): the presets, and the
//! validation that completes a user's [`ClientConfig`] and refuses any setting that loses data.
//!
//! | client | setting | enforced value | why |
//! |---|---|---|---|
//! | producer | `enable.idempotence` | `true` | librdkafka's internal retries reorder and duplicate without it |
//! | producer | `acks` (`request.required.acks`) | `all` / `-1` | the leader confirms before followers have the data |
//! | producer | `retries` (`message.send.max.retries`) | `2147483647` | librdkafka gives up on transient errors after the count |
//! | producer | `max.in.flight.requests.per.connection` | `1..=5` | above 5 the idempotent producer cannot keep order |
//! | producer | `message.timeout.ms` (`delivery.timeout.ms`) | `1..=confirm timeout` (default: see below) | `0` keeps messages forever; above the core's confirm timeout the core resends copies librdkafka still holds |
//! | both | `allow.auto.create.topics` | `false` | a missing topic is created with the broker's defaults (often RF 1), bypassing the topic check |
//! | consumer | `enable.auto.commit` | `false` | offsets are committed before the handler has finished |
//! | consumer | `enable.auto.offset.store` | `false` | offsets are stored for messages still in an in-memory buffer |
//! | consumer | `auto.offset.reset` | `earliest` unless set (`latest` refused) | a new group skips everything produced before it joined |
//!
//! The consumer preset also sets `fetch.queue.backoff.ms` to 10 (librdkafka's 1000 ms idles a
//! consumer that empties its local queue quickly); that one is about throughput and may be
//! changed freely.
//!
//! `message.timeout.ms` is how long librdkafka owns a message (retrying it in order, without
//! duplicates) before it reports it failed. [`harden_producer_config`] and [`producer_preset`]
//! size it from a per-attempt confirm timeout (nine tenths of it); the
//! [`KafkaTransport`](crate::KafkaTransport) builder sizes it from the delivery deadline in
//! [`SendOrder::Preserved`](reliable_core::producer::SendOrder::Preserved) (see the
//! [`producer`](crate::producer) module docs, "Order").
//!
//! A missing setting is filled in with the safe value; a weaker one is an
//! [`UnsafeConfigError`] naming each setting, its value and how it loses data. The explicit
//! opt-out is [`Safety::accept_data_loss_for`], logged at `warn` level every time it is used.
//!
//! ```
//! use std::time::Duration;
//! use reliable_kafka::config::{harden_producer_config, Safety};
//! use reliable_kafka::rdkafka::ClientConfig;
//!
//! let mut config = ClientConfig::new();
//! config.set("bootstrap.servers", "127.0.0.1:9092").set("acks", "1");
//! let err = harden_producer_config(&mut config, Duration::from_secs(5), &Safety::strict())
//!     .unwrap_err();
//! assert_eq!(err.violations[0].setting, "acks");
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use reliable_core::redact::{is_secret_key, redact_url, Scrubber, MASK};

/// The largest retry count librdkafka accepts; the preset's "unbounded".
pub const UNBOUNDED_RETRIES: i64 = 2_147_483_647;

/// The largest `message.timeout.ms` librdkafka accepts (about 24.8 days).
const MAX_MESSAGE_TIMEOUT_MS: u128 = 2_147_483_647;

/// Which unsafe settings the caller knowingly accepts. [`Safety::strict`] (the default)
/// accepts none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Safety {
    accepted: BTreeSet<String>,
}

impl Safety {
    /// Refuse every unsafe setting.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Lets `setting` (its canonical name, e.g. `"acks"` or `"enable.auto.commit"`) keep a value
    /// that can lose messages. Each use is logged at `warn` level; prefer fixing the setting.
    pub fn accept_data_loss_for(mut self, setting: impl Into<String>) -> Self {
        self.accepted.insert(setting.into());
        self
    }

    fn accepts(&self, setting: &str) -> bool {
        self.accepted.contains(setting)
    }
}

/// One setting whose value loses (or risks) data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The canonical setting name.
    pub setting: &'static str,
    /// The value found (as configured, possibly under an alias).
    pub value: String,
    /// What the SDK requires instead.
    pub required: &'static str,
    /// How the value loses data.
    pub why: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` = `{}` (required: {}): {}",
            self.setting, self.value, self.required, self.why
        )
    }
}

/// A client configuration weakens the safe preset. Fix every listed setting (or, knowing the
/// cost, accept it with [`Safety::accept_data_loss_for`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsafe Kafka {client} settings: {}; fix them or opt out explicitly with Safety::accept_data_loss_for", join(violations))]
pub struct UnsafeConfigError {
    /// `"producer"` or `"consumer"`.
    pub client: &'static str,
    /// Every unsafe setting found.
    pub violations: Vec<Violation>,
}

fn join(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One rule: canonical name, aliases, the safe default and the check.
struct Rule {
    setting: &'static str,
    aliases: &'static [&'static str],
    required: &'static str,
    why: &'static str,
    is_safe: fn(&str, &Limits) -> bool,
    default: fn(&Limits) -> String,
}

/// Values rules depend on.
struct Limits {
    /// The core's confirm timeout: `message.timeout.ms` may not exceed it.
    confirm_timeout_ms: u128,
    /// `message.timeout.ms` when the config does not set it.
    message_timeout_ms: u128,
}

fn bool_is(v: &str, want: bool) -> bool {
    v.trim()
        .eq_ignore_ascii_case(if want { "true" } else { "false" })
}

fn int(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

/// Shared by producer and consumer: neither may create a topic behind the topic check.
const NO_TOPIC_AUTO_CREATION: Rule = Rule {
    setting: "allow.auto.create.topics",
    aliases: &[],
    required: "false",
    why: "a produce to, or a metadata request for, a missing topic creates it with the broker's defaults (often replication factor 1, min.insync.replicas 1), bypassing the topic safety check",
    is_safe: |v, _| bool_is(v, false),
    default: |_| "false".into(),
};

const PRODUCER_RULES: &[Rule] = &[
    Rule {
        setting: "enable.idempotence",
        aliases: &[],
        required: "true",
        why: "without idempotence librdkafka's own retries can duplicate and reorder messages, and a retried batch can be lost behind a failed one",
        is_safe: |v, _| bool_is(v, true),
        default: |_| "true".into(),
    },
    Rule {
        setting: "acks",
        aliases: &["request.required.acks"],
        required: "all (or -1)",
        why: "the leader confirms before the followers have the data; a leader crash then loses confirmed messages",
        is_safe: |v, _| matches!(v.trim(), "all" | "-1"),
        default: |_| "all".into(),
    },
    Rule {
        setting: "retries",
        aliases: &["message.send.max.retries"],
        required: "2147483647 (unbounded)",
        why: "librdkafka gives up on transient broker errors (leader election, network) after this many retries",
        is_safe: |v, _| int(v).is_some_and(|n| n >= UNBOUNDED_RETRIES),
        default: |_| UNBOUNDED_RETRIES.to_string(),
    },
    Rule {
        setting: "max.in.flight.requests.per.connection",
        aliases: &["max.in.flight"],
        required: "1 to 5",
        why: "the idempotent producer keeps order and exactly-once per partition only up to 5 requests in flight",
        is_safe: |v, _| int(v).is_some_and(|n| (1..=5).contains(&n)),
        default: |_| "5".into(),
    },
    Rule {
        setting: "message.timeout.ms",
        aliases: &["delivery.timeout.ms"],
        required: "1 to the core's confirm timeout",
        why: "0 keeps a message queued forever, and a timeout longer than the core's confirm timeout makes the core resend copies librdkafka still holds (duplicates, unbounded queue)",
        is_safe: |v, l| int(v).is_some_and(|n| n >= 1 && (n as u128) <= l.confirm_timeout_ms),
        default: |l| l.message_timeout_ms.to_string(),
    },
    NO_TOPIC_AUTO_CREATION,
];

const CONSUMER_RULES: &[Rule] = &[
    NO_TOPIC_AUTO_CREATION,
    Rule {
        setting: "enable.auto.commit",
        aliases: &[],
        required: "false",
        why: "offsets are committed on a timer, before the handler has finished; a crash then skips those messages",
        is_safe: |v, _| bool_is(v, false),
        default: |_| "false".into(),
    },
    Rule {
        setting: "enable.auto.offset.store",
        aliases: &[],
        required: "false",
        why: "librdkafka stores the offset of every message it hands out, including those still in an in-memory buffer; a commit then skips them after a crash",
        is_safe: |v, _| bool_is(v, false),
        default: |_| "false".into(),
    },
    Rule {
        setting: "auto.offset.reset",
        aliases: &[],
        required: "earliest (or error)",
        why: "a new consumer group (or one whose offsets expired) starts at the end and never sees the messages produced before it joined",
        is_safe: |v, _| matches!(v.trim(), "earliest" | "smallest" | "beginning" | "error"),
        default: |_| "earliest".into(),
    },
];

fn harden(
    client: &'static str,
    rules: &[Rule],
    config: &mut ClientConfig,
    limits: &Limits,
    safety: &Safety,
) -> Result<(), UnsafeConfigError> {
    let mut violations = Vec::new();
    for rule in rules {
        let names = std::iter::once(rule.setting).chain(rule.aliases.iter().copied());
        let mut found = false;
        for name in names {
            let Some(value) = config.get(name) else {
                continue;
            };
            found = true;
            if (rule.is_safe)(value, limits) {
                continue;
            }
            if safety.accepts(rule.setting) {
                tracing::warn!(
                    setting = rule.setting,
                    value,
                    why = rule.why,
                    "unsafe Kafka {client} setting accepted by explicit opt-out; messages can be lost"
                );
                continue;
            }
            violations.push(Violation {
                setting: rule.setting,
                value: value.to_owned(),
                required: rule.required,
                why: rule.why,
            });
        }
        if !found {
            config.set(rule.setting, (rule.default)(limits));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(UnsafeConfigError { client, violations })
    }
}

/// Completes `config` with the safe producer settings and refuses any that are weaker (see the
/// module docs). `confirm_timeout` is the core producer's
/// [`confirm_timeout`](reliable_core::producer::ProducerConfig::confirm_timeout): librdkafka's
/// `message.timeout.ms` is kept at or below it.
pub fn harden_producer_config(
    config: &mut ClientConfig,
    confirm_timeout: Duration,
    safety: &Safety,
) -> Result<(), UnsafeConfigError> {
    // Slightly below the core's timeout, so librdkafka reports the timeout itself and no stale
    // copy is left in its queue when the core resends.
    let message_timeout = confirm_timeout / 10 * 9;
    harden_producer_config_sized(config, message_timeout, confirm_timeout, safety)
}

/// [`harden_producer_config`] with `message.timeout.ms` defaulting to `message_timeout`
/// (clamped to what librdkafka accepts) and allowed up to `confirm_timeout`.
pub(crate) fn harden_producer_config_sized(
    config: &mut ClientConfig,
    message_timeout: Duration,
    confirm_timeout: Duration,
    safety: &Safety,
) -> Result<(), UnsafeConfigError> {
    let limits = Limits {
        confirm_timeout_ms: confirm_timeout.as_millis().max(1),
        message_timeout_ms: message_timeout.as_millis().clamp(1, MAX_MESSAGE_TIMEOUT_MS),
    };
    harden("producer", PRODUCER_RULES, config, &limits, safety)
}

/// Completes `config` with the safe consumer settings and refuses any that are weaker (see the
/// module docs).
pub fn harden_consumer_config(
    config: &mut ClientConfig,
    safety: &Safety,
) -> Result<(), UnsafeConfigError> {
    let limits = Limits {
        confirm_timeout_ms: 0,
        message_timeout_ms: 0,
    };
    harden("consumer", CONSUMER_RULES, config, &limits, safety)
}

/// The safe producer preset for `bootstrap_servers` (see the module docs for every value).
pub fn producer_preset(bootstrap_servers: &str, confirm_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap_servers);
    // An empty config with the defaults filled in cannot violate anything.
    let _ = harden_producer_config(&mut config, confirm_timeout, &Safety::strict());
    config
}

/// How long librdkafka waits before fetching a partition again once its local queue was
/// full, in the consumer preset. Its default (1000 ms) idles a consumer that drains the queue
/// faster than that: the pipeline takes batches, so it usually does.
pub const CONSUMER_FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// The safe consumer preset for `bootstrap_servers` and consumer group `group_id`, with
/// `fetch.queue.backoff.ms` at [`CONSUMER_FETCH_QUEUE_BACKOFF_MS`] (a throughput setting,
/// not a safety one: set it again to change it).
pub fn consumer_preset(bootstrap_servers: &str, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group_id)
        .set("fetch.queue.backoff.ms", CONSUMER_FETCH_QUEUE_BACKOFF_MS);
    let _ = harden_consumer_config(&mut config, &Safety::strict());
    config
}

/// How often librdkafka reports its statistics when the config does not say: the freshness of
/// the consumer's lag ([`KafkaConsumer::lag`](crate::KafkaConsumer::lag)) and of the
/// producer's connection state ([`Transport::connected`](reliable_core::Transport::connected)).
pub(crate) const STATISTICS_INTERVAL_MS: &str = "1000";

/// Sets `statistics.interval.ms` to [`STATISTICS_INTERVAL_MS`] unless `config` sets it.
pub(crate) fn enable_statistics(config: &mut ClientConfig) {
    if config.get("statistics.interval.ms").is_none() {
        config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    }
}

/// Debug view of a [`ClientConfig`] with every secret masked (invariant 8): the values of
/// secret settings (rdkafka's own `Debug` masks only a fixed list, not `ssl.key.pem` or
/// `sasl.oauthbearer.config`), and credentials inside other values (a bootstrap list written
/// `sasl_ssl://user:password@host:9092`).
pub(crate) struct RedactedConfig<'a>(pub(crate) &'a ClientConfig);

impl fmt::Debug for RedactedConfig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.0.config_map() {
            if is_secret_key(name) {
                map.entry(&name, &MASK);
            } else {
                map.entry(&name, &redact_url(value));
            }
        }
        map.finish()
    }
}

/// `text` with every secret of `config` replaced by `***`, for errors and logs that quote
/// client messages (invariant 8): the values of secret settings, and credentials inside other
/// values.
pub(crate) fn redact(config: &ClientConfig, text: impl Into<String>) -> String {
    let mut scrubber = Scrubber::default();
    // `config_map` masks librdkafka's known secrets; read the real values to find them.
    for name in config.config_map().into_keys() {
        match config.get(name) {
            Some(value) if is_secret_key(name) => scrubber.add(value),
            Some(value) => scrubber.add_secrets_of(value),
            None => {}
        }
    }
    scrubber.scrub(&text.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_is_complete_and_safe() {
        let c = producer_preset("b:1", Duration::from_secs(10));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("retries"), Some("2147483647"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("5"));
        assert_eq!(c.get("message.timeout.ms"), Some("9000"));
        assert_eq!(c.get("allow.auto.create.topics"), Some("false"));
        let c = consumer_preset("b:1", "g");
        assert_eq!(c.get("allow.auto.create.topics"), Some("false"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
    }

    #[test]
    fn every_weakening_is_named_including_aliases() {
        let mut c = ClientConfig::new();
        c.set("request.required.acks", "1")
            .set("message.send.max.retries", "3")
            .set("enable.idempotence", "false")
            .set("max.in.flight", "10")
            .set("message.timeout.ms", "0");
        let err =
            harden_producer_config(&mut c, Duration::from_secs(5), &Safety::strict()).unwrap_err();
        let named: Vec<_> = err.violations.iter().map(|v| v.setting).collect();
        assert_eq!(
            named,
            [
                "enable.idempotence",
                "acks",
                "retries",
                "max.in.flight.requests.per.connection",
                "message.timeout.ms"
            ]
        );
        assert!(err.to_string().contains("`acks` = `1`"));
    }

    #[test]
    fn topic_auto_creation_is_refused_for_both_clients() {
        for harden in [
            |c: &mut ClientConfig| {
                harden_producer_config(c, Duration::from_secs(5), &Safety::strict())
            },
            |c: &mut ClientConfig| harden_consumer_config(c, &Safety::strict()),
        ] {
            let mut c = ClientConfig::new();
            c.set("allow.auto.create.topics", "true");
            let err = harden(&mut c).unwrap_err();
            let named: Vec<_> = err.violations.iter().map(|v| v.setting).collect();
            assert_eq!(named, ["allow.auto.create.topics"]);
        }
    }

    #[test]
    fn secret_settings_are_masked_including_passphrases_and_usernames() {
        for name in [
            "sasl.password",
            "sasl.username",
            "ssl.key.password",
            "ssl.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
        ] {
            assert!(is_secret_key(name), "{name} is not masked");
        }
        assert!(!is_secret_key("bootstrap.servers"));
    }

    #[test]
    fn timeout_above_confirm_timeout_is_refused_and_opt_out_works() {
        let mut c = ClientConfig::new();
        c.set("message.timeout.ms", "300000");
        assert!(harden_producer_config(&mut c, Duration::from_secs(5), &Safety::strict()).is_err());
        let safety = Safety::strict().accept_data_loss_for("message.timeout.ms");
        assert!(harden_producer_config(&mut c, Duration::from_secs(5), &safety).is_ok());
    }

    #[test]
    fn consumer_auto_commit_and_latest_are_refused() {
        let mut c = ClientConfig::new();
        c.set("enable.auto.commit", "true")
            .set("auto.offset.reset", "latest");
        let err = harden_consumer_config(&mut c, &Safety::strict()).unwrap_err();
        let named: Vec<_> = err.violations.iter().map(|v| v.setting).collect();
        assert_eq!(named, ["enable.auto.commit", "auto.offset.reset"]);
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = ClientConfig::new();
        c.set("sasl.password", "hunter2");
        c.set("ssl.key.pem", "PEMDATA");
        assert_eq!(redact(&c, "bad login hunter2"), "bad login ***");
        let debug = format!("{:?}", RedactedConfig(&c));
        assert!(
            !debug.contains("hunter2") && !debug.contains("PEMDATA"),
            "{debug}"
        );
    }

    #[test]
    fn passwords_holding_delimiters_and_bootstrap_credentials_are_redacted() {
        let mut leaks = Vec::new();
        // Neither `Xq7` (before the delimiter) nor `Zk9` (after it) may show.
        for password in [
            "Xq7/Zk9", "Xq7?Zk9", "Xq7#Zk9", "Xq7@Zk9", "Xq7:Zk9", "Xq7%Zk9",
        ] {
            let mut c = ClientConfig::new();
            c.set("sasl.password", password).set(
                "bootstrap.servers",
                format!("sasl_ssl://app:{password}@b1:9092,b2:9092"),
            );
            let debug = format!("{:?}", RedactedConfig(&c));
            let login = redact(&c, format!("login with {password} refused"));
            let broker = redact(
                &c,
                format!("sasl_ssl://app:{password}@b1:9092/bootstrap: down"),
            );
            for text in [debug, login, broker] {
                if text.contains("Xq7") || text.contains("Zk9") {
                    leaks.push(format!("{password} -> {text}"));
                }
            }
        }
        assert!(leaks.is_empty(), "{}", leaks.join("\n"));
    }
}
