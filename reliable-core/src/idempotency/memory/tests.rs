use super::table::canonical_uuid;
use super::*;
use crate::MessageId;

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap_or_else(|_| IdempotencyKey::from(MessageId::new()))
}

fn store(lease: Duration) -> InMemoryIdempotencyStore {
    InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        ttl: Duration::from_secs(10),
        lease,
        capacity: 100,
    })
}

async fn new(s: &InMemoryIdempotencyStore, k: &IdempotencyKey) -> LeaseToken {
    match s.reserve(k).await {
        Ok(Reservation::New(token)) => token,
        other => panic!("expected a new reservation, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn reserve_complete_release_and_ttl() -> Result<(), StoreError> {
    let s = store(Duration::from_secs(2));
    let k = key("a");
    let first = new(&s, &k).await;
    assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
    s.release(&k, first).await?;
    let second = new(&s, &k).await;
    assert_ne!(first, second, "a token per reservation");
    assert_eq!(s.complete(&k, second).await?, Completion::Recorded);
    assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
    s.release(&k, second).await?; // releasing a completed key changes nothing
    assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(s.reserve(&k).await?.is_new());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn expired_lease_frees_the_key() -> Result<(), StoreError> {
    let s = store(Duration::from_secs(2));
    let k = key("a");
    new(&s, &k).await;
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(s.reserve(&k).await?.is_new());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn renewal_keeps_the_key_and_a_lease_taken_over_is_lost() -> Result<(), StoreError> {
    let s = store(Duration::from_secs(2));
    let k = key("a");
    let first = new(&s, &k).await;
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
        assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
    }
    // Run out, nobody took it: renewing takes it again.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
    assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
    // Run out and taken over: lost, and the late holder frees nothing.
    tokio::time::advance(Duration::from_secs(3)).await;
    let second = new(&s, &k).await;
    assert_eq!(s.renew(&k, first).await?, Renewal::Lost);
    s.release(&k, first).await?;
    assert_eq!(s.reserve(&k).await?, Reservation::InProgress);
    // The late holder's effect did run: it is recorded, as superseded.
    assert_eq!(s.complete(&k, first).await?, Completion::Superseded);
    assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
    assert_eq!(s.renew(&k, second).await?, Renewal::Lost);
    assert_eq!(s.complete(&k, second).await?, Completion::Superseded);
    // A retry of a completion that landed.
    assert_eq!(s.complete(&k, first).await?, Completion::Recorded);
    assert_eq!(s.renew(&k, first).await?, Renewal::Renewed);
    assert_eq!(s.reserve(&k).await?, Reservation::Duplicate, "still done");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn complete_after_the_lease_ran_out_unclaimed_is_recorded() -> Result<(), StoreError> {
    let s = store(Duration::from_secs(2));
    let k = key("a");
    let token = new(&s, &k).await;
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(s.complete(&k, token).await?, Completion::Recorded);
    assert_eq!(s.reserve(&k).await?, Reservation::Duplicate);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn size_bound_evicts_oldest_done_and_refuses_when_all_reserved() -> Result<(), StoreError> {
    let s = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        capacity: 2,
        ..InMemoryStoreConfig::default()
    });
    let (a, b, c) = (key("a"), key("b"), key("c"));
    let t = new(&s, &a).await;
    s.complete(&a, t).await?;
    tokio::time::advance(Duration::from_millis(1)).await;
    let t = new(&s, &b).await;
    s.complete(&b, t).await?;
    assert!(s.reserve(&c).await?.is_new());
    assert_eq!(s.len(), 2);
    assert_eq!(s.reserve(&b).await?, Reservation::Duplicate);
    assert!(s.reserve(&a).await?.is_new(), "oldest done key evicted");
    assert_eq!(
        s.reserve(&key("d")).await,
        Err(StoreError::Full { capacity: 2 })
    );
    Ok(())
}

/// When full, expired entries (completed or reserved) make room before any live completed key
/// is forgotten; live ones are evicted oldest completion first, a tenth of the capacity at once.
#[tokio::test(start_paused = true)]
async fn a_full_store_drops_expired_entries_before_evicting_live_ones() -> Result<(), StoreError> {
    let s = InMemoryIdempotencyStore::new(InMemoryStoreConfig {
        ttl: Duration::from_secs(10),
        lease: Duration::from_secs(2),
        capacity: 20,
    });
    let keys: Vec<_> = (0..30).map(|i| key(&format!("k{i}"))).collect();
    // k0..k4 completed long ago, k5 reserved and abandoned, k6..k19 completed since.
    for k in &keys[..5] {
        let t = new(&s, k).await;
        s.complete(k, t).await?;
    }
    new(&s, &keys[5]).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    for k in &keys[6..20] {
        let t = new(&s, k).await;
        s.complete(k, t).await?;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert_eq!(s.len(), 20);
    tokio::time::advance(Duration::from_secs(5)).await;
    // Six expired entries make room for six keys; nothing live goes.
    for k in &keys[20..26] {
        new(&s, k).await;
    }
    assert_eq!(s.len(), 20);
    for k in &keys[6..20] {
        assert_eq!(s.reserve(k).await?, Reservation::Duplicate, "{k} kept");
    }
    // Full of live entries: the two oldest completed keys (a tenth of 20) go.
    new(&s, &keys[26]).await;
    assert_eq!(s.len(), 19);
    assert!(s.reserve(&keys[6]).await?.is_new(), "oldest evicted");
    assert_eq!(s.reserve(&keys[8]).await?, Reservation::Duplicate);
    assert!(s.reserve(&keys[7]).await?.is_new(), "second oldest evicted");
    Ok(())
}

/// A business key whose text is a message id's text is the same key as that id's; keys of
/// other texts (another id, the id in upper case or without hyphens) are different keys.
#[tokio::test(start_paused = true)]
async fn a_business_key_equal_to_an_id_text_is_that_id_key() -> Result<(), StoreError> {
    let s = store(Duration::from_secs(2));
    let id = MessageId::new();
    let by_id = IdempotencyKey::from(id);
    let by_text = key(&id.to_string());
    assert_eq!(by_id, by_text);
    let token = new(&s, &by_id).await;
    assert_eq!(s.reserve(&by_text).await?, Reservation::InProgress);
    assert_eq!(s.renew(&by_text, token).await?, Renewal::Renewed);
    s.release(&by_text, token).await?;
    let token = new(&s, &by_text).await;
    assert_eq!(s.complete(&by_id, token).await?, Completion::Recorded);
    assert_eq!(s.reserve(&by_text).await?, Reservation::Duplicate);
    assert_eq!(s.reserve(&by_id).await?, Reservation::Duplicate);
    assert_eq!(s.len(), 1);

    let others = [
        IdempotencyKey::from(MessageId::new()),
        key(&id.to_string().to_uppercase()),
        key(&id.as_uuid().simple().to_string()),
        key(&id.as_uuid().braced().to_string()),
        key(&id.to_string().replacen('-', "_", 1)),
    ];
    for other in &others {
        assert_ne!(other, &by_id);
        assert!(s.reserve(other).await?.is_new(), "{other} is its own key");
    }
    let answers = s.reserve_many(&[by_text.clone(), by_id.clone()]).await?;
    assert_eq!(answers, [Reservation::Duplicate, Reservation::Duplicate]);
    assert_eq!(s.len(), 1 + others.len());
    Ok(())
}

#[test]
fn only_a_canonical_uuid_text_reads_as_bits() {
    for _ in 0..100 {
        let id = MessageId::new();
        assert_eq!(
            canonical_uuid(id.text().as_bytes()),
            Some(id.as_u128()),
            "{id}"
        );
    }
    let all = uuid::Uuid::from_u128(u128::MAX).hyphenated().to_string();
    assert_eq!(canonical_uuid(all.as_bytes()), Some(u128::MAX));
    assert_eq!(
        canonical_uuid(b"00000000-0000-0000-0000-000000000000"),
        Some(0)
    );
    let text = "0190f6a2-7b3c-7d4e-8f50-0123456789ab";
    assert!(canonical_uuid(text.as_bytes()).is_some());
    for bad in [
        "0190F6A2-7B3C-7D4E-8F50-0123456789AB",
        "0190f6a2-7b3c-7d4e-8f50-0123456789aB",
        "0190f6a27b3c7d4e8f500123456789ab",
        "{0190f6a2-7b3c-7d4e-8f50-0123456789ab}",
        "0190f6a2-7b3c-7d4e-8f50-0123456789ag",
        "0190f6a2-7b3c-7d4e-8f50-0123456789a",
        "0190f6a2-7b3c-7d4e-8f50-0123456789abc",
        "0190f6a2-7b3c-7d4e-8f5-00123456789ab",
        "0190f6a2_7b3c-7d4e-8f50-0123456789ab",
        "0190f6a2-7b3c-7d4e-8f50-0123456789\u{e9}",
        "urn:uuid:0190f6a2-7b3c-7d4e-8f50-0123456789ab",
    ] {
        assert_eq!(canonical_uuid(bad.as_bytes()), None, "{bad}");
    }
}

#[tokio::test]
async fn tokens_are_distinct_uuid_v7s() -> Result<(), StoreError> {
    let s = InMemoryIdempotencyStore::default();
    let keys: Vec<_> = (0..10_000)
        .map(|_| IdempotencyKey::from(MessageId::new()))
        .collect();
    let answers = s.reserve_many(&keys).await?;
    let mut tokens: Vec<_> = answers.iter().filter_map(|a| a.token()).collect();
    assert_eq!(tokens.len(), keys.len());
    for t in &tokens {
        assert_eq!(uuid::Uuid::from_u128(t.as_u128()).get_version_num(), 7);
    }
    tokens.sort_by_key(|t| t.as_u128());
    tokens.dedup();
    assert_eq!(tokens.len(), keys.len());
    Ok(())
}
