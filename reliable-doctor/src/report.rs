//! The audit's result: the findings, an aligned table for people, a JSON document for
//! machines, and the exit code.

use serde::{Deserialize, Serialize};

use crate::{Finding, Severity};

/// How many objects the audit looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audited {
    /// RabbitMQ queues.
    pub queues: usize,
    /// Kafka topics (internal ones skipped).
    pub topics: usize,
    /// Kafka consumer groups.
    pub groups: usize,
}

/// How many findings of each severity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Findings of severity `unsafe`.
    #[serde(rename = "unsafe")]
    pub unsafe_: usize,
    /// Findings of severity `warning`.
    pub warning: usize,
    /// Findings of severity `info`.
    pub info: usize,
}

/// Every finding of one audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// What was looked at.
    pub audited: Audited,
    /// The findings, worst first.
    pub findings: Vec<Finding>,
}

/// The JSON document `--json` prints.
#[derive(Serialize)]
struct Document<'a> {
    /// The version of the doctor that wrote it.
    version: &'static str,
    audited: &'a Audited,
    summary: Summary,
    findings: &'a [Finding],
}

impl Report {
    /// Orders the findings worst first, then by broker, object and check.
    pub fn sort(&mut self) {
        self.findings.sort_by(|a, b| {
            (a.severity, a.broker, &a.object, &a.check)
                .cmp(&(b.severity, b.broker, &b.object, &b.check))
        });
    }

    /// How many findings of each severity.
    pub fn summary(&self) -> Summary {
        let count = |s| self.findings.iter().filter(|f| f.severity == s).count();
        Summary {
            unsafe_: count(Severity::Unsafe),
            warning: count(Severity::Warning),
            info: count(Severity::Info),
        }
    }

    /// 1 when any finding is `unsafe`, else 0 (2, for errors, is the binary's).
    pub fn exit_code(&self) -> i32 {
        i32::from(self.findings.iter().any(|f| f.severity == Severity::Unsafe))
    }

    /// The JSON document: `version`, `audited`, `summary` and `findings`.
    pub fn to_json(&self) -> String {
        let document = Document {
            version: env!("CARGO_PKG_VERSION"),
            audited: &self.audited,
            summary: self.summary(),
            findings: &self.findings,
        };
        // Plain strings and numbers only: serialising cannot fail.
        serde_json::to_string_pretty(&document).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// An aligned table: one line per finding, then what to do and a summary line.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let headers = ["SEVERITY", "BROKER", "OBJECT", "CHECK", "WHAT IT MEANS"];
        let rows: Vec<[&str; 5]> = self
            .findings
            .iter()
            .map(|f| {
                [
                    f.severity.as_str(),
                    f.broker.as_str(),
                    f.object.as_str(),
                    f.check.as_str(),
                    f.meaning.as_str(),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            text.trim_end().to_owned() + "\n"
        };
        if !rows.is_empty() {
            out.push_str(&line(headers));
            for row in &rows {
                out.push_str(&line(*row));
            }
            out.push_str("\nwhat to do:\n");
            for f in &self.findings {
                out.push_str(&format!("  {} {}: {}\n", f.check, f.object, f.action));
            }
            out.push('\n');
        }
        let s = self.summary();
        out.push_str(&format!(
            "audited {} queue(s), {} topic(s), {} group(s): {} unsafe, {} warning(s), {} info\n",
            self.audited.queues,
            self.audited.topics,
            self.audited.groups,
            s.unsafe_,
            s.warning,
            s.info
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Broker;

    fn finding(severity: Severity, object: &str) -> Finding {
        Finding::new(Broker::Kafka, object, "kafka-x", severity, "means", "do")
    }

    #[test]
    fn exit_code_is_one_only_with_an_unsafe_finding() {
        let mut report = Report::default();
        assert_eq!(report.exit_code(), 0);
        report.findings.push(finding(Severity::Warning, "a"));
        report.findings.push(finding(Severity::Info, "b"));
        assert_eq!(report.exit_code(), 0);
        report.findings.push(finding(Severity::Unsafe, "c"));
        assert_eq!(report.exit_code(), 1);
        report.sort();
        assert_eq!(report.findings[0].object, "c");
    }

    #[test]
    fn table_columns_line_up_and_json_counts() {
        let mut report = Report::default();
        report.findings.push(finding(Severity::Unsafe, "orders"));
        report
            .findings
            .push(finding(Severity::Info, "a-much-longer-topic"));
        let table = report.to_table();
        let lines: Vec<&str> = table.lines().take(3).collect();
        let col = |l: &str| l.find("kafka-x").or_else(|| l.find("CHECK"));
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["summary"]["unsafe"], 1);
        assert_eq!(json["findings"][1]["severity"], "info");
    }
}
