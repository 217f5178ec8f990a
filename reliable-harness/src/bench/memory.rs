//! Resident memory per pending (unconfirmed) message, measured in a fresh child process so that
//! nothing else the benchmark did is in its heap.
//!
//! The child sends messages through the SDK producer over a transport that never confirms, so
//! every message stays pending with all the state the producer keeps for it (the message for
//! resending, its entry in the producer's driver, its completion and its handle). Resident
//! memory (`VmRSS`) is read before and after `--pending` such sends; the payload's bytes are
//! subtracted. For reference, the same number of bare [`Message`]s is
//! measured the same way.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use reliable_core::producer::{BatchHandle, Producer, ProducerConfig, SendHandle};
use reliable_core::{Attempt, Completion, Message, PublishError, Submission, Transport};
use serde::{Deserialize, Serialize};

use super::BenchArgs;
use crate::child::{payload, PAYLOAD_BYTES};
use crate::HarnessError;

/// Options of the hidden `bench-memory` child.
#[derive(clap::Args, Clone, Debug)]
pub struct MemoryArgs {
    /// Messages to keep pending.
    #[arg(long, default_value_t = 100_000)]
    pub pending: u64,
    /// Send in batches of 1,000 with `send_many` (one handle per batch) instead of `send`.
    #[arg(long)]
    pub batched: bool,
}

/// What the child measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryResult {
    /// Messages pending at the measurement.
    pub pending: u64,
    /// Payload bytes per message (excluded from the per-message figures).
    pub payload_bytes: u64,
    /// Resident bytes the pending messages added, in all.
    pub resident_delta_bytes: u64,
    /// Resident bytes per pending message, payload excluded.
    pub bytes_per_pending: f64,
    /// The same, sent in batches of 1,000 with `send_many` (one handle per batch).
    #[serde(default)]
    pub bytes_per_pending_batched: Option<f64>,
    /// Resident bytes per bare `Message` (id, key, headers), payload excluded: the part of the
    /// above that is the message itself.
    pub bytes_per_bare_message: f64,
}

impl MemoryResult {
    /// The markdown table of the result.
    pub fn markdown(&self) -> String {
        format!(
            "**Memory, SDK producer, {} pending messages ({}-byte payloads, excluded)**\n\n| | resident bytes per message |\n|---|---:|\n| pending in the SDK producer, `send` (message, driver entry, completion, handle) | {:.0} |\n| pending in the SDK producer, `send_many` of 1,000 (one handle per batch) | {} |\n| a bare message (id, idempotency key, headers) | {:.0} |\n",
            self.pending,
            self.payload_bytes,
            self.bytes_per_pending,
            self.bytes_per_pending_batched.map_or("–".to_owned(), |b| format!("{b:.0}")),
            self.bytes_per_bare_message
        )
    }
}

/// A broker that never confirms. Like the Kafka transport's client, it keeps each attempt's
/// [`Completion`] until the broker answers (here: never), so the figure includes what a
/// callback transport holds per message.
#[derive(Default)]
struct Held {
    attempts: std::sync::Mutex<Vec<Completion>>,
}

#[async_trait]
impl Transport for Held {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        std::future::pending().await
    }

    fn submit(
        self: std::sync::Arc<Self>,
        _msg: std::sync::Arc<Message>,
        done: Completion,
    ) -> Submission {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done);
        Submission::Now(Ok(Attempt::Callback))
    }
}

fn resident_bytes() -> Result<u64, HarnessError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| HarnessError::Setup("no VmRSS in /proc/self/status".into()))
}

/// Lets the spawned publish tasks reach their pending state.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The child: measures and prints the result as JSON.
pub async fn child(args: MemoryArgs) -> Result<(), HarnessError> {
    let n = args.pending;
    let producer = Producer::new(
        Held::default(),
        ProducerConfig {
            max_in_flight: (n as usize + 2_000).max(1),
            confirm_timeout: Duration::from_secs(3600),
            deadline: Duration::from_secs(7200),
            ..ProducerConfig::default()
        },
    );
    let mut handles: Vec<SendHandle> = Vec::with_capacity(n as usize + 1_000);
    let mut batches: Vec<BatchHandle> = Vec::with_capacity(n as usize / 1_000 + 2);
    // Warm-up: the runtime's and the producer's first allocations are not the messages'.
    for seq in 0..1_000 {
        handles.push(producer.send(Message::new(payload(seq))).await?);
    }
    settle().await;
    let before = resident_bytes()?;
    if args.batched {
        let mut seq = 0;
        while seq < n {
            let end = (seq + 1_000).min(n);
            let batch = (seq..end).map(|s| Message::new(payload(s))).collect();
            batches.push(producer.send_many(batch).await.map_err(|e| e.error)?);
            seq = end;
        }
    } else {
        for seq in 0..n {
            handles.push(producer.send(Message::new(payload(seq))).await?);
        }
    }
    settle().await;
    let after = resident_bytes()?;
    let pending = producer.stats();
    let bare_before = resident_bytes()?;
    let bare: Vec<Message> = (0..n).map(|seq| Message::new(payload(seq))).collect();
    let bare_after = resident_bytes()?;
    let per = |delta: u64| (delta as f64 / n.max(1) as f64 - PAYLOAD_BYTES as f64).round();
    let result = MemoryResult {
        pending: n,
        payload_bytes: PAYLOAD_BYTES as u64,
        resident_delta_bytes: after.saturating_sub(before),
        bytes_per_pending: per(after.saturating_sub(before)),
        bytes_per_pending_batched: None,
        bytes_per_bare_message: per(bare_after.saturating_sub(bare_before)),
    };
    tracing::info!(
        ?pending,
        bare = bare.len(),
        handles = handles.len(),
        batches = batches.len(),
        "measured"
    );
    println!(
        "{}",
        serde_json::to_string(&result).map_err(|e| HarnessError::Setup(e.to_string()))?
    );
    // Exit without tearing down 100k tasks.
    std::process::exit(0)
}

/// Runs the child, per message and batched, and reads its results.
pub async fn measure(args: &BenchArgs) -> Result<MemoryResult, HarnessError> {
    let mut result = run_child(args, false).await?;
    result.bytes_per_pending_batched = Some(run_child(args, true).await?.bytes_per_pending);
    Ok(result)
}

async fn run_child(args: &BenchArgs, batched: bool) -> Result<MemoryResult, HarnessError> {
    let exe = std::env::current_exe()?;
    let pending = args.pending.to_string();
    let mut child_args = vec!["bench-memory", "--pending", pending.as_str()];
    if batched {
        child_args.push("--batched");
    }
    let output = tokio::process::Command::new(exe)
        .args(child_args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(HarnessError::Setup(format!(
            "the memory child failed ({}): {stdout}",
            output.status
        )));
    }
    serde_json::from_str(stdout.trim())
        .map_err(|e| HarnessError::Setup(format!("the memory child's output ({stdout}): {e}")))
}
