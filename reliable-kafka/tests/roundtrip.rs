//! Produce through the core Producer + KafkaTransport, consume through KafkaConsumer: what is
//! kept on the wire, gap-safe commits (L5, invariant 5) and dead-lettering to a topic.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_core::pipeline::{handler_fn, HandlerBuilder, HandlerError, Pipeline};
use reliable_core::producer::Producer;
use reliable_core::{DeliverySource, Message, MessageId};
use reliable_kafka::{KafkaConsumer, KafkaTransport, Ordering, TopicSpec};
use reliable_test_support::{kafka, require, unique_name};

async fn transport(bootstrap: &str, topics: &[TopicSpec]) -> KafkaTransport {
    let mut b = KafkaTransport::builder(bootstrap).confirm_timeout(Duration::from_secs(10));
    for t in topics {
        b = b.topic(t.clone());
    }
    b.build().await.unwrap()
}

async fn produce(t: &KafkaTransport, msgs: Vec<Message>) -> Vec<MessageId> {
    let producer = Producer::new(t.clone(), t.recommended_producer_config());
    let mut ids = Vec::new();
    for m in msgs {
        ids.push(producer.send_confirmed(m).await.unwrap().id);
    }
    producer.close().await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_messages_come_back_with_key_headers_and_ids() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-rt");
    let spec = TopicSpec::new(&topic).partitions(3);
    let dlq = format!("{topic}.dlq");
    let t = transport(&cluster.bootstrap, &[spec.clone(), TopicSpec::new(&dlq)]).await;
    let msgs: Vec<Message> = (0..30)
        .map(|i| {
            Message::new(format!("m{i}"))
                .with_destination(&topic)
                .with_routing_key(format!("key-{}", i % 5))
                .with_idempotency_key(format!("biz-{i}"))
                .unwrap()
                .with_header("n", i.to_string())
        })
        .collect();
    let sent = produce(&t, msgs).await;
    t.close().await;

    // The same key always lands in the same partition (checked with an independent reader).
    let records = common::read_all(&cluster.bootstrap, &topic, 30, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 30);
    let mut key_partition = std::collections::HashMap::new();
    for r in &records {
        let p = *key_partition
            .entry(r.key.clone().unwrap())
            .or_insert(r.partition);
        assert_eq!(p, r.partition, "key {:?} split over partitions", r.key);
    }

    let group = unique_name("rk-rt-g");
    let source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .subscribe(spec)
        .build()
        .await
        .unwrap();
    assert!(
        !source.rejects_to_dead_letter(),
        "a Kafka reject only skips the record: the pipeline must refuse DeadLetter::BrokerReject"
    );
    let seen = Arc::new(Mutex::new(Vec::<Message>::new()));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let handler = {
        let seen = seen.clone();
        handler_fn(move |m: Message| {
            let seen = seen.clone();
            let done_tx = done_tx.clone();
            async move {
                let mut s = seen.lock().unwrap();
                s.push(m);
                if s.len() == 30 {
                    if let Some(tx) = done_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                Ok(())
            }
        })
    };
    let pipeline = Pipeline::new(
        source,
        HandlerBuilder::new(handler).build(),
        t.dead_letter(&dlq),
    );
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline.run_until(async {
            let _ = done_rx.await;
        }),
    )
    .await
    .expect("pipeline did not finish")
    .unwrap();
    assert_eq!(stats.succeeded, 30);
    let seen = seen.lock().unwrap();
    let ids: HashSet<MessageId> = seen.iter().map(Message::id).collect();
    assert_eq!(ids, sent.iter().copied().collect());
    for m in seen.iter() {
        let n = m.header("n").unwrap();
        assert_eq!(m.idempotency_key().as_str(), format!("biz-{n}"));
        assert_eq!(m.destination(), Some(topic.as_str()));
        assert!(m.routing_key().unwrap().starts_with("key-"));
    }
    // The final commit covered everything on every partition.
    let total: i64 = (0..3)
        .map(|p| common::committed_offset(&cluster.bootstrap, &group, &topic, p).unwrap_or(0))
        .sum();
    assert_eq!(total, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completion_never_commits_past_a_gap() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-gap");
    let spec = TopicSpec::new(&topic);
    let t = transport(&cluster.bootstrap, std::slice::from_ref(&spec)).await;
    produce(
        &t,
        (0..5)
            .map(|i| Message::new(format!("g{i}")).with_destination(&topic))
            .collect(),
    )
    .await;
    let group = unique_name("rk-gap-g");
    // Holds several deliveries of one partition at once, so no per-partition ordering.
    let mut source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .ordering(Ordering::Unordered)
        .subscribe(spec)
        .commit_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(30), source.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        deliveries.push(d);
    }
    let offsets: Vec<i64> = deliveries
        .iter()
        .map(|d| d.position().unwrap().offset)
        .collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4]);
    let mut it = deliveries.into_iter();
    let (d0, d1) = (it.next().unwrap(), it.next().unwrap());
    // Finish 0, 2, 3, 4: offset 1 is the gap.
    d0.ack().await.unwrap();
    for d in it {
        d.ack().await.unwrap();
    }
    source.commit_now().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(1)
    );

    // nack with requeue brings offset 1 back, still uncommitted.
    d1.nack(true).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(30), source.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(again.position().unwrap().offset, 1);
    assert!(again.redelivered());
    source.commit_now().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(1)
    );

    again.ack().await.unwrap();
    source.close().await.unwrap();
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_lands_in_the_dead_letter_topic() {
    let cluster = require!(kafka(3));
    let topic = unique_name("rk-dl");
    let dlq = format!("{topic}.dlq");
    let spec = TopicSpec::new(&topic);
    let t = transport(&cluster.bootstrap, &[spec.clone(), TopicSpec::new(&dlq)]).await;
    let ids = produce(
        &t,
        ["ok-1", "poison", "ok-2"]
            .into_iter()
            .map(|p| {
                Message::new(p)
                    .with_destination(&topic)
                    .with_routing_key("k")
            })
            .collect(),
    )
    .await;
    let group = unique_name("rk-dl-g");
    let source = KafkaConsumer::builder(&cluster.bootstrap, &group)
        .subscribe(spec)
        .build()
        .await
        .unwrap();
    let handler = handler_fn(|m: Message| async move {
        if m.payload().as_ref() == b"poison" {
            Err(HandlerError::permanent("cannot parse order"))
        } else {
            Ok(())
        }
    });
    let dead_letter = t.dead_letter(&dlq);
    let pipeline = Pipeline::new(source, HandlerBuilder::new(handler).build(), dead_letter);
    let stats = pipeline.stats();
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline.run_until(async move {
            while stats.snapshot().succeeded + stats.snapshot().dead_lettered < 3 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((stats.succeeded, stats.dead_lettered), (2, 1));
    let dead = common::read_all(&cluster.bootstrap, &dlq, 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id(), ids[1]);
    assert_eq!(dead[0].message.payload().as_ref(), b"poison");
    assert_eq!(dead[0].key.as_deref(), Some("k"));
    assert!(dead[0].headers["x-dead-letter-reason"].contains("cannot parse order"));
    // Where it came from: the poison message was the second record of partition 0.
    assert_eq!(dead[0].headers["x-origin-topic"], topic);
    assert_eq!(dead[0].headers["x-origin-partition"], "0");
    assert_eq!(dead[0].headers["x-origin-offset"], "1");
    // The poison message's offset was finished only after the dead letter was confirmed.
    assert_eq!(
        common::committed_offset(&cluster.bootstrap, &group, &topic, 0),
        Some(3)
    );
    t.close().await;
}
