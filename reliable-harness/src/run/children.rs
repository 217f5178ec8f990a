//! The producer and consumer processes of one run: this binary again, as `produce` and
//! `consume`, each with its own journal and log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::Planned;
use crate::child::BrokerArgs;
use crate::journal::open_append;
use crate::HarnessError;

/// The child processes of one run.
pub(super) struct Children {
    /// This binary.
    pub(super) exe: PathBuf,
    /// The consumer's arguments (scenario, variant, destination, brokers).
    pub(super) base: Vec<String>,
    /// The producer's: the same, but its RabbitMQ URL may lead through the run's proxy.
    pub(super) producer_base: Vec<String>,
    /// Where journals and logs go.
    pub(super) dir: PathBuf,
    /// The consumer's rate limit.
    pub(super) capacity: u32,
    /// The producer's own arguments (messages, rate).
    pub(super) producer_args: Vec<String>,
    pub(super) producer: Option<KillOnDrop>,
    pub(super) consumer: Option<Child>,
    /// Consumers killed by the harness.
    pub(super) consumer_kills: u32,
    /// Consumers that exited on their own.
    pub(super) consumer_crashes: u32,
}

impl Children {
    fn spawn(&self, role: &str, base: &[String], extra: &[String]) -> Result<Child, HarnessError> {
        let log = open_append(&self.dir.join(format!("{role}.out")))?;
        let err = log.try_clone()?;
        let journal = self.dir.join(format!("{role}.log"));
        Ok(Command::new(&self.exe)
            .arg(role)
            .args(base)
            .arg("--journal")
            .arg(journal)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()?)
    }

    pub(super) fn start_producer(&mut self) -> Result<(), HarnessError> {
        self.producer = Some(KillOnDrop(self.spawn(
            "produce",
            &self.producer_base,
            &self.producer_args,
        )?));
        Ok(())
    }

    /// The producer's process id, while it runs.
    pub(super) fn producer_pid(&self) -> Option<u32> {
        self.producer.as_ref().map(|p| p.0.id())
    }

    /// SIGKILL, and reap.
    pub(super) fn kill_producer(&mut self) {
        self.producer = None;
    }

    /// The producer's exit status, once it has exited on its own.
    pub(super) fn producer_exited(
        &mut self,
    ) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        match self.producer.as_mut() {
            Some(p) => Ok(p.0.try_wait()?),
            None => Ok(None),
        }
    }

    pub(super) fn start_consumer(&mut self) -> Result<(), HarnessError> {
        let capacity = ["--capacity".to_owned(), self.capacity.to_string()];
        self.consumer = Some(self.spawn("consume", &self.base, &capacity)?);
        Ok(())
    }

    /// SIGKILL, and reap.
    pub(super) fn kill_consumer(&mut self) {
        if let Some(mut c) = self.consumer.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a consumer that died on its own (counted: it must not happen in safe runs).
    pub(super) fn supervise(&mut self) -> Result<(), HarnessError> {
        let exited = match self.consumer.as_mut() {
            Some(c) => c.try_wait()?,
            None => return Ok(()),
        };
        if let Some(status) = exited {
            self.consumer_crashes += 1;
            eprintln!("harness: consumer exited on its own ({status}); restarting it");
            self.start_consumer()?;
        }
        Ok(())
    }
}

/// A child process killed (SIGKILL) and reaped when dropped: an aborted run leaves nothing
/// running.
pub(super) struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_consumer();
    }
}

/// The arguments every child of run `p` takes, with `brokers` saying where the brokers are.
pub(super) fn child_args(p: &Planned, brokers: &BrokerArgs) -> Vec<String> {
    let mut v = vec![
        "--scenario".into(),
        p.scenario.name().into(),
        "--variant".into(),
        p.variant.name().into(),
        "--dest".into(),
        p.dest.clone(),
    ];
    v.extend(brokers.to_args());
    v
}
