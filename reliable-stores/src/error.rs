//! The error of building a store: what is wrong and what to do about it.

/// Why a store could not be opened or connected. Each message says what to do next; none
/// contains a password (URLs are shown with `***` in place of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoresError {
    /// A setting of the store's configuration cannot work.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with it and what it must be.
        reason: String,
    },
    /// The connection URL could not be parsed.
    #[error("invalid {store} URL {url}: {reason}; expected {expected}")]
    InvalidUrl {
        /// Which store ("Redis", "PostgreSQL").
        store: &'static str,
        /// The URL, password replaced by `***`.
        url: String,
        /// Why it was refused.
        reason: String,
        /// The form a URL of this store takes.
        expected: &'static str,
    },
    /// The server did not answer, or refused the login, within the store's timeout.
    #[error("{store} at {url} is unreachable: {reason}; start it (for this project's tests: `scripts/stores up`), or fix the URL and credentials")]
    Unreachable {
        /// Which store ("Redis", "PostgreSQL").
        store: &'static str,
        /// The URL, password replaced by `***`.
        url: String,
        /// What went wrong, without credentials.
        reason: String,
    },
    /// The redb file is open already, by another process or another store in this process.
    #[error("the idempotency database {path} is already open (redb allows one open per file); share one RedbStore through an Arc within the process, and use RedisStore or PostgresStore to share keys between processes")]
    AlreadyOpen {
        /// The database file.
        path: String,
    },
    /// The redb file could not be created, opened or initialised.
    #[error("cannot open the idempotency database {path}: {reason}; check that its directory exists and is writable and that the file is a redb database")]
    Storage {
        /// The database file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The PostgreSQL table could not be created.
    #[error("cannot create the idempotency table {table}: {reason}; give the user the right to create tables in its schema, or create it by hand with PostgresStore::schema_sql()")]
    Migration {
        /// The table's name.
        table: String,
        /// What went wrong, without credentials.
        reason: String,
    },
    /// The constructor needs a running Tokio runtime and found none.
    #[error(
        "{what} must be called inside a Tokio runtime; call it from async code running on Tokio"
    )]
    NoRuntime {
        /// The function that was called.
        what: &'static str,
    },
}
