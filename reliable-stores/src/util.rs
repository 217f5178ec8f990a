//! Helpers shared by the stores: wall-clock time, timeouts, credential scrubbing.

#![cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reliable_core::idempotency::StoreError;

/// Milliseconds since the Unix epoch, by the wall clock (survives restarts, unlike `Instant`).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration in whole milliseconds, at least 1, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A duration in whole milliseconds as the `i64` databases take, at least 1, saturating.
pub(crate) fn millis_i64(d: Duration) -> i64 {
    i64::try_from(millis(d)).unwrap_or(i64::MAX)
}

/// Refuses a zero duration for `setting`.
pub(crate) fn positive(
    setting: &'static str,
    d: Duration,
) -> Result<(), crate::error::StoresError> {
    if d.is_zero() {
        return Err(crate::error::StoresError::InvalidConfig {
            setting,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(())
}

/// Removes known secrets from text that goes into errors and logs (invariant 8).
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} secret(s))", self.secrets.len())
    }
}

impl Scrubber {
    /// Scrubs `secret` (and its percent-decoded form) from now on; empty secrets are ignored.
    pub(crate) fn add(&mut self, secret: &str) {
        for s in [secret.to_owned(), percent_decode(secret)] {
            if !s.is_empty() && !self.secrets.contains(&s) {
                self.secrets.push(s);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// `text` with every known secret replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }

    /// A [`StoreError::Unavailable`] whose reason is `what: err`, scrubbed.
    pub(crate) fn unavailable(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            reason: self.scrub(&format!("{what}: {err}")),
        }
    }
}

/// Runs `fut` for at most `limit`; a timeout becomes [`StoreError::Unavailable`].
pub(crate) async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable {
            reason: format!("{what}: no answer within {limit:?}"),
        }),
    }
}

/// The password of a `scheme://user:password@host/..` URL, if it has one (not decoded).
pub(crate) fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, pw)| pw)
}

/// The URL with its password replaced by `***`, for messages. Key-value connection strings
/// (`host=.. password=..`) have their `password` value replaced.
pub(crate) fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let tail = redact_query_password(tail);
        return match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    format!("{scheme}://{user}:***@{host}{tail}")
                } else {
                    format!("{scheme}://{user}@{host}{tail}")
                }
            }
            None => format!("{scheme}://{authority}{tail}"),
        };
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `?a=1&password=x` → `?a=1&password=***`.
fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let query = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

/// Decodes `%XX` escapes; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords_in_every_form() {
        assert_eq!(
            redact_url("redis://default:s3cret@127.0.0.1:6379/0"),
            "redis://default:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h:5432/db?sslmode=disable&password=x"),
            "postgres://u:***@h:5432/db?sslmode=disable&password=***"
        );
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        assert_eq!(
            redact_url("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
    }

    #[test]
    fn url_password_finds_the_password() {
        assert_eq!(url_password("redis://:pw@h:1/0"), Some("pw"));
        assert_eq!(url_password("postgres://u:p%40ss@h/db"), Some("p%40ss"));
        assert_eq!(url_password("redis://h:1/0"), None);
        assert_eq!(url_password("redis://u@h"), None);
    }

    #[test]
    fn scrubber_removes_raw_and_decoded_secrets() {
        let mut s = Scrubber::default();
        s.add("p%40ss");
        assert_eq!(
            s.scrub("auth p@ss and p%40ss failed"),
            "auth *** and *** failed"
        );
        s.add("");
        assert_eq!(s.scrub("nothing"), "nothing");
    }

    #[test]
    fn durations_are_clamped_to_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis_i64(Duration::MAX), i64::MAX);
    }
}
