//! [`PostgresStore`]: an idempotency store in a PostgreSQL table, shared by every consumer
//! process, with the inbox form in which the key commits in the same transaction as the
//! business write.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError,
};
use reliable_core::message::IdempotencyKey;
use reliable_core::redact::{redact_url, Scrubber};
use tokio_postgres::NoTls;

use crate::error::StoresError;
use crate::util::{bounded, millis_i64, positive, ScrubbedError};

mod attempts;
mod config;
mod inbox;
mod sql;

pub use config::PostgresStoreConfig;
pub use inbox::{Applied, ApplyError, TxFuture};
use sql::Sql;

/// The table the store uses unless configured otherwise.
pub const DEFAULT_TABLE: &str = "reliable_idempotency";

/// Expired keys are purged on every this many completions, at most 1 000 at a time.
const PURGE_EVERY: u64 = 256;

/// An [`IdempotencyStore`] in a PostgreSQL table, shared by every process that uses the same
/// database and table. Its clock is the server's (`now()`), so consumers on machines with
/// skewed clocks agree on leases and TTLs.
///
/// Two ways to use it:
///
/// - As any store, under the pipeline's [`DedupeLayer`](reliable_core::pipeline::DedupeLayer):
///   `reserve` inserts the key with a lease, `complete` marks it done. Between the effect and
///   `complete` a crash leaves the key reserved; when the lease ends a redelivery applies the
///   effect again.
/// - The inbox form, when the effect is a write to the same database: [`apply_once`](Self::apply_once)
///   (or [`complete_in`](Self::complete_in) inside your own transaction) records the key **in
///   the transaction of the business write**. Both commit or neither does, so no crash can apply
///   the effect twice; a concurrent duplicate waits on the key's row lock and then answers
///   [`Applied::Duplicate`].
///
/// ```no_run
/// # async fn demo(msg: reliable_core::message::Message) -> Result<(), Box<dyn std::error::Error>> {
/// use reliable_stores::{Applied, PostgresStore, PostgresStoreConfig};
///
/// let store = PostgresStore::connect(
///     "postgres://app:secret@127.0.0.1:5432/shop",
///     PostgresStoreConfig::default(),
/// )
/// .await?;
/// let order = String::from_utf8_lossy(msg.payload()).into_owned();
/// let applied = store
///     .apply_once(&msg.idempotency_key(), |tx| {
///         Box::pin(async move {
///             tx.execute("INSERT INTO orders (body) VALUES ($1)", &[&order]).await
///         })
///     })
///     .await?;
/// if let Applied::Duplicate = applied {
///     // Applied before: just acknowledge.
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: PostgresStoreConfig,
    url: String,
    scrubber: Scrubber,
    completions: AtomicU64,
    sql: Sql,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.inner.url)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn valid_table(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 48
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db` or a `host=.. user=..`
    /// string), and creates the table if it is missing.
    ///
    /// Fails with [`StoresError::InvalidConfig`] for a zero duration or pool size or a table
    /// name that is not a plain identifier, [`StoresError::InvalidUrl`] for a URL PostgreSQL
    /// cannot use, [`StoresError::Unreachable`] when the server does not answer or refuses the
    /// login within the timeout, and [`StoresError::Migration`] when the table cannot be
    /// created.
    pub async fn connect(url: &str, config: PostgresStoreConfig) -> Result<Self, StoresError> {
        let shown = redact_url(url);
        let mut scrubber = Scrubber::default();
        scrubber.add_secrets_of(url);
        let pg = tokio_postgres::Config::from_str(url).map_err(|e| StoresError::InvalidUrl {
            store: "PostgreSQL",
            url: shown.clone(),
            reason: scrubber.scrub(&e.to_string()),
            expected: "postgres://user:password@host:port/database",
        })?;
        if let Some(pw) = pg.get_password() {
            scrubber.add(&String::from_utf8_lossy(pw));
        }
        if config.pool_size == 0 {
            return Err(StoresError::InvalidConfig {
                setting: "pool_size",
                reason: "must be at least 1".into(),
            });
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .wait_timeout(Some(config.timeout))
            .create_timeout(Some(config.timeout))
            .recycle_timeout(Some(config.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoresError::InvalidConfig {
                setting: "pool_size",
                reason: e.to_string(),
            })?;
        Self::build(pool, config, shown, scrubber).await
    }

    /// Uses an existing pool (its connections must reach the database the table lives in), and
    /// creates the table if it is missing. Errors as [`connect`](Self::connect).
    pub async fn from_pool(pool: Pool, config: PostgresStoreConfig) -> Result<Self, StoresError> {
        Self::build(
            pool,
            config,
            "(a caller's pool)".into(),
            Scrubber::default(),
        )
        .await
    }

    async fn build(
        pool: Pool,
        config: PostgresStoreConfig,
        url: String,
        scrubber: Scrubber,
    ) -> Result<Self, StoresError> {
        positive("ttl", config.ttl)?;
        positive("lease", config.lease)?;
        positive("timeout", config.timeout)?;
        if !valid_table(&config.table) {
            return Err(StoresError::InvalidConfig {
                setting: "table",
                reason: format!(
                    "{:?} is not a plain lower-case identifier ([a-z_][a-z0-9_]*, at most 48 bytes)",
                    config.table
                ),
            });
        }
        let store = Self {
            inner: Arc::new(Inner {
                sql: Sql::new(&config.table),
                pool,
                url,
                scrubber,
                completions: AtomicU64::new(0),
                config,
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The SQL that creates the store's tables and indexes (what [`connect`](Self::connect)
    /// runs): the idempotency table and its attempt counts (`<table>_attempts`), for a migration
    /// tool when the application's user may not create tables.
    pub fn schema_sql(table: &str) -> String {
        let attempts = sql::attempts_table(table);
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (\n  key text PRIMARY KEY,\n  done boolean NOT NULL,\n  \
             owner text,\n  expires_at timestamptz NOT NULL\n);\n\
             CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at);\n\
             CREATE TABLE IF NOT EXISTS {attempts} (\n  key text PRIMARY KEY,\n  \
             attempts integer NOT NULL,\n  expires_at timestamptz NOT NULL\n);\n\
             CREATE INDEX IF NOT EXISTS {attempts}_expires_at ON {attempts} (expires_at);"
        )
    }

    async fn migrate(&self) -> Result<(), StoresError> {
        let inner = &self.inner;
        let mut client = self.client().await.map_err(|e| StoresError::Unreachable {
            store: "PostgreSQL",
            url: inner.url.clone(),
            reason: e.to_string(),
        })?;
        let migration = |e: tokio_postgres::Error| StoresError::Migration {
            table: inner.config.table.clone(),
            reason: inner.scrubber.scrub(&e.to_string()),
        };
        let tx = client.transaction().await.map_err(migration)?;
        // Two processes starting at once must not race on CREATE TABLE.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('reliable_stores_migration'))",
            &[],
        )
        .await
        .map_err(migration)?;
        tx.batch_execute(&Self::schema_sql(&inner.config.table))
            .await
            .map_err(migration)?;
        tx.commit().await.map_err(migration)
    }

    /// The store's connection pool: borrow a connection from it for your own transactions.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Removes every key whose TTL (or lease) has passed, and every attempt count that many
    /// since its last delivery; returns how many rows went. The store also does this by itself,
    /// a thousand at a time, as keys complete.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for (what, sql) in [
            ("PostgreSQL purge", &self.inner.sql.purge),
            ("PostgreSQL purge attempts", &self.inner.sql.purge_attempts),
        ] {
            loop {
                let n = self.execute(what, sql, &[]).await?;
                total += n;
                if n == 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Counts `completions` more, and purges expired rows when that count passes a multiple
    /// of [`PURGE_EVERY`].
    async fn purge_now_and_then(&self, completions: u64) {
        let inner = &self.inner;
        let before = inner.completions.fetch_add(completions, Ordering::Relaxed);
        if before / PURGE_EVERY == (before + completions) / PURGE_EVERY {
            return;
        }
        for (what, sql) in [
            ("PostgreSQL purge", &inner.sql.purge),
            ("PostgreSQL purge attempts", &inner.sql.purge_attempts),
        ] {
            if let Err(e) = self.execute(what, sql, &[]).await {
                tracing::warn!(error = %e, "purging expired rows failed; will retry");
            }
        }
    }

    /// Runs one batch statement `sql` over `keys` and `tokens` (with `millis` as `$2`); answers
    /// the rows, one per distinct key.
    async fn batch(
        &self,
        what: &'static str,
        sql: &str,
        keys: &[&str],
        millis: i64,
        tokens: &[String],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let inner = &self.inner;
        let client = self.client().await?;
        bounded(inner.config.timeout, what, async {
            client
                .query(sql, &[&keys, &millis, &tokens])
                .await
                .map_err(|e| inner.scrubber.unavailable(what, e))
        })
        .await
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let inner = &self.inner;
        bounded(inner.config.timeout, "PostgreSQL connection", async {
            inner
                .pool
                .get()
                .await
                .map_err(|e| inner.scrubber.unavailable("PostgreSQL connection", e))
        })
        .await
    }

    async fn execute(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let client = self.client().await?;
        bounded(inner.config.timeout, what, async {
            client
                .execute(sql, params)
                .await
                .map_err(|e| inner.scrubber.unavailable(what, e))
        })
        .await
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    fn lease_duration(&self) -> Option<Duration> {
        Some(self.inner.config.lease)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        let inner = &self.inner;
        let what = "PostgreSQL reserve";
        let token = LeaseToken::generate();
        let owner = token.to_string();
        let client = self.client().await?;
        bounded(inner.config.timeout, what, async {
            let fail = |e| inner.scrubber.unavailable(what, e);
            let lease = millis_i64(inner.config.lease);
            let won = client
                .query_opt(inner.sql.reserve.as_str(), &[&key.as_str(), &lease, &owner])
                .await
                .map_err(fail)?;
            if won.is_some() {
                return Ok(Reservation::New(token));
            }
            let row = client
                .query_opt(inner.sql.state.as_str(), &[&key.as_str()])
                .await
                .map_err(fail)?;
            Ok(
                match row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
                    Some((true, true)) => Reservation::Duplicate,
                    // Held by another worker, or it expired or went between the two statements:
                    // the next attempt decides.
                    _ => Reservation::InProgress,
                },
            )
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn renew(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<Renewal, StoreError> {
        let inner = &self.inner;
        let what = "PostgreSQL renew";
        let lease = millis_i64(inner.config.lease);
        let owner = token.to_string();
        let client = self.client().await?;
        let row = bounded(inner.config.timeout, what, async {
            client
                .query_opt(inner.sql.renew.as_str(), &[&key.as_str(), &lease, &owner])
                .await
                .map_err(|e| inner.scrubber.unavailable(what, e))
        })
        .await?;
        Ok(if row.is_some() {
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
        let inner = &self.inner;
        let what = "PostgreSQL complete";
        let ttl = millis_i64(inner.config.ttl);
        let owner = token.to_string();
        let client = self.client().await?;
        let own = bounded(inner.config.timeout, what, async {
            client
                .query_one(inner.sql.complete.as_str(), &[&key.as_str(), &ttl, &owner])
                .await
                .and_then(|row| row.try_get::<_, bool>(0))
                .map_err(|e| inner.scrubber.unavailable(what, e))
        })
        .await?;
        drop(client);
        self.purge_now_and_then(1).await;
        Ok(if own {
            Completion::Recorded
        } else {
            Completion::Superseded
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %key.as_str()))]
    async fn release(&self, key: &IdempotencyKey, token: LeaseToken) -> Result<(), StoreError> {
        let owner = token.to_string();
        self.execute(
            "PostgreSQL release",
            &self.inner.sql.release,
            &[&key.as_str(), &owner],
        )
        .await
        .map(|_| ())
    }

    /// One multi-row statement for the whole batch (atomic, one round trip). The statement
    /// writes each key's first copy; a later copy of a key answers here what `reserve` would
    /// after the first: [`InProgress`](Reservation::InProgress) when the first took the key,
    /// the first's answer otherwise.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn reserve_many(&self, keys: &[IdempotencyKey]) -> Result<Vec<Reservation>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let what = "PostgreSQL reserve_many";
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::generate()).collect();
        let owners: Vec<String> = tokens.iter().map(ToString::to_string).collect();
        let names: Vec<&str> = keys.iter().map(IdempotencyKey::as_str).collect();
        let lease = millis_i64(self.inner.config.lease);
        let rows = self
            .batch(what, &self.inner.sql.reserve_many, &names, lease, &owners)
            .await?;
        let mut firsts: Vec<Option<Reservation>> = vec![None; keys.len()];
        for row in rows {
            let (n, won, done) = row
                .try_get::<_, i64>(0)
                .and_then(|n| Ok((n, row.try_get::<_, bool>(1)?, row.try_get::<_, bool>(2)?)))
                .map_err(|e| self.inner.scrubber.unavailable(what, e))?;
            let i = position(what, n, keys.len())?;
            firsts[i] = Some(if won {
                Reservation::New(tokens[i])
            } else if done {
                Reservation::Duplicate
            } else {
                // Held by another worker, or it changed under the statement: the next
                // attempt decides (as `reserve`).
                Reservation::InProgress
            });
        }
        let mut seen: std::collections::HashMap<&str, Reservation> =
            std::collections::HashMap::new();
        let mut answers = Vec::with_capacity(keys.len());
        for (key, first) in keys.iter().zip(firsts) {
            let answer = match (seen.get(key.as_str()), first) {
                (Some(Reservation::New(_)), _) => Reservation::InProgress,
                (Some(earlier), _) => *earlier,
                (None, Some(answer)) => answer,
                (None, None) => return Err(missing(what, key)),
            };
            seen.entry(key.as_str()).or_insert(answer);
            answers.push(answer);
        }
        Ok(answers)
    }

    /// One multi-row statement for the whole batch (atomic, one round trip). The statement
    /// completes each key's first copy; a later copy of a key finds it done, as `complete`
    /// would: [`Recorded`](Completion::Recorded) when done under the copy's own token (or by
    /// the inbox form), [`Superseded`](Completion::Superseded) otherwise.
    #[tracing::instrument(level = "debug", skip_all, fields(keys = completions.len()))]
    async fn complete_many(
        &self,
        completions: &[(IdempotencyKey, LeaseToken)],
    ) -> Result<Vec<Completion>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let what = "PostgreSQL complete_many";
        let owners: Vec<String> = completions.iter().map(|(_, t)| t.to_string()).collect();
        let names: Vec<&str> = completions.iter().map(|(k, _)| k.as_str()).collect();
        let ttl = millis_i64(self.inner.config.ttl);
        let rows = self
            .batch(what, &self.inner.sql.complete_many, &names, ttl, &owners)
            .await?;
        let mut firsts: Vec<Option<(bool, Option<String>)>> = vec![None; completions.len()];
        for row in rows {
            let (n, own, owner) = row
                .try_get::<_, i64>(0)
                .and_then(|n| {
                    Ok((
                        n,
                        row.try_get::<_, bool>(1)?,
                        row.try_get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(|e| self.inner.scrubber.unavailable(what, e))?;
            firsts[position(what, n, completions.len())?] = Some((own, owner));
        }
        // The owner each key is done under after the statement.
        let mut done_under: std::collections::HashMap<&str, Option<String>> =
            std::collections::HashMap::new();
        let mut answers = Vec::with_capacity(completions.len());
        for (((key, _), owner), first) in completions.iter().zip(&owners).zip(firsts) {
            let own = match (done_under.get(key.as_str()), first) {
                (Some(after), _) => after.as_ref().is_none_or(|after| after == owner),
                (None, Some((own, after))) => {
                    done_under.insert(key.as_str(), after);
                    own
                }
                (None, None) => return Err(missing(what, key)),
            };
            answers.push(if own {
                Completion::Recorded
            } else {
                Completion::Superseded
            });
        }
        self.purge_now_and_then(completions.len() as u64).await;
        Ok(answers)
    }
}

/// The 0-based index of the 1-based batch position `n` the statement answered.
fn position(what: &str, n: i64, len: usize) -> Result<usize, StoreError> {
    usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_sub(1))
        .filter(|i| *i < len)
        .ok_or_else(|| StoreError::Unavailable {
            reason: format!("{what}: the statement answered position {n} of a batch of {len}"),
        })
}

/// The error of a batch statement that gave no answer for `key`.
fn missing(what: &str, key: &IdempotencyKey) -> StoreError {
    StoreError::Unavailable {
        reason: format!("{what}: the statement gave no answer for key {key}"),
    }
}

#[cfg(test)]
mod tests;
