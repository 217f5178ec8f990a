//! [`RedisStore`]: an idempotency store in Redis, shared by every consumer process and machine
//! that uses the same server and key prefix.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use reliable_core::attempts::AttemptCounter;
use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError, DEFAULT_LEASE,
    DEFAULT_TTL,
};
use reliable_core::message::IdempotencyKey;
use reliable_core::redact::{redact_url, Scrubber};

use crate::error::StoresError;
use crate::util::{bounded, millis, positive, ScrubbedError};

/// The prefix of every idempotency key the store writes, unless configured otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "reliable:idem:";

/// The prefix of every attempt count the store writes ([`AttemptCounter`]), unless configured
/// otherwise.
pub const DEFAULT_ATTEMPTS_KEY_PREFIX: &str = "reliable:attempts:";

// A key's value names its state and the reservation that set it: `lease:<token>` while
// reserved, `done:<token>` once completed (a bare `done` is a completion whose reservation is
// unknown). Every script below reads and writes one key atomically.

/// The value of a key reserved by `token`.
fn lease_value(token: LeaseToken) -> String {
    format!("lease:{token}")
}

/// The value of a key completed under `token`.
fn done_value(token: LeaseToken) -> String {
    format!("done:{token}")
}

/// `SET key <lease> NX PX <lease ms>`, and when the key exists, whether it is done.
/// ARGV: lease value, lease ms. Returns 0 = New, 1 = Duplicate, 2 = InProgress.
const RESERVE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 4) == 'done' then return 1 end
return 2
";

/// Extends the caller's lease, or takes the key again when it is free; never touches another
/// reservation or a completed key. ARGV: lease value, lease ms, done value.
/// Returns 1 = Renewed, 0 = Lost.
const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[3] then return 1 end
return 0
";

/// Marks the key done under the caller's token unless it is done already. ARGV: lease value,
/// done value, TTL ms. Returns 1 = Recorded (the caller's lease, a free key, or its own earlier
/// completion), 0 = Superseded (another reservation held or completed the key).
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[2] then return 1 end
if v and string.sub(v, 1, 4) == 'done' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if v == false or v == ARGV[1] then return 1 end
return 0
";

/// Deletes the key only while the caller's reservation holds it. ARGV: lease value.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// [`RESERVE`] for every key of KEYS in turn, in one atomic step. ARGV: lease ms, then the
/// lease value of each key. Returns one answer per key, as `RESERVE`'s.
const RESERVE_MANY: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('SET', k, ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    out[i] = 0
  else
    local v = redis.call('GET', k)
    if v and string.sub(v, 1, 4) == 'done' then out[i] = 1 else out[i] = 2 end
  end
end
return out
";

/// [`COMPLETE`] for every key of KEYS in turn, in one atomic step. ARGV: TTL ms, then the lease
/// value and the done value of each key. Returns one answer per key, as `COMPLETE`'s.
const COMPLETE_MANY: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local lease, done = ARGV[2 * i], ARGV[2 * i + 1]
  local v = redis.call('GET', k)
  if v == done then
    out[i] = 1
  elseif v and string.sub(v, 1, 4) == 'done' then
    out[i] = 0
  else
    redis.call('SET', k, done, 'PX', ARGV[1])
    if v == false or v == lease then out[i] = 1 else out[i] = 0 end
  end
end
return out
";

/// Counts one more delivery and (re)arms the count's expiry, in one atomic step, so a count
/// never exists without a TTL. ARGV: TTL ms. Returns the count.
const RECORD_ATTEMPT: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
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
    /// How long a completed key is remembered: the deduplication window. Default 24 h. Also
    /// how long an attempt count lives after its last delivery ([`AttemptCounter`]), so the
    /// counts of messages that are never settled do not stay in Redis for ever.
    pub ttl: Duration,
    /// How long a reservation lasts unless renewed, completed or released: the longest a
    /// crashed consumer blocks a message. The pipeline's `DedupeLayer` renews it every third of
    /// this while the handler runs, so it must exceed a few renewal round trips (and
    /// [`timeout`](Self::timeout)), not the handler's run. Default 5 min.
    pub lease: Duration,
    /// Prepended to every key, so several applications can share one Redis. Default
    /// [`DEFAULT_KEY_PREFIX`].
    pub key_prefix: String,
    /// Prepended to every attempt count's key ([`AttemptCounter`]). Neither it nor
    /// [`key_prefix`](Self::key_prefix) may start with the other, so a count never lands on an
    /// idempotency key. Default [`DEFAULT_ATTEMPTS_KEY_PREFIX`]; give each application its own
    /// when several share one Redis.
    pub attempts_key_prefix: String,
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
            attempts_key_prefix: DEFAULT_ATTEMPTS_KEY_PREFIX.to_owned(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// An [`IdempotencyStore`] in Redis. A reservation is `SET key lease:<token> NX PX <lease>`
/// with a fresh token per reservation, a completed key is `done:<token>` with the TTL; every
/// consumer pointed at the same server and prefix sees the same keys, so a duplicate delivered
/// to another process is still recognised. Renewing, completing and releasing are Lua scripts
/// that check the token, so they act for their own reservation only.
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
    url: String,
    scrubber: Scrubber,
    reserve: Script,
    renew: Script,
    complete: Script,
    release: Script,
    record_attempt: Script,
    reserve_many: Script,
    complete_many: Script,
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
    /// Fails with [`StoresError::InvalidConfig`] for a zero TTL, lease or timeout, an empty
    /// prefix, or prefixes that overlap, [`StoresError::InvalidUrl`] for a URL Redis cannot use, and
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
        check_attempts_prefix(&config)?;
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
            url: shown,
            scrubber,
            reserve: Script::new(RESERVE),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            record_attempt: Script::new(RECORD_ATTEMPT),
            reserve_many: Script::new(RESERVE_MANY),
            complete_many: Script::new(COMPLETE_MANY),
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

    fn attempts_key(&self, key: &IdempotencyKey) -> String {
        format!("{}{}", self.config.attempts_key_prefix, key.as_str())
    }

    /// Runs `script` (built by `args`) within the timeout; a failure or timeout becomes a
    /// scrubbed [`StoreError::Unavailable`] naming `what`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        script: &Script,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<T, StoreError> {
        let mut c = self.connection.clone();
        let mut invocation = script.prepare_invoke();
        args(&mut invocation);
        bounded(self.config.timeout, what, async {
            invocation
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.scrubber.unavailable(what, e))
        })
        .await
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    fn lease_duration(&self) -> Option<Duration> {
        Some(self.config.lease)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let token = LeaseToken::generate();
        let answer: i64 = self
            .run("Redis reserve", &self.reserve, |i| {
                i.key(self.key(key))
                    .arg(lease_value(token))
                    .arg(millis(self.config.lease));
            })
            .await?;
        Ok(match answer {
            0 => Reservation::New(token),
            1 => Reservation::Duplicate,
            _ => Reservation::InProgress,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        let answer: i64 = self
            .run("Redis renew", &self.renew, |i| {
                i.key(self.key(key))
                    .arg(lease_value(token))
                    .arg(millis(self.config.lease))
                    .arg(done_value(token));
            })
            .await?;
        Ok(if answer == 1 {
            Renewal::Renewed
        } else {
            Renewal::Lost
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: LeaseToken,
    ) -> Result<Completion, StoreError> {
        let answer: i64 = self
            .run("Redis complete", &self.complete, |i| {
                i.key(self.key(key))
                    .arg(lease_value(token))
                    .arg(done_value(token))
                    .arg(millis(self.config.ttl));
            })
            .await?;
        Ok(if answer == 1 {
            Completion::Recorded
        } else {
            Completion::Superseded
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        self.run::<i64>("Redis release", &self.release, |i| {
            i.key(self.key(key)).arg(lease_value(token));
        })
        .await
        .map(|_| ())
    }

    /// One Lua script call for the whole batch (the single `reserve` script's step for each
    /// key in turn): atomic, one round trip, the keys taken in the batch's order (so a key's
    /// second copy sees its first).
    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::generate()).collect();
        let answers: Vec<i64> = self
            .run("Redis reserve_many", &self.reserve_many, |i| {
                i.arg(millis(self.config.lease));
                for (key, token) in keys.iter().zip(&tokens) {
                    i.key(self.key(key)).arg(lease_value(*token));
                }
            })
            .await?;
        check_len("Redis reserve_many", keys.len(), answers.len())?;
        Ok(answers
            .into_iter()
            .zip(tokens)
            .map(|(answer, token)| match answer {
                0 => Reservation::New(token),
                1 => Reservation::Duplicate,
                _ => Reservation::InProgress,
            })
            .collect())
    }

    /// One Lua script call (`COMPLETE` for each pair in turn) for the whole batch: atomic, one
    /// round trip.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = completions.len()))]
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let answers: Vec<i64> = self
            .run("Redis complete_many", &self.complete_many, |i| {
                i.arg(millis(self.config.ttl));
                for (key, token) in completions {
                    i.key(self.key(key))
                        .arg(lease_value(*token))
                        .arg(done_value(*token));
                }
            })
            .await?;
        check_len("Redis complete_many", completions.len(), answers.len())?;
        Ok(answers
            .into_iter()
            .map(|answer| {
                if answer == 1 {
                    Completion::Recorded
                } else {
                    Completion::Superseded
                }
            })
            .collect())
    }
}

/// Refuses a batch answer that does not hold one answer per key.
fn check_len(what: &str, asked: usize, answered: usize) -> Result<(), StoreError> {
    if asked == answered {
        return Ok(());
    }
    Err(StoreError::Unavailable {
        reason: format!("{what}: {answered} answers to {asked} keys"),
    })
}

/// Refuses an attempts prefix that could make a count share a Redis key with an idempotency key.
fn check_attempts_prefix(config: &RedisStoreConfig) -> Result<(), StoresError> {
    let (keys, counts) = (&config.key_prefix, &config.attempts_key_prefix);
    if counts.is_empty() || keys.starts_with(counts.as_str()) || counts.starts_with(keys.as_str()) {
        return Err(StoresError::InvalidConfig {
            setting: "attempts_key_prefix",
            reason: format!(
                "{counts:?} must be non-empty and neither start nor be the start of key_prefix \
                 {keys:?}, or an attempt count could overwrite an idempotency key; keep the \
                 default {DEFAULT_ATTEMPTS_KEY_PREFIX:?} or pick e.g. \"<app>:attempts:\""
            ),
        });
    }
    Ok(())
}

/// Counts deliveries in Redis, shared by every consumer on the same server and
/// [`attempts_key_prefix`](RedisStoreConfig::attempts_key_prefix): `INCR` and `PEXPIRE` in one
/// script, so each count expires [`ttl`](RedisStoreConfig::ttl) after its last delivery when the
/// message is never settled. Durable as far as Redis persists (`appendonly yes`).
#[async_trait]
impl AttemptCounter for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn record_attempt(&self, key: &IdempotencyKey) -> Result<u32, StoreError> {
        let n: i64 = self
            .run("Redis record_attempt", &self.record_attempt, |i| {
                i.key(self.attempts_key(key)).arg(millis(self.config.ttl));
            })
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn clear(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        let what = "Redis clear_attempts";
        let mut c = self.connection.clone();
        let _: i64 = bounded(self.config.timeout, what, async {
            redis::cmd("DEL")
                .arg(self.attempts_key(key))
                .query_async(&mut c)
                .await
                .map_err(|e| self.scrubber.unavailable(what, e))
        })
        .await?;
        Ok(())
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
