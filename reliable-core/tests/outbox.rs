//! The crash-safe producer outbox (feature `outbox`) over in-process transports.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reliable_core::memory::InMemoryBroker;
use reliable_core::outbox::Outbox;
use reliable_core::producer::{Producer, ProducerConfig, SendError};
use reliable_core::{Message, MessageId, PublishError, Transport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Never answers: every publish stays unconfirmed.
struct Blackhole;

#[async_trait]
impl Transport for Blackhole {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        std::future::pending().await
    }
}

/// Confirms at once, noting whether the outbox already held the message when it was sent.
struct Witness {
    outbox: Outbox,
    spooled_before_send: Mutex<Vec<bool>>,
}

#[async_trait]
impl Transport for Witness {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let held = self
            .outbox
            .pending()
            .map(|p| p.iter().any(|m| m.id() == msg.id()))
            .unwrap_or(false);
        if let Ok(mut seen) = self.spooled_before_send.lock() {
            seen.push(held);
        }
        Ok(())
    }
}

/// Refuses everything for good.
struct Refuser;

#[async_trait]
impl Transport for Refuser {
    async fn publish(&self, _msg: &Message) -> Result<(), PublishError> {
        Err(PublishError::Unroutable {
            reason: "no queue bound".into(),
        })
    }
}

async fn eventually_empty(outbox: &Outbox) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if outbox.is_empty().unwrap_or(false) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Opens the outbox once the previous owner (a dropped runtime's writer thread) let it go.
fn reopen(path: &Path) -> Outbox {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match Outbox::open(path) {
            Ok(o) => return o,
            Err(e) if Instant::now() > until => panic!("outbox not released: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn msg(i: usize) -> Message {
    Message::new(format!("m{i}"))
        .with_destination("q")
        .with_header("n", i.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_on_disk_before_its_first_send_and_removed_on_confirm() -> TestResult {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(dir.path().join("o"))?;
    let transport = Arc::new(Witness {
        outbox: outbox.clone(),
        spooled_before_send: Mutex::new(Vec::new()),
    });
    let producer =
        Producer::with_outbox(transport.clone(), ProducerConfig::default(), outbox.clone());
    for i in 0..50 {
        producer.send_confirmed(msg(i)).await?;
    }
    let seen = transport
        .spooled_before_send
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter().all(|&held| held),
        "every message was spooled before its send"
    );
    assert!(
        eventually_empty(&outbox).await,
        "confirmed messages leave the outbox"
    );
    Ok(())
}

#[test]
fn unconfirmed_messages_survive_a_crash_and_are_replayed_with_their_ids() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o");
    // The first process: 200 sends accepted, none confirmed, then the runtime dies.
    let crashed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sent: Vec<(MessageId, String)> = crashed.block_on(async {
        let outbox = Outbox::open(&path)?;
        let producer = Producer::with_outbox(
            Blackhole,
            ProducerConfig {
                max_in_flight: 1024,
                ..ProducerConfig::default()
            },
            outbox,
        );
        let mut sent = Vec::new();
        for i in 0..200 {
            let m = msg(i);
            let key = m.idempotency_key().as_str().to_owned();
            let handle = producer.send(m).await?;
            sent.push((handle.id(), key));
        }
        Ok::<_, Box<dyn std::error::Error>>(sent)
    })?;
    crashed.shutdown_background();

    // The next process: replay through a working broker.
    let outbox = reopen(&path);
    assert_eq!(
        outbox.len()?,
        200,
        "every accepted message is in the outbox"
    );
    assert_eq!(
        outbox.pending()?.iter().map(|m| m.id()).collect::<Vec<_>>(),
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        "kept oldest first, so the replay starts with the oldest"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = InMemoryBroker::new();
        broker.declare_queue("q");
        let producer = Producer::with_outbox(
            broker.transport(),
            ProducerConfig::default(),
            outbox.clone(),
        );
        let handles = producer.replay_outbox().await?;
        assert_eq!(handles.len(), 200);
        for h in handles {
            h.await?;
        }
        let delivered: Vec<(MessageId, String)> = broker
            .messages("q")
            .iter()
            .map(|m| (m.id(), m.idempotency_key().as_str().to_owned()))
            .collect();
        let want: HashSet<_> = sent.iter().cloned().collect();
        assert_eq!(delivered.len(), 200);
        assert_eq!(
            delivered.iter().cloned().collect::<HashSet<_>>(),
            want,
            "same ids and keys"
        );
        assert!(eventually_empty(&outbox).await);
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_leaves_the_outbox() -> TestResult {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(dir.path().join("o"))?;
    let producer = Producer::with_outbox(Refuser, ProducerConfig::default(), outbox.clone());
    let err = producer.send_confirmed(msg(1)).await.err();
    assert!(matches!(err, Some(SendError::Refused { .. })), "{err:?}");
    assert!(
        eventually_empty(&outbox).await,
        "the caller holds the message now"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_owner_of_an_outbox_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o");
    let held = Outbox::open(&path)?;
    // A second owner of the same file is refused at open: one process per outbox file.
    assert!(Outbox::open(&path).is_err());
    drop(held);
    Ok(())
}

/// The ids of `msgs`, in order.
fn ids(msgs: &[Message]) -> Vec<MessageId> {
    msgs.iter().map(Message::id).collect()
}

/// Polls `done` every 10 ms until it holds or `within` passed.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// A short deadline, so a message over [`Blackhole`] is handed back quickly.
fn short_deadline() -> ProducerConfig {
    ProducerConfig {
        confirm_timeout: Duration::from_millis(50),
        deadline: Duration::from_millis(200),
        max_attempts: 100,
        ..ProducerConfig::default()
    }
}

/// Invariant 10: a message handed back leaves the outbox only once its caller received it. A
/// handle dropped before the hand-back, and one dropped unread after it, both leave the entry
/// in place: the next `replay_outbox` of this process sends it again, and so does a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_back_message_whose_handle_was_dropped_stays_in_the_outbox() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o");
    let outbox = Outbox::open(&path)?;
    let producer = Producer::with_outbox(Blackhole, short_deadline(), outbox.clone());
    let (early, late) = (msg(1), msg(2));
    // Dropped while the message is in flight.
    drop(producer.send(early.clone()).await?);
    // Kept until the hand-back sits in it, then dropped unread.
    let unread = producer.send(late.clone()).await?;
    assert!(
        eventually(Duration::from_secs(5), || producer.stats().failed == 2).await,
        "both messages handed back after the deadline"
    );
    drop(unread);
    // A removal, had one been scheduled, is committed well within this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ids(&outbox.pending()?),
        vec![early.id(), late.id()],
        "nobody received the handed-back messages: they stay for replay"
    );

    // The next replay in this process sends them again.
    let replayed = producer.replay_outbox().await?;
    assert_eq!(
        replayed.iter().map(|h| h.id()).collect::<Vec<_>>(),
        vec![early.id(), late.id()]
    );
    drop(replayed);
    assert!(
        eventually(Duration::from_secs(5), || producer.stats().failed == 4).await,
        "the replayed messages are handed back again"
    );
    drop(producer);
    drop(outbox);

    // After a restart they are still there, and a replay through a working broker sends them.
    let outbox = reopen(&path);
    assert_eq!(ids(&outbox.pending()?), vec![early.id(), late.id()]);
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::with_outbox(
        broker.transport(),
        ProducerConfig::default(),
        outbox.clone(),
    );
    let handles = producer.replay_outbox().await?;
    assert_eq!(handles.len(), 2);
    for h in handles {
        h.await?;
    }
    // Replayed deliveries run concurrently: the broker may hold them in either order.
    let mut delivered = ids(&broker.messages("q"));
    delivered.sort();
    let mut expected = vec![early.id(), late.id()];
    expected.sort();
    assert_eq!(delivered, expected);
    assert!(eventually_empty(&outbox).await, "confirmed: they leave now");
    Ok(())
}

/// `replay_outbox` resends what no task of this process is delivering: a message in flight
/// here is not sent a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_skips_messages_in_flight_in_this_process() -> TestResult {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(dir.path().join("o"))?;
    let producer = Producer::with_outbox(Blackhole, ProducerConfig::default(), outbox.clone());
    let mut handles = Vec::new();
    for i in 0..3 {
        handles.push(producer.send(msg(i)).await?);
    }
    assert_eq!(outbox.len()?, 3);
    let replayed = producer.replay_outbox().await?;
    assert_eq!(
        replayed.iter().map(|h| h.id()).collect::<Vec<_>>(),
        Vec::<MessageId>::new(),
        "messages in flight here are not replayed"
    );
    assert_eq!(producer.stats().sent, 3);
    Ok(())
}

/// One undecodable entry (a newer version's, or damaged) is moved to the quarantine and every
/// other entry is still replayed: nothing is discarded, and the bad entry stays inspectable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_quarantined_and_the_rest_replayed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o");
    let (first, second) = (msg(1), msg(2));
    {
        let outbox = Outbox::open(&path)?;
        let producer = Producer::with_outbox(Blackhole, short_deadline(), outbox.clone());
        drop(producer.send(first.clone()).await?);
        drop(producer.send(second.clone()).await?);
        assert!(
            eventually(Duration::from_secs(5), || producer.stats().failed == 2).await,
            "both handed back, nobody receiving them: they stay"
        );
        assert_eq!(outbox.len()?, 2);
    }
    {
        // A damaged entry between the two, written straight into the file.
        let db = reopen_raw(&path);
        let table: redb::TableDefinition<&[u8], &[u8]> =
            redb::TableDefinition::new("reliable_outbox_v1");
        let txn = db.begin_write()?;
        txn.open_table(table)?
            .insert(&b"\x00damaged"[..], &b"\x07not an entry"[..])?;
        txn.commit()?;
    }
    let outbox = reopen(&path);
    let pending = outbox.pending()?;
    assert_eq!(ids(&pending), vec![first.id(), second.id()]);
    let quarantined = outbox.quarantined()?;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].reason.contains("version"), "{quarantined:?}");
    assert_eq!(quarantined[0].raw, b"\x07not an entry");
    assert_eq!(
        outbox.len()?,
        2,
        "the quarantine is apart from the pending entries"
    );

    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let producer = Producer::with_outbox(
        broker.transport(),
        ProducerConfig::default(),
        outbox.clone(),
    );
    for h in producer.replay_outbox().await? {
        h.await?;
    }
    assert_eq!(broker.messages("q").len(), 2);
    Ok(())
}

/// The outbox file opened with redb itself, once the previous owner let it go.
fn reopen_raw(path: &Path) -> redb::Database {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match redb::Database::create(path) {
            Ok(db) => return db,
            Err(e) if Instant::now() > until => panic!("outbox not released: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A batch handle keeps the outbox entries of its handed-back messages until it yields them:
/// dropped unawaited, they stay for the next replay; awaited, they leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handles_handed_back_messages_leave_the_outbox_only_when_it_yields_them(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(dir.path().join("o"))?;
    let producer = Producer::with_outbox(Refuser, ProducerConfig::default(), outbox.clone());

    let dropped = producer.send_many((0..10).map(msg).collect()).await?;
    producer.flush().await;
    drop(dropped);
    assert_eq!(outbox.len()?, 10, "handed back but never received: kept");

    let kept = 10;
    let outcome = producer.send_many((10..15).map(msg).collect()).await?.await;
    assert_eq!(outcome.confirmed, 0);
    assert_eq!(outcome.handed_back.len(), 5);
    assert!(outcome.handed_back.iter().all(|e| e.message().is_some()));
    let until = Instant::now() + Duration::from_secs(10);
    while outbox.len()? != kept && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outbox.len()?, kept, "received by the caller: removed");
    Ok(())
}
