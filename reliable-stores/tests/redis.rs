//! `RedisStore` against the Redis that `scripts/stores up` starts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::IdempotencyStore;
use reliable_stores::{RedisStore, RedisStoreConfig, StoresError};
use reliable_test_support::{redis_url, require};

async fn store(url: &str, config: RedisStoreConfig) -> RedisStore {
    RedisStore::connect(url, config)
        .await
        .expect("connect to Redis")
}

#[tokio::test]
async fn redis_store_follows_the_store_protocol_across_instances() {
    let url = require!(redis_url());
    let a = store(&url, RedisStoreConfig::default()).await;
    let b = store(&url, RedisStoreConfig::default()).await;
    common::protocol(&a).await;
    common::shared(&a, &b).await;
    let (a, b): (Arc<dyn IdempotencyStore>, Arc<dyn IdempotencyStore>) = (Arc::new(a), Arc::new(b));
    common::one_winner(a, b).await;
}

#[tokio::test]
async fn redis_store_frees_leases_and_forgets_keys_after_their_ttl() {
    let url = require!(redis_url());
    let short = Duration::from_millis(500);
    let config = RedisStoreConfig {
        ttl: short,
        lease: short,
        ..RedisStoreConfig::default()
    };
    common::expiry(&store(&url, config).await, short).await;
}

#[tokio::test]
async fn an_unreachable_redis_answers_unavailable_in_time_and_the_store_recovers() {
    let url = require!(redis_url());
    let proxy = common::Proxy::start(common::host_port(&url)).await;
    let config = RedisStoreConfig {
        timeout: Duration::from_millis(500),
        ..RedisStoreConfig::default()
    };
    let s = store(&common::via(&url, proxy.addr), config).await;
    common::unavailable_then_back(&s, &proxy, &common::password(&url), Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn connecting_fails_clearly_without_leaking_the_password() {
    let url = require!(redis_url());
    let secret = common::password(&url);
    // Nothing listens on port 1.
    let bad = common::via(&url, "127.0.0.1:1".parse().unwrap());
    let config = RedisStoreConfig {
        timeout: Duration::from_millis(500),
        ..RedisStoreConfig::default()
    };
    let err = RedisStore::connect(&bad, config.clone()).await.unwrap_err();
    assert!(matches!(err, StoresError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("scripts/stores up"), "{err}");
    assert!(!err.to_string().contains(&secret), "{err}");
    let wrong = url.replace(&secret, "not-the-password");
    let err = RedisStore::connect(&wrong, config.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoresError::Unreachable { .. }), "{err:?}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    let err = RedisStore::connect("http://nowhere", config.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoresError::InvalidUrl { .. }), "{err:?}");
    let empty = RedisStoreConfig {
        key_prefix: String::new(),
        ..config
    };
    let err = RedisStore::connect(&url, empty).await.unwrap_err();
    assert!(matches!(
        err,
        StoresError::InvalidConfig {
            setting: "key_prefix",
            ..
        }
    ));
}
