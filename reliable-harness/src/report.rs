//! Verdicts, the final table and the JSON results.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::journal::{Counts, ProducerView};
use crate::plan::{Mode, Scenario, Sizes, Variant};
use crate::poison::{PoisonCounts, POISON_MAX_DELIVERIES};
use crate::run::FaultRecord;
use crate::HarnessError;

/// The outcome class of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Safe run: nothing lost, no duplicate effect, every publish resolved.
    Pass,
    /// A check failed (see the notes).
    Fail,
    /// Negative control: loss observed, as expected.
    LossSeen,
    /// Negative control: no loss observed (a failure: the run could not see loss).
    NoLossSeen,
    /// Negative control of a poison scenario: a message crashed its consumer again and again.
    LoopSeen,
    /// Negative control of a poison scenario: no loop observed (a failure).
    NoLoopSeen,
}

/// A run's verdict with the reasons behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The outcome class.
    pub status: Status,
    /// Whether this verdict lets the whole harness pass.
    pub ok: bool,
    /// Why (failed checks, or what a control showed).
    pub notes: Vec<String>,
    /// Figures worth reading that decide nothing (e.g. extra copies after a silent network).
    pub figures: Vec<String>,
}

impl Verdict {
    /// Judges a finished run.
    pub fn judge(
        variant: Variant,
        sizes: &Sizes,
        counts: &Counts,
        faults: u32,
        producer: &ProducerView,
        producer_finished: bool,
    ) -> Self {
        let mut notes = Vec::new();
        let missing = (faults < sizes.faults)
            .then(|| format!("only {faults} of {} faults injected", sizes.faults));
        if !producer_finished || producer.done.is_none() {
            notes.push("the producer did not finish".to_owned());
        }
        // A control that lost messages after a fault struck has shown the run can see loss,
        // however many of its faults struck before its producer (often quicker without
        // confirms) was done.
        if variant == Variant::Safe || counts.lost == 0 || faults == 0 {
            notes.extend(missing.clone());
        }
        match variant {
            Variant::Safe => {
                let checks = [
                    (counts.lost, "lost"),
                    (counts.duplicate_effects, "duplicate effects"),
                    (counts.unresolved, "unresolved publishes"),
                    (counts.unexpected, "unexpected"),
                    (counts.malformed, "malformed journal lines"),
                    (counts.out_of_order, "first copies out of order"),
                ];
                for (n, what) in checks {
                    if n > 0 {
                        notes.push(format!("{n} {what}"));
                    }
                }
                if counts.lost > 0 {
                    notes.extend(lost_breakdown(counts));
                    notes.push(format!("lost sample: {:?}", counts.lost_sample));
                }
                if counts.out_of_order > 0 {
                    notes.push(format!(
                        "out-of-order sample: {:?}",
                        counts.out_of_order_sample
                    ));
                }
                if counts.applied > 0 && counts.order_checked == 0 {
                    notes.push("the consumer journaled no delivery order to check".to_owned());
                }
                let ok = notes.is_empty();
                let status = if ok { Status::Pass } else { Status::Fail };
                Self {
                    status,
                    ok,
                    notes,
                    figures: Vec::new(),
                }
            }
            Variant::Control => {
                let harness_ok = notes.is_empty();
                let (status, ok) = if counts.lost > 0 {
                    notes.extend(missing);
                    notes.push(format!("{} accepted messages lost", counts.lost));
                    notes.extend(lost_breakdown(counts));
                    (Status::LossSeen, harness_ok)
                } else {
                    notes.push(
                        "the unsafe configuration lost nothing: this run cannot see loss"
                            .to_owned(),
                    );
                    (Status::NoLossSeen, false)
                };
                Self {
                    status,
                    ok,
                    notes,
                    figures: vec![order_figure(counts)],
                }
            }
        }
    }

    /// Judges a finished poison run: the safe run must also account for every crashing and
    /// failing message (dead-lettered once, with its origin) without a loop; the control must
    /// show the loop.
    pub fn judge_poison(
        variant: Variant,
        sizes: &Sizes,
        counts: &Counts,
        faults: u32,
        producer: &ProducerView,
        producer_finished: bool,
        poison: &PoisonCounts,
    ) -> Self {
        match variant {
            Variant::Safe => {
                let mut v =
                    Self::judge(variant, sizes, counts, faults, producer, producer_finished);
                let notes = poison.safe_notes();
                if !notes.is_empty() {
                    v.notes.extend(notes);
                    v.status = Status::Fail;
                    v.ok = false;
                }
                v.with_figures(vec![poison.figure()])
            }
            Variant::Control => {
                let mut notes = Vec::new();
                if faults < sizes.faults {
                    notes.push(format!("only {faults} of {} faults injected", sizes.faults));
                }
                if !producer_finished || producer.done.is_none() {
                    notes.push("the producer did not finish".to_owned());
                }
                let harness_ok = notes.is_empty();
                let (status, ok) = if poison.loop_seen {
                    notes.push(format!(
                        "a message crashed its consumer {} times (limit {}), {} crashes in all",
                        poison.max_crashes_per_message, POISON_MAX_DELIVERIES, poison.crashes
                    ));
                    (Status::LoopSeen, harness_ok)
                } else {
                    notes.push(
                        "no message crashed its consumer repeatedly: this run cannot see the loop"
                            .to_owned(),
                    );
                    (Status::NoLoopSeen, false)
                };
                Self {
                    status,
                    ok,
                    notes,
                    figures: vec![order_figure(counts)],
                }
            }
        }
    }

    /// Adds figures that decide nothing.
    pub fn with_figures(mut self, figures: Vec<String>) -> Self {
        self.figures.extend(figures);
        self
    }
}

/// A control's order figure: it decides nothing there (the control's fault is loss, not order).
fn order_figure(counts: &Counts) -> String {
    format!(
        "{} of {} first copies out of order",
        counts.out_of_order, counts.order_checked
    )
}

/// The kinds of loss only runs with messages the broker must refuse have.
fn lost_breakdown(counts: &Counts) -> Vec<String> {
    let mut notes = Vec::new();
    if counts.bad_confirmed > 0 {
        notes.push(format!(
            "{} of them must have been refused and were reported confirmed",
            counts.bad_confirmed
        ));
    }
    if counts.good_refused > 0 {
        notes.push(format!(
            "{} of them were good and handed back",
            counts.good_refused
        ));
    }
    notes
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::LossSeen => "loss seen (control)",
            Status::NoLossSeen => "no loss seen (control)",
            Status::LoopSeen => "loop seen (control)",
            Status::NoLoopSeen => "no loop seen (control)",
        };
        f.write_str(s)?;
        if !self.ok && self.status != Status::Fail {
            f.write_str(" — FAIL")?;
        }
        if !self.notes.is_empty() {
            write!(f, ": {}", self.notes.join("; "))?;
        }
        if !self.figures.is_empty() {
            write!(f, " ({})", self.figures.join("; "))?;
        }
        Ok(())
    }
}

/// One scenario run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Safe or control.
    pub variant: Variant,
    /// The configuration, in words.
    pub config: &'static str,
    /// The queue or topic.
    pub destination: String,
    /// The checker's figures.
    pub counts: Counts,
    /// Resends the SDK producer made.
    pub resent: u64,
    /// Faults planned.
    pub faults_planned: u32,
    /// Faults injected.
    pub faults: Vec<FaultRecord>,
    /// Consumer process starts (journaled by the consumers).
    pub consumer_starts: u32,
    /// Consumer processes killed by the harness.
    pub consumer_kills: u32,
    /// Consumer processes that exited on their own.
    pub consumer_crashes: u32,
    /// The poison checker's figures (poison scenarios only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poison: Option<PoisonCounts>,
    /// Seconds the run took, drain included.
    pub duration_s: f64,
    /// The verdict.
    pub verdict: Verdict,
}

/// The whole harness run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// short or long.
    pub mode: Mode,
    /// The sizes every run used.
    pub sizes: Sizes,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Seconds for everything.
    pub duration_s: f64,
    /// Whether every verdict holds.
    pub passed: bool,
}

impl Report {
    /// Collects the runs.
    pub fn new(mode: Mode, sizes: Sizes, runs: Vec<RunResult>, took: Duration) -> Self {
        let passed = runs.iter().all(|r| r.verdict.ok);
        Self {
            mode,
            sizes,
            runs,
            duration_s: (took.as_secs_f64() * 10.0).round() / 10.0,
            passed,
        }
    }
}

/// The markdown table of a report.
pub fn markdown(report: &Report) -> String {
    let mut out = format!(
        "{} mode: {} messages per run at {}/s, consumer {}/s, {} fault(s) per run; {:.0} s in all; {}\n\n",
        match report.mode {
            Mode::Short => "short",
            Mode::Long => "long",
        },
        report.sizes.messages,
        report.sizes.rate,
        report.sizes.consumer_capacity,
        report.sizes.faults,
        report.duration_s,
        if report.passed { "all verdicts hold" } else { "SOME VERDICTS FAIL" },
    );
    out.push_str("| scenario | run | configuration | sent | confirmed | lost | unexpected | dup. deliveries | dup. effects | out of order | unresolved | resent | faults | verdict |\n");
    out.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in &report.runs {
        let c = &r.counts;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | **{}** | {} | {} | **{}** | **{}** | {} | {} | {}/{} | {} |\n",
            r.scenario,
            r.variant.name(),
            r.config,
            c.attempted,
            c.confirmed,
            c.lost,
            c.unexpected,
            c.duplicated_deliveries,
            c.duplicate_effects,
            c.out_of_order,
            c.unresolved,
            r.resent,
            r.faults.len(),
            r.faults_planned,
            r.verdict.to_string().replace('|', "/"),
        ));
    }
    out
}

/// Writes `results.json` and `results.md` into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<(), HarnessError> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| HarnessError::Setup(format!("results JSON: {e}")))?;
    std::fs::write(dir.join("results.json"), json)?;
    std::fs::write(dir.join("results.md"), markdown(report))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> ProducerView {
        let mut p = ProducerView::default();
        p.apply("DONE 10 0");
        p
    }

    fn judge(variant: Variant, counts: Counts, faults: u32) -> Verdict {
        Verdict::judge(
            variant,
            &Mode::Short.sizes(),
            &counts,
            faults,
            &done(),
            true,
        )
    }

    #[test]
    fn a_safe_run_fails_on_any_loss_duplicate_effect_unresolved_publish_or_inversion() {
        let clean = Counts {
            attempted: 10,
            confirmed: 10,
            applied: 10,
            order_checked: 10,
            ..Counts::default()
        };
        assert_eq!(judge(Variant::Safe, clean.clone(), 1).status, Status::Pass);
        for bad in [
            Counts {
                lost: 1,
                ..clean.clone()
            },
            Counts {
                duplicate_effects: 1,
                ..clean.clone()
            },
            Counts {
                unresolved: 1,
                ..clean.clone()
            },
            Counts {
                unexpected: 1,
                ..clean.clone()
            },
            Counts {
                out_of_order: 1,
                out_of_order_sample: vec![7],
                ..clean.clone()
            },
            Counts {
                order_checked: 0,
                ..clean.clone()
            },
        ] {
            let v = judge(Variant::Safe, bad, 1);
            assert_eq!(v.status, Status::Fail);
            assert!(!v.ok);
        }
        let inverted = Counts {
            out_of_order: 2,
            out_of_order_sample: vec![7, 9],
            ..clean.clone()
        };
        let v = judge(Variant::Safe, inverted, 1);
        assert_eq!(
            v.notes,
            ["2 first copies out of order", "out-of-order sample: [7, 9]"]
        );
        let v = judge(Variant::Safe, clean, 0);
        assert!(!v.ok, "a run without its fault proves nothing");
    }

    #[test]
    fn a_control_that_loses_nothing_fails_and_one_that_loses_passes() {
        let none = Counts {
            attempted: 10,
            confirmed: 10,
            ..Counts::default()
        };
        let v = judge(Variant::Control, none.clone(), 1);
        assert_eq!((v.status, v.ok), (Status::NoLossSeen, false));
        let lossy = Counts {
            lost: 3,
            order_checked: 7,
            out_of_order: 2,
            ..none
        };
        let v = judge(Variant::Control, lossy.clone(), 1);
        assert_eq!((v.status, v.ok), (Status::LossSeen, true));
        assert_eq!(
            v.figures,
            ["2 of 7 first copies out of order"],
            "order decides nothing in a control"
        );
        let v = judge(Variant::Control, lossy.clone(), 0);
        assert!(!v.ok, "a control without its fault proves nothing");
        let three = Sizes {
            faults: 3,
            ..Mode::Short.sizes()
        };
        let v = Verdict::judge(Variant::Control, &three, &lossy, 1, &done(), true);
        assert!(v.ok, "a control that lost after one of its faults saw loss");
        let v = Verdict::judge(Variant::Safe, &three, &Counts::default(), 1, &done(), true);
        assert!(!v.ok, "a safe run must meet every fault");
    }
}
