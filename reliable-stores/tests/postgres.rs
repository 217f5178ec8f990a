//! `PostgresStore` against the PostgreSQL that `scripts/stores up` starts: the store protocol
//! and the inbox form (key and business write in one transaction).

mod common;

use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::{IdempotencyStore, Reservation};
use reliable_stores::{
    Applied, ApplyError, PostgresStore, PostgresStoreConfig, StoresError, TxFuture,
};
use reliable_test_support::{postgres_url, require, unique_name};

/// A configuration with a table of its own.
fn config() -> PostgresStoreConfig {
    PostgresStoreConfig {
        table: unique_name("idem").replace('-', "_"),
        ..PostgresStoreConfig::default()
    }
}

async fn store(url: &str, config: PostgresStoreConfig) -> PostgresStore {
    PostgresStore::connect(url, config)
        .await
        .expect("connect to PostgreSQL")
}

/// A fresh effects table (no unique constraint: a duplicate effect shows as a second row).
async fn effects_table(store: &PostgresStore) -> String {
    let name = unique_name("effects").replace('-', "_");
    let client = store.pool().get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {name} (key text NOT NULL, body text)"
        ))
        .await
        .unwrap();
    name
}

/// The business write: `sql` with the key as `$1`.
fn insert_row<'t>(
    tx: &'t tokio_postgres::Transaction<'t>,
    sql: String,
    key: String,
) -> TxFuture<'t, u64, tokio_postgres::Error> {
    Box::pin(async move { tx.execute(sql.as_str(), &[&key]).await })
}

async fn count(store: &PostgresStore, sql: &str) -> i64 {
    let client = store.pool().get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn postgres_batches_answer_what_the_single_calls_answer() {
    let url = require!(postgres_url());
    let config = config();
    let a = store(&url, config.clone()).await;
    let b = store(&url, config).await;
    common::batch::cases(&a).await;
    let (a, b): (Arc<dyn IdempotencyStore>, Arc<dyn IdempotencyStore>) = (Arc::new(a), Arc::new(b));
    for seed in 1..=8 {
        common::batch::matches_singles(a.clone(), seed, 60, 4).await;
    }
    common::batch::race(a, b).await;
}

#[tokio::test]
async fn postgres_store_follows_the_store_protocol_across_instances() {
    let url = require!(postgres_url());
    let config = config();
    let a = store(&url, config.clone()).await;
    let b = store(&url, config).await;
    common::protocol(&a).await;
    common::shared(&a, &b).await;
    let (a, b): (Arc<dyn IdempotencyStore>, Arc<dyn IdempotencyStore>) = (Arc::new(a), Arc::new(b));
    common::one_winner(a, b).await;
}

#[tokio::test]
async fn postgres_store_frees_leases_and_forgets_keys_after_their_ttl() {
    let url = require!(postgres_url());
    let short = Duration::from_millis(500);
    let s = store(
        &url,
        PostgresStoreConfig {
            ttl: short,
            lease: short,
            ..config()
        },
    )
    .await;
    common::expiry(&s, short).await;
    // expiry() ends holding two fresh leases; once they run out both rows go.
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(
        s.purge_expired().await.unwrap(),
        2,
        "the expired keys are purged"
    );
}

/// A store with the 1 s lease of the L11 checks.
async fn short_lease(url: &str) -> PostgresStore {
    let config = PostgresStoreConfig {
        lease: common::leases::LEASE,
        ..config()
    };
    store(url, config).await
}

#[tokio::test]
async fn postgres_a_handler_slower_than_the_lease_applies_its_effect_once() {
    let url = require!(postgres_url());
    common::leases::a_slow_handler_keeps_its_lease(Arc::new(short_lease(&url).await)).await;
}

#[tokio::test]
async fn postgres_a_failed_complete_is_retried_and_never_becomes_a_second_effect() {
    let url = require!(postgres_url());
    common::leases::a_failed_complete_is_retried(Arc::new(short_lease(&url).await)).await;
}

#[tokio::test]
async fn postgres_renew_complete_and_release_act_for_their_own_reservation_only() {
    let url = require!(postgres_url());
    common::leases::tokens_fence_renew_and_complete(&short_lease(&url).await).await;
}

#[tokio::test]
async fn postgres_a_late_release_keeps_the_reservation_of_the_same_instance_s_new_holder() {
    let url = require!(postgres_url());
    common::leases::a_late_release_keeps_the_new_holder(&short_lease(&url).await).await;
}

#[tokio::test]
async fn an_unreachable_postgres_answers_unavailable_in_time_and_the_store_recovers() {
    let url = require!(postgres_url());
    let proxy = common::Proxy::start(common::host_port(&url)).await;
    let s = store(
        &common::via(&url, proxy.addr),
        PostgresStoreConfig {
            timeout: Duration::from_millis(800),
            ..config()
        },
    )
    .await;
    common::unavailable_then_back(&s, &proxy, &common::password(&url), Duration::from_secs(3))
        .await;
}

#[tokio::test]
async fn connecting_fails_clearly_without_leaking_the_password() {
    let url = require!(postgres_url());
    let secret = common::password(&url);
    let wrong = url.replace(&secret, "not-the-password");
    let short = PostgresStoreConfig {
        timeout: Duration::from_secs(2),
        ..config()
    };
    let err = PostgresStore::connect(&wrong, short.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoresError::Unreachable { .. }), "{err:?}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    assert!(err.to_string().contains("credentials"), "{err}");
    let err = PostgresStore::connect("postgres://u:p@h:notaport/db", short.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoresError::InvalidUrl { .. }), "{err:?}");
    let bad_table = PostgresStoreConfig {
        table: "orders; DROP TABLE x".into(),
        ..short
    };
    let err = PostgresStore::connect(&url, bad_table).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoresError::InvalidConfig {
                setting: "table",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn apply_once_commits_the_effect_with_its_key_and_skips_duplicates() {
    let url = require!(postgres_url());
    let s = store(&url, config()).await;
    let effects = effects_table(&s).await;
    let k = common::key("order");
    let insert = format!("INSERT INTO {effects} (key, body) VALUES ($1, 'paid')");
    let key = k.as_str().to_owned();
    let first = s
        .apply_once(&k, |tx| insert_row(tx, insert.clone(), key.clone()))
        .await
        .unwrap();
    assert_eq!(first, Applied::New(1));
    let again = s
        .apply_once(&k, |tx| insert_row(tx, insert.clone(), key.clone()))
        .await
        .unwrap();
    assert_eq!(again, Applied::Duplicate);
    // The same key through the store protocol (a DedupeLayer on another consumer).
    assert_eq!(s.reserve(&k).await.unwrap(), Reservation::Duplicate);
    assert_eq!(
        count(&s, &format!("SELECT count(*) FROM {effects}")).await,
        1
    );
}

#[tokio::test]
async fn a_failed_write_rolls_back_its_key_so_the_retry_runs() {
    let url = require!(postgres_url());
    let s = store(&url, config()).await;
    let effects = effects_table(&s).await;
    let k = common::key("fails-once");
    let insert = format!("INSERT INTO {effects} (key, body) VALUES ($1, 'x')");
    let key = k.as_str().to_owned();
    let failed = s
        .apply_once(&k, |tx| {
            let (insert, key) = (insert.clone(), key.clone());
            Box::pin(async move {
                tx.execute(insert.as_str(), &[&key])
                    .await
                    .map_err(|e| e.to_string())?;
                Err::<(), String>("the payment service said no".into())
            })
        })
        .await;
    assert!(
        matches!(failed, Err(ApplyError::Write(ref e)) if e.contains("said no")),
        "{failed:?}"
    );
    assert_eq!(
        count(&s, &format!("SELECT count(*) FROM {effects}")).await,
        0,
        "rolled back"
    );
    let retried = s
        .apply_once(&k, |tx| insert_row(tx, insert, key))
        .await
        .unwrap();
    assert_eq!(retried, Applied::New(1));
    assert_eq!(
        count(&s, &format!("SELECT count(*) FROM {effects}")).await,
        1
    );
}

#[tokio::test]
async fn concurrent_duplicates_from_two_instances_apply_each_effect_once() {
    let url = require!(postgres_url());
    let config = config();
    let stores = [store(&url, config.clone()).await, store(&url, config).await];
    let effects = effects_table(&stores[0]).await;
    let keys: Vec<_> = (0..25).map(|i| common::key(&format!("dup{i}"))).collect();
    let mut tasks = Vec::new();
    for copy in 0..8 {
        let s = stores[copy % 2].clone();
        let (keys, effects) = (keys.clone(), effects.clone());
        tasks.push(tokio::spawn(async move {
            let mut applied = 0;
            for k in &keys {
                let insert = format!("INSERT INTO {effects} (key) VALUES ($1)");
                let key = k.as_str().to_owned();
                let r = s
                    .apply_once(k, |tx| {
                        Box::pin(async move {
                            // Widen the race window: hold the transaction open a little.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            tx.execute(insert.as_str(), &[&key]).await
                        })
                    })
                    .await
                    .unwrap();
                if let Applied::New(_) = r {
                    applied += 1;
                }
            }
            applied
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap();
    }
    assert_eq!(applied, keys.len(), "one copy of each key applied");
    let s = &stores[0];
    assert_eq!(
        count(s, &format!("SELECT count(*) FROM {effects}")).await,
        25
    );
    assert_eq!(
        count(s, &format!("SELECT count(DISTINCT key) FROM {effects}")).await,
        25
    );
}

#[tokio::test]
async fn complete_in_records_the_key_only_if_the_business_transaction_commits() {
    let url = require!(postgres_url());
    let s = store(&url, config()).await;
    let (rolled_back, committed) = (common::key("rolled-back"), common::key("committed"));
    for k in [&rolled_back, &committed] {
        common::new(&s, k).await;
    }
    let mut client = s.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    s.complete_in(&tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    s.complete_in(&tx, &committed).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.reserve(&committed).await.unwrap(), Reservation::Duplicate);
    assert_eq!(
        s.reserve(&rolled_back).await.unwrap(),
        Reservation::InProgress,
        "a rolled-back completion leaves the reservation as it was"
    );
}

/// The inbox form by hand under a `DedupeLayer`: the handler records the key with
/// `complete_in` in its own transaction and then keeps running past a lease. The layer's
/// renewals and its final `complete` must take that key as this message's own: no lost lease
/// reported, one effect.
#[tokio::test]
async fn complete_in_under_a_dedupe_layer_is_not_taken_for_a_lost_lease() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use reliable_core::pipeline::{handler_fn, DedupeLayer, Handler, HandlerBuilder, HandlerError};
    use reliable_core::Message;

    let url = require!(postgres_url());
    let s = short_lease(&url).await;
    let effects = effects_table(&s).await;
    let applied = Arc::new(AtomicUsize::new(0));
    let layer = DedupeLayer::new(Arc::new(s.clone()));
    let handler = HandlerBuilder::new(handler_fn({
        let (s, effects, applied) = (s.clone(), effects.clone(), applied.clone());
        move |msg: Message| {
            let (s, effects, applied) = (s.clone(), effects.clone(), applied.clone());
            async move {
                let key = msg.idempotency_key();
                let mut client = s.pool().get().await.map_err(HandlerError::transient)?;
                let tx = client
                    .transaction()
                    .await
                    .map_err(HandlerError::transient)?;
                tx.execute(
                    format!("INSERT INTO {effects} (key) VALUES ($1)").as_str(),
                    &[&key.as_str()],
                )
                .await
                .map_err(HandlerError::transient)?;
                s.complete_in(&tx, &key)
                    .await
                    .map_err(HandlerError::transient)?;
                tx.commit().await.map_err(HandlerError::transient)?;
                applied.fetch_add(1, Ordering::SeqCst);
                // Work after the commit, across several renewals.
                tokio::time::sleep(common::leases::LEASE * 2).await;
                Ok::<(), HandlerError>(())
            }
        }
    }))
    .layer(layer.clone())
    .build();
    let msg = Message::new("order").with_key(common::key("inbox-by-hand"));
    handler.handle(&msg).await.unwrap();
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    assert_eq!(
        layer.leases_lost(),
        0,
        "the key the handler recorded itself is not a lost lease"
    );
    assert_eq!(
        s.reserve(&msg.idempotency_key()).await.unwrap(),
        Reservation::Duplicate
    );
    assert_eq!(
        count(&s, &format!("SELECT count(*) FROM {effects}")).await,
        1
    );
}

#[tokio::test]
async fn postgres_attempt_counts_survive_a_restart_are_shared_and_reset_by_clear() {
    let url = require!(postgres_url());
    let config = config();
    let k = {
        let before = store(&url, config.clone()).await;
        common::attempts::before_restart(&before).await
    };
    let a = store(&url, config.clone()).await;
    let b = store(&url, config).await;
    common::attempts::after_restart(Arc::new(a), Arc::new(b), &k).await;
}

#[tokio::test]
async fn postgres_attempt_counts_of_unsettled_messages_expire_with_the_ttl_and_are_purged() {
    let url = require!(postgres_url());
    let ttl = Duration::from_millis(500);
    let s = store(&url, PostgresStoreConfig { ttl, ..config() }).await;
    common::attempts::expires(&s, ttl, || async {}).await;
    reliable_core::attempts::AttemptCounter::record_attempt(&s, &common::key("left"))
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(
        s.purge_expired().await.unwrap() >= 1,
        "the expired count was purged"
    );
}
