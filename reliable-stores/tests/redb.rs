//! `RedbStore` against a real redb file: the store protocol, expiry, restarts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::{IdempotencyStore, Reservation};
use reliable_stores::{RedbStore, RedbStoreConfig, StoresError};

fn short() -> RedbStoreConfig {
    RedbStoreConfig {
        ttl: Duration::from_millis(500),
        lease: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn redb_store_follows_the_store_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("keys.redb"), RedbStoreConfig::default()).unwrap();
    common::protocol(&store).await;
    let store: Arc<dyn IdempotencyStore> = Arc::new(store);
    common::one_winner(store.clone(), store).await;
}

#[tokio::test]
async fn redb_store_frees_leases_and_forgets_keys_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("keys.redb"), short()).unwrap();
    common::expiry(&store, Duration::from_millis(500)).await;
}

/// A store with the 1 s lease of the L11 checks, in `dir`.
fn short_lease(dir: &tempfile::TempDir) -> RedbStore {
    let config = RedbStoreConfig {
        lease: common::leases::LEASE,
        ..RedbStoreConfig::default()
    };
    RedbStore::open(dir.path().join("keys.redb"), config).unwrap()
}

#[tokio::test]
async fn redb_a_handler_slower_than_the_lease_applies_its_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    common::leases::a_slow_handler_keeps_its_lease(Arc::new(short_lease(&dir))).await;
}

#[tokio::test]
async fn redb_a_failed_complete_is_retried_and_never_becomes_a_second_effect() {
    let dir = tempfile::tempdir().unwrap();
    common::leases::a_failed_complete_is_retried(Arc::new(short_lease(&dir))).await;
}

#[tokio::test]
async fn redb_renew_complete_and_release_act_for_their_own_reservation_only() {
    let dir = tempfile::tempdir().unwrap();
    common::leases::tokens_fence_renew_and_complete(&short_lease(&dir)).await;
}

#[tokio::test]
async fn redb_a_late_release_keeps_the_new_holder_s_reservation() {
    let dir = tempfile::tempdir().unwrap();
    common::leases::a_late_release_keeps_the_new_holder(&short_lease(&dir)).await;
}

#[tokio::test]
async fn completed_keys_survive_a_reopen_and_reservations_of_the_dead_process_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let (done, held) = (common::key("done"), common::key("held"));
    {
        let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
        let token = common::new(&store, &done).await;
        store.complete(&done, token).await.unwrap();
        common::new(&store, &held).await;
    }
    let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
    assert_eq!(store.reserve(&done).await.unwrap(), Reservation::Duplicate);
    assert!(
        store.reserve(&held).await.unwrap().is_new(),
        "a reservation of the earlier process must not block the key for a whole lease"
    );
}

#[tokio::test]
async fn a_second_open_of_the_same_file_says_to_share_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let _first = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
    let err = RedbStore::open(&path, RedbStoreConfig::default()).unwrap_err();
    assert!(matches!(err, StoresError::AlreadyOpen { .. }), "{err:?}");
    assert!(
        err.to_string().contains("RedisStore or PostgresStore"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_settings_and_paths_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let zero = RedbStoreConfig {
        lease: Duration::ZERO,
        ..RedbStoreConfig::default()
    };
    let err = RedbStore::open(dir.path().join("a.redb"), zero).unwrap_err();
    assert!(
        matches!(
            err,
            StoresError::InvalidConfig {
                setting: "lease",
                ..
            }
        ),
        "{err:?}"
    );
    let err = RedbStore::open(
        dir.path().join("missing/dir/a.redb"),
        RedbStoreConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, StoresError::Storage { .. }), "{err:?}");
    assert!(err.to_string().contains("writable"), "{err}");
}

#[tokio::test]
async fn purge_removes_expired_keys_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("keys.redb"), short()).unwrap();
    for i in 0..10 {
        let k = common::key(&format!("old{i}"));
        let token = common::new(&store, &k).await;
        store.complete(&k, token).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fresh = common::key("fresh");
    let token = common::new(&store, &fresh).await;
    store.complete(&fresh, token).await.unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 10);
    assert_eq!(store.reserve(&fresh).await.unwrap(), Reservation::Duplicate);
}

/// Set in the child process of the kill -9 test: the store file it writes to.
const CRASH_CHILD: &str = "RELIABLE_REDB_CRASH_CHILD";

/// A child process completes keys (printing each after `complete` returned) and holds one
/// reservation; it is killed with SIGKILL mid-stream. Reopened, the file knows every key the
/// child reported complete, and the dead child's reservation does not block its key.
#[tokio::test]
async fn completed_keys_survive_a_kill_9_of_the_process() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    if let Ok(path) = std::env::var(CRASH_CHILD) {
        // The child: never returns; the parent kills it.
        let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
        let held = reliable_core::message::IdempotencyKey::new("held").unwrap();
        common::new(&store, &held).await;
        for i in 0.. {
            let k = reliable_core::message::IdempotencyKey::new(format!("k{i}")).unwrap();
            let token = common::new(&store, &k).await;
            store.complete(&k, token).await.unwrap();
            println!("done k{i}");
        }
        unreachable!();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "completed_keys_survive_a_kill_9_of_the_process",
            "--nocapture",
        ])
        .env(CRASH_CHILD, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reported = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if let Some(key) = line.unwrap().strip_prefix("done ") {
            reported.push(key.to_owned());
            if reported.len() == 200 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(reported.len(), 200, "the child stopped early");
    let store = RedbStore::open(&path, RedbStoreConfig::default()).unwrap();
    for key in &reported {
        let k = reliable_core::message::IdempotencyKey::new(key.as_str()).unwrap();
        assert_eq!(
            store.reserve(&k).await.unwrap(),
            Reservation::Duplicate,
            "{key} forgotten"
        );
    }
    let held = reliable_core::message::IdempotencyKey::new("held").unwrap();
    assert!(store.reserve(&held).await.unwrap().is_new());
}

#[tokio::test]
async fn redb_attempt_counts_of_unsettled_messages_are_purged_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("keys.redb"), short()).unwrap();
    let ttl = short().ttl;
    let purging = store.clone();
    common::attempts::expires(&store, ttl, || async move {
        assert!(
            purging.purge_expired().await.unwrap() >= 1,
            "the count was purged"
        );
    })
    .await;
}

#[tokio::test]
async fn redb_batches_answer_what_the_single_calls_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("keys.redb"), RedbStoreConfig::default()).unwrap();
    common::batch::cases(&store).await;
    let store: Arc<dyn IdempotencyStore> = Arc::new(store);
    for seed in 1..=8 {
        common::batch::matches_singles(store.clone(), seed, 60, 4).await;
    }
    common::batch::race(store.clone(), store).await;
}
