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
//!   dedupe), `E <seq>` per effect applied, `X <payload>` for a payload the harness never sent,
//!   and, written by the delivery source before any handler runs, `P <seq> <partition>
//!   <offset> [<key>]` (Kafka) or `R <seq> [redelivered]` (RabbitMQ) per delivery: where it
//!   sat in the broker's order (see the order check, [`order`]).
//!
//! The check is Jepsen's total-queue check: *lost* = accepted or confirmed, not handed back,
//! and never applied (a producer killed with messages pending must still deliver them),
//! *unexpected*
//! = applied but never sent, *duplicated deliveries* = deliveries beyond the first of each
//! message, *duplicate effects* = effects beyond the first (must be 0 with dedupe), *out of
//! order* = first copies that reached the consumer after a later message of their ordering
//! scope (per record key on Kafka, per producer on RabbitMQ; must be 0).
//!
//! Where the run mixes in messages the broker must refuse (`amqp-bad-publish`), the check is
//! told which: a refused message reported confirmed is lost too (confirmed, and nowhere), and so
//! is a good message handed back (it had nothing to be refused for).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod check;
mod order;
mod views;

pub use check::{check, check_with, Counts};
pub use order::{log_line, queue_line};
pub use views::{ConsumerView, ProducerView};

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

#[cfg(test)]
mod tests {
    use super::*;

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
