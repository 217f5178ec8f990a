//! The journals the child processes write and the checker that reads them.
//!
//! Each child appends one line per event to its own file; every line is written with a single
//! `write` call on an `O_APPEND` file and no user-space buffer, so a SIGKILL never leaves half a
//! line, and a page-cache write survives the death of the process (this harness kills
//! processes, not machines).
//!
//! * producer journal: `A <seq>` (accepted: `send` returned, the SDK owns the message now),
//!   `C <seq>` (confirmed: the send resolved `Ok`), `F <seq> <error>` (the send was handed back
//!   with an error), and at the end `DONE <attempted> <resent>`;
//! * consumer journal: `START <pid>` per process start, `D <seq>` per delivery seen (before
//!   dedupe), `E <seq>` per effect applied, `X <payload>` for a payload the harness never sent.
//!
//! The check is Jepsen's total-queue check: *lost* = accepted or confirmed, not handed back,
//! and never applied (a producer killed with messages pending must still deliver them),
//! *unexpected*
//! = applied but never sent, *duplicated deliveries* = deliveries beyond the first of each
//! message, *duplicate effects* = effects beyond the first (must be 0 with dedupe).
//!
//! Where the run mixes in messages the broker must refuse (`amqp-bad-publish`), the check is
//! told which: a refused message reported confirmed is lost too (confirmed, and nowhere), and so
//! is a good message handed back (it had nothing to be refused for).

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// Opens `path` for appending, creating it (and its directory) if needed.
pub fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// An append-only journal shared by the tasks of one process: each record is one `write`.
#[derive(Debug)]
pub struct Journal {
    file: Mutex<File>,
    path: PathBuf,
}

impl Journal {
    /// Opens (or creates) the journal at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: Mutex::new(open_append(path)?),
            path: path.to_owned(),
        })
    }

    /// Appends one record; `line` must not contain a newline.
    pub fn record(&self, line: &str) -> io::Result<()> {
        self.record_all(std::iter::once(line))
    }

    /// Appends several records with one write.
    pub fn record_all<'a>(&self, lines: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
        let mut buf = Vec::new();
        for line in lines {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        let mut file = self
            .file
            .lock()
            .map_err(|_| io::Error::other(format!("journal {} poisoned", self.path.display())))?;
        file.write_all(&buf)
    }
}

/// Reads the lines appended to a file since the last call; a trailing partial line waits for
/// its newline.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Tails `path` from its beginning (a missing file reads as empty).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Calls `f` with every complete line appended since the last call.
    pub fn read(&mut self, mut f: impl FnMut(&str)) -> io::Result<()> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut start = 0;
        while let Some(nl) = self.partial[start..].iter().position(|&b| b == b'\n') {
            f(&String::from_utf8_lossy(&self.partial[start..start + nl]));
            start += nl + 1;
        }
        self.partial.drain(..start);
        Ok(())
    }
}

/// What the producer journal says so far.
#[derive(Debug, Default)]
pub struct ProducerView {
    /// Sequence numbers the producer accepted (its `send` returned).
    pub accepted: BTreeSet<u64>,
    /// Sequence numbers whose send resolved `Ok`.
    pub confirmed: BTreeSet<u64>,
    /// Sequence numbers handed back with an error, with the first error seen.
    pub failed: HashMap<u64, String>,
    /// `(attempted, resent)` once the producer finished.
    pub done: Option<(u64, u64)>,
    /// Lines that did not parse.
    pub malformed: u64,
}

impl ProducerView {
    /// The next sequence number a (restarted) producer sends.
    pub fn next_seq(&self) -> u64 {
        self.accepted
            .iter()
            .chain(&self.confirmed)
            .chain(self.failed.keys())
            .max()
            .map_or(0, |m| m + 1)
    }

    /// Messages whose send resolved, confirmed or handed back.
    pub fn resolved(&self) -> u64 {
        let failed_only = self
            .failed
            .keys()
            .filter(|s| !self.confirmed.contains(s))
            .count();
        (self.confirmed.len() + failed_only) as u64
    }

    /// Applies one journal line.
    pub fn apply(&mut self, line: &str) {
        let mut parts = line.splitn(3, ' ');
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some("C"), Some(seq), None) => seq.parse().map(|s| {
                self.confirmed.insert(s);
            }),
            (Some("A"), Some(seq), None) => seq.parse().map(|s| {
                self.accepted.insert(s);
            }),
            (Some("F"), Some(seq), reason) => seq.parse().map(|s| {
                self.failed
                    .entry(s)
                    .or_insert_with(|| reason.unwrap_or("").to_owned());
            }),
            (Some("DONE"), Some(attempted), Some(resent)) => {
                match (attempted.parse(), resent.parse()) {
                    (Ok(a), Ok(r)) => {
                        self.done = Some((a, r));
                        Ok(())
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            _ => {
                self.malformed += 1;
                return;
            }
        };
        if parsed.is_err() {
            self.malformed += 1;
        }
    }
}

/// What the consumer journal says so far.
#[derive(Debug, Default)]
pub struct ConsumerView {
    /// Deliveries seen per sequence number.
    pub delivered: HashMap<u64, u32>,
    /// Effects applied per sequence number.
    pub effects: HashMap<u64, u32>,
    /// All deliveries seen.
    pub deliveries_total: u64,
    /// All effects applied.
    pub effects_total: u64,
    /// Payloads the harness never produced.
    pub foreign: u64,
    /// Consumer process starts.
    pub starts: u32,
    /// Lines that did not parse.
    pub malformed: u64,
}

impl ConsumerView {
    /// Applies one journal line.
    pub fn apply(&mut self, line: &str) {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "START" => self.starts += 1,
            "X" => self.foreign += 1,
            "D" | "E" => match rest.parse::<u64>() {
                Ok(seq) if tag == "D" => {
                    *self.delivered.entry(seq).or_default() += 1;
                    self.deliveries_total += 1;
                }
                Ok(seq) => {
                    *self.effects.entry(seq).or_default() += 1;
                    self.effects_total += 1;
                }
                Err(_) => self.malformed += 1,
            },
            _ => self.malformed += 1,
        }
    }
}

/// The verdict figures of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Messages the producer sent (sequence numbers `0..attempted`).
    pub attempted: u64,
    /// Sends that resolved `Ok` (for a no-confirm producer: the publish call returned).
    pub confirmed: u64,
    /// Sends handed back with an error.
    pub failed: u64,
    /// Sends that neither resolved nor failed (the producer never finished them).
    pub unresolved: u64,
    /// Deliveries seen by the consumer, duplicates included.
    pub deliveries: u64,
    /// Deliveries beyond the first of each message.
    pub duplicated_deliveries: u64,
    /// Distinct messages whose effect was applied.
    pub applied: u64,
    /// Effects beyond the first of each message (must be 0 with dedupe).
    pub duplicate_effects: u64,
    /// Accepted or confirmed by the producer, not handed back, never applied.
    pub lost: u64,
    /// Applied, never sent (or a payload the harness did not write).
    pub unexpected: u64,
    /// Applied although the send was not confirmed (handed back or unresolved): not loss.
    pub recovered: u64,
    /// Journal lines that did not parse.
    pub malformed: u64,
    /// Up to 10 lost sequence numbers, for the investigation.
    pub lost_sample: Vec<u64>,
    /// Of the lost: good messages handed back with an error (runs with messages the broker
    /// must refuse only).
    pub good_refused: u64,
    /// Of the lost: messages the broker must refuse, reported confirmed.
    pub bad_confirmed: u64,
}

/// Runs the total-queue check over both journals. `must_refuse`, for runs that mix in
/// messages the broker must refuse, says which: then a good message handed back is lost too.
/// Without it, a hand-back is the SDK's honest answer to a fault, not loss.
pub fn check(
    producer: &ProducerView,
    consumer: &ConsumerView,
    must_refuse: Option<&dyn Fn(u64) -> bool>,
) -> Counts {
    check_with(producer, consumer, must_refuse, &|_| false)
}

/// [`check`], where a message `accounted(seq)` says is accounted for elsewhere (in the dead
/// letter with its origin, in the poison scenarios) is not lost although never applied.
pub fn check_with(
    producer: &ProducerView,
    consumer: &ConsumerView,
    must_refuse: Option<&dyn Fn(u64) -> bool>,
    accounted: &dyn Fn(u64) -> bool,
) -> Counts {
    let refusing = must_refuse.is_some();
    let must_refuse = |s: u64| must_refuse.is_some_and(|f| f(s));
    let attempted = producer.done.map_or_else(
        || {
            // The producer never finished: count what it wrote about.
            let max = producer
                .confirmed
                .iter()
                .chain(producer.failed.keys())
                .max();
            max.map_or(0, |m| m + 1)
        },
        |(a, _)| a,
    );
    let confirmed = producer.confirmed.len() as u64;
    let failed = producer
        .failed
        .keys()
        .filter(|s| !producer.confirmed.contains(s))
        .count() as u64;
    let (mut good_refused, mut bad_confirmed) = (0, 0);
    let lost: Vec<u64> = producer
        .accepted
        .union(&producer.confirmed)
        .chain(producer.failed.keys())
        .copied()
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .filter(|s| {
            let confirmed = producer.confirmed.contains(s);
            let failed = producer.failed.contains_key(s);
            if must_refuse(*s) {
                bad_confirmed += u64::from(confirmed);
                return confirmed;
            }
            if consumer.effects.contains_key(s) || accounted(*s) {
                return false;
            }
            let refused = refusing && failed && !confirmed;
            good_refused += u64::from(refused);
            confirmed || !failed || refused
        })
        .collect();
    let unexpected = consumer
        .effects
        .keys()
        .filter(|&&s| s >= attempted || must_refuse(s))
        .count() as u64
        + consumer.foreign;
    let recovered = consumer
        .effects
        .keys()
        .filter(|&&s| s < attempted && !producer.confirmed.contains(&s))
        .count() as u64;
    let extra = |m: &HashMap<u64, u32>| m.values().map(|&n| u64::from(n.saturating_sub(1))).sum();
    Counts {
        attempted,
        confirmed,
        failed,
        unresolved: attempted.saturating_sub(confirmed + failed),
        deliveries: consumer.deliveries_total,
        duplicated_deliveries: extra(&consumer.delivered),
        applied: consumer.effects.len() as u64,
        duplicate_effects: extra(&consumer.effects),
        lost: lost.len() as u64,
        unexpected,
        recovered,
        malformed: producer.malformed + consumer.malformed,
        lost_sample: lost.into_iter().take(10).collect(),
        good_refused,
        bad_confirmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(producer: &[&str], consumer: &[&str]) -> Counts {
        let mut p = ProducerView::default();
        producer.iter().for_each(|l| p.apply(l));
        let mut c = ConsumerView::default();
        consumer.iter().for_each(|l| c.apply(l));
        check(&p, &c, None)
    }

    #[test]
    fn a_clean_run_has_nothing_to_report() {
        let c = views(
            &["C 0", "C 1", "C 2", "DONE 3 0"],
            &["START 1", "D 0", "E 0", "D 1", "E 1", "D 2", "E 2"],
        );
        assert_eq!((c.attempted, c.confirmed, c.unresolved), (3, 3, 0));
        assert_eq!((c.lost, c.unexpected, c.duplicate_effects), (0, 0, 0));
        assert_eq!(c.applied, 3);
    }

    #[test]
    fn confirmed_but_never_applied_is_lost_and_sampled() {
        let c = views(&["C 0", "C 1", "C 2", "DONE 3 0"], &["D 1", "E 1"]);
        assert_eq!(c.lost, 2);
        assert_eq!(c.lost_sample, vec![0, 2]);
    }

    #[test]
    fn redelivery_is_a_duplicated_delivery_and_a_second_effect_is_a_duplicate_effect() {
        let c = views(
            &["C 0", "C 1", "DONE 2 1"],
            &["D 0", "E 0", "D 0", "D 1", "E 1", "D 1", "E 1"],
        );
        assert_eq!(c.duplicated_deliveries, 2);
        assert_eq!(c.duplicate_effects, 1);
        assert_eq!(c.lost, 0);
    }

    #[test]
    fn applied_but_never_sent_is_unexpected_and_unconfirmed_but_applied_is_recovered() {
        let c = views(
            &["C 0", "F 1 timeout", "DONE 3 0"],
            &["E 0", "E 1", "E 7", "X garbage"],
        );
        assert_eq!(
            c.unexpected, 2,
            "seq 7 was never sent, plus one foreign payload"
        );
        assert_eq!(c.recovered, 1);
        assert_eq!(c.failed, 1);
        assert_eq!(c.unresolved, 1, "seq 2 neither confirmed nor failed");
    }

    #[test]
    fn accepted_but_never_resolved_nor_applied_is_lost_and_handed_back_is_not() {
        let c = views(
            &["A 0", "A 1", "A 2", "A 3", "C 0", "F 3 refused", "DONE 4 0"],
            &["E 0", "E 2"],
        );
        assert_eq!(
            c.lost, 1,
            "seq 1: accepted, pending when the producer died, never applied"
        );
        assert_eq!(c.lost_sample, vec![1]);
        assert_eq!(c.unresolved, 2);
        let mut p = ProducerView::default();
        ["A 0", "A 5", "C 3"].iter().for_each(|l| p.apply(l));
        assert_eq!(p.next_seq(), 6);
        assert_eq!(ProducerView::default().next_seq(), 0);
    }

    #[test]
    fn with_messages_the_broker_must_refuse_a_refused_one_confirmed_is_lost_and_so_is_a_good_one_handed_back(
    ) {
        let mut p = ProducerView::default();
        [
            "A 0",
            "A 1",
            "A 2",
            "A 3",
            "A 4",
            "A 5",
            "C 0",
            "F 1 unroutable",
            "C 2",
            "F 3 refused",
            "C 4",
            "F 5 unroutable",
            "DONE 6 0",
        ]
        .iter()
        .for_each(|l| p.apply(l));
        let mut c = ConsumerView::default();
        ["E 0", "E 4", "E 5"].iter().for_each(|l| c.apply(l));
        // 1 and 5 must be refused; 2 is confirmed although it must be refused; 3 is good.
        let counts = check(&p, &c, Some(&|s| s % 2 == 1 || s == 2));
        assert_eq!(counts.bad_confirmed, 1, "seq 2");
        assert_eq!(counts.good_refused, 0);
        assert_eq!(counts.unexpected, 1, "seq 5 must never reach the queue");
        let counts = check(&p, &c, Some(&|s| s == 1 || s == 5));
        assert_eq!(counts.bad_confirmed, 0);
        assert_eq!(counts.good_refused, 1, "seq 3 was good and handed back");
        assert_eq!(counts.lost, 2, "seq 2 (confirmed, never applied) and seq 3");
        assert_eq!(counts.lost_sample, vec![2, 3]);
        // Without refused messages a hand-back is not loss.
        assert_eq!(check(&p, &c, None).good_refused, 0);
        assert_eq!(check(&p, &c, None).lost, 1, "only seq 2");
    }

    #[test]
    fn malformed_lines_are_counted_not_trusted() {
        let c = views(&["C x", "DONE 1 0", "C 0"], &["E", "Q 1", "E 0"]);
        assert_eq!(c.malformed, 3);
        assert_eq!(c.lost, 0);
    }

    #[test]
    fn a_tail_returns_only_complete_lines_and_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let journal = Journal::open(&path).unwrap();
        let mut tail = Tail::new(&path);
        let mut seen = Vec::new();
        journal.record("E 1").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"E 2")
            .unwrap();
        tail.read(|l| seen.push(l.to_owned())).unwrap();
        assert_eq!(seen, ["E 1"]);
        journal.record("").unwrap(); // completes "E 2"
        journal.record("E 3").unwrap();
        tail.read(|l| seen.push(l.to_owned())).unwrap();
        assert_eq!(seen, ["E 1", "E 2", "E 3"]);
    }
}
