//! Helpers of the send-order tests (issue 18): numbered messages, a raw read-back of a queue in
//! queue order, and the order check.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use reliable_amqp::lapin::options::BasicConsumeOptions;
use reliable_amqp::lapin::types::FieldTable;
use reliable_amqp::lapin::Connection;
use reliable_core::producer::SendHandle;
use reliable_core::Message;

/// Payload size of every numbered message, in bytes.
pub const PAYLOAD_BYTES: usize = 100;

/// Message `seq` to `queue` (default exchange): a 100-byte payload that starts with the
/// sequence number.
pub fn numbered(queue: &str, seq: u64) -> Message {
    let mut payload = format!("{seq:>20}").into_bytes();
    payload.resize(PAYLOAD_BYTES, b'.');
    Message::new(payload).with_routing_key(queue)
}

/// The sequence number a [`numbered`] payload carries.
fn sequence(payload: &[u8]) -> u64 {
    let head = payload.get(..20).expect("a numbered payload");
    std::str::from_utf8(head)
        .expect("a numbered payload")
        .trim()
        .parse()
        .expect("a numbered payload")
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
            Ok(Some(Ok(delivery))) => seqs.push(sequence(&delivery.data)),
            Ok(Some(Err(e))) => panic!("reading the queue back: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = ch.close(200, "read back".into()).await;
    seqs
}

/// The order of a queue read back, as issue 18 counts it.
#[derive(Debug, Default)]
pub struct Order {
    /// Messages in the queue, copies included.
    pub stored: u64,
    /// Distinct sequence numbers.
    pub distinct: u64,
    /// First copies that sit behind a message with a later sequence number.
    pub out_of_order: u64,
    /// The first such inversion: (sequence number, the later one it sits behind).
    pub first_inversion: Option<(u64, u64)>,
    /// The most copies of one message.
    pub most_copies: u64,
}

impl Order {
    /// Copies beyond the first.
    pub fn duplicates(&self) -> u64 {
        self.stored - self.distinct
    }

    /// Copies per distinct message.
    pub fn copies_per_message(&self) -> f64 {
        self.stored as f64 / self.distinct.max(1) as f64
    }
}

/// Counts first copies that sit behind a later sequence number (duplicates apart).
pub fn check(seqs: &[u64]) -> Order {
    let mut copies: HashMap<u64, u64> = HashMap::new();
    let mut order = Order {
        stored: seqs.len() as u64,
        ..Order::default()
    };
    let mut highest: Option<u64> = None;
    for &seq in seqs {
        let n = copies.entry(seq).or_default();
        *n += 1;
        if *n == 1 {
            if let Some(h) = highest.filter(|&h| h > seq) {
                order.out_of_order += 1;
                order.first_inversion.get_or_insert((seq, h));
            }
        }
        highest = highest.max(Some(seq));
    }
    order.distinct = copies.len() as u64;
    order.most_copies = copies.values().copied().max().unwrap_or(0);
    order
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

#[test]
fn the_check_counts_late_first_copies_and_not_duplicates() {
    let order = check(&[0, 1, 3, 2, 3, 1, 4, 5]);
    assert_eq!(order.out_of_order, 1);
    assert_eq!(order.first_inversion, Some((2, 3)));
    assert_eq!(order.duplicates(), 2);
    assert_eq!(order.most_copies, 2);
}
