//! Producer and pipeline throughput over the in-memory broker on one core (current-thread
//! runtime), each beside its baseline measured in the same run: publishing straight through the
//! transport (no tracking, no resend), and draining the queue with bare `next()` + `ack()` (no
//! pipeline). Plus heap allocations per message, measured with a counting global allocator.
//!
//! ```text
//! cargo bench -p reliable-core --bench throughput -- --warm-up-time 1 --measurement-time 3
//! cargo bench -p reliable-core --bench throughput -- --warm-up-time 1 --measurement-time 3 producer_
//! RELIABLE_BENCH_CLOCK=cpu cargo bench -p reliable-core --bench throughput -- producer_
//! ```
//!
//! The last argument is criterion's filter, a regular expression over the case names
//! (`producer_send_confirm`, `producer_send_many_1000`, ...). `RELIABLE_BENCH_CLOCK=cpu` times
//! the bench thread's CPU time instead of wall time (Linux): steadier on a shared machine,
//! where other processes take the core away from the bench for part of its wall time.
//!
//! What one core means here: everything runs on the bench's thread, in a current-thread Tokio
//! runtime: the sending task, the producer's driver task and the in-memory broker (which stores
//! and confirms inline, in the driver's call to `Transport::submit`). No other thread does any
//! of the work, so messages per second are per core. Each iteration times 1,000 messages
//! through a fresh broker and producer: the messages are built and the producer is created
//! before the clock starts; the driver task is spawned by the first send (timed), and every
//! confirm is awaited before the clock stops. The previous iteration's driver ends (dropping
//! its state, and the broker with the messages it stored) when it next runs, which is inside
//! the following iteration's time: that teardown is counted once per 1,000 messages, as for a
//! producer that lives for 1,000 messages.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use reliable_core::idempotency::InMemoryIdempotencyStore;
use reliable_core::memory::InMemoryBroker;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, Pipeline, PipelineConfig, RetryLayer,
    RetryPolicy,
};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{DeliverySource, Message, Transport};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Set only while `report_allocations` counts: the timed cases run without the shared
/// counter's atomic add on every allocation (a plain load instead).
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count_allocation() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BATCH: usize = 1_000;

/// When a timed section started, on the clock the cases are timed with: wall time by default;
/// with `RELIABLE_BENCH_CLOCK=cpu` (Linux), the CPU time of the bench's thread, which counts
/// all the work (every task runs on that thread) and leaves out the time other processes
/// take the core away, for steadier figures on a shared machine.
struct Stamp {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Stamp {
    fn now() -> Self {
        static CPU: OnceLock<bool> = OnceLock::new();
        let cpu = *CPU.get_or_init(|| {
            let cpu = std::env::var("RELIABLE_BENCH_CLOCK").is_ok_and(|c| c == "cpu");
            if cpu && thread_cpu_time().is_none() {
                eprintln!("RELIABLE_BENCH_CLOCK=cpu: no thread CPU clock here; timing wall time");
            }
            cpu
        });
        Self {
            wall: Instant::now(),
            cpu: if cpu { thread_cpu_time() } else { None },
        }
    }

    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => self.wall.elapsed(),
        }
    }
}

/// The CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_time() -> Option<Duration> {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on 64-bit Linux).
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    }
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("order-{i}")).with_destination("q"))
        .collect()
}

/// Awaits every confirm.
async fn confirm_all(handles: Vec<reliable_core::producer::SendHandle>) {
    for h in handles {
        if let Err(e) = h.await {
            panic!("confirm: {e}");
        }
    }
}

/// Sends `msgs` through a fresh producer and awaits every confirm.
async fn produce(msgs: Vec<Message>) -> Duration {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    let start = Stamp::now();
    let mut handles = Vec::with_capacity(msgs.len());
    for m in msgs {
        match producer.send(m).await {
            Ok(h) => handles.push(h),
            Err(e) => panic!("send: {e}"),
        }
    }
    confirm_all(handles).await;
    start.elapsed()
}

/// Sends `msgs` in batches of `chunk` through a fresh producer (with an outbox in `dir` when
/// given) and awaits every confirm.
async fn produce_batches(
    msgs: Vec<Message>,
    chunk: usize,
    dir: Option<&std::path::Path>,
) -> Duration {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    #[cfg(feature = "outbox")]
    let outbox_path =
        dir.map(|d| d.join(format!("bench-{}.outbox", reliable_core::MessageId::new())));
    let producer = match dir {
        #[cfg(feature = "outbox")]
        Some(_) => {
            let path = outbox_path.clone().unwrap_or_default();
            let outbox = match reliable_core::outbox::Outbox::open(&path) {
                Ok(o) => o,
                Err(e) => panic!("outbox: {e}"),
            };
            Producer::with_outbox(broker.transport(), ProducerConfig::default(), outbox)
        }
        _ => Producer::new(broker.transport(), ProducerConfig::default()),
    };
    let start = Stamp::now();
    let mut handles = Vec::with_capacity(msgs.len());
    let mut msgs = msgs.into_iter().peekable();
    while msgs.peek().is_some() {
        let batch: Vec<Message> = msgs.by_ref().take(chunk).collect();
        match producer.send_batch(batch).await {
            Ok(h) => handles.extend(h),
            Err(e) => panic!("send: {e}"),
        }
    }
    confirm_all(handles).await;
    let took = start.elapsed();
    #[cfg(feature = "outbox")]
    if let Some(path) = outbox_path {
        let _ = std::fs::remove_file(path);
    }
    took
}

/// Sends `msgs` in batches of `chunk` through a fresh producer with one handle per batch
/// (`send_many`) and awaits every batch.
async fn produce_many(msgs: Vec<Message>, chunk: usize) -> Duration {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::new(broker.transport(), ProducerConfig::default());
    let start = Stamp::now();
    let mut handles = Vec::with_capacity(msgs.len().div_ceil(chunk.max(1)));
    let mut msgs = msgs.into_iter().peekable();
    while msgs.peek().is_some() {
        let batch: Vec<Message> = msgs.by_ref().take(chunk).collect();
        match producer.send_many(batch).await {
            Ok(h) => handles.push(h),
            Err(e) => panic!("send: {e}"),
        }
    }
    for h in handles {
        let outcome = h.await;
        if let Some(e) = outcome.handed_back.first() {
            panic!("confirm: {e}");
        }
    }
    start.elapsed()
}

/// Baseline for `produce`: the same messages published straight through the transport.
async fn publish_raw(msgs: Vec<Message>) -> Duration {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let t = broker.transport();
    let start = Stamp::now();
    for m in &msgs {
        if let Err(e) = t.publish(m).await {
            panic!("publish: {e}");
        }
    }
    start.elapsed()
}

/// A queue holding `msgs`, published outside any timing.
async fn filled(msgs: &[Message]) -> InMemoryBroker {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    broker.declare_queue("dlq");
    let t = broker.transport();
    for m in msgs {
        if let Err(e) = t.publish(m).await {
            panic!("publish: {e}");
        }
    }
    broker
}

/// Baseline for `consume`: the queue drained with bare `next()` + `ack()`.
async fn consume_raw(msgs: Vec<Message>) -> Duration {
    let broker = filled(&msgs).await;
    let mut source = broker.consumer("q").end_when_drained();
    let start = Stamp::now();
    loop {
        match source.next().await {
            Ok(Some(delivery)) => {
                if let Err(e) = delivery.ack().await {
                    panic!("ack: {e}");
                }
            }
            Ok(None) => break,
            Err(e) => panic!("next: {e}"),
        }
    }
    start.elapsed()
}

/// Fills a queue with `msgs`, then times a deduplicating pipeline draining it.
async fn consume(msgs: Vec<Message>) -> Duration {
    let broker = filled(&msgs).await;
    let handler = HandlerBuilder::new(handler_fn(|_m: Message| async { Ok(()) }))
        .layer(RetryLayer::new(RetryPolicy::default()))
        .layer(DedupeLayer::new(Arc::new(
            InMemoryIdempotencyStore::default(),
        )))
        .build();
    let dl = DeadLetter::publish(
        Producer::new(broker.transport(), ProducerConfig::default()),
        "dlq",
    );
    let pipeline = Pipeline::new(broker.consumer("q").end_when_drained(), handler, dl).with_config(
        PipelineConfig {
            concurrency: 64,
            ..PipelineConfig::default()
        },
    );
    let start = Stamp::now();
    if let Err(e) = pipeline.run().await {
        panic!("pipeline: {e}");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("in_memory");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(BenchmarkId::new("baseline_transport_publish", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += publish_raw(messages(BATCH)).await;
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("producer_send_confirm", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += produce(messages(BATCH)).await;
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("producer_send_batch_100", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += produce_batches(messages(BATCH), 100, None).await;
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("producer_send_many_1000", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += produce_many(messages(BATCH), 1_000).await;
            }
            total
        })
    });
    #[cfg(feature = "outbox")]
    {
        // The outbox files live under the target directory (a real disk, fsync per commit).
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        group.bench_function(
            BenchmarkId::new("producer_outbox_send_batch_100", BATCH),
            |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += produce_batches(messages(BATCH), 100, Some(dir)).await;
                    }
                    total
                })
            },
        );
    }
    group.bench_function(BenchmarkId::new("baseline_next_ack", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += consume_raw(messages(BATCH)).await;
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("pipeline_dedupe_ack", BATCH), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += consume(messages(BATCH)).await;
            }
            total
        })
    });
    group.finish();
}

/// Heap allocations per message on each path (setup excluded).
fn report_allocations() {
    COUNTING.store(true, Ordering::Relaxed);
    let rt = runtime();
    let n = 10_000;
    let msgs = messages(n);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    rt.block_on(produce(msgs));
    let produced = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let msgs = messages(n);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    rt.block_on(produce_many(msgs, 1_000));
    let produced_many = ALLOCATIONS.load(Ordering::Relaxed) - before;

    // Count the consume path alone: publish into a queue first, outside the count.
    let msgs = messages(n);
    let broker = rt.block_on(filled(&msgs));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    rt.block_on(async {
        let handler = HandlerBuilder::new(handler_fn(|_m: Message| async { Ok(()) }))
            .layer(DedupeLayer::new(Arc::new(
                InMemoryIdempotencyStore::default(),
            )))
            .build();
        let _ = Pipeline::new(
            broker.consumer("q").end_when_drained(),
            handler,
            DeadLetter::BrokerReject,
        )
        .run()
        .await;
    });
    let consumed = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "allocations per message: producer send+confirm {:.1} (incl. transport store), send_many of 1,000 {:.1}, pipeline dedupe+handle+ack {:.1}",
        produced as f64 / n as f64,
        produced_many as f64 / n as f64,
        consumed as f64 / n as f64
    );
    COUNTING.store(false, Ordering::Relaxed);
}

criterion_group!(benches, bench);

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
