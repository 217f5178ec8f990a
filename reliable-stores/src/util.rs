//! Helpers shared by the stores: wall-clock time, timeouts, scrubbed errors.

#![cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reliable_core::idempotency::StoreError;
use reliable_core::redact::Scrubber;

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

/// Store errors whose text has the store's secrets removed (invariant 8).
pub(crate) trait ScrubbedError {
    /// A [`StoreError::Unavailable`] whose reason is `what: err`, scrubbed.
    fn unavailable(&self, what: &str, err: impl std::fmt::Display) -> StoreError;
}

impl ScrubbedError for Scrubber {
    fn unavailable(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
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

/// Helpers of the stores' credential tests.
#[cfg(test)]
pub(crate) mod leak_check {
    use std::future::Future;

    /// Passwords holding every character that ends a URL part somewhere. A test checks that
    /// neither `Xq7` (before the delimiter) nor `Zk9` (after it) shows.
    pub(crate) const PASSWORDS: [&str; 7] = [
        "Xq7/Zk9",
        "Xq7?Zk9",
        "Xq7#Zk9",
        "Xq7@Zk9",
        "Xq7:Zk9",
        "Xq7%Zk9",
        "Xq7/?#@:%Zk9",
    ];

    /// Runs `error_of` (an `(input, error text)` of connecting with each input) on all inputs
    /// at once; lists, one per line, every one whose text shows one of `fragments`.
    pub(crate) async fn leaks<F, Fut>(
        inputs: Vec<String>,
        fragments: &[&str],
        error_of: F,
    ) -> String
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = (String, String)>,
    {
        futures::future::join_all(inputs.into_iter().map(error_of))
            .await
            .into_iter()
            .filter(|(_, text)| fragments.iter().any(|f| text.contains(f)))
            .map(|(input, text)| format!("{input} -> {text}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_errors_are_scrubbed() {
        let mut scrubber = Scrubber::default();
        scrubber.add_secrets_of("redis://default:pa/ss@127.0.0.1:1/0");
        let e = scrubber.unavailable("PING", "auth pa/ss refused");
        assert_eq!(e.to_string().matches("pa/ss").count(), 0, "{e}");
        assert!(e.to_string().contains("PING: auth *** refused"), "{e}");
    }

    #[test]
    fn durations_are_clamped_to_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis_i64(Duration::MAX), i64::MAX);
    }
}
