//! Publish paths that must never lose a message (issue "loss paths on the publish side"):
//! returns under cancellation and scheduling races, and one bad publish among good ones.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use reliable_amqp::settings::AmqpSettings;
use reliable_amqp::topology::{self, QueueSpec};
use reliable_amqp::AmqpPublisher;
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, PublishError, Transport};
use reliable_test_support::{require, unique_name};

/// Routable publishes flow in the background; unroutable publishes are interleaved with
/// routable ones cancelled after a few microseconds (the producer's attempt timeout dropping
/// the future anywhere, also in the middle of `basic_publish`), all from spawned tasks. lapin
/// hands a return to whichever confirm resolves next, including confirms of cancelled
/// publishes and of publishes not yet handed to the confirm driver: none of that may turn an
/// unroutable publish into `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_unroutable_publish_resolves_ok_under_cancellation() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-returns-cancel");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let nowhere = unique_name("amqp-returns-nowhere");
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let background: Vec<_> = (0..4)
        .map(|_| {
            let publisher = publisher.clone();
            let queue = queue.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let msg = Message::new(&b"background"[..]).with_routing_key(&queue);
                    let _ = publisher.publish(&msg).await;
                }
            })
        })
        .collect();

    let unroutable_ok = Arc::new(AtomicU64::new(0));
    let unroutable_refused = Arc::new(AtomicU64::new(0));
    for round in 0..400u64 {
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let publisher = publisher.clone();
            if i % 2 == 0 {
                let nowhere = nowhere.clone();
                let ok = unroutable_ok.clone();
                let refused = unroutable_refused.clone();
                tasks.push(tokio::spawn(async move {
                    let msg = Message::new(&b"unroutable"[..]).with_routing_key(&nowhere);
                    match publisher.publish(&msg).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(PublishError::Unroutable { .. }) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }));
            } else {
                let queue = queue.clone();
                let micros = (round * 7 + i * 13) % 400;
                tasks.push(tokio::spawn(async move {
                    let msg = Message::new(&b"cancelled"[..]).with_routing_key(&queue);
                    let _ = tokio::time::timeout(
                        Duration::from_micros(micros),
                        publisher.publish(&msg),
                    )
                    .await;
                }));
            }
        }
        join_all(tasks).await;
    }
    stop.store(true, Ordering::Relaxed);
    join_all(background).await;

    let ok = unroutable_ok.load(Ordering::Relaxed);
    let refused = unroutable_refused.load(Ordering::Relaxed);
    eprintln!("unroutable publishes: {refused} refused as unroutable, {ok} resolved Ok");
    assert_eq!(ok, 0, "{ok} unroutable publishes resolved Ok (loss)");
    assert!(refused > 0, "the test must have seen returns");
    common::delete(&conn, &[&queue]).await;
}

/// A publish to a missing exchange closes the channel (404), and lapin fails every pending
/// confirm on it with that error. Only that publish is refused; its 200 neighbours are resent
/// on a fresh channel and confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_missing_exchange_fails_alone() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-bad-neighbour");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let producer = Producer::new(
        publisher,
        ProducerConfig {
            confirm_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            ..ProducerConfig::default()
        },
    );

    let good: Vec<Message> = (0..200)
        .map(|i| Message::new(format!("good {i}").into_bytes()).with_routing_key(&queue))
        .collect();
    let bad = Message::new(&b"bad"[..])
        .with_destination(unique_name("no-such-exchange"))
        .with_routing_key(&queue);
    let mut handles = Vec::new();
    for (i, msg) in good.into_iter().enumerate() {
        handles.push(producer.send(msg).await.unwrap());
        if i == 100 {
            handles.push(producer.send(bad.clone()).await.unwrap());
        }
    }
    let results = join_all(handles).await;
    let mut confirmed = 0;
    let mut bad_refused = false;
    let mut neighbours_refused = Vec::new();
    for result in results {
        match result {
            Ok(_) => confirmed += 1,
            Err(SendError::Refused {
                message, source, ..
            }) if message.id() == bad.id() => {
                assert!(!source.is_retryable(), "{source:?}");
                bad_refused = true;
            }
            Err(e) => neighbours_refused.push(e.to_string()),
        }
    }
    assert!(
        neighbours_refused.is_empty(),
        "{} good messages refused, e.g. {:?}",
        neighbours_refused.len(),
        neighbours_refused.first()
    );
    assert!(
        bad_refused,
        "the publish to the missing exchange is refused"
    );
    assert_eq!(confirmed, 200);
    // Neighbours published before the bad one may have been enqueued with their acks lost in
    // the close; their resends are duplicates (at-least-once; consumers deduplicate by id).
    let mut copies: HashMap<String, u32> = HashMap::new();
    while let Some(got) = common::get_one(&ch, &queue).await {
        let id = got
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        *copies.entry(id.unwrap_or_default()).or_default() += 1;
    }
    let total: u32 = copies.values().sum();
    eprintln!(
        "{} distinct good messages in the queue, {total} copies",
        copies.len()
    );
    assert_eq!(copies.len(), 200, "every good message is in the queue");
    producer.close().await;
    common::delete(&conn, &[&queue]).await;
}

/// `close()` is the one way to shut a publisher down: bounded, after which publishing is a
/// typed, non-retryable error; under the core producer, `Producer::close` settles every
/// pending message, and leaves a publisher other handles still use open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_settles_then_closes_and_later_publishes_are_refused() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-close");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let producer = Producer::new(publisher.clone(), ProducerConfig::default());
    let mut handles = Vec::new();
    for i in 0..100 {
        let msg = Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue);
        handles.push(producer.send(msg).await.unwrap());
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), producer.close())
        .await
        .expect("close is bounded");
    eprintln!("producer close took {:?}", started.elapsed());
    for result in join_all(handles).await {
        assert!(result.is_ok(), "{result:?}");
    }
    assert_eq!(common::wait_for_count(&conn, &queue, 100).await, 100);
    // The application still holds a clone: the producer's close left it open for it.
    assert!(!publisher.is_closed(), "a shared publisher stays open");
    let still = Message::new(&b"still open"[..]).with_routing_key(&queue);
    publisher.publish(&still).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), publisher.close())
        .await
        .expect("close is bounded");
    assert!(publisher.is_closed());
    let late = Message::new(&b"late"[..]).with_routing_key(&queue);
    let error = publisher.publish(&late).await.unwrap_err();
    assert!(
        matches!(&error, PublishError::Fatal { reason } if reason.contains("closed")),
        "{error:?}"
    );
    common::delete(&conn, &[&queue]).await;
}

/// Dropping the producer (and so, once its deliveries end, the publisher) without `close`
/// loses nothing: deliveries already started run to their end and their handles resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_producer_without_close_still_settles_what_it_took() {
    let url = require!(reliable_test_support::amqp_url());
    let (conn, ch) = common::open(&url).await;
    let queue = unique_name("amqp-drop");
    topology::declare_queue(&ch, &QueueSpec::quorum(&queue))
        .await
        .unwrap();
    let publisher = AmqpPublisher::connect(&url, AmqpSettings::safe())
        .await
        .unwrap();
    let producer = Producer::new(publisher, ProducerConfig::default());
    let mut handles = Vec::new();
    for i in 0..100 {
        let msg = Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue);
        handles.push(producer.send(msg).await.unwrap());
    }
    drop(producer);
    let results = tokio::time::timeout(Duration::from_secs(30), join_all(handles))
        .await
        .expect("handles resolve after the producer is dropped");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(common::wait_for_count(&conn, &queue, 100).await, 100);
    common::delete(&conn, &[&queue]).await;
}
