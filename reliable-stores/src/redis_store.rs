//! [`RedisStore`]: an idempotency store in Redis, shared by every consumer process and machine
//! that uses the same server and key prefix.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use reliable_core::idempotency::{
    IdempotencyStore, Reservation, StoreError, DEFAULT_LEASE, DEFAULT_TTL,
};
use reliable_core::message::IdempotencyKey;
use reliable_core::redact::{redact_url, Scrubber};

use crate::error::StoresError;
use crate::util::{bounded, millis, positive, ScrubbedError};

/// The prefix of every key the store writes, unless configured otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "reliable:idem:";

/// The value of a completed key.
const DONE: &str = "done";

/// `SET key lease NX PX ms`, and when the key exists, whether it is done.
/// Returns 0 = New, 1 = Duplicate, 2 = InProgress.
const RESERVE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[3] then return 1 end
return 2
";

/// Deletes the key only while it holds this store's lease.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Settings of a [`RedisStore`].
///
/// ```
/// use std::time::Duration;
/// use reliable_stores::RedisStoreConfig;
///
/// let config = RedisStoreConfig { key_prefix: "orders:idem:".into(), ..Default::default() };
/// assert_eq!(config.timeout, Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// How long a completed key is remembered: the deduplication window. Default 24 h.
    pub ttl: Duration,
    /// How long a reservation lasts without `complete` or `release`: the longest a crashed
    /// consumer blocks a message. Must exceed the longest handler run. Default 5 min.
    pub lease: Duration,
    /// Prepended to every key, so several applications can share one Redis. Default
    /// [`DEFAULT_KEY_PREFIX`].
    pub key_prefix: String,
    /// The longest any one call waits for Redis (connecting included) before it answers
    /// [`StoreError::Unavailable`]. Default 2 s.
    pub timeout: Duration,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// An [`IdempotencyStore`] in Redis. A reservation is `SET key <lease token> NX PX <lease>`, a
/// completed key is `SET key done PX <ttl>`; every consumer pointed at the same server and
/// prefix sees the same keys, so a duplicate delivered to another process is still recognised.
///
/// Durability is Redis's: run it with `appendonly yes` (as `scripts/stores` does) if completed
/// keys must survive a restart of Redis itself. A lost Redis write can only make a duplicate
/// run again, never lose a message.
///
/// The connection reconnects by itself; while Redis is down every call answers
/// [`StoreError::Unavailable`] within [`RedisStoreConfig::timeout`], and the pipeline requeues
/// the message.
///
/// ```no_run
/// # async fn demo() -> Result<(), reliable_stores::StoresError> {
/// use reliable_stores::{RedisStore, RedisStoreConfig};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379/0", RedisStoreConfig::default()).await?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    config: RedisStoreConfig,
    /// This instance's lease value: tells its reservations from another process's.
    lease_token: String,
    url: String,
    scrubber: Scrubber,
    reserve: Script,
    release: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port/db`).
    ///
    /// Fails with [`StoresError::InvalidConfig`] for a zero TTL, lease or timeout or an empty
    /// prefix, [`StoresError::InvalidUrl`] for a URL Redis cannot use, and
    /// [`StoresError::Unreachable`] when Redis does not answer (or refuses the login) within
    /// the timeout.
    pub async fn connect(url: &str, config: RedisStoreConfig) -> Result<Self, StoresError> {
        positive("ttl", config.ttl)?;
        positive("lease", config.lease)?;
        positive("timeout", config.timeout)?;
        if config.key_prefix.is_empty() {
            return Err(StoresError::InvalidConfig {
                setting: "key_prefix",
                reason: "must not be empty: keys without a prefix mix with the application's own"
                    .into(),
            });
        }
        let shown = redact_url(url);
        let mut scrubber = Scrubber::default();
        scrubber.add_secrets_of(url);
        let client = redis::Client::open(url).map_err(|e| StoresError::InvalidUrl {
            store: "Redis",
            url: shown.clone(),
            reason: scrubber.scrub(&e.to_string()),
            expected: "redis://[user:password@]host:port/db",
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let unreachable = |url: &str, reason: String| StoresError::Unreachable {
            store: "Redis",
            url: url.to_owned(),
            reason,
        };
        let connection = match tokio::time::timeout(
            config.timeout.saturating_mul(2),
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(&shown, scrubber.scrub(&e.to_string()))),
            Err(_) => {
                return Err(unreachable(
                    &shown,
                    format!("no answer within {:?}", config.timeout.saturating_mul(2)),
                ))
            }
        };
        let store = Self {
            connection,
            lease_token: format!("lease:{}", uuid::Uuid::now_v7()),
            url: shown,
            scrubber,
            reserve: Script::new(RESERVE),
            release: Script::new(RELEASE),
            config,
        };
        // Check the login and the server now, not on the first message.
        let mut c = store.connection.clone();
        let pong: Result<String, _> = bounded(store.config.timeout, "PING", async {
            redis::cmd("PING")
                .query_async(&mut c)
                .await
                .map_err(|e| store.scrubber.unavailable("PING", e))
        })
        .await;
        if let Err(e) = pong {
            return Err(unreachable(&store.url, e.to_string()));
        }
        Ok(store)
    }

    fn key(&self, key: &IdempotencyKey) -> String {
        format!("{}{}", self.config.key_prefix, key.as_str())
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let mut c = self.connection.clone();
        let answer: i64 = bounded(self.config.timeout, "Redis reserve", async {
            self.reserve
                .key(self.key(key))
                .arg(&self.lease_token)
                .arg(millis(self.config.lease))
                .arg(DONE)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.scrubber.unavailable("Redis reserve", e))
        })
        .await?;
        Ok(match answer {
            0 => Reservation::New,
            1 => Reservation::Duplicate,
            _ => Reservation::InProgress,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn complete(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        bounded(self.config.timeout, "Redis complete", async {
            redis::cmd("SET")
                .arg(self.key(key))
                .arg(DONE)
                .arg("PX")
                .arg(millis(self.config.ttl))
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| self.scrubber.unavailable("Redis complete", e))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn release(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        bounded(self.config.timeout, "Redis release", async {
            self.release
                .key(self.key(key))
                .arg(&self.lease_token)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(|e| self.scrubber.unavailable("Redis release", e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::leak_check::{leaks, PASSWORDS};

    /// The error of connecting to `url` (nothing listens there), Display and Debug.
    async fn connect_error(url: String) -> (String, String) {
        let config = RedisStoreConfig {
            timeout: Duration::from_millis(500),
            ..Default::default()
        };
        match RedisStore::connect(&url, config).await {
            Ok(_) => panic!("something answered at {url}"),
            Err(e) => (url, format!("{e} | {e:?}")),
        }
    }

    #[tokio::test]
    async fn errors_never_show_a_password_holding_url_delimiters() {
        let mut urls = vec!["redis://default:pa/ss@127.0.0.1:1/0".to_owned()];
        for password in PASSWORDS {
            urls.extend([
                format!("redis://default:{password}@127.0.0.1:1/0"),
                format!("redis://:{password}@127.0.0.1:1"),
                format!("rediss://default:{password}@127.0.0.1:1/0"),
                format!("redis+unix:///nonexistent/reliable.sock?db=0&pass={password}"),
                format!("unix:///nonexistent/reliable.sock?pass={password}&db=0"),
            ]);
        }
        let shown = leaks(urls, &["pa/ss", "Xq7", "Zk9"], connect_error).await;
        assert_eq!(shown, "");
    }
}
