//! The RabbitMQ checks: what the management API says about each queue, turned into findings.
//! Pure functions, so the rules are tested without a broker.
//!
//! A queue's effective setting is its queue argument (`x-...`), else the definition of the
//! policy the broker applied to it (the queue's `policy` field), else its operator policy's.
//! Sources for the dead-lettering rules: RabbitMQ's dead letter guide (at-most-once by
//! default; a missing exchange drops) and the at-least-once dead-lettering post
//! (<https://www.rabbitmq.com/blog/2022/03/29/at-least-once-dead-lettering>: quorum queues
//! only; `dead-letter-strategy: at-least-once` needs `overflow: reject-publish`, otherwise the
//! queue falls back to at-most-once).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Broker, Finding, Severity};

/// A queue as `GET /api/queues?disable_stats=true` lists it (the fields the checks read).
#[derive(Debug, Clone, Deserialize)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Its virtual host.
    pub vhost: String,
    /// Whether it survives a broker restart.
    #[serde(default)]
    pub durable: bool,
    /// Whether it is deleted when its last consumer goes.
    #[serde(default)]
    pub auto_delete: bool,
    /// Whether it is deleted when its declaring connection closes.
    #[serde(default)]
    pub exclusive: bool,
    /// `classic`, `quorum` or `stream`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The queue arguments (`x-...`).
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// The name of the policy applied to it.
    #[serde(default)]
    pub policy: Option<String>,
    /// The name of the operator policy applied to it.
    #[serde(default)]
    pub operator_policy: Option<String>,
}

/// A policy or operator policy as `GET /api/policies` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyInfo {
    /// Its name.
    pub name: String,
    /// Its virtual host.
    pub vhost: String,
    /// Its keys (`dead-letter-exchange`, `delivery-limit`, ...).
    #[serde(default)]
    pub definition: Map<String, Value>,
}

/// What the checks need to know about the node.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// The major version of RabbitMQ (3, 4, ...), from `/api/overview`; `None` when unknown.
    pub major_version: Option<u32>,
}

/// One queue with the policies that apply to it.
struct Effective<'a> {
    queue: &'a QueueInfo,
    policy: Option<&'a PolicyInfo>,
    operator: Option<&'a PolicyInfo>,
}

impl Effective<'_> {
    /// The effective value of queue argument `argument` / policy key `key`.
    fn setting(&self, argument: &str, key: &str) -> Option<&Value> {
        self.queue
            .arguments
            .get(argument)
            .or_else(|| self.policy.and_then(|p| p.definition.get(key)))
            .or_else(|| self.operator.and_then(|p| p.definition.get(key)))
    }

    /// [`Effective::setting`] as a string, lower-cased.
    fn text(&self, argument: &str, key: &str) -> Option<String> {
        self.setting(argument, key)
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    }
}

/// The object name of a queue in findings: its name in the default vhost `/`, otherwise
/// `vhost/name`.
pub fn object_name(queue: &QueueInfo) -> String {
    if queue.vhost == "/" {
        queue.name.clone()
    } else {
        format!("{}/{}", queue.vhost, queue.name)
    }
}

/// Every finding for `queues`, given the node's `policies` and `operator_policies`.
pub fn check_queues(
    queues: &[QueueInfo],
    policies: &[PolicyInfo],
    operator_policies: &[PolicyInfo],
    node: &NodeInfo,
) -> Vec<Finding> {
    let find = |list: &'_ [PolicyInfo], vhost: &str, name: Option<&str>| -> Option<usize> {
        let name = name?;
        list.iter().position(|p| p.vhost == vhost && p.name == name)
    };
    let mut findings = Vec::new();
    for queue in queues {
        let effective = Effective {
            queue,
            policy: find(policies, &queue.vhost, queue.policy.as_deref()).map(|i| &policies[i]),
            operator: find(
                operator_policies,
                &queue.vhost,
                queue.operator_policy.as_deref(),
            )
            .map(|i| &operator_policies[i]),
        };
        check_queue(&effective, node, &mut findings);
    }
    findings
}

fn check_queue(q: &Effective<'_>, node: &NodeInfo, out: &mut Vec<Finding>) {
    let queue = q.queue;
    let object = object_name(queue);
    let finding = |check: &str, severity, meaning: String, action: &str| {
        Finding::new(
            Broker::Rabbitmq,
            object.clone(),
            check,
            severity,
            meaning,
            action,
        )
    };
    let kind = queue.kind.as_deref().unwrap_or("classic");
    let temporary = queue.exclusive || queue.auto_delete;
    if !queue.durable && temporary {
        // A reply or scratch queue: it is meant to go away with its consumer.
        out.push(finding(
            "amqp-queue-transient",
            Severity::Info,
            "a non-durable exclusive or auto-delete queue: its messages go when its consumer \
             or connection does"
                .into(),
            "fine for replies and scratch work; declare a durable quorum queue for anything \
             that must not be lost",
        ));
        return;
    }
    if !queue.durable {
        out.push(finding(
            "amqp-queue-not-durable",
            Severity::Unsafe,
            "a non-durable queue is deleted, with every message in it, when the node restarts"
                .into(),
            "declare it again as a durable quorum queue (QueueSpec::quorum) and move the \
             consumers over",
        ));
    }
    if queue.durable && queue.auto_delete {
        out.push(finding(
            "amqp-queue-auto-delete",
            Severity::Unsafe,
            "a durable auto-delete queue is deleted, with its messages, when its last consumer \
             cancels"
                .into(),
            "declare it again without auto-delete",
        ));
    }
    if queue.durable && queue.exclusive {
        out.push(finding(
            "amqp-queue-exclusive",
            Severity::Unsafe,
            "an exclusive queue is deleted, with its messages, when its declaring connection \
             closes"
                .into(),
            "declare it again without exclusive",
        ));
    }
    if kind == "stream" {
        // Streams are replicated logs: no dead-lettering, no delivery limit, consumers keep
        // their own offsets. The checks below do not apply.
        return;
    }
    if kind != "quorum" {
        out.push(finding(
            "amqp-queue-not-quorum",
            Severity::Warning,
            format!(
                "a {kind} queue keeps its messages on one node and can dead-letter only at \
                 most once"
            ),
            "use a quorum queue (x-queue-type: quorum) for messages that must not be lost",
        ));
    }
    // Both checks depend on it: computed once from the argument or the policy.
    let has_dlx = q
        .setting("x-dead-letter-exchange", "dead-letter-exchange")
        .is_some();
    check_dead_lettering(q, kind, has_dlx, node, &finding, out);
    check_limits(q, kind, has_dlx, node, &finding, out);
}

type MakeFinding<'a> = dyn Fn(&str, Severity, String, &str) -> Finding + 'a;

fn check_dead_lettering(
    q: &Effective<'_>,
    kind: &str,
    has_dlx: bool,
    node: &NodeInfo,
    finding: &MakeFinding<'_>,
    out: &mut Vec<Finding>,
) {
    if !has_dlx {
        // A quorum queue drops a message past its delivery limit when it has no dead-letter
        // exchange; RabbitMQ 4.x sets a limit of 20 when none is declared.
        let limited = kind == "quorum"
            && (q.setting("x-delivery-limit", "delivery-limit").is_some()
                || node.major_version.is_some_and(|v| v >= 4));
        let (severity, why) = if limited {
            (
                Severity::Unsafe,
                "rejected messages and those past the delivery limit are dropped",
            )
        } else {
            (Severity::Warning, "rejected messages are dropped")
        };
        out.push(finding(
            "amqp-queue-no-dead-letter",
            severity,
            format!("no dead-letter exchange (argument or policy): {why}"),
            "give it x-dead-letter-exchange (QueueSpec::with_dead_letter) with a bound durable \
             dead-letter queue",
        ));
        return;
    }
    if kind != "quorum" {
        out.push(finding(
            "amqp-dead-letter-at-most-once",
            Severity::Warning,
            format!(
                "a {kind} queue dead-letters at most once: a message is lost when the \
                 dead-letter queue cannot take it"
            ),
            "use a quorum queue with x-dead-letter-strategy at-least-once and x-overflow \
             reject-publish",
        ));
        return;
    }
    let strategy = q
        .text("x-dead-letter-strategy", "dead-letter-strategy")
        .unwrap_or_else(|| "at-most-once".into());
    let overflow = q
        .text("x-overflow", "overflow")
        .unwrap_or_else(|| "drop-head".into());
    if strategy != "at-least-once" {
        out.push(finding(
            "amqp-dead-letter-at-most-once",
            Severity::Unsafe,
            format!(
                "dead-lettering is {strategy} (the default): a message is lost when the \
                 dead-letter queue cannot take it"
            ),
            "set x-dead-letter-strategy at-least-once with x-overflow reject-publish (needs \
             a new queue, or a policy)",
        ));
    } else if overflow != "reject-publish" {
        out.push(finding(
            "amqp-dead-letter-at-most-once",
            Severity::Unsafe,
            format!(
                "at-least-once dead-lettering needs x-overflow reject-publish; with {overflow} \
                 RabbitMQ falls back to at-most-once"
            ),
            "set x-overflow reject-publish (needs a new queue, or a policy)",
        ));
    }
}

fn check_limits(
    q: &Effective<'_>,
    kind: &str,
    has_dlx: bool,
    node: &NodeInfo,
    finding: &MakeFinding<'_>,
    out: &mut Vec<Finding>,
) {
    if kind == "quorum" {
        match q
            .setting("x-delivery-limit", "delivery-limit")
            .and_then(Value::as_i64)
        {
            None => out.push(finding(
                "amqp-quorum-no-delivery-limit",
                Severity::Warning,
                match node.major_version {
                    Some(v) if v >= 4 => "no explicit delivery limit: RabbitMQ 4.x applies 20, \
                        which a short outage with requeues can exhaust"
                        .into(),
                    _ => "no delivery limit: a poison message that crashes its consumer is \
                          redelivered forever"
                        .into(),
                },
                "declare x-delivery-limit explicitly (the SDK uses 1000) with a dead-letter \
                 exchange",
            )),
            Some(limit) if limit < 0 && node.major_version.is_none_or(|v| v < 4) => {
                out.push(finding(
                    "amqp-quorum-no-delivery-limit",
                    Severity::Unsafe,
                    format!(
                        "x-delivery-limit {limit}: RabbitMQ 3.x compares it as a number, so \
                         the first requeue exceeds it and the message is dead-lettered or \
                         dropped"
                    ),
                    "declare a positive x-delivery-limit (the SDK uses 1000)",
                ));
            }
            Some(_) => {}
        }
    }
    let max_length = q
        .setting("x-max-length", "max-length")
        .or_else(|| q.setting("x-max-length-bytes", "max-length-bytes"));
    let overflow = q
        .text("x-overflow", "overflow")
        .unwrap_or_else(|| "drop-head".into());
    if max_length.is_some() && overflow == "drop-head" {
        out.push(finding(
            "amqp-queue-overflow-drops",
            Severity::Unsafe,
            "a length limit with overflow drop-head: a full queue silently drops (or \
             dead-letters at most once) its oldest messages, after they were confirmed"
                .into(),
            "set x-overflow reject-publish, so that publishers get a nack and resend",
        ));
    }
    if q.setting("x-message-ttl", "message-ttl").is_some() {
        let (severity, meaning) = if has_dlx {
            (
                Severity::Info,
                "a message TTL: expired messages are dead-lettered",
            )
        } else {
            (
                Severity::Unsafe,
                "a message TTL and no dead-letter exchange: expired messages are dropped",
            )
        };
        out.push(finding(
            "amqp-queue-message-ttl",
            severity,
            meaning.into(),
            "remove the TTL, or dead-letter expired messages to a durable queue",
        ));
    }
    if q.setting("x-expires", "expires").is_some() {
        out.push(finding(
            "amqp-queue-expires",
            Severity::Unsafe,
            "a queue TTL (x-expires): the queue and its messages are deleted after it goes \
             unused for that long"
                .into(),
            "remove x-expires (and the expires policy key) from queues that hold work",
        ));
    }
}
