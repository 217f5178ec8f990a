//! What every idempotency store must answer, run against each real store; and a TCP proxy the
//! tests cut to make a store unreachable.

#![allow(dead_code)]

pub mod attempts;
pub mod batch;
pub mod leases;

use std::sync::Arc;
use std::time::Duration;

use reliable_core::idempotency::{Completion, IdempotencyStore, LeaseToken, Reservation};
use reliable_core::message::IdempotencyKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A key unique to this test run.
pub fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::new(reliable_test_support::unique_name(name)).expect("valid key")
}

/// Reserves `k`, which must be free; returns the reservation's token.
pub async fn new(store: &dyn IdempotencyStore, k: &IdempotencyKey) -> LeaseToken {
    match store.reserve(k).await.unwrap() {
        Reservation::New(token) => token,
        other => panic!("{k} should be free, the store answered {other:?}"),
    }
}

/// reserve → New, then InProgress while held; complete → Duplicate; release → New again.
pub async fn protocol(store: &dyn IdempotencyStore) {
    let k = key("protocol");
    let first = new(store, &k).await;
    assert_eq!(store.reserve(&k).await.unwrap(), Reservation::InProgress);
    store.release(&k, first).await.unwrap();
    let second = new(store, &k).await; // released keys are free
    assert_ne!(first, second, "a token per reservation");
    assert_eq!(
        store.complete(&k, second).await.unwrap(),
        Completion::Recorded
    );
    assert_eq!(store.reserve(&k).await.unwrap(), Reservation::Duplicate);
    store.release(&k, second).await.unwrap();
    assert_eq!(
        store.reserve(&k).await.unwrap(),
        Reservation::Duplicate,
        "release never undoes a completed key"
    );
    assert_eq!(
        store.complete(&k, second).await.unwrap(),
        Completion::Recorded,
        "completing again (a retry after a lost answer) is recorded"
    );
}

/// A reservation nobody completes frees the key after the lease; a completed key is
/// forgotten after the TTL. `store` must have a lease and a TTL of `short`.
pub async fn expiry(store: &dyn IdempotencyStore, short: Duration) {
    let held = key("lease");
    new(store, &held).await;
    let done = key("ttl");
    let token = new(store, &done).await;
    store.complete(&done, token).await.unwrap();
    assert_eq!(store.reserve(&done).await.unwrap(), Reservation::Duplicate);
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert!(store.reserve(&held).await.unwrap().is_new(), "lease ended");
    assert!(store.reserve(&done).await.unwrap().is_new(), "TTL ended");
}

/// Two instances over the same backend (two processes' view): a key completed by one is a
/// duplicate for the other, a key held by one is in progress for the other, and one instance's
/// release does not free the other's reservation.
pub async fn shared(a: &dyn IdempotencyStore, b: &dyn IdempotencyStore) {
    let k = key("shared");
    let token = new(a, &k).await;
    assert_eq!(b.reserve(&k).await.unwrap(), Reservation::InProgress);
    b.release(&k, LeaseToken::generate()).await.unwrap();
    assert_eq!(
        b.reserve(&k).await.unwrap(),
        Reservation::InProgress,
        "a release under another token must not free a's lease"
    );
    assert_eq!(a.complete(&k, token).await.unwrap(), Completion::Recorded);
    assert_eq!(b.reserve(&k).await.unwrap(), Reservation::Duplicate);
}

/// Many tasks over two instances race for the same keys: exactly one wins each key.
pub async fn one_winner(a: Arc<dyn IdempotencyStore>, b: Arc<dyn IdempotencyStore>) {
    let keys: Vec<IdempotencyKey> = (0..20).map(|i| key(&format!("race{i}"))).collect();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for k in &keys {
                if store.reserve(k).await.unwrap().is_new() {
                    won.push(k.as_str().to_owned());
                }
            }
            won
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    winners.sort();
    let mut unique = winners.clone();
    unique.dedup();
    assert_eq!(
        winners.len(),
        keys.len(),
        "every key has exactly one winner: {winners:?}"
    );
    assert_eq!(unique.len(), keys.len());
}

/// The `host:port` of `url`.
pub fn host_port(url: &str) -> String {
    reliable_test_support::host_port(url).expect("a URL")
}

/// A TCP proxy to `target` that the test can cut: while cut, it refuses new connections and
/// closes open ones, like a store that went down.
pub struct Proxy {
    /// The address to connect to instead of the target.
    pub addr: std::net::SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.up.send(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        let _ = self.up.send(true);
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// The password of `url`.
pub fn password(url: &str) -> String {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| u)
        .unwrap_or_default();
    userinfo
        .split_once(':')
        .map(|(_, p)| p.to_owned())
        .unwrap_or_default()
}

/// While the store is cut off, `reserve` fails with a retryable `Unavailable` within
/// `deadline` and its text holds no password; once restored, the store answers again.
pub async fn unavailable_then_back(
    store: &dyn IdempotencyStore,
    proxy: &Proxy,
    secret: &str,
    deadline: Duration,
) {
    let k = key("outage");
    new(store, &k).await;
    proxy.cut();
    let started = std::time::Instant::now();
    let err = store
        .reserve(&key("during-outage"))
        .await
        .expect_err("a cut-off store cannot answer");
    assert!(
        started.elapsed() <= deadline,
        "answered after {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        matches!(
            err,
            reliable_core::idempotency::StoreError::Unavailable { .. }
        ),
        "{err:?}"
    );
    assert!(text.contains("will be retried"), "{text}");
    assert!(
        secret.is_empty() || !text.contains(secret),
        "password leaked: {text}"
    );
    proxy.restore();
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match store.reserve(&k).await {
                Ok(r) => return r,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("the store answers again once reachable");
    assert_eq!(
        back,
        Reservation::InProgress,
        "the reservation made before the outage holds"
    );
}
