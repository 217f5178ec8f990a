use super::*;

fn round_trip(msg: &Message) -> Message {
    let wire: Vec<(String, String)> = msg
        .wire_headers()
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Message::from_wire(
        msg.payload().clone(),
        wire.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .expect("decodes")
}

#[test]
fn the_key_header_travels_only_when_it_is_not_the_message_id() {
    let plain = Message::new("x").with_header("trace", "t1");
    let wire = plain.wire_headers();
    let names: Vec<&str> = wire.iter().map(|(k, _)| k).collect();
    assert_eq!(names, [headers::MESSAGE_ID, "trace"]);
    let back = round_trip(&plain);
    assert_eq!(back, plain);
    assert_eq!(back.idempotency_key(), plain.idempotency_key());
    assert_eq!(back.idempotency_key().as_str(), plain.id_text().as_str());

    let keyed = Message::new("x")
        .with_idempotency_key("order-42")
        .expect("valid key");
    assert_eq!(keyed.wire_headers().len(), 2);
    assert_eq!(keyed.wire_headers().iter().len(), 2);
    assert_eq!(round_trip(&keyed).idempotency_key().as_str(), "order-42");
    assert_eq!(round_trip(&keyed), keyed);
}

#[test]
fn messages_written_with_both_identity_headers_read_back_the_same() {
    let id = MessageId::new().to_string();
    let msg = Message::from_wire(
        &b"x"[..],
        [
            (headers::MESSAGE_ID, id.as_str()),
            (headers::IDEMPOTENCY_KEY, id.as_str()),
        ],
    )
    .expect("decodes");
    assert_eq!(msg.id_text(), id);
    assert_eq!(msg.idempotency_key().as_str(), id);
    assert!(msg.key_is_id());
    assert_eq!(msg.wire_headers().len(), 1);
    assert!(matches!(
        Message::from_wire(&b"x"[..], [(headers::IDEMPOTENCY_KEY, "k")]),
        Err(MessageFormatError::MissingHeader {
            header: headers::MESSAGE_ID
        })
    ));
}

#[test]
fn the_wire_format_is_unchanged() {
    let id: MessageId = "0190b5f2-6c1e-7a3b-9d4e-2f1a3b4c5d6e"
        .parse()
        .expect("uuid");
    let msg = Message::new("p")
        .with_id(id)
        .with_header("b", "2")
        .with_header("a", "1")
        .with_idempotency_key("biz")
        .expect("valid key");
    let wire = msg.wire_headers();
    assert_eq!(
        wire.iter().collect::<Vec<_>>(),
        [
            ("x-message-id", "0190b5f2-6c1e-7a3b-9d4e-2f1a3b4c5d6e"),
            ("x-idempotency-key", "biz"),
            ("a", "1"),
            ("b", "2"),
        ]
    );
    assert_eq!(msg.id_text(), "0190b5f2-6c1e-7a3b-9d4e-2f1a3b4c5d6e");
    assert_eq!(msg.id().to_string(), msg.id_text().as_str());
    // Upper-case ids read back and are written lower-case, as before.
    let upper = Message::from_wire(
        &b"p"[..],
        [(headers::MESSAGE_ID, "0190B5F2-6C1E-7A3B-9D4E-2F1A3B4C5D6E")],
    )
    .expect("decodes");
    assert_eq!(upper.id(), id);
    assert_eq!(
        upper.wire_headers().message_id(),
        "0190b5f2-6c1e-7a3b-9d4e-2f1a3b4c5d6e"
    );
}

#[test]
fn the_default_key_follows_the_id_and_a_business_key_stays() {
    let first = MessageId::new();
    let second = MessageId::new();
    let msg = Message::new("x").with_id(first).with_id(second);
    assert_eq!(msg.idempotency_key(), IdempotencyKey::from(second));

    let keyed = Message::new("x")
        .with_idempotency_key("k")
        .expect("valid key")
        .with_id(second);
    assert_eq!(keyed.idempotency_key().as_str(), "k");

    // A key equal to the id's text is the default key: same message, no key header.
    let same = Message::new("x")
        .with_id(first)
        .with_idempotency_key(first.to_string())
        .expect("valid key");
    assert!(same.key_is_id());
    assert_eq!(same, Message::new("x").with_id(first));
    // A key made from another id is a business key until the id becomes that id.
    let other = Message::new("x")
        .with_id(first)
        .with_key(IdempotencyKey::from(second));
    assert!(!other.key_is_id());
    assert_eq!(other.wire_headers().len(), 2);
    let now_same = other.with_id(second);
    assert!(now_same.key_is_id());
    assert_eq!(now_same.wire_headers().len(), 1);
}

#[test]
fn keys_compare_by_text_whatever_their_form() {
    let id = MessageId::new();
    let from_id = IdempotencyKey::from(id);
    let from_text = IdempotencyKey::new(id.to_string()).expect("valid key");
    assert_eq!(from_id, from_text);
    let state = std::hash::RandomState::new();
    assert_eq!(
        std::hash::BuildHasher::hash_one(&state, &from_id),
        std::hash::BuildHasher::hash_one(&state, id.to_string().as_str())
    );
    let set: std::collections::HashSet<IdempotencyKey> = [from_id.clone(), from_text].into();
    assert_eq!(set.len(), 1);
    assert_eq!(
        format!("{from_id:?}"),
        format!("IdempotencyKey({:?})", id.to_string())
    );
    assert!(matches!(
        IdempotencyKey::new(""),
        Err(MessageFormatError::EmptyIdempotencyKey)
    ));
    assert!(matches!(
        IdempotencyKey::new("k".repeat(256)),
        Err(MessageFormatError::IdempotencyKeyTooLong { len: 256 })
    ));
}

#[test]
fn a_bare_message_is_small_and_allocates_nothing_but_its_payload() {
    assert!(
        std::mem::size_of::<Message>() <= 88,
        "{}",
        std::mem::size_of::<Message>()
    );
    assert_eq!(std::mem::size_of::<IdText>(), 36);
    let msg = Message::new("x");
    assert!(msg.rare.is_none());
    assert!(msg.headers().is_empty());
    // Headers and a business key share one box, dropped when neither is left.
    let keyed = msg
        .with_idempotency_key("k")
        .expect("valid key")
        .with_header("h", "v");
    assert!(keyed.rare.is_some());
    let id = keyed.id();
    let cleared = Message::new("x")
        .with_key(IdempotencyKey::from(id))
        .with_id(id);
    assert!(cleared.rare.is_none());
}

#[test]
fn destinations_can_be_shared() {
    let topic: Arc<str> = Arc::from("orders");
    let a = Message::new("a").with_destination(&topic);
    let b = Message::new("b").with_destination(topic.clone());
    assert_eq!(Arc::strong_count(&topic), 3);
    assert_eq!(a.destination(), Some("orders"));
    assert_eq!(b.destination(), Some("orders"));
    let name = String::from("eu");
    let c = Message::new("c")
        .with_routing_key(&name)
        .with_destination(name.clone());
    assert_eq!(c.routing_key(), Some("eu"));
    assert_eq!(c.destination(), Some("eu"));
}

#[test]
fn reserved_headers_are_not_user_headers() {
    let msg = Message::new("x")
        .with_header(headers::MESSAGE_ID, "forged")
        .with_header(headers::IDEMPOTENCY_KEY, "forged");
    assert!(msg.headers().is_empty());
    assert!(msg.rare.is_none());
    assert_eq!(msg.wire_headers().len(), 1);
}
