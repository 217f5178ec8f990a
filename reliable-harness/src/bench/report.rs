//! The benchmark's report: each case's figures, the targets and context ratios between
//! cases of one run, and the markdown the run writes.

use serde::Serialize;

use super::memory;
use super::rounds::paired_ratio;

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The comparison it belongs to (e.g. `RabbitMQ quorum`).
    pub group: String,
    /// The client and mode (e.g. `SDK, confirms`).
    pub case: String,
    /// The confirm window, where one applies.
    pub window: Option<usize>,
    /// Messages per round.
    pub messages: u64,
    /// The median round's throughput.
    pub msgs_per_s: f64,
    /// The median round's median latency.
    pub p50_ms: Option<f64>,
    /// The median round's 99th percentile latency.
    pub p99_ms: Option<f64>,
    /// Client CPU time per message in the median round (microseconds, measured window only).
    pub cpu_us_per_msg: Option<f64>,
    /// Every round's throughput.
    pub rounds: Vec<f64>,
}

/// A target ratio between two cases of the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub what: String,
    /// The ratio measured.
    pub ratio: f64,
    /// The least ratio the target asks for.
    pub at_least: f64,
    /// Whether it is met.
    pub met: bool,
}

/// A ratio between two cases of the same run, reported without a target.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// What is compared.
    pub what: String,
    /// The ratio measured.
    pub ratio: f64,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Producer and consumer cases.
    pub cases: Vec<CaseResult>,
    /// Target ratios.
    pub targets: Vec<Target>,
    /// Ratios reported for context, without a target (e.g. against a raw client that does less
    /// work than the SDK).
    pub context: Vec<Ratio>,
    /// Memory per pending message.
    pub memory: Option<memory::MemoryResult>,
    /// Notes on the run (settings used, versions).
    pub notes: Vec<String>,
}

impl Report {
    /// Adds a case's row, unless the case did not run.
    pub fn push(&mut self, case: CaseResult) {
        if !case.rounds.is_empty() {
            self.cases.push(case);
        }
    }

    fn find(&self, group: &str, case: &str, window: Option<usize>) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.group == group && c.case == case && c.window == window)
    }

    /// The ratio `num / den` of two cases' throughput: the median of the per-round paired
    /// ratios (the ratio of the median rounds when the cases' rounds differ); `None` when
    /// either case did not run.
    fn ratio(
        &self,
        num: (&str, &str, Option<usize>),
        den: (&str, &str, Option<usize>),
    ) -> Option<f64> {
        let n = self.find(num.0, num.1, num.2)?;
        let d = self.find(den.0, den.1, den.2)?;
        Some(round2(
            paired_ratio(&n.rounds, &d.rounds)
                .unwrap_or_else(|| n.msgs_per_s / d.msgs_per_s.max(1e-9)),
        ))
    }

    /// Records the ratio `num / den` of two cases' throughput as a target (see [`ratio`]).
    ///
    /// [`ratio`]: Self::ratio
    pub fn target(
        &mut self,
        what: &str,
        num: (&str, &str, Option<usize>),
        den: (&str, &str, Option<usize>),
        at_least: f64,
    ) {
        if let Some(ratio) = self.ratio(num, den) {
            self.targets.push(Target {
                what: what.to_owned(),
                ratio,
                at_least,
                met: ratio >= at_least,
            });
        }
    }

    /// Records the ratio `num / den` for context, without a target.
    pub fn context(
        &mut self,
        what: &str,
        num: (&str, &str, Option<usize>),
        den: (&str, &str, Option<usize>),
    ) {
        if let Some(ratio) = self.ratio(num, den) {
            self.context.push(Ratio {
                what: what.to_owned(),
                ratio,
            });
        }
    }
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into())
}

pub(super) fn markdown(report: &Report) -> String {
    let mut md = String::new();
    if !report.targets.is_empty() {
        md.push_str("| target | ratio | at least | met |\n|---|---:|---:|---|\n");
        for t in &report.targets {
            md.push_str(&format!(
                "| {} | {:.2} | {:.2} | {} |\n",
                t.what,
                t.ratio,
                t.at_least,
                if t.met { "yes" } else { "**no**" }
            ));
        }
        md.push('\n');
    }
    if !report.context.is_empty() {
        md.push_str("| for context (no target) | ratio |\n|---|---:|\n");
        for r in &report.context {
            md.push_str(&format!("| {} | {:.2} |\n", r.what, r.ratio));
        }
        md.push('\n');
    }
    let mut groups: Vec<&str> = Vec::new();
    for c in &report.cases {
        if !groups.contains(&c.group.as_str()) {
            groups.push(&c.group);
        }
    }
    for g in groups {
        md.push_str(&format!(
            "**{g}**\n\n| case | window | messages | msg/s | p50 ms | p99 ms | client CPU µs/msg | rounds (msg/s) |\n|---|---:|---:|---:|---:|---:|---:|---|\n"
        ));
        for c in report.cases.iter().filter(|c| c.group == g) {
            let rounds: Vec<String> = c.rounds.iter().map(|r| format!("{r:.0}")).collect();
            md.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} |\n",
                c.case,
                c.window
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "–".into()),
                c.messages,
                c.msgs_per_s,
                opt(c.p50_ms),
                opt(c.p99_ms),
                opt(c.cpu_us_per_msg),
                rounds.join(", ")
            ));
        }
        md.push('\n');
    }
    if let Some(m) = &report.memory {
        md.push_str(&m.markdown());
        md.push('\n');
    }
    for n in &report.notes {
        md.push_str(&format!("- {n}\n"));
    }
    md
}
