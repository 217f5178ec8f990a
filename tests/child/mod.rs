//! The child-process half the SIGTERM tests share (`graceful_shutdown.rs` on RabbitMQ,
//! `graceful_shutdown_kafka.rs` on Kafka): the test binary runs again as the consumer service,
//! journals what it applies, and gets SIGTERM mid-stream.

// Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How the child stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// `reliable::shutdown_signal()`: SIGTERM starts the clean stop.
    Signal,
    /// The control: the service never listens for a signal, so SIGTERM kills it.
    NoSignal,
}

impl Stop {
    /// The name the child is told.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Signal => "signal",
            Stop::NoSignal => "no-signal",
        }
    }

    /// The mode a child was told by [`name`](Self::name).
    pub fn from_name(name: &str) -> Stop {
        if name == Stop::Signal.name() {
            Stop::Signal
        } else {
            Stop::NoSignal
        }
    }
}

/// Starts this test binary again as the child: only its test `child_consumer_process` runs,
/// with `spec` in the variable `env`.
pub fn spawn(env: &str, spec: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_consumer_process", "--nocapture"])
        .env(env, spec)
        .stdin(Stdio::null())
        .spawn()
        .expect("child started")
}

/// How a child ended after [`terminate`].
pub struct Stopped {
    /// Its exit status.
    pub status: ExitStatus,
    /// When `kill -TERM` returned.
    pub sent_at: Instant,
    /// From then to its exit.
    pub took: Duration,
}

/// Sends SIGTERM to `child` and waits for its exit, at most `bound` (then kills it and fails).
pub async fn terminate(child: &mut Child, bound: Duration) -> Stopped {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    let sent_at = Instant::now();
    assert!(killed.success(), "SIGTERM sent");
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return Stopped {
                status,
                sent_at,
                took: sent_at.elapsed(),
            };
        }
        if sent_at.elapsed() > bound {
            let _ = child.kill();
            panic!("the child did not stop within {bound:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The journal's lines, in order; the file is removed.
pub fn take_journal(path: &Path) -> Vec<String> {
    let applied = std::fs::read_to_string(path)
        .expect("journal")
        .lines()
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_file(path);
    applied
}

/// Waits until `path`, a journal still empty at `start`, has at least `lines` lines; then the
/// count and the instant of the look before (the lines beyond that count were written after
/// it). `None` if `bound` passes.
pub async fn wait_for_lines(
    path: &Path,
    lines: usize,
    start: Instant,
    bound: Duration,
) -> Option<(usize, Instant)> {
    let mut before = (0, start);
    loop {
        let looked_at = Instant::now();
        let now = std::fs::read_to_string(path).map_or(0, |s| s.lines().count());
        if now >= lines {
            return Some(before);
        }
        if start.elapsed() > bound {
            return None;
        }
        before = (now, looked_at);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
