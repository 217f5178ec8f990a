//! Lock-free latency histogram used by the producer's stats snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (LINEAR + (64 - 4) * SUB) as usize;

/// A log-linear histogram of durations in microseconds (relative error at most 1/8), updated
/// with relaxed atomics so recording never blocks and never allocates.
pub(crate) struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
}

impl LatencyHistogram {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get(index(micros)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `q`-quantile (0.0..=1.0), or `None` when nothing was recorded.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(Duration::from_micros(midpoint(i)));
            }
        }
        None
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= 4
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    (LINEAR + u64::from(exp - 4) * SUB + sub) as usize
}

fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let exp = (i - LINEAR) / SUB + 4;
    let sub = (i - LINEAR) % SUB;
    (1u64 << exp) | (sub << (exp - u64::from(SUB_BITS)))
}

fn midpoint(i: usize) -> u64 {
    let lo = lower_bound(i);
    let hi = if i + 1 < BUCKETS {
        lower_bound(i + 1)
    } else {
        u64::MAX
    };
    lo + (hi - lo) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotone_and_contain_their_values() {
        for v in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1_000,
            123_456,
            10_000_000,
            u64::MAX,
        ] {
            let i = index(v);
            assert!(lower_bound(i) <= v, "{v}");
            if i + 1 < BUCKETS {
                assert!(lower_bound(i + 1) > v, "{v}");
            }
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth() {
        let h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).map(|d| d.as_micros() as f64).unwrap_or(0.0);
        let p99 = h
            .quantile(0.99)
            .map(|d| d.as_micros() as f64)
            .unwrap_or(0.0);
        assert!((p50 - 50_000.0).abs() / 50_000.0 <= 0.125, "p50 {p50}");
        assert!((p99 - 99_000.0).abs() / 99_000.0 <= 0.125, "p99 {p99}");
    }
}
