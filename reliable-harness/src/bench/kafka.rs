//! Kafka producers: raw rdkafka, the SDK and Kafka's own Java producer, with the same settings.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::FutureExt;
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::Message;
use reliable_kafka::config::producer_preset;
use reliable_kafka::rdkafka::message::{Header, OwnedHeaders};
use reliable_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use reliable_kafka::rdkafka::ClientConfig;
use reliable_kafka::{ensure_topic, KafkaTransport, TopicSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{
    cpu_time_of, stamp, through_producer, windowed, BenchArgs, KafkaCase, Report, Round, Sample,
    Tally,
};
use crate::child::{payload, KAFKA_PARTITIONS, PAYLOAD_BYTES};
use crate::HarnessError;

const GROUP: &str = "Kafka, acks=all + idempotence, RF 3, min.insync.replicas 2";
const RAW: &str = "raw rdkafka (FutureProducer)";
const RAW_HEADERS: &str =
    "raw rdkafka + the SDK's identity header (as the SDK writes it, a fresh id per message)";
const SDK: &str = "SDK";
const JAVA: &str = "Java producer (kafka-tools ProducerPerformance 4.3.1; CPU: its reported window, sampled every 20 ms)";

/// How often the Java child's CPU time is sampled, to find it at the start of its window.
const JAVA_CPU_SAMPLE: Duration = Duration::from_millis(20);

/// librdkafka's defaults for the batching settings the preset leaves alone, given to the Java
/// producer so both batch alike (Java's own `batch.size` default is 16 KiB).
const LINGER_MS: &str = "5";
const BATCH_BYTES: &str = "1000000";

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

/// The SDK's producer preset: the settings every case uses.
fn preset(args: &BenchArgs) -> ClientConfig {
    producer_preset(
        &args.brokers.kafka_bootstrap,
        ProducerConfig::default().confirm_timeout,
    )
}

/// The identity headers the SDK writes on a message of its own, for a raw record: built from a
/// fresh [`Message`] each time, so every record carries a distinct id (a UUIDv7 generated for
/// it), as the SDK's do.
fn identity_headers() -> OwnedHeaders {
    Message::new(Vec::new())
        .wire_headers()
        .iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// Raw rdkafka; with `headers`, each record also carries the identity headers the SDK writes
/// (see [`identity_headers`]: a distinct id per record), to tell their cost from the SDK's own.
async fn raw(
    args: &BenchArgs,
    topic: &str,
    messages: u64,
    headers: bool,
) -> Result<Sample, HarnessError> {
    let producer: FutureProducer = preset(args).create().map_err(setup)?;
    let send = |seq: u64| {
        let p = payload(seq);
        let producer = producer.clone();
        // Once per message: a fresh id each (resends of the same record below keep it).
        let identity = headers.then(identity_headers);
        async move {
            loop {
                let mut record = FutureRecord::<(), [u8]>::to(topic).payload(&p);
                if let Some(h) = &identity {
                    record = record.headers(h.clone());
                }
                match producer.send_result(record) {
                    Ok(delivery) => return Ok(delivery),
                    Err((e, _))
                        if e.rdkafka_error_code()
                            == Some(
                                reliable_kafka::rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ) =>
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(setup(e)),
                }
            }
        }
    };
    windowed(messages, args.kafka_window, |seq, permit| {
        let delivery = send(seq);
        async move {
            let delivery = delivery.await?;
            Ok(async move {
                let outcome = delivery.await.map_err(|e| e.to_string())?;
                drop(permit);
                outcome.map(|_| ()).map_err(|(e, _)| e.to_string())
            }
            .boxed())
        }
    })
    .await
}

async fn sdk(args: &BenchArgs, topic: &str, messages: u64) -> Result<Sample, HarnessError> {
    let transport = KafkaTransport::builder(&args.brokers.kafka_bootstrap)
        .default_topic(TopicSpec::new(topic).partitions(KAFKA_PARTITIONS))
        .build()
        .await?;
    let producer = Producer::new(
        transport.clone(),
        ProducerConfig {
            max_in_flight: args.kafka_window,
            ..transport.recommended_producer_config()
        },
    );
    through_producer(producer, messages, |seq| Message::new(payload(seq))).await
}

/// Kafka's Java producer benchmark with the preset's settings, in a JVM of its own.
///
/// Its CPU is counted over the window it reports, not the JVM's start: the child's
/// `/proc/<pid>/stat` (utime + stime) is sampled every [`JAVA_CPU_SAMPLE`] while it runs and
/// read again when its summary line arrives (printed after its producer closed, the end of its
/// window); the window's start is that moment less the elapsed time the summary implies
/// (records / records per second), and the CPU there is interpolated between samples.
async fn java(
    args: &BenchArgs,
    libs: &Path,
    topic: &str,
    messages: u64,
) -> Result<Sample, HarnessError> {
    let config = preset(args);
    let prop = |k: &str, default: &str| format!("{k}={}", config.get(k).unwrap_or(default));
    let mut child = tokio::process::Command::new("java")
        .arg("-Xmx1g")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("org.apache.kafka.tools.ProducerPerformance")
        .args(["--topic", topic])
        .args(["--num-records", &messages.to_string()])
        .args(["--record-size", &PAYLOAD_BYTES.to_string()])
        .args(["--throughput", "-1"])
        .arg("--producer-props")
        .arg(format!(
            "bootstrap.servers={}",
            args.brokers.kafka_bootstrap
        ))
        .arg(prop("acks", "all"))
        .arg(prop("enable.idempotence", "true"))
        .arg(prop("max.in.flight.requests.per.connection", "5"))
        .arg(prop("retries", "2147483647"))
        .arg(format!(
            "linger.ms={}",
            config.get("linger.ms").unwrap_or(LINGER_MS)
        ))
        .arg(format!(
            "batch.size={}",
            config.get("batch.size").unwrap_or(BATCH_BYTES)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HarnessError::Setup(format!("cannot run java: {e}")))?;
    let pid = child.id();
    let (Some(out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(setup("the Java producer's output is not piped"));
    };
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(out).lines();
    let mut stdout = String::new();
    let mut samples: Vec<(Instant, Duration)> = Vec::new();
    let mut end: Option<(Instant, Option<Duration>)> = None;
    let mut tick = tokio::time::interval(JAVA_CPU_SAMPLE);
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => {
                    if end.is_none() && is_summary(&line) {
                        end = Some((Instant::now(), pid.and_then(cpu_time_of)));
                    }
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                None => break,
            },
            _ = tick.tick(), if end.is_none() => {
                if let Some(cpu) = pid.and_then(cpu_time_of) {
                    samples.push((Instant::now(), cpu));
                }
            }
        }
    }
    let status = child.wait().await?;
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        return Err(HarnessError::Setup(format!(
            "ProducerPerformance failed ({status}): {}{}",
            stdout.lines().last().unwrap_or_default(),
            stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
        )));
    }
    let mut sample = parse_java(&stdout, messages)?;
    if let Some((ended, Some(cpu_end))) = end {
        let started = ended.checked_sub(sample.took).unwrap_or(ended);
        sample.cpu = cpu_at(&samples, started).map(|c| cpu_end.saturating_sub(c));
    }
    Ok(sample)
}

/// Whether `line` is `ProducerPerformance`'s summary (the periodic lines have no percentiles).
fn is_summary(line: &str) -> bool {
    line.contains("records sent") && line.contains("50th")
}

/// The CPU time at `at`, interpolated between the samples around it (the first sample's when
/// `at` is before it; `None` without samples).
fn cpu_at(samples: &[(Instant, Duration)], at: Instant) -> Option<Duration> {
    let after = samples.iter().position(|(t, _)| *t >= at);
    match after {
        Some(0) => samples.first().map(|s| s.1),
        Some(i) => {
            let ((t0, c0), (t1, c1)) = (samples[i - 1], samples[i]);
            let span = t1.saturating_duration_since(t0).as_secs_f64();
            let part = at.saturating_duration_since(t0).as_secs_f64() / span.max(1e-9);
            Some(c0 + c1.saturating_sub(c0).mul_f64(part.clamp(0.0, 1.0)))
        }
        None => samples.last().map(|s| s.1),
    }
}

/// Reads the summary line of `ProducerPerformance`: "N records sent, R records/sec (..), A ms
/// avg latency, M ms max latency, P50 ms 50th, P95 ms 95th, P99 ms 99th, .. ms 99.9th."
fn parse_java(stdout: &str, messages: u64) -> Result<Sample, HarnessError> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| is_summary(l))
        .ok_or_else(|| {
            HarnessError::Setup(format!(
                "no summary line from ProducerPerformance in: {stdout}"
            ))
        })?;
    let before = |marker: &str| -> Option<f64> {
        let head = &line[..line.find(marker)?];
        head.split([' ', ',', '('])
            .filter(|w| !w.is_empty())
            .nth_back(if marker == " records/sec" { 0 } else { 1 })?
            .parse()
            .ok()
    };
    let (Some(rate), Some(p50), Some(p99)) =
        (before(" records/sec"), before(" 50th"), before(" 99th"))
    else {
        return Err(HarnessError::Setup(format!(
            "cannot read ProducerPerformance's summary: {line}"
        )));
    };
    Ok(Sample {
        messages,
        took: Duration::from_secs_f64(messages as f64 / rate.max(1e-9)),
        latencies_us: Vec::new(),
        reported_ms: Some((p50, p99)),
        cpu: None,
    })
}

/// Runs the Kafka producer cases.
pub async fn run(args: &BenchArgs, report: &mut Report) -> Result<(), HarnessError> {
    let libs = args.kafka_libs.clone();
    let java_libs = || {
        libs.as_deref().ok_or_else(|| {
        HarnessError::Setup(
            "the Java producer needs Apache Kafka's jars: set RELIABLE_KAFKA_LIBS (eval \"$(scripts/brokers env)\") or pass --kafka-libs".into(),
        )
        })
    };
    let topic = format!("bench-producer-{}", stamp());
    ensure_topic(
        &preset(args),
        &TopicSpec::new(&topic).partitions(KAFKA_PARTITIONS),
    )
    .await
    .map_err(reliable_kafka::Error::from)?;
    let (mut raw_t, mut sdk_t, mut java_t) = (Tally::default(), Tally::default(), Tally::default());
    let mut headers_t = Tally::default();
    for round in Round::all(args.rounds) {
        for case in round.in_turn(&args.kafka_cases) {
            match case {
                KafkaCase::Raw => {
                    let s = raw(args, &topic, args.kafka_messages, false).await?;
                    raw_t.add(round, s);
                }
                KafkaCase::RawHeaders => {
                    let s = raw(args, &topic, args.kafka_messages, true).await?;
                    headers_t.add(round, s);
                }
                KafkaCase::Sdk => {
                    sdk_t.add(round, sdk(args, &topic, args.kafka_messages).await?);
                }
                KafkaCase::Java => {
                    let s = java(args, java_libs()?, &topic, args.kafka_messages).await?;
                    java_t.add(round, s);
                }
            }
        }
        eprintln!(
            "bench: Kafka: raw {:?}, raw + headers {:?}, SDK {:?}, Java {:?}",
            raw_t.rounds(),
            headers_t.rounds(),
            sdk_t.rounds(),
            java_t.rounds()
        );
    }
    let w = Some(args.kafka_window);
    report.push(raw_t.result(GROUP, RAW, w));
    report.push(headers_t.result(GROUP, RAW_HEADERS, w));
    report.push(sdk_t.result(GROUP, SDK, w));
    report.push(java_t.result(GROUP, JAVA, None));
    report.target(
        "Kafka: SDK / raw rdkafka carrying the SDK's identity header",
        (GROUP, SDK, w),
        (GROUP, RAW_HEADERS, w),
        0.95,
    );
    report.context(
        "Kafka: SDK / raw rdkafka without the identity header",
        (GROUP, SDK, w),
        (GROUP, RAW, w),
    );
    report.target(
        "Kafka: SDK / Java producer",
        (GROUP, SDK, w),
        (GROUP, JAVA, None),
        1.10,
    );
    report.notes.push(format!(
        "Kafka: {} messages per case to a {KAFKA_PARTITIONS}-partition topic; every client with the SDK's producer preset (acks=all, enable.idempotence=true, max.in.flight 5, unbounded retries), linger.ms {LINGER_MS} and batch.size {BATCH_BYTES} (librdkafka's defaults, passed to Java); raw and SDK keep at most {} unconfirmed; Java's latencies are its own report; client CPU is the measured window's (for Java, its child process over the window it reports)",
        args.kafka_messages, args.kafka_window
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_java_summary_line() {
        let out = "1000 records sent, 500.0 records/sec (0.05 MB/sec), 3.1 ms avg latency, 9.0 ms max latency.\n\
                   200000 records sent, 98765.4 records/sec (9.42 MB/sec), 12.34 ms avg latency, 250.00 ms max latency, 7 ms 50th, 30 ms 95th, 45 ms 99th, 120 ms 99.9th.\n";
        let s = parse_java(out, 200_000).expect("parsed");
        assert!((s.rate() - 98765.4).abs() < 1.0, "rate {}", s.rate());
        assert_eq!(s.reported_ms, Some((7.0, 45.0)));
        assert!(parse_java("nothing here", 1).is_err());
    }

    #[test]
    fn every_raw_record_carries_an_id_of_its_own() {
        let id = |h: &OwnedHeaders| {
            use reliable_kafka::rdkafka::message::Headers;
            h.iter()
                .find(|h| h.key == reliable_core::message::headers::MESSAGE_ID)
                .and_then(|h| h.value)
                .map(<[u8]>::to_vec)
        };
        let (a, b) = (identity_headers(), identity_headers());
        assert!(id(&a).is_some());
        assert_ne!(id(&a), id(&b));
    }

    #[test]
    fn the_cpu_at_a_moment_is_interpolated_between_samples() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let samples = [(t, ms(100)), (t + ms(20), ms(140))];
        assert_eq!(cpu_at(&samples, t + ms(10)), Some(ms(120)));
        assert_eq!(cpu_at(&samples, t), Some(ms(100)));
        assert_eq!(cpu_at(&samples, t + ms(50)), Some(ms(140)));
        assert_eq!(cpu_at(&[], t), None);
    }
}
