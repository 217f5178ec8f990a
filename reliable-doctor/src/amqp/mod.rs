//! RabbitMQ: the queues, policies and version come from the management HTTP API (AMQP alone
//! cannot list queues); the AMQP URL, when given, is checked for reachability.
//!
//! The HTTP client is `ureq` (blocking, rustls, no default features): the doctor makes three
//! GET requests per run, so a small synchronous client on a blocking thread is all it needs.

pub mod checks;

use std::time::Duration;

use base64::Engine as _;
use lapin::{Connection, ConnectionProperties};
use percent_encoding::percent_decode_str;
use reliable_core::redact::{redact_url, Scrubber};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Broker, DoctorError, Finding, Options, Report, Severity};
use checks::{NodeInfo, PolicyInfo, QueueInfo};

/// Runs the RabbitMQ part of the audit into `report`.
pub(crate) async fn audit(options: &Options, report: &mut Report) -> Result<(), DoctorError> {
    if let Some(url) = &options.amqp_url {
        check_reachable(url, options.timeout).await?;
    }
    let Some(management_url) = options.management_url.clone() else {
        let object = options
            .amqp_url
            .as_deref()
            .map(redact_url)
            .unwrap_or_default();
        report.findings.push(Finding::new(
            Broker::Rabbitmq,
            object,
            "amqp-queues-not-listed",
            Severity::Info,
            "the node is reachable, but AMQP cannot list queues, so no queue was audited",
            "give --management-url http://user:password@host:15672 (rabbitmq_management plugin)",
        ));
        return Ok(());
    };
    let timeout = options.timeout;
    let state = tokio::task::spawn_blocking(move || {
        let api = Management::new(&management_url, timeout)?;
        api.read_state()
    })
    .await
    .map_err(|e| DoctorError::Worker(e.to_string()))??;
    let queues: Vec<QueueInfo> = state
        .queues
        .into_iter()
        .filter(|q| options.selects(&q.name))
        .collect();
    report.audited.queues += queues.len();
    report.findings.extend(checks::check_queues(
        &queues,
        &state.policies,
        &state.operator_policies,
        &state.node,
    ));
    Ok(())
}

/// Opens an AMQP connection to `url` and closes it again, within `timeout`.
pub async fn check_reachable(url: &str, timeout: Duration) -> Result<(), DoctorError> {
    let mut scrubber = Scrubber::default();
    scrubber.add_secrets_of(url);
    let unreachable = |reason: String| DoctorError::AmqpUnreachable {
        url: redact_url(url),
        reason: scrubber.scrub(&reason),
    };
    let connection = tokio::time::timeout(
        timeout,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
    .map_err(|e| unreachable(e.to_string()))?;
    // A failed close changes nothing about reachability; the connection is dropped anyway.
    let _ = connection.close(200, "reliable doctor done".into()).await;
    Ok(())
}

/// What the management API says about the node.
#[derive(Debug, Default)]
pub struct ManagementState {
    /// Every queue of every vhost the user may see.
    pub queues: Vec<QueueInfo>,
    /// Every policy.
    pub policies: Vec<PolicyInfo>,
    /// Every operator policy (empty when the user may not read them).
    pub operator_policies: Vec<PolicyInfo>,
    /// The node's version.
    pub node: NodeInfo,
}

/// A client of the RabbitMQ management HTTP API.
pub struct Management {
    /// The API root without credentials, ending in `/`.
    base: url::Url,
    /// The `Authorization` header value, when the URL holds a user.
    authorization: Option<String>,
    agent: ureq::Agent,
    /// The URL as shown in errors (credentials masked).
    shown: String,
    scrubber: Scrubber,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Overview {
    #[serde(default)]
    rabbitmq_version: Option<String>,
}

impl Management {
    /// A client for the API at `url` (`http[s]://user:password@host:port[/prefix]`), each
    /// request bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, DoctorError> {
        let shown = redact_url(url);
        let mut base = url::Url::parse(url).map_err(|e| DoctorError::InvalidUrl {
            what: "--management-url",
            url: shown.clone(),
            reason: e.to_string(),
            example: "http://guest:guest@127.0.0.1:15672",
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(DoctorError::InvalidUrl {
                what: "--management-url",
                url: shown,
                reason: format!("scheme {} is not http or https", base.scheme()),
                example: "http://guest:guest@127.0.0.1:15672",
            });
        }
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let authorization = (!base.username().is_empty()).then(|| {
            let user = decode(base.username());
            let password = decode(base.password().unwrap_or_default());
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        // The credentials travel in the header only; the URL keeps none.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        base.set_fragment(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut scrubber = Scrubber::default();
        scrubber.add_secrets_of(url);
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .new_agent();
        Ok(Self {
            base,
            authorization,
            agent,
            shown,
            scrubber,
        })
    }

    /// Reads the queues, the policies, the operator policies and the node's version.
    pub fn read_state(&self) -> Result<ManagementState, DoctorError> {
        let overview: Overview = self.get("api/overview")?;
        // disable_stats: the queue records themselves, without waiting for the statistics
        // database (whose `policy` field lags behind by one emission interval).
        let queues = self.get("api/queues?disable_stats=true")?;
        let policies = self.get("api/policies")?;
        // Only administrators and policy makers may read operator policies; without them the
        // audit reads queue arguments and user policies.
        let operator_policies = self.get("api/operator-policies").unwrap_or_default();
        let major_version = overview
            .rabbitmq_version
            .as_deref()
            .and_then(|v| v.split('.').next())
            .and_then(|major| major.parse().ok());
        Ok(ManagementState {
            queues,
            policies,
            operator_policies,
            node: NodeInfo { major_version },
        })
    }

    /// GETs `path` (relative to the API root) and parses its JSON body.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DoctorError> {
        let failed = |reason: String| DoctorError::Management {
            url: self.shown.clone(),
            path: path.to_owned(),
            reason: self.scrubber.scrub(&reason),
        };
        let url = self.base.join(path).map_err(|e| failed(e.to_string()))?;
        let mut request = self.agent.get(url.as_str());
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let mut response = request.call().map_err(|e| match e {
            ureq::Error::StatusCode(401) => {
                failed("401 Unauthorized: wrong user or password".into())
            }
            other => failed(other.to_string()),
        })?;
        response
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_json()
            .map_err(|e| failed(format!("unreadable answer: {e}")))
    }
}

#[cfg(test)]
mod tests;
