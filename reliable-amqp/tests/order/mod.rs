//! Helpers of the send-order tests (issue 18): numbered messages, a raw read-back of a queue in
//! queue order, and the order check.
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use reliable_amqp::lapin::options::BasicConsumeOptions;
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::Connection;
use reliable_core::producer::SendHandle;
use reliable_core::Message;

pub use reliable_test_support::order::Order;
use reliable_test_support::order::{numbered_payload, sequence};

/// Message `seq` to `queue` (default exchange): a 100-byte payload that starts with the
/// sequence number.
pub fn numbered(queue: &str, seq: u64) -> Message {
    Message::new(numbered_payload(seq)).with_routing_key(queue)
}

/// Waits until `queue`'s length stands still for two seconds (late copies still on their way
/// land within moments), then reads it back in queue order with a plain lapin consumer and
/// returns the sequence numbers, copies included.
pub async fn read_back(conn: &Connection, queue: &str) -> Vec<u64> {
    let mut last = super::common::count(conn, queue).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = super::common::count(conn, queue).await;
        if now == last {
            break;
        }
        last = now;
    }
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "send-order-reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let mut seqs = Vec::with_capacity(last as usize);
    // Until the counted messages arrived and nothing more comes for a second.
    loop {
        let wait = if seqs.len() >= last as usize {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(15)
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                seqs.push(sequence(&delivery.data).expect("a numbered payload"))
            }
            Ok(Some(Err(e))) => panic!("reading the queue back: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = ch.close(200, "read back".into()).await;
    seqs
}

/// The order of a queue read back (one scope: the queue).
pub fn check(seqs: &[u64]) -> Order<()> {
    reliable_test_support::order::check(seqs.iter().map(|&seq| ((), seq)))
}

/// Awaits every handle (each at most 120 s): the confirmed sequence numbers, and what was
/// handed back (`seq: error`).
pub async fn settle(handles: Vec<(u64, SendHandle)>) -> (HashSet<u64>, Vec<String>) {
    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for (seq, handle) in handles {
        match tokio::time::timeout(Duration::from_secs(120), handle).await {
            Ok(Ok(_)) => {
                confirmed.insert(seq);
            }
            Ok(Err(e)) => failed.push(format!("{seq}: {e}")),
            Err(_) => failed.push(format!("{seq}: unresolved after 120 s")),
        }
    }
    (confirmed, failed)
}

/// Confirmed sequence numbers missing from the queue read back.
pub fn lost(confirmed: &HashSet<u64>, seqs: &[u64]) -> Vec<u64> {
    let stored: HashSet<u64> = seqs.iter().copied().collect();
    let mut lost: Vec<u64> = confirmed.difference(&stored).copied().collect();
    lost.sort_unstable();
    lost
}
