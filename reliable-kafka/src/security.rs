//! TLS and SASL/SCRAM for the Kafka clients: typed settings ([`KafkaSecurity`]) and the typed
//! errors ([`SecurityError`]) a bad CA, a wrong password or a build without TLS surface as.
//!
//! TLS needs librdkafka built with OpenSSL: the `ssl` feature of this crate (`tls` of the
//! `reliable` facade). SCRAM needs nothing more (librdkafka implements it over OpenSSL; the
//! cyrus-sasl `sasl` feature is only for GSSAPI/Kerberos).
//!
//! ```
//! use reliable_kafka::security::{KafkaSecurity, Scram};
//! use reliable_kafka::KafkaTransport;
//!
//! let security = KafkaSecurity::sasl_ssl(Scram::sha512("orders-app", "s3cret"))
//!     .ca_file("/etc/kafka/ca.pem");
//! let builder = KafkaTransport::builder("kafka-1:9093").security(&security);
//! assert!(!format!("{security:?} {builder:?}").contains("s3cret"));
//! ```
//!
//! Before it builds a client from a configuration whose `security.protocol` is not
//! `plaintext`, the transport and consumer builders (and [`ensure_topic`](crate::ensure_topic))
//! make one metadata request and turn librdkafka's TLS and authentication failures into
//! [`SecurityError`] at once, instead of the timeout the request would otherwise end in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use rdkafka::ClientConfig;
use reliable_core::redact::MASK;

use crate::config::redact;

/// How the client talks to the brokers: TLS, with or without a SASL/SCRAM login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecurityProtocol {
    /// TLS (`security.protocol=SSL`).
    Ssl,
    /// SASL over TLS (`security.protocol=SASL_SSL`).
    SaslSsl,
}

/// The SCRAM hash (`sasl.mechanisms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramMechanism {
    /// `SCRAM-SHA-256`.
    Sha256,
    /// `SCRAM-SHA-512`.
    Sha512,
}

impl ScramMechanism {
    /// The `sasl.mechanisms` value.
    pub fn name(self) -> &'static str {
        match self {
            ScramMechanism::Sha256 => "SCRAM-SHA-256",
            ScramMechanism::Sha512 => "SCRAM-SHA-512",
        }
    }
}

/// A SASL/SCRAM login. `Debug` shows the mechanism only: the user name and the password are
/// secrets (`sasl.username` is treated as one throughout the crate).
#[derive(Clone, PartialEq, Eq)]
pub struct Scram {
    mechanism: ScramMechanism,
    username: String,
    password: String,
}

impl Scram {
    /// A `SCRAM-SHA-512` login.
    pub fn sha512(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(ScramMechanism::Sha512, username, password)
    }

    /// A `SCRAM-SHA-256` login.
    pub fn sha256(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(ScramMechanism::Sha256, username, password)
    }

    /// A login with `mechanism`.
    pub fn new(
        mechanism: ScramMechanism,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            mechanism,
            username: username.into(),
            password: password.into(),
        }
    }

    /// The SCRAM hash.
    pub fn mechanism(&self) -> ScramMechanism {
        self.mechanism
    }
}

impl fmt::Debug for Scram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scram")
            .field("mechanism", &self.mechanism)
            .field("username", &MASK)
            .field("password", &MASK)
            .finish()
    }
}

/// TLS and login settings for a Kafka client, applied to its [`ClientConfig`] by
/// [`KafkaTransportBuilder::security`](crate::KafkaTransportBuilder::security),
/// [`KafkaConsumerBuilder::security`](crate::KafkaConsumerBuilder::security) or
/// [`apply`](Self::apply). Without [`ca_file`](Self::ca_file) the system's CA store is used.
/// `Debug` never shows the user name or password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSecurity {
    protocol: SecurityProtocol,
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    sasl: Option<Scram>,
}

impl KafkaSecurity {
    /// TLS without a login (`security.protocol=SSL`).
    pub fn ssl() -> Self {
        Self {
            protocol: SecurityProtocol::Ssl,
            ca_file: None,
            client_cert: None,
            sasl: None,
        }
    }

    /// A SCRAM login over TLS (`security.protocol=SASL_SSL`).
    pub fn sasl_ssl(scram: Scram) -> Self {
        Self {
            protocol: SecurityProtocol::SaslSsl,
            sasl: Some(scram),
            ..Self::ssl()
        }
    }

    /// Trusts the CA certificate(s) in the PEM file at `path` (`ssl.ca.location`) instead of
    /// the system's CA store.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents a client certificate (mutual TLS): PEM files of the certificate
    /// (`ssl.certificate.location`) and of its unencrypted private key (`ssl.key.location`).
    pub fn client_cert(mut self, certificate: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((certificate.into(), key.into()));
        self
    }

    /// The protocol.
    pub fn protocol(&self) -> SecurityProtocol {
        self.protocol
    }

    /// Sets `security.protocol`, the `ssl.*` locations and the `sasl.*` login on `config`.
    pub fn apply(&self, config: &mut ClientConfig) {
        let protocol = match self.protocol {
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some(ca) = &self.ca_file {
            config.set("ssl.ca.location", ca.to_string_lossy());
        }
        if let Some((cert, key)) = &self.client_cert {
            config.set("ssl.certificate.location", cert.to_string_lossy());
            config.set("ssl.key.location", key.to_string_lossy());
        }
        if let Some(scram) = &self.sasl {
            config
                .set("sasl.mechanisms", scram.mechanism.name())
                .set("sasl.username", &scram.username)
                .set("sasl.password", &scram.password);
        }
    }
}

/// Why a secured Kafka client could not talk to the cluster. The texts name what to check and
/// never hold a password, user name or key (librdkafka's messages are redacted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// The TLS handshake failed: most often the brokers' certificates are not signed by the CA
    /// the client trusts.
    #[error(
        "TLS handshake with the Kafka brokers failed ({reason}); check that the CA file \
         (`ssl.ca.location`, KafkaSecurity::ca_file) holds the CA that signed the brokers' \
         certificates, that the bootstrap host names are in those certificates, and that the \
         addresses are TLS listeners"
    )]
    Tls {
        /// What librdkafka reported (redacted).
        reason: String,
    },
    /// The brokers refused the SASL login.
    #[error(
        "Kafka authentication failed ({reason}); check the credentials: the SASL mechanism, \
         user name and password (KafkaSecurity / `sasl.mechanisms`, `sasl.username`, \
         `sasl.password`) and that the user exists on the cluster"
    )]
    Authentication {
        /// What librdkafka reported (redacted).
        reason: String,
    },
    /// A certificate or key file named in the configuration cannot be read.
    #[error(
        "cannot read the `{setting}` file `{path}` ({reason}); check the path and its permissions"
    )]
    File {
        /// The setting, e.g. `ssl.ca.location`.
        setting: &'static str,
        /// The path as configured.
        path: String,
        /// The operating system's answer.
        reason: String,
    },
    /// librdkafka was built without TLS, so `SSL` / `SASL_SSL` cannot work.
    #[error(
        "`security.protocol` is `{protocol}` but librdkafka was built without TLS; enable the \
         `ssl` feature of reliable-kafka (the `tls` feature of reliable), which needs the \
         OpenSSL headers (Debian: libssl-dev) to build"
    )]
    NotBuilt {
        /// The configured protocol.
        protocol: String,
    },
}

/// Whether `config` asks for TLS or SASL (any `security.protocol` but `plaintext`).
pub(crate) fn is_secured(config: &ClientConfig) -> bool {
    config
        .get("security.protocol")
        .is_some_and(|p| !p.eq_ignore_ascii_case("plaintext"))
}

/// The file settings checked before a client is built.
const FILE_SETTINGS: [&str; 3] = [
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
];

/// Checks that the certificate and key files `config` names can be read.
pub(crate) fn check_files(config: &ClientConfig) -> Result<(), SecurityError> {
    for setting in FILE_SETTINGS {
        let Some(path) = config.get(setting) else {
            continue;
        };
        // `probe` lets librdkafka read the system store itself.
        if setting == "ssl.ca.location" && path == "probe" {
            continue;
        }
        if let Err(e) = std::fs::File::open(Path::new(path)) {
            return Err(SecurityError::File {
                setting,
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

/// The [`SecurityError`] behind a client creation failure, if it is one.
fn from_create_error(config: &ClientConfig, error: &KafkaError) -> Option<SecurityError> {
    let text = error.to_string();
    if text.contains("not available at build time") || text.contains("not supported by this build")
    {
        return Some(SecurityError::NotBuilt {
            protocol: config.get("security.protocol").unwrap_or("?").to_owned(),
        });
    }
    text.contains("ssl.").then(|| SecurityError::Tls {
        reason: redact(config, text),
    })
}

/// Records the first TLS or authentication failure librdkafka reports.
#[derive(Default)]
struct ProbeContext {
    failure: Mutex<Option<(bool, String)>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let auth = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                true
            }
            Some(RDKafkaErrorCode::SSL) => false,
            _ => return,
        };
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert_with(|| (auth, reason.to_owned()));
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// How long [`probe`] waits for the cluster at most.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One metadata request with the connection settings of `config` (those `ensure_topic` keeps),
/// turning a TLS or login failure into a [`SecurityError`].
/// A cluster that cannot be reached at all is not this check's business: it returns `Ok` after
/// [`PROBE_TIMEOUT`] and leaves the error to the caller's own requests. Nothing for a
/// `plaintext` configuration.
pub(crate) async fn probe(config: &ClientConfig) -> Result<(), SecurityError> {
    let connection = crate::topic::admin_config(config);
    if !is_secured(&connection) {
        return Ok(());
    }
    check_files(&connection)?;
    let redact_with = config.clone();
    let outcome = tokio::task::spawn_blocking(move || -> Result<(), SecurityError> {
        let producer: BaseProducer<ProbeContext> =
            match connection.create_with_context(ProbeContext::default()) {
                Ok(producer) => producer,
                Err(e) => {
                    // Any other refusal is the real client's to report, with its own words.
                    return from_create_error(&connection, &e).map_or(Ok(()), Err);
                }
            };
        let deadline = Instant::now() + PROBE_TIMEOUT;
        while Instant::now() < deadline {
            let fetched = producer
                .client()
                .fetch_metadata(None, Duration::from_millis(500));
            producer.poll(Duration::from_millis(50));
            let failure = producer
                .context()
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match failure {
                Some((true, reason)) => return Err(SecurityError::Authentication { reason }),
                Some((false, reason)) => return Err(SecurityError::Tls { reason }),
                None if fetched.is_ok() => return Ok(()),
                None => {}
            }
        }
        tracing::warn!("no Kafka broker answered a metadata request within {PROBE_TIMEOUT:?}");
        Ok(())
    })
    .await
    .unwrap_or(Ok(()));
    outcome.map_err(|e| match e {
        SecurityError::Tls { reason } => SecurityError::Tls {
            reason: redact(&redact_with, reason),
        },
        SecurityError::Authentication { reason } => SecurityError::Authentication {
            reason: redact(&redact_with, reason),
        },
        other => other,
    })
}

/// Checks that a client with the connection settings of `config` (`bootstrap.servers`,
/// `security.*`, `ssl.*`, `sasl.*`, `socket.*`) gets past the TLS handshake and the login: the
/// same check the builders make before they build a client, for code that builds its own
/// rdkafka clients (after [`KafkaSecurity::apply`]). It first checks that the certificate and
/// key files can be read, then makes one metadata request. Call it inside a Tokio runtime: the
/// request runs on a blocking thread.
///
/// Returns the TLS or login failure as a [`SecurityError`] (texts redacted). A `plaintext`
/// configuration is `Ok` at once, and so is a cluster that does not answer within 10 seconds:
/// the caller's own requests report that, with their own timeout.
///
/// ```no_run
/// use reliable_kafka::rdkafka::ClientConfig;
/// use reliable_kafka::security::{check_connection, KafkaSecurity};
///
/// # async fn run() -> Result<(), reliable_kafka::SecurityError> {
/// let mut config = ClientConfig::new();
/// config.set("bootstrap.servers", "kafka-1:9093");
/// KafkaSecurity::ssl().ca_file("/etc/kafka/ca.pem").apply(&mut config);
/// check_connection(&config).await?;
/// # Ok(())
/// # }
/// ```
pub async fn check_connection(config: &ClientConfig) -> Result<(), SecurityError> {
    probe(config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_sets_every_setting_and_debug_hides_the_login() {
        let security = KafkaSecurity::sasl_ssl(Scram::sha512("app-user", "pw-9f8e"))
            .ca_file("/ca.pem")
            .client_cert("/c.pem", "/k.pem");
        let mut config = ClientConfig::new();
        security.apply(&mut config);
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(config.get("ssl.certificate.location"), Some("/c.pem"));
        assert_eq!(config.get("ssl.key.location"), Some("/k.pem"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("app-user"));
        assert_eq!(config.get("sasl.password"), Some("pw-9f8e"));
        let shown = format!("{security:?}");
        assert!(
            !shown.contains("pw-9f8e") && !shown.contains("app-user"),
            "{shown}"
        );
    }

    #[cfg(not(feature = "ssl"))]
    #[tokio::test]
    async fn tls_without_the_feature_is_named() {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1");
        KafkaSecurity::sasl_ssl(Scram::sha512("u", "pw-1a2b")).apply(&mut config);
        let err = probe(&config).await.unwrap_err();
        assert!(matches!(err, SecurityError::NotBuilt { .. }), "{err:?}");
        assert!(err.to_string().contains("`ssl` feature"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let mut config = ClientConfig::new();
        KafkaSecurity::ssl()
            .ca_file("/nonexistent/ca.pem")
            .apply(&mut config);
        let err = check_files(&config).unwrap_err();
        assert!(matches!(
            err,
            SecurityError::File {
                setting: "ssl.ca.location",
                ..
            }
        ));
        assert!(err.to_string().contains("/nonexistent/ca.pem"));
    }
}
