//! The id generator: unique across threads, ordered within a thread, RFC 9562 version 7.

use std::collections::HashSet;

use reliable_core::message::{IdText, Message, MessageId};

const THREADS: usize = 8;
const PER_THREAD: usize = 100_000;

fn ids_on_threads() -> Vec<Vec<MessageId>> {
    let threads: Vec<_> = (0..THREADS)
        .map(|_| std::thread::spawn(|| (0..PER_THREAD).map(|_| MessageId::new()).collect()))
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("generator thread"))
        .collect()
}

#[test]
fn ids_from_many_threads_are_unique_and_ordered_per_thread() {
    let per_thread = ids_on_threads();
    let mut seen = HashSet::with_capacity(THREADS * PER_THREAD);
    for ids in &per_thread {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids made later on one thread compare greater"
        );
        for id in ids {
            assert!(seen.insert(*id), "duplicate id {id}");
        }
    }
    assert_eq!(seen.len(), THREADS * PER_THREAD);
}

#[test]
fn ids_are_uuid_v7_with_the_current_time() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    let id = MessageId::new();
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    let uuid = id.as_uuid();
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
    let millis = id.as_u128() >> 80;
    assert!(
        before <= millis && millis <= after + 1,
        "{before} {millis} {after}"
    );
}

#[test]
fn an_id_and_its_text_read_back() {
    let msg = Message::new("x");
    let text: IdText = msg.id_text();
    assert_eq!(text.len(), IdText::LEN);
    assert_eq!(text.parse::<MessageId>().expect("parses"), msg.id());
    assert_eq!(text, msg.id().to_string());
    assert_eq!(msg.idempotency_key().as_str(), &*text);
}
