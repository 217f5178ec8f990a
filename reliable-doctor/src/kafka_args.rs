//! The Kafka TLS and SASL options of `reliable doctor`, turned into the SDK's
//! [`KafkaSecurity`]. The SASL password is never a command-line argument (arguments show in
//! `ps`): it comes from [`PASSWORD_ENV`] or from a file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use reliable_kafka::security::{KafkaSecurity, Scram, ScramMechanism};

/// The variable the SASL password is read from.
pub(crate) const PASSWORD_ENV: &str = "RELIABLE_KAFKA_SASL_PASSWORD";

/// `security.protocol`: the protocols the SDK's `KafkaSecurity` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Protocol {
    /// No TLS, no login
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS
    #[value(name = "ssl")]
    Ssl,
    /// A SASL/SCRAM login over TLS
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

/// `sasl.mechanisms`: the SCRAM hashes the SDK's `Scram` logs in with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mechanism {
    /// SCRAM with SHA-512
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    /// SCRAM with SHA-256
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
}

/// How the doctor's Kafka clients reach a secured cluster.
#[derive(Args, Debug)]
#[cfg_attr(feature = "tls", command(next_help_heading = "Kafka TLS and SASL"))]
#[cfg_attr(
    not(feature = "tls"),
    command(
        next_help_heading = "Kafka TLS and SASL (not in this build: rebuild with --features tls)"
    )
)]
pub(crate) struct KafkaSecurityArgs {
    /// The Kafka listeners' protocol: plaintext, ssl (TLS) or sasl_ssl (a SASL/SCRAM login
    /// over TLS)
    #[arg(
        long = "kafka-security-protocol",
        env = "RELIABLE_KAFKA_SECURITY_PROTOCOL",
        value_name = "PROTOCOL",
        value_enum,
        ignore_case = true,
        default_value = "plaintext"
    )]
    protocol: Protocol,
    /// PEM file of the CA(s) that signed the brokers' certificates (default: the system's CA
    /// store)
    #[arg(long = "kafka-ca", env = "RELIABLE_KAFKA_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// PEM file of a client certificate, for brokers that require mutual TLS (with
    /// --kafka-client-key)
    #[arg(
        long = "kafka-client-cert",
        env = "RELIABLE_KAFKA_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's unencrypted private key
    #[arg(
        long = "kafka-client-key",
        env = "RELIABLE_KAFKA_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// The SASL mechanism of sasl_ssl
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "RELIABLE_KAFKA_SASL_MECHANISM",
        value_name = "MECHANISM",
        value_enum,
        ignore_case = true,
        default_value = "SCRAM-SHA-512"
    )]
    mechanism: Mechanism,
    /// The SASL user of sasl_ssl
    #[arg(
        long = "kafka-sasl-user",
        env = "RELIABLE_KAFKA_SASL_USER",
        hide_env_values = true,
        value_name = "USER"
    )]
    user: Option<String>,
    /// A file holding the SASL password of sasl_ssl (a trailing newline is ignored). The other
    /// way to give it is the variable RELIABLE_KAFKA_SASL_PASSWORD; there is no password
    /// argument, since arguments show in `ps`
    #[arg(
        long = "kafka-sasl-password-file",
        env = "RELIABLE_KAFKA_SASL_PASSWORD_FILE",
        value_name = "FILE"
    )]
    password_file: Option<PathBuf>,
}

impl KafkaSecurityArgs {
    /// The security the options ask for (`None`: plaintext), with `password_env` the value of
    /// [`PASSWORD_ENV`]. The SASL options count only with `sasl_ssl` (the variables may be set
    /// for other tools). The error is a usage message that holds no secret.
    pub(crate) fn resolve(
        &self,
        password_env: Option<String>,
    ) -> Result<Option<KafkaSecurity>, String> {
        let mut security = match self.protocol {
            Protocol::Plaintext => {
                if self.ca.is_some() || self.client_cert.is_some() {
                    return Err(
                        "--kafka-ca and --kafka-client-cert/--kafka-client-key need \
                                --kafka-security-protocol ssl or sasl_ssl (plaintext uses no \
                                TLS)"
                            .into(),
                    );
                }
                return Ok(None);
            }
            Protocol::Ssl => KafkaSecurity::ssl(),
            Protocol::SaslSsl => KafkaSecurity::sasl_ssl(self.scram(password_env)?),
        };
        if let Some(ca) = &self.ca {
            security = security.ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            security = security.client_cert(cert, key);
        }
        Ok(Some(security))
    }

    /// The SASL login of `sasl_ssl`.
    fn scram(&self, password_env: Option<String>) -> Result<Scram, String> {
        let user = self.user.as_deref().filter(|u| !u.is_empty()).ok_or(
            "--kafka-security-protocol sasl_ssl needs --kafka-sasl-user (or the variable \
                    RELIABLE_KAFKA_SASL_USER)",
        )?;
        let password_env = password_env.filter(|p| !p.is_empty());
        let password = match (&self.password_file, password_env) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "the SASL password is given twice, in {PASSWORD_ENV} and in \
                     --kafka-sasl-password-file; keep one"
                ))
            }
            (None, Some(password)) => password,
            (Some(path), None) => read_password(path)?,
            (None, None) => {
                return Err(format!(
                    "--kafka-security-protocol sasl_ssl needs the SASL password in the variable \
                     {PASSWORD_ENV} or in a file named by --kafka-sasl-password-file"
                ))
            }
        };
        let mechanism = match self.mechanism {
            Mechanism::ScramSha512 => ScramMechanism::Sha512,
            Mechanism::ScramSha256 => ScramMechanism::Sha256,
        };
        Ok(Scram::new(mechanism, user, password))
    }
}

/// The password in the file at `path`, without its trailing line break.
fn read_password(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read --kafka-sasl-password-file {} ({e}); check the path and its \
             permissions",
            path.display()
        )
    })?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(format!(
            "--kafka-sasl-password-file {} is empty",
            path.display()
        ));
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: KafkaSecurityArgs,
    }

    /// The args parsed from `argv` alone (the variables of the test's environment ignored).
    fn args(argv: &[&str]) -> KafkaSecurityArgs {
        let mut command = <Cli as clap::CommandFactory>::command();
        command = command.mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(std::iter::once("t").chain(argv.iter().copied()))
            .expect("parses");
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("parses")
            .args
    }

    #[test]
    fn plaintext_is_none_and_refuses_tls_files() {
        assert_eq!(args(&[]).resolve(Some("pw".into())), Ok(None));
        let err = args(&["--kafka-ca", "/ca.pem"]).resolve(None).unwrap_err();
        assert!(err.contains("--kafka-security-protocol ssl"), "{err}");
    }

    #[test]
    fn ssl_and_sasl_ssl_build_the_sdk_security() {
        let ssl = args(&["--kafka-security-protocol", "SSL", "--kafka-ca", "/ca.pem"])
            .resolve(Some("ignored".into()))
            .unwrap();
        assert_eq!(ssl, Some(KafkaSecurity::ssl().ca_file("/ca.pem")));
        let sasl = args(&[
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-sasl-mechanism",
            "scram-sha-256",
            "--kafka-sasl-user",
            "app",
        ])
        .resolve(Some("pw-1".into()))
        .unwrap();
        assert_eq!(
            sasl,
            Some(KafkaSecurity::sasl_ssl(Scram::sha256("app", "pw-1")))
        );
    }

    #[test]
    fn sasl_ssl_needs_a_user_and_one_password() {
        let sasl = ["--kafka-security-protocol", "sasl_ssl"];
        let err = args(&sasl).resolve(Some("pw".into())).unwrap_err();
        assert!(err.contains("--kafka-sasl-user"), "{err}");
        let with_user = [&sasl[..], &["--kafka-sasl-user", "app"]].concat();
        let err = args(&with_user).resolve(None).unwrap_err();
        assert!(err.contains(PASSWORD_ENV), "{err}");
        let file = std::env::temp_dir().join(format!("doctor-pw-{}", std::process::id()));
        std::fs::write(&file, "pw-from-file\r\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        let with_file = [&with_user[..], &["--kafka-sasl-password-file", &path]].concat();
        let err = args(&with_file).resolve(Some("pw-env".into())).unwrap_err();
        assert!(
            err.contains("given twice") && !err.contains("pw-env"),
            "{err}"
        );
        let from_file = args(&with_file).resolve(None);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            from_file,
            Ok(Some(KafkaSecurity::sasl_ssl(Scram::sha512(
                "app",
                "pw-from-file"
            ))))
        );
        let err = args(&with_file).resolve(None).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn a_client_cert_needs_its_key() {
        let mut command = <Cli as clap::CommandFactory>::command();
        command = command.mut_args(|arg| arg.env(None::<&str>));
        let err = command
            .try_get_matches_from(["t", "--kafka-client-cert", "/c.pem"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
