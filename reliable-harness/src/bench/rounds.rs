//! How a comparison's rounds run and count: a discarded warm-up, cases in ABBA order, the median
//! round per case and the median of per-round paired ratios per target.

use super::report::round2;
use super::{CaseResult, Sample};

/// One round of a comparison. Round 0 warms the brokers and clients up and is discarded; the
/// measured rounds run the comparison's cases in ABBA order ([`in_turn`](Self::in_turn)), so
/// drift on the machine hits every case alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round(u32);

impl Round {
    /// The warm-up round and then `measured` rounds.
    pub fn all(measured: u32) -> impl Iterator<Item = Round> {
        (0..=measured).map(Round)
    }

    /// Whether this is the discarded warm-up round.
    pub fn is_warm_up(self) -> bool {
        self.0 == 0
    }

    /// `cases` in this round's order: as given in odd rounds, reversed in even ones
    /// (A B, B A, A B, ...).
    pub fn in_turn<T: Copy>(self, cases: &[T]) -> Vec<T> {
        let mut order = cases.to_vec();
        if self.0.is_multiple_of(2) {
            order.reverse();
        }
        order
    }
}

/// The measured rounds of one case, in round order; the median round counts.
#[derive(Debug, Default)]
pub struct Tally {
    samples: Vec<Sample>,
    rates: Vec<f64>,
}

impl Tally {
    /// Adds `round`'s sample (the warm-up round's is discarded).
    pub fn add(&mut self, round: Round, sample: Sample) {
        if round.is_warm_up() {
            return;
        }
        self.rates.push(sample.rate().round());
        self.samples.push(sample);
    }

    /// Every measured round's throughput so far.
    pub fn rounds(&self) -> &[f64] {
        &self.rates
    }

    /// The result row of the case: the median round's figures.
    pub fn result(&mut self, group: &str, case: &str, window: Option<usize>) -> CaseResult {
        let mut by_rate: Vec<usize> = (0..self.samples.len()).collect();
        by_rate.sort_by(|&a, &b| self.samples[a].rate().total_cmp(&self.samples[b].rate()));
        let median = by_rate.get(by_rate.len() / 2).copied();
        let (messages, rate, p50, p99, cpu) = match median.map(|i| &mut self.samples[i]) {
            Some(s) => (
                s.messages,
                s.rate().round(),
                s.percentile_ms(0.50),
                s.percentile_ms(0.99),
                s.cpu
                    .map(|c| round2(c.as_secs_f64() * 1e6 / s.messages.max(1) as f64)),
            ),
            None => (0, 0.0, None, None, None),
        };
        CaseResult {
            group: group.to_owned(),
            case: case.to_owned(),
            window,
            messages,
            msgs_per_s: rate,
            p50_ms: p50.map(round2),
            p99_ms: p99.map(round2),
            cpu_us_per_msg: cpu,
            rounds: self.rates.clone(),
        }
    }
}

/// The median of the per-round ratios `num[i] / den[i]` of two cases measured in the same
/// rounds; `None` when they were not.
pub fn paired_ratio(num: &[f64], den: &[f64]) -> Option<f64> {
    if num.len() != den.len() || num.is_empty() {
        return None;
    }
    let mut ratios: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d.max(1e-9)).collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    Some(if ratios.len().is_multiple_of(2) {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    } else {
        ratios[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::sample;

    #[test]
    fn the_warm_up_is_discarded_the_median_round_counts_and_every_round_is_kept() {
        let mut t = Tally::default();
        let [warm, r1, r2, r3]: [Round; 4] = Round::all(3).collect::<Vec<_>>().try_into().unwrap();
        t.add(warm, sample(1_000, 10, vec![1; 10]));
        t.add(r1, sample(1_000, 1_000, vec![9_000; 10]));
        t.add(r2, sample(1_000, 500, vec![1; 10]));
        t.add(
            r3,
            sample(1_000, 800, (1..=100).map(|i| i * 1_000).collect()),
        );
        let r = t.result("g", "c", Some(16));
        assert_eq!(r.rounds, vec![1_000.0, 2_000.0, 1_250.0]);
        // The median round (1,250 msg/s) and its latencies: 1..=100 ms.
        assert_eq!(r.msgs_per_s, 1_250.0);
        assert_eq!(r.p50_ms, Some(51.0));
        assert_eq!(r.p99_ms, Some(99.0));
        assert_eq!(r.cpu_us_per_msg, Some(400.0));
    }

    #[test]
    fn rounds_alternate_abba() {
        let orders: Vec<Vec<char>> = Round::all(4)
            .filter(|r| !r.is_warm_up())
            .map(|r| r.in_turn(&['a', 'b']))
            .collect();
        assert_eq!(
            orders,
            [
                vec!['a', 'b'],
                vec!['b', 'a'],
                vec!['a', 'b'],
                vec!['b', 'a']
            ]
        );
    }

    #[test]
    fn a_target_is_the_median_of_the_paired_ratios() {
        // Drift: both cases slow down together; the paired ratio stays 2.
        assert_eq!(
            paired_ratio(&[200.0, 100.0, 50.0], &[100.0, 50.0, 25.0]),
            Some(2.0)
        );
        assert_eq!(paired_ratio(&[1.0, 3.0], &[1.0, 1.0]), Some(2.0));
        assert_eq!(paired_ratio(&[1.0], &[1.0, 2.0]), None);
    }
}
