//! Helpers shared by the broker tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use reliable_amqp::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::{Channel, Connection, ConnectionProperties};
use reliable_amqp::AmqpConsumer;
use reliable_core::{Delivery, DeliverySource};

/// How long a test waits for a delivery it expects.
pub const NEXT_TIMEOUT: Duration = Duration::from_secs(10);

/// The next delivery from the SDK's consumer, within `NEXT_TIMEOUT`.
pub async fn next(consumer: &mut AmqpConsumer) -> Delivery {
    tokio::time::timeout(NEXT_TIMEOUT, consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer ok")
        .expect("stream open")
}

/// A connection and channel for test setup and inspection.
pub async fn open(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Ready messages in `queue` (passive declare on a fresh channel).
pub async fn count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = ch.close(200, "count".into()).await;
    q.message_count()
}

/// Waits (bounded) until `queue` holds `expected` ready messages; returns the last count.
pub async fn wait_for_count(conn: &Connection, queue: &str, expected: u32) -> u32 {
    let mut last = 0;
    for _ in 0..50 {
        last = count(conn, queue).await;
        if last == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Takes one message from `queue` with basic.get (acked), if any.
pub async fn get_one(
    ch: &Channel,
    queue: &str,
) -> Option<reliable_amqp::lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
}

/// Deletes queues, ignoring errors (cleanup).
pub async fn delete(conn: &Connection, queues: &[&str]) {
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch
                .queue_delete((*q).into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// Reads `queue` back (about `expected` messages) with a plain lapin consumer and counts the
/// copies of each message id.
pub async fn read_back(
    conn: &reliable_amqp::lapin::Connection,
    queue: &str,
    expected: u32,
) -> HashMap<String, u64> {
    use futures::StreamExt;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "read-back".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut copies: HashMap<String, u64> = HashMap::new();
    let mut read = 0u32;
    // Until the expected number arrived and nothing more comes for a second.
    loop {
        let wait = if read >= expected {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(15)
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .expect("every message carries its id");
                *copies.entry(id).or_default() += 1;
                read += 1;
            }
            Ok(Some(Err(e))) => panic!("reading the queue back: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = ch.close(200, "read back".into()).await;
    copies
}

/// Sends `messages` messages (`m0`, `m1`, ...) to `queue`, one every `pace`, and returns their
/// handles unresolved: the fault tests strike while this runs, then await each handle.
pub fn paced_sends(
    producer: reliable_core::producer::Producer,
    queue: String,
    messages: usize,
    pace: Duration,
) -> tokio::task::JoinHandle<Vec<reliable_core::producer::SendHandle>> {
    tokio::spawn(async move {
        let mut handles = Vec::with_capacity(messages);
        for i in 0..messages {
            let msg =
                reliable_core::Message::new(format!("m{i}").into_bytes()).with_routing_key(&queue);
            handles.push(producer.send(msg).await.expect("producer open"));
            tokio::time::sleep(pace).await;
        }
        handles
    })
}
