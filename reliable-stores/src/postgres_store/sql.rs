//! The store's SQL statements, with its table's name filled in.

/// The statements, with the table name filled in. A row's `owner` is the token of the
/// reservation that reserved or completed it (`NULL` for keys recorded by
/// [`PostgresStore::complete_in`](super::PostgresStore::complete_in) /
/// [`PostgresStore::apply_once`](super::PostgresStore::apply_once), which have none).
pub(super) struct Sql {
    /// Takes a free or expired key for a new reservation ($1 key, $2 lease ms, $3 token).
    pub(super) reserve: String,
    /// Whether a key is done, and whether its row is live ($1 key).
    pub(super) state: String,
    /// Extends a reservation ($1 key, $2 lease ms, $3 token); a row back means renewed.
    pub(super) renew: String,
    /// Marks a key done under a token ($1 key, $2 TTL ms, $3 token); answers whether it was
    /// the token's own doing.
    pub(super) complete: String,
    /// Marks a key done with no token, inside the caller's transaction ($1 key, $2 TTL ms).
    pub(super) complete_in: String,
    /// Deletes a token's own reservation ($1 key, $2 token).
    pub(super) release: String,
    /// Claims a key as done unless it is done already, locking its row ($1 key, $2 TTL ms).
    pub(super) claim_done: String,
    /// Deletes up to 1 000 expired rows.
    pub(super) purge: String,
    /// `reserve` for a batch, in one statement ($1 keys, $2 lease ms, $3 tokens, both arrays in
    /// the batch's order). Only the first copy of each key is written; answers one row per
    /// distinct key: its 1-based position in the batch, whether it was taken (New), and
    /// whether it is done (Duplicate).
    pub(super) reserve_many: String,
    /// `complete` for a batch, in one statement ($1 keys, $2 TTL ms, $3 tokens). Only the first
    /// copy of each key is written; answers one row per distinct key: its 1-based position,
    /// whether the completion was the token's own doing (as `complete`), and the owner the key
    /// is done under afterwards (what the key's later copies in the batch are checked against).
    pub(super) complete_many: String,
    /// Counts one more delivery of a key and answers the count; a count past its expiry starts
    /// over at 1 ($1 key, $2 TTL ms).
    pub(super) record_attempt: String,
    /// Forgets a key's count ($1 key).
    pub(super) clear_attempts: String,
    /// Deletes up to 1 000 expired counts.
    pub(super) purge_attempts: String,
}

/// The table of the attempt counts kept beside the idempotency table `t`.
pub(super) fn attempts_table(t: &str) -> String {
    format!("{t}_attempts")
}

impl Sql {
    pub(super) fn new(t: &str) -> Self {
        let upsert = |done: bool, owner: &str, when: &str| {
            format!(
                "INSERT INTO {t} (key, done, owner, expires_at) \
                 VALUES ($1, {done}, {owner}, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET done = EXCLUDED.done, owner = EXCLUDED.owner, \
                 expires_at = EXCLUDED.expires_at {when}"
            )
        };
        let a = attempts_table(t);
        // The batch's first copy of each key, with its token and 1-based position.
        let firsts = "firsts AS (\
             SELECT DISTINCT ON (k) k, o, n \
             FROM unnest($1::text[], $3::text[]) WITH ORDINALITY AS batch(k, o, n) \
             ORDER BY k, n)";
        // A live completed row: renewing must leave it as it is.
        let done_live = format!("{t}.done AND {t}.expires_at > now()");
        Self {
            reserve: upsert(
                false,
                "$3",
                &format!("WHERE {t}.expires_at <= now() RETURNING 1"),
            ),
            state: format!("SELECT done, expires_at > now() FROM {t} WHERE key = $1"),
            // Extends the caller's reservation, or takes the key again when it is free (expired
            // or missing); answers a row too, leaving it untouched, for a key completed under
            // the caller's token or by the inbox form (owner NULL: the caller's handler most
            // likely, and the inbox transaction applied the effect once either way). No row:
            // another reservation holds or completed the key.
            renew: format!(
                "INSERT INTO {t} (key, done, owner, expires_at) \
                 VALUES ($1, false, $3, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET \
                 done = {done_live}, \
                 owner = CASE WHEN {done_live} THEN {t}.owner ELSE EXCLUDED.owner END, \
                 expires_at = CASE WHEN {done_live} THEN {t}.expires_at \
                 ELSE EXCLUDED.expires_at END \
                 WHERE {t}.owner = EXCLUDED.owner OR {t}.expires_at <= now() \
                 OR ({done_live} AND {t}.owner IS NULL) \
                 RETURNING 1"
            ),
            // Marks the key done under the caller's token unless it is done already, and
            // answers whether that was the caller's own doing: its live reservation or
            // completion, a completion by the inbox form (owner NULL, as for `renew`), or a
            // free key it wrote (true = Recorded, false = Superseded). The row lock taken by
            // `prev` orders it after any concurrent writer of the key.
            complete: format!(
                "WITH prev AS (\
                   SELECT owner, expires_at > now() AS live FROM {t} WHERE key = $1 FOR UPDATE\
                 ), up AS (\
                   INSERT INTO {t} (key, done, owner, expires_at) \
                   VALUES ($1, true, $3, now() + $2::bigint * interval '1 millisecond') \
                   ON CONFLICT (key) DO UPDATE SET done = true, owner = EXCLUDED.owner, \
                   expires_at = EXCLUDED.expires_at WHERE NOT ({done_live}) RETURNING 1\
                 ) SELECT CASE WHEN (SELECT live FROM prev) \
                   THEN COALESCE((SELECT owner FROM prev) = $3, true) \
                   ELSE EXISTS (SELECT 1 FROM up) END"
            ),
            complete_in: upsert(true, "NULL", ""),
            release: format!("DELETE FROM {t} WHERE key = $1 AND owner = $2 AND NOT done"),
            claim_done: upsert(
                true,
                "NULL",
                &format!("WHERE NOT {t}.done OR {t}.expires_at <= now() RETURNING 1"),
            ),
            // The batch forms lock rows in key order (`firsts` is sorted by key), so two
            // batches sharing keys wait for each other instead of deadlocking.
            reserve_many: format!(
                "WITH {firsts}, \
                 prev AS (\
                   SELECT {t}.key, {t}.done AND {t}.expires_at > now() AS done \
                   FROM {t} JOIN firsts f ON {t}.key = f.k\
                 ), won AS (\
                   INSERT INTO {t} (key, done, owner, expires_at) \
                   SELECT k, false, o, now() + $2::bigint * interval '1 millisecond' \
                   FROM firsts ORDER BY k \
                   ON CONFLICT (key) DO UPDATE SET done = EXCLUDED.done, owner = EXCLUDED.owner, \
                   expires_at = EXCLUDED.expires_at WHERE {t}.expires_at <= now() RETURNING key\
                 ) SELECT f.n, w.key IS NOT NULL, COALESCE(p.done, false) \
                 FROM firsts f LEFT JOIN won w ON w.key = f.k LEFT JOIN prev p ON p.key = f.k"
            ),
            // As `complete`, per key. `up` reads `prev`, so each key's row is locked (and its
            // earlier state read) before the same statement overwrites it.
            complete_many: format!(
                "WITH {firsts}, \
                 prev AS (\
                   SELECT {t}.key, {t}.owner, {t}.expires_at > now() AS live \
                   FROM {t} JOIN firsts f ON {t}.key = f.k ORDER BY {t}.key FOR UPDATE OF {t}\
                 ), up AS (\
                   INSERT INTO {t} (key, done, owner, expires_at) \
                   SELECT f.k, true, f.o, now() + $2::bigint * interval '1 millisecond' \
                   FROM firsts f LEFT JOIN prev p ON p.key = f.k ORDER BY f.k \
                   ON CONFLICT (key) DO UPDATE SET done = true, owner = EXCLUDED.owner, \
                   expires_at = EXCLUDED.expires_at WHERE NOT ({done_live}) RETURNING key\
                 ) SELECT f.n, \
                   CASE WHEN p.live THEN COALESCE(p.owner = f.o, true) \
                   ELSE u.key IS NOT NULL END, \
                   CASE WHEN u.key IS NOT NULL THEN f.o ELSE p.owner END \
                 FROM firsts f LEFT JOIN prev p ON p.key = f.k LEFT JOIN up u ON u.key = f.k"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE key IN \
                 (SELECT key FROM {t} WHERE expires_at <= now() LIMIT 1000)"
            ),
            // The row lock of the upsert serialises concurrent records of one key, so none is
            // lost; the count saturates instead of overflowing `integer`.
            record_attempt: format!(
                "INSERT INTO {a} (key, attempts, expires_at) \
                 VALUES ($1, 1, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET \
                 attempts = CASE WHEN {a}.expires_at > now() \
                 THEN LEAST({a}.attempts, 2147483646) + 1 ELSE 1 END, \
                 expires_at = EXCLUDED.expires_at \
                 RETURNING attempts"
            ),
            clear_attempts: format!("DELETE FROM {a} WHERE key = $1"),
            purge_attempts: format!(
                "DELETE FROM {a} WHERE key IN \
                 (SELECT key FROM {a} WHERE expires_at <= now() LIMIT 1000)"
            ),
        }
    }
}
