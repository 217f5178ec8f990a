//! Backoff policy shared by the producer's resends, the pipeline's handler retries and the
//! pipeline's reconnect loop: exponential with jitter, built on `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff with optional jitter.
///
/// The n-th delay is `min_delay * factor^n`, capped at `max_delay`; with jitter on, a random
/// extra of up to the same amount is added (so a delay lies in `[d, 2d)`), which spreads the
/// resends of many producers after a broker restart.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// The first delay.
    pub min_delay: Duration,
    /// The largest delay (before jitter).
    pub max_delay: Duration,
    /// The growth factor between delays; at least 1.
    pub factor: f32,
    /// Whether to add random jitter.
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    /// 50 ms, doubling, capped at 5 s, with jitter.
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl BackoffPolicy {
    /// An endless iterator of delays following this policy.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay.max(self.min_delay))
            .with_factor(self.factor.max(1.0))
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        let cap = self.max_delay.max(self.min_delay);
        // `without_max_times` never ends; the fallback keeps the contract if that changes.
        builder.build().chain(std::iter::repeat(cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let policy = BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            factor: 2.0,
            jitter: false,
        };
        // backon computes in f32: compare to the microsecond.
        let d: Vec<u128> = policy
            .delays()
            .take(5)
            .map(|d| d.as_micros().div_ceil(10) * 10)
            .collect();
        assert_eq!(d, [10_000, 20_000, 40_000, 40_000, 40_000]);
    }

    #[test]
    fn jitter_stays_within_double() {
        let policy = BackoffPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            factor: 2.0,
            jitter: true,
        };
        for (d, base) in policy.delays().zip([10u64, 20, 40, 40]) {
            let (lo, hi) = (Duration::from_millis(base), Duration::from_millis(2 * base));
            assert!(d + Duration::from_micros(1) >= lo && d < hi, "{d:?}");
        }
    }
}
