//! A poison message that aborts its consumer process (issue 14, item 3; loss-matrix row L10),
//! against the real RabbitMQ: the test runs the consumer as a child process (this test binary
//! again, in `child_consumer_process`), which calls `std::process::abort()` on one message;
//! the test restarts it after each crash. The quorum queue's `x-delivery-count` survives the
//! restarts, so after `max_deliveries` crashes the message is dead-lettered with its origin
//! without running its handler again, and every other message is applied once.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::{AmqpConsumer, AmqpPublisher};
use reliable_core::message::headers;
use reliable_core::pipeline::{handler_fn, DeadLetter, HandlerError, Pipeline, PipelineConfig};
use reliable_core::producer::{Producer, ProducerConfig};
use reliable_core::{Message, Transport};
use reliable_test_support::{require, unique_name};

/// The child's instructions: queue, dead-letter exchange, effects file (tab-separated).
const CHILD_ENV: &str = "RELIABLE_POISON_CHILD";
const MAX_DELIVERIES: u32 = 3;

/// The consumer process: does nothing unless started by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_consumer_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('\t');
    let (Some(queue), Some(dlx), Some(effects)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD_ENV}");
    };
    let url = reliable_test_support::amqp_url().expect("RabbitMQ URL");
    // Prefetch 1: RabbitMQ counts every delivery returned by the crash, prefetched ones
    // included, and this consumer counts with the broker's count alone.
    let settings = AmqpSettings::safe().with_prefetch(1).expect("prefetch");
    let source = AmqpConsumer::connect(&url, queue, settings.clone())
        .await
        .expect("consumer");
    let publisher = AmqpPublisher::connect(&url, settings)
        .await
        .expect("publisher");
    let effects = effects.to_owned();
    let handler = handler_fn(move |msg: Message| {
        let effects = effects.clone();
        async move {
            if msg.payload().as_ref() == b"poison" {
                std::process::abort();
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&effects)
                .expect("effects file");
            f.write_all(&[msg.payload().as_ref(), b"\n"].concat())
                .expect("effect written");
            Ok::<(), HandlerError>(())
        }
    });
    let pipeline = Pipeline::new(
        source,
        handler,
        DeadLetter::publish(Producer::new(publisher, ProducerConfig::default()), dlx),
    )
    .with_config(PipelineConfig {
        concurrency: 1,
        max_deliveries: MAX_DELIVERIES,
        ..PipelineConfig::default()
    });
    // Ends once nothing has arrived for 2 s.
    let stats = pipeline.stats();
    let idle = async move {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = stats.snapshot().received;
            if now == last {
                return;
            }
            last = now;
        }
    };
    pipeline.run_until(idle).await.expect("pipeline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_aborts_its_consumer_is_dead_lettered_after_max_deliveries_restarts() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-poison-proc");
    let dlx = unique_name("amqp-poison-proc-dlx");
    let dlq = unique_name("amqp-poison-proc-dlq");
    topology::declare_dead_letter(&ch, &dlx, &dlq)
        .await
        .unwrap();
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let payloads = ["m0", "m1", "poison", "m3", "m4"];
    for p in payloads {
        publisher
            .publish(&Message::new(p.to_owned()).with_routing_key(&queue))
            .await
            .unwrap();
    }
    let poison_id = {
        // The id is only known on the dead-lettered copy; payloads identify messages here.
        let effects = std::env::temp_dir().join(unique_name("amqp-poison-effects"));
        let mut crashes = 0;
        let mut clean = false;
        for _ in 0..(MAX_DELIVERIES + 3) {
            let status = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_consumer_process", "--nocapture"])
                .env(CHILD_ENV, format!("{queue}\t{dlx}\t{}", effects.display()))
                .status()
                .unwrap();
            if status.success() {
                clean = true;
                break;
            }
            crashes += 1;
        }
        assert!(clean, "the consumer stopped crashing");
        assert_eq!(
            crashes, MAX_DELIVERIES,
            "one crash per delivery up to the limit"
        );
        let applied = std::fs::read_to_string(&effects).unwrap();
        let mut applied: Vec<&str> = applied.lines().collect();
        applied.sort_unstable();
        assert_eq!(
            applied,
            ["m0", "m1", "m3", "m4"],
            "everything else applied once"
        );
        let got = common::get_one(&ch, &dlq)
            .await
            .expect("the poison message is in the dead-letter queue");
        assert_eq!(got.delivery.data, b"poison");
        let h = got
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let text = |name: &str| {
            h.inner().get(name).and_then(|v| match v {
                reliable_amqp::lapin::types::AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            })
        };
        assert_eq!(text(headers::ORIGIN_QUEUE).as_deref(), Some(queue.as_str()));
        assert_eq!(text(headers::DELIVERY_ATTEMPTS).as_deref(), Some("4"));
        let reason = text(headers::DEAD_LETTER_REASON).unwrap_or_default();
        assert!(reason.contains("crashed its consumer 3 times"), "{reason}");
        assert!(
            common::get_one(&ch, &dlq).await.is_none(),
            "dead-lettered once"
        );
        let _ = std::fs::remove_file(&effects);
        text(headers::MESSAGE_ID)
    };
    assert!(poison_id.is_some());
    assert_eq!(
        common::wait_for_count(&conn, &queue, 0).await,
        0,
        "nothing left"
    );
    common::delete(&conn, &[&queue, &dlq]).await;
}
