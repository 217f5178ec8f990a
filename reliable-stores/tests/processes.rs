//! Proof: two consumer processes sharing one idempotency store, fed duplicates through a real
//! RabbitMQ queue, apply each effect once. A negative control gives each process its own
//! in-memory store and must show duplicate effects, so we know the check can see them.
//!
//! This test binary is its own worker: the orchestrator (`main` without arguments) re-runs it
//! with `--worker`. Each worker consumes the shared quorum queue with the SDK's
//! [`AmqpConsumer`] under the core [`Pipeline`] and journals every effect it applies:
//!
//! - `redis`: a [`DedupeLayer`] over one [`RedisStore`] shared by both processes;
//! - `postgres`: the inbox form, [`PostgresStore::apply_once`], the effect a row in PostgreSQL
//!   written in the same transaction as the key;
//! - `memory` (control): a [`DedupeLayer`] over an in-memory store per process.
//!
//! Every message is published twice in a row with the same idempotency key, so the two copies
//! usually reach different processes at the same moment. The check: every key applied
//! (nothing lost), no key applied twice (safe stores), both processes did work, the queue is
//! empty at the end; and the control applied some key twice.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use reliable_amqp::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::{Connection, ConnectionProperties};
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::idempotency::InMemoryIdempotencyStore;
use reliable_core::message::IdempotencyKey;
use reliable_core::pipeline::{
    handler_fn, DeadLetter, DedupeLayer, Handler, HandlerBuilder, HandlerError, Pipeline,
    PipelineConfig,
};
use reliable_core::{Message, Transport};
use reliable_stores::{
    Applied, ApplyError, PostgresStore, PostgresStoreConfig, RedisStore, RedisStoreConfig,
};
use reliable_test_support::{amqp_url, postgres_url, redis_url, unique_name, Missing};

/// Distinct keys per scenario; each is published twice.
const KEYS: usize = 300;
/// A worker stops when it has been idle this long after its first delivery.
const IDLE: Duration = Duration::from_secs(3);
/// Hard limits, so the test always ends.
const WORKER_DEADLINE: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        if let Err(e) = rt.block_on(worker(&args[2..])) {
            eprintln!("worker failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo test -- --list` and filters that exclude this binary's one test.
    if args.iter().any(|a| a == "--list") {
        println!("two_consumer_processes_sharing_a_store_apply_each_effect_once: test");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let failures = rt.block_on(orchestrate());
    if failures.is_empty() {
        println!("test two_consumer_processes_sharing_a_store_apply_each_effect_once ... ok");
    } else {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
}

/// Everything the processes need, or why it is missing.
struct Env {
    amqp: String,
    redis: String,
    postgres: String,
}

fn env() -> Result<Env, Missing> {
    Ok(Env {
        amqp: amqp_url()?,
        redis: redis_url()?,
        postgres: postgres_url()?,
    })
}

#[derive(Debug)]
struct Outcome {
    store: &'static str,
    applied: usize,
    distinct: usize,
    duplicate_effects: usize,
    per_worker: [usize; 2],
    left_in_queue: u32,
}

async fn orchestrate() -> Vec<String> {
    let env = match env() {
        Ok(env) => env,
        Err(missing) => {
            reliable_test_support::skip_or_fail(&missing);
            return Vec::new();
        }
    };
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for store in ["redis", "postgres", "memory"] {
        match scenario(&env, store).await {
            Ok(o) => {
                let safe = store != "memory";
                if safe {
                    if o.duplicate_effects != 0 {
                        failures.push(format!(
                            "{store}: {} duplicate effects",
                            o.duplicate_effects
                        ));
                    }
                    if o.distinct != KEYS {
                        failures.push(format!("{store}: {} of {KEYS} keys applied", o.distinct));
                    }
                } else if o.duplicate_effects == 0 {
                    failures.push(
                        "memory control: no duplicate effect seen, so the check could not see one"
                            .into(),
                    );
                }
                if o.per_worker.contains(&0) {
                    failures.push(format!(
                        "{store}: one process applied nothing: {:?}",
                        o.per_worker
                    ));
                }
                if o.left_in_queue != 0 {
                    failures.push(format!(
                        "{store}: {} messages left in the queue",
                        o.left_in_queue
                    ));
                }
                rows.push(o);
            }
            Err(e) => failures.push(format!("{store}: {e}")),
        }
    }
    println!("| store | deliveries | effects | distinct keys | duplicate effects | per process | left in queue |");
    println!("|---|---|---|---|---|---|---|");
    for o in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:?} | {} |",
            o.store,
            2 * KEYS,
            o.applied,
            o.distinct,
            o.duplicate_effects,
            o.per_worker,
            o.left_in_queue
        );
    }
    failures
}

async fn scenario(env: &Env, store: &'static str) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let queue = unique_name(&format!("shared-store-{store}"));
    let table = unique_name("effects").replace('-', "_");
    let conn = Connection::connect(&env.amqp, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect to RabbitMQ: {e}"))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    topology::declare_queue(&ch, &queue_spec(&queue))
        .await
        .map_err(|e| e.to_string())?;
    let store_table = unique_name("idem").replace('-', "_");
    if store == "postgres" {
        // Once, before the workers start: two concurrent CREATE TABLEs of one name race.
        pg_sql(
            &env.postgres,
            &format!("CREATE TABLE {table} (key text NOT NULL, pid integer)"),
        )
        .await?;
    }
    let journals = [dir.path().join("w0"), dir.path().join("w1")];
    let mut workers = Vec::new();
    for journal in &journals {
        workers.push(spawn_worker(store, &queue, journal, &table, &store_table)?);
    }
    for w in &mut workers {
        wait_ready(w)?;
    }

    let publisher = AmqpPublisher::connect(&env.amqp, AmqpSettings::safe())
        .await
        .map_err(|e| e.to_string())?;
    let run = unique_name("k");
    let mut messages = Vec::new();
    for i in 0..KEYS {
        let key = IdempotencyKey::new(format!("{run}-{i}")).map_err(|e| e.to_string())?;
        for copy in 0..2 {
            messages.push(
                Message::new(format!("{i}/{copy}").into_bytes())
                    .with_key(key.clone())
                    .with_routing_key(&queue),
            );
        }
    }
    let published = join_all(messages.iter().map(|m| publisher.publish(m))).await;
    if let Some(e) = published.iter().find_map(|r| r.as_ref().err()) {
        return Err(format!("publish: {e}"));
    }

    for (i, w) in workers.iter_mut().enumerate() {
        let status = wait_exit(w, WORKER_DEADLINE)?;
        if !status.success() {
            return Err(format!("worker {i} exited with {status}"));
        }
    }
    let mut per_key: HashMap<String, usize> = HashMap::new();
    let mut per_worker = [0; 2];
    for (i, journal) in journals.iter().enumerate() {
        for key in read_effects(journal)? {
            per_worker[i] += 1;
            *per_key.entry(key).or_default() += 1;
        }
    }
    let applied: usize = per_key.values().sum();
    if store == "postgres" {
        let rows = count_rows(&env.postgres, &table).await?;
        if rows != applied {
            return Err(format!(
                "the journals say {applied} effects, the table holds {rows}"
            ));
        }
    }
    let passive = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let left_in_queue = passive.message_count();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    Ok(Outcome {
        store,
        applied,
        distinct: per_key.len(),
        duplicate_effects: applied - per_key.len(),
        per_worker,
        left_in_queue,
    })
}

fn spawn_worker(
    store: &str,
    queue: &str,
    journal: &Path,
    table: &str,
    store_table: &str,
) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .args(["--worker", store, queue, table, store_table])
        .arg(journal)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn worker: {e}"))
}

/// Waits for the worker's `ready` line (it consumes by then).
fn wait_ready(child: &mut Child) -> Result<(), String> {
    let stdout = child.stdout.take().ok_or("no worker stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().and_then(Result::ok);
        let _ = tx.send(ready);
        for _ in lines {}
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Some(line)) if line == "ready" => Ok(()),
        Ok(other) => {
            let _ = child.kill();
            Err(format!("worker said {other:?} instead of ready"))
        }
        Err(_) => {
            let _ = child.kill();
            Err(format!("worker not ready within {READY_TIMEOUT:?}"))
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("worker still running after {limit:?}; killed"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_effects(journal: &Path) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(journal).map_err(|e| format!("read {}: {e}", journal.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("E "))
        .map(str::to_owned)
        .collect())
}

/// A connection to the test database (through the store's pool).
async fn pg_client(url: &str) -> Result<reliable_stores::deadpool_postgres::Object, String> {
    let store = PostgresStore::connect(url, PostgresStoreConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    store.pool().get().await.map_err(|e| e.to_string())
}

async fn pg_sql(url: &str, sql: &str) -> Result<(), String> {
    pg_client(url)
        .await?
        .batch_execute(sql)
        .await
        .map_err(|e| format!("{sql}: {e:?}"))
}

async fn count_rows(url: &str, table: &str) -> Result<usize, String> {
    let row = pg_client(url)
        .await?
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map_err(|e| format!("{e:?}"))?;
    usize::try_from(row.get::<_, i64>(0)).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// the worker process
// ---------------------------------------------------------------------------------------------

/// Appends `E <key>` lines: the effects this process applied.
struct EffectJournal(Mutex<std::fs::File>);

impl EffectJournal {
    fn record(&self, key: &str) -> Result<(), HandlerError> {
        let mut file = self
            .0
            .lock()
            .map_err(|_| HandlerError::permanent("journal lock"))?;
        writeln!(file, "E {key}").map_err(HandlerError::permanent)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn worker(args: &[String]) -> Result<(), String> {
    let [store, queue, table, store_table, journal] = args else {
        return Err(format!("worker arguments: {args:?}"));
    };
    let env = env().map_err(|m| m.0)?;
    let journal = Arc::new(EffectJournal(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(PathBuf::from(journal))
            .map_err(|e| e.to_string())?,
    )));
    let last = Arc::new(AtomicU64::new(0));
    let lease = Duration::from_secs(30);

    // The effect: journal the key, slowly enough that the two copies of a key overlap.
    let effect = {
        let journal = journal.clone();
        handler_fn(move |msg: Message| {
            let journal = journal.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                journal.record(msg.idempotency_key().as_str())
            }
        })
    };
    let handler: Arc<dyn Handler> = match store.as_str() {
        "redis" => {
            let config = RedisStoreConfig {
                key_prefix: format!("{store_table}:"),
                lease,
                ..RedisStoreConfig::default()
            };
            let shared = RedisStore::connect(&env.redis, config)
                .await
                .map_err(|e| e.to_string())?;
            let layer = DedupeLayer::new(Arc::new(shared)).with_in_progress_wait(lease);
            Arc::new(HandlerBuilder::new(effect).layer(layer).build())
        }
        "memory" => {
            let own = InMemoryIdempotencyStore::default();
            let layer = DedupeLayer::new(Arc::new(own)).with_in_progress_wait(lease);
            Arc::new(HandlerBuilder::new(effect).layer(layer).build())
        }
        "postgres" => {
            let config = PostgresStoreConfig {
                table: store_table.clone(),
                lease,
                ..PostgresStoreConfig::default()
            };
            // The orchestrator created the effects table `table`.
            let shared = PostgresStore::connect(&env.postgres, config)
                .await
                .map_err(|e| e.to_string())?;
            let (table, journal) = (table.clone(), journal.clone());
            Arc::new(handler_fn(move |msg: Message| {
                let (shared, journal) = (shared.clone(), journal.clone());
                let insert = format!("INSERT INTO {table} (key, pid) VALUES ($1, $2)");
                async move {
                    let key = msg.idempotency_key().as_str().to_owned();
                    let pid = std::process::id() as i32;
                    let applied = shared
                        .apply_once(&msg.idempotency_key(), |tx| {
                            let key = key.clone();
                            Box::pin(async move {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                tx.execute(insert.as_str(), &[&key, &pid]).await
                            })
                        })
                        .await;
                    match applied {
                        Ok(Applied::New(_)) => journal.record(&key),
                        Ok(Applied::Duplicate) => Ok(()),
                        Err(ApplyError::Store(e)) => Err(HandlerError::unavailable(e)),
                        Err(ApplyError::Write(e)) => Err(HandlerError::transient(e)),
                    }
                }
            }))
        }
        other => return Err(format!("unknown store {other}")),
    };
    let handler = {
        let last = last.clone();
        handler_fn(move |msg: Message| {
            let (handler, last) = (handler.clone(), last.clone());
            async move {
                last.store(now_ms(), Ordering::Relaxed);
                let r = handler.handle(&msg).await;
                last.store(now_ms(), Ordering::Relaxed);
                r
            }
        })
    };

    let source = AmqpConsumer::connect_checked(&env.amqp, &queue_spec(queue), AmqpSettings::safe())
        .await
        .map_err(|e| e.to_string())?;
    println!("ready");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let idle = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = last.load(Ordering::Relaxed);
            let quiet = seen != 0 && now_ms().saturating_sub(seen) > IDLE.as_millis() as u64;
            if quiet || started.elapsed() > WORKER_DEADLINE {
                return;
            }
        }
    };
    let config = PipelineConfig {
        concurrency: 8,
        ..PipelineConfig::default()
    };
    Pipeline::new(source, handler, DeadLetter::BrokerReject)
        .with_config(config)
        .run_until(idle)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The workers' queue: a quorum queue dead-lettering at least once to `<queue>.dlq`, so the
/// pipeline may reject a poison message to the broker.
fn queue_spec(queue: &str) -> QueueSpec {
    QueueSpec::quorum(queue).with_dead_letter(DeadLetterTarget::new(
        format!("{queue}.dlx"),
        format!("{queue}.dlq"),
    ))
}
