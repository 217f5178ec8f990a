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
async fn redis_batches_answer_what_the_single_calls_answer() {
    let url = require!(redis_url());
    let store = store(&url, RedisStoreConfig::default()).await;
    common::batch::cases(&store).await;
    let store: Arc<dyn IdempotencyStore> = Arc::new(store);
    for seed in 1..=8 {
        common::batch::matches_singles(store.clone(), seed, 60, 4).await;
    }
    let other: Arc<dyn IdempotencyStore> =
        Arc::new(self::store(&url, RedisStoreConfig::default()).await);
    common::batch::race(store, other).await;
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

/// A store with the 1 s lease of the L11 checks.
async fn short_lease(url: &str) -> RedisStore {
    let config = RedisStoreConfig {
        lease: common::leases::LEASE,
        ..RedisStoreConfig::default()
    };
    store(url, config).await
}

#[tokio::test]
async fn redis_a_handler_slower_than_the_lease_applies_its_effect_once() {
    let url = require!(redis_url());
    common::leases::a_slow_handler_keeps_its_lease(Arc::new(short_lease(&url).await)).await;
}

#[tokio::test]
async fn redis_a_failed_complete_is_retried_and_never_becomes_a_second_effect() {
    let url = require!(redis_url());
    common::leases::a_failed_complete_is_retried(Arc::new(short_lease(&url).await)).await;
}

#[tokio::test]
async fn redis_renew_complete_and_release_act_for_their_own_reservation_only() {
    let url = require!(redis_url());
    common::leases::tokens_fence_renew_and_complete(&short_lease(&url).await).await;
}

#[tokio::test]
async fn redis_a_late_release_keeps_the_reservation_of_the_same_instance_s_new_holder() {
    let url = require!(redis_url());
    common::leases::a_late_release_keeps_the_new_holder(&short_lease(&url).await).await;
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

/// End to end, on a real queue: while Redis is cut off the consumer neither acks (the message
/// stays with the broker, requeued) nor dead-letters it (the quorum queue has no DLX, so a
/// reject would drop it) nor runs the effect; once Redis is back the effect runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_redis_is_down_neither_acks_nor_loses_the_message() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use reliable_amqp::settings::AmqpSettings;
    use reliable_amqp::topology::{self, DeadLetterTarget, QueueSpec};
    use reliable_amqp::{AmqpConsumer, AmqpPublisher};
    use reliable_core::pipeline::{
        handler_fn, DeadLetter, DedupeLayer, HandlerBuilder, HandlerError, Pipeline, PipelineConfig,
    };
    use reliable_core::{Message, Transport};

    let redis = require!(redis_url());
    let amqp = require!(reliable_test_support::amqp_url());
    let proxy = common::Proxy::start(common::host_port(&redis)).await;
    let config = RedisStoreConfig {
        timeout: Duration::from_millis(300),
        ..RedisStoreConfig::default()
    };
    let store = Arc::new(store(&common::via(&redis, proxy.addr), config).await);

    let conn = reliable_amqp::lapin::Connection::connect(&amqp, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queue = reliable_test_support::unique_name("store-down");
    let spec = QueueSpec::quorum(&queue).with_dead_letter(DeadLetterTarget::new(
        format!("{queue}.dlx"),
        format!("{queue}.dlq"),
    ));
    topology::declare_queue(&ch, &spec).await.unwrap();
    let publisher = AmqpPublisher::connect(&amqp, AmqpSettings::safe())
        .await
        .unwrap();
    publisher
        .publish(&Message::new(&b"order-1"[..]).with_routing_key(&queue))
        .await
        .unwrap();

    proxy.cut();
    let applied = Arc::new(AtomicUsize::new(0));
    let effect = {
        let applied = applied.clone();
        handler_fn(move |_msg: Message| {
            let applied = applied.clone();
            async move {
                applied.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let handler = HandlerBuilder::new(effect)
        .layer(DedupeLayer::new(store))
        .build();
    let source = AmqpConsumer::connect_checked(&amqp, &spec, AmqpSettings::safe())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let pipeline =
        Pipeline::new(source, handler, DeadLetter::BrokerReject).with_config(PipelineConfig {
            requeue_delay: Duration::from_millis(200),
            ..PipelineConfig::default()
        });
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run_until(async {
        let _ = stopped.await;
    }));

    // The outage: the delivery goes round (taken, store unavailable, requeued), never applied.
    let outage_until = std::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().requeued < 3 && std::time::Instant::now() < outage_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = stats.snapshot();
    assert!(
        during.requeued >= 3,
        "the message must be requeued while Redis is down: {during:?}"
    );
    assert_eq!(during.dead_lettered, 0, "{during:?}");
    assert_eq!(during.succeeded, 0, "{during:?}");
    assert_eq!(applied.load(Ordering::SeqCst), 0);

    proxy.restore();
    let back_until = std::time::Instant::now() + Duration::from_secs(20);
    while applied.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < back_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    let after = run.await.unwrap().unwrap();
    assert_eq!(
        applied.load(Ordering::SeqCst),
        1,
        "applied once after Redis came back"
    );
    assert_eq!(after.succeeded, 1, "{after:?}");
    assert_eq!(after.dead_lettered, 0, "{after:?}");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn redis_attempt_counts_survive_a_restart_are_shared_and_reset_by_clear() {
    let url = require!(redis_url());
    let k = {
        let before = store(&url, RedisStoreConfig::default()).await;
        common::attempts::before_restart(&before).await
    };
    let a = store(&url, RedisStoreConfig::default()).await;
    let b = store(&url, RedisStoreConfig::default()).await;
    common::attempts::after_restart(Arc::new(a), Arc::new(b), &k).await;
}

#[tokio::test]
async fn redis_attempt_counts_of_unsettled_messages_expire_with_the_ttl() {
    let url = require!(redis_url());
    let ttl = Duration::from_millis(500);
    let config = RedisStoreConfig {
        ttl,
        ..RedisStoreConfig::default()
    };
    let s = store(&url, config).await;
    common::attempts::expires(&s, ttl, || async {}).await;
}

#[tokio::test]
async fn redis_attempt_counts_never_share_a_key_with_idempotency_keys() {
    let url = require!(redis_url());
    let err = RedisStore::connect(
        &url,
        RedisStoreConfig {
            attempts_key_prefix: RedisStoreConfig::default().key_prefix,
            ..RedisStoreConfig::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            StoresError::InvalidConfig {
                setting: "attempts_key_prefix",
                ..
            }
        ),
        "{err:?}"
    );
}
