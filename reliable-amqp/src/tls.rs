//! TLS for `amqps://` URLs (feature `tls`: lapin's rustls backend).
//!
//! An `amqps://` URL alone trusts the system's CA store. [`TlsConfig`] adds a CA of your own
//! (a private CA that signed the brokers' certificates) and, for mutual TLS, a client
//! certificate; give it to [`AmqpSettings::with_tls`](crate::AmqpSettings::with_tls):
//!
//! ```no_run
//! use reliable_amqp::tls::TlsConfig;
//! use reliable_amqp::{AmqpPublisher, AmqpSettings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = AmqpSettings::safe().with_tls(TlsConfig::ca_file("/etc/rabbitmq/ca.pem")?);
//! let publisher = AmqpPublisher::connect("amqps://app:secret@rabbit:5671/orders", settings).await?;
//! # let _ = publisher; Ok(()) }
//! ```
//!
//! What is refused before any connection: an `amqps://` URL in a build without the `tls`
//! feature ([`AmqpError::TlsNotBuilt`]: lapin would otherwise talk plain AMQP to it), and TLS
//! settings with an `amqp://` URL ([`AmqpError::TlsWithoutAmqps`]: the connection would not be
//! encrypted). A handshake the broker's certificate fails (an unknown CA, a host name not in
//! the certificate) is [`AmqpError::Tls`], at once and without retries.

use std::fmt;
use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPScheme;
use reliable_core::redact::MASK;

use crate::connect::SecretUrl;
use crate::error::AmqpError;

/// Extra TLS settings for `amqps://` connections: a CA to trust besides the system's, and a
/// client certificate. `Debug` names the files, never the key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    ca_file: Option<PathBuf>,
    ca_pem: Option<String>,
    client: Option<ClientIdentity>,
}

#[derive(Clone, PartialEq, Eq)]
struct ClientIdentity {
    certificate_file: PathBuf,
    certificate_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// A certificate or key file that cannot be used. Names the file, never its content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot use the TLS {what} file `{path}`: {reason}; check the path, its permissions and that it holds PEM")]
pub struct TlsFileError {
    /// `CA`, `client certificate` or `client key`.
    pub what: &'static str,
    /// The path as given.
    pub path: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// Reads `path` and checks that it holds a PEM block whose label contains `label`.
fn read_pem(what: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, TlsFileError> {
    let error = |reason: String| TlsFileError {
        what,
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label));
    if !found {
        return Err(error(format!("no PEM `{label}` block in it")));
    }
    Ok(bytes)
}

impl TlsConfig {
    /// Trusts the CA certificate(s) in the PEM file at `path`, besides the system's CA store.
    /// The file is read here: a missing or non-PEM file is a [`TlsFileError`] now, not a
    /// failed handshake later.
    pub fn ca_file(path: impl Into<PathBuf>) -> Result<Self, TlsFileError> {
        let path = path.into();
        let pem = read_pem("CA", &path, "CERTIFICATE")?;
        Ok(Self {
            ca_pem: Some(String::from_utf8_lossy(&pem).into_owned()),
            ca_file: Some(path),
            client: None,
        })
    }

    /// Presents a client certificate (mutual TLS): PEM files of the certificate (chain) and of
    /// its unencrypted PKCS#8 private key. Both are read here.
    pub fn with_client_cert(
        mut self,
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Self, TlsFileError> {
        let certificate_file = certificate.into();
        let certificate_pem = read_pem("client certificate", &certificate_file, "CERTIFICATE")?;
        let key_pem = read_pem("client key", &key.into(), "PRIVATE KEY")?;
        self.client = Some(ClientIdentity {
            certificate_file,
            certificate_pem,
            key_pem,
        });
        Ok(self)
    }

    /// The CA file given to [`ca_file`](Self::ca_file), if any.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// What lapin connects with.
    pub(crate) fn to_lapin(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.client.as_ref().map(|c| OwnedIdentity::PKCS8 {
                pem: c.certificate_pem.clone(),
                key: c.key_pem.clone(),
            }),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("TlsConfig");
        s.field("ca_file", &self.ca_file);
        if let Some(client) = &self.client {
            s.field("client_certificate", &client.certificate_file)
                .field("client_key", &MASK);
        }
        s.finish()
    }
}

/// Refuses `url` when its scheme and the TLS settings disagree (see the module docs).
pub(crate) fn check_scheme(url: &SecretUrl, tls: Option<&TlsConfig>) -> Result<(), AmqpError> {
    match url.scheme() {
        AMQPScheme::AMQPS if !cfg!(feature = "tls") => Err(AmqpError::TlsNotBuilt),
        AMQPScheme::AMQP if tls.is_some() => Err(AmqpError::TlsWithoutAmqps {
            target: url.target().to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The TLS failure inside a connect error (a certificate the client does not trust, a
/// refused client certificate), as rustls words it; `None` for any other error.
pub(crate) fn tls_failure(error: &lapin::Error) -> Option<String> {
    #[cfg(feature = "tls")]
    if let lapin::ErrorKind::IOError(io) = error.kind() {
        return io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string);
    }
    let _ = error;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let err = TlsConfig::ca_file("/nonexistent/ca.pem").unwrap_err();
        assert_eq!(err.what, "CA");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let not_pem = std::env::temp_dir().join(format!("reliable-tls-{}.txt", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        let err = TlsConfig::ca_file(&not_pem).unwrap_err();
        assert!(err.reason.contains("no PEM"), "{err}");
        let _ = std::fs::remove_file(not_pem);
    }

    #[test]
    fn plain_urls_with_tls_settings_are_refused() {
        let url = SecretUrl::parse("amqp://u:topsecret@rabbit:5672/v").unwrap();
        let tls = TlsConfig::default();
        let err = check_scheme(&url, Some(&tls)).unwrap_err();
        assert!(matches!(err, AmqpError::TlsWithoutAmqps { .. }));
        assert!(!err.to_string().contains("topsecret"));
        assert!(check_scheme(&url, None).is_ok());
        let tls_url = SecretUrl::parse("amqps://u:topsecret@rabbit:5671/v").unwrap();
        assert_eq!(check_scheme(&tls_url, None).is_ok(), cfg!(feature = "tls"));
    }
}
