//! The SQLite backend: [`Store`], one database file.
//!
//! WAL journal, `synchronous=NORMAL`, statement journals in memory, a 5 s busy timeout. The
//! schema is created by versioned migrations recorded in `schema_migrations` (v1 devices and
//! summaries; v2 scores and gaps; v3 quantiles; v4 a partial alerts index; v5 summaries in
//! arrival order with the window key as a unique index; v6 latest values); a file written by a
//! newer build is refused rather than guessed at.
//!
//! The invariants are the module's ([`crate::store`]): one row per window at its highest
//! revision, one row per `(device, gap seq)`, one latest value per `(device, stream)` at its
//! newest `time_ms`, a batch all or nothing, durable (WAL + `synchronous=NORMAL`: survives a
//! process crash; on power loss the commits since the last checkpoint may roll back) when
//! `ingest` returns `Ok`.
//!
//! Batches are written by [`writer`]: one thread with its own connection commits the batches
//! that arrive together in one transaction (each in its own savepoint), and another copies the
//! write-ahead log into the file. Everything else (authentication, queries, device management)
//! uses a second connection behind a mutex; in WAL mode its reads do not wait for the writer.
//! rusqlite is synchronous: async callers run those methods in `tokio::task::spawn_blocking`
//! (the [`crate::store::Storage`] impl does). A [`Store`] is cheap to clone and safe to share;
//! when the last clone is dropped the writer finishes what is queued and closes.
//!
//! Tested by the unit tests below on temporary files, by the shared backend suite
//! (`tests/backends.rs`) and through HTTP in `tests/api.rs`.

use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

pub mod writer;
use std::time::Duration;

use edgewise_protocol::{Gap, Quantiles, Score, WindowSummary};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::latest::{
    LatestQuery, StoredLatest, UPSERT_NEWER, ValueColumns, latest_sql, value_from_columns,
};
use super::{
    CheckedBatch, DeviceInfo, GapQuery, IngestOutcome, MAX_QUERY_LIMIT, StoreError, StoredGap,
    StoredSummary, SummaryFilter, SummaryQuery, check_device_id, now_ms,
};
use crate::auth::{DeviceToken, TokenHash, TokenHasher};

/// How long a write waits for another connection's write lock (another receiver on the same
/// file) before it fails as busy.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, applied in order; `MIGRATIONS[i]` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: devices and summaries.
    "CREATE TABLE devices (
         id            TEXT PRIMARY KEY NOT NULL,
         token_hash    TEXT NOT NULL UNIQUE,
         created_at_ms INTEGER NOT NULL,
         revoked       INTEGER NOT NULL DEFAULT 0,
         last_seen_ms  INTEGER
     );
     CREATE TABLE summaries (
         device_id       TEXT NOT NULL REFERENCES devices(id),
         stream          TEXT NOT NULL,
         window_start_ms INTEGER NOT NULL,
         window_end_ms   INTEGER NOT NULL,
         revision        INTEGER NOT NULL,
         count           INTEGER NOT NULL,
         min             REAL NOT NULL,
         max             REAL NOT NULL,
         mean            REAL NOT NULL,
         stddev          REAL NOT NULL,
         first_value     REAL NOT NULL,
         first_time_ms   INTEGER NOT NULL,
         last_value      REAL NOT NULL,
         last_time_ms    INTEGER NOT NULL,
         unit            TEXT,
         summary_id      TEXT NOT NULL,
         received_at_ms  INTEGER NOT NULL,
         PRIMARY KEY (device_id, stream, window_start_ms)
     ) WITHOUT ROWID;
     CREATE INDEX summaries_by_window_start ON summaries (window_start_ms);",
    // v2: anomaly scores on summaries (NULL when unscored), and gap records.
    "ALTER TABLE summaries ADD COLUMN score_value REAL;
     ALTER TABLE summaries ADD COLUMN score_alert INTEGER;
     ALTER TABLE summaries ADD COLUMN score_model TEXT;
     CREATE INDEX summaries_alerts ON summaries (score_alert, window_start_ms);
     CREATE TABLE gaps (
         device_id      TEXT NOT NULL REFERENCES devices(id),
         seq            INTEGER NOT NULL,
         streams        TEXT NOT NULL,
         from_ms        INTEGER NOT NULL,
         to_ms          INTEGER NOT NULL,
         count          INTEGER NOT NULL,
         reason         TEXT NOT NULL,
         recorded_at_ms INTEGER NOT NULL,
         received_at_ms INTEGER NOT NULL,
         PRIMARY KEY (device_id, seq)
     );",
    // v3: quantile estimates on summaries (NULL when the agent computes none).
    "ALTER TABLE summaries ADD COLUMN q_p50 REAL;
     ALTER TABLE summaries ADD COLUMN q_p90 REAL;
     ALTER TABLE summaries ADD COLUMN q_p99 REAL;
     ALTER TABLE summaries ADD COLUMN q_relative_error REAL;",
    // v4: only alerts in the alerts index (queries name `score_alert = 1` literally), so the
    // ~98% of windows that are not alerts cost one index insert less.
    "DROP INDEX summaries_alerts;
     CREATE INDEX summaries_alerts ON summaries (window_start_ms) WHERE score_alert = 1;",
    // v5: summaries in a rowid table, in arrival order, with the window key as a UNIQUE index.
    // Clustered by (device, stream, window start), every batch inserted into the middle of the
    // tree at one place per stream, and each index entry repeated the whole key: about half
    // the CPU per stored summary went into page splits and into the log pages they dirtied.
    // Now rows append at the end, and the indexes carry small entries. Also gone: the
    // `summary_id` column (derived from the key and revision, never read; the API computes the
    // id) and the per-row foreign key check to devices (ingest checks the device once per batch
    // in the same transaction, and devices are never deleted; PostgreSQL dropped it in v4).
    "CREATE TABLE summaries_v5 (
         device_id        TEXT NOT NULL,
         stream           TEXT NOT NULL,
         window_start_ms  INTEGER NOT NULL,
         window_end_ms    INTEGER NOT NULL,
         revision         INTEGER NOT NULL,
         count            INTEGER NOT NULL,
         min              REAL NOT NULL,
         max              REAL NOT NULL,
         mean             REAL NOT NULL,
         stddev           REAL NOT NULL,
         first_value      REAL NOT NULL,
         first_time_ms    INTEGER NOT NULL,
         last_value       REAL NOT NULL,
         last_time_ms     INTEGER NOT NULL,
         unit             TEXT,
         received_at_ms   INTEGER NOT NULL,
         score_value      REAL,
         score_alert      INTEGER,
         score_model      TEXT,
         q_p50            REAL,
         q_p90            REAL,
         q_p99            REAL,
         q_relative_error REAL
     );
     INSERT INTO summaries_v5 SELECT device_id, stream, window_start_ms, window_end_ms,
         revision, count, min, max, mean, stddev, first_value, first_time_ms, last_value,
         last_time_ms, unit, received_at_ms, score_value, score_alert, score_model, q_p50,
         q_p90, q_p99, q_relative_error
     FROM summaries ORDER BY received_at_ms;
     DROP TABLE summaries;
     ALTER TABLE summaries_v5 RENAME TO summaries;
     CREATE UNIQUE INDEX summaries_key ON summaries (device_id, stream, window_start_ms);
     CREATE INDEX summaries_by_window_start ON summaries (window_start_ms);
     CREATE INDEX summaries_alerts ON summaries (window_start_ms) WHERE score_alert = 1;",
    // v6: the latest text, boolean or data value of each stream (see store::latest); the one
    // value column its kind names is set, the others are NULL.
    "CREATE TABLE latest_values (
         device_id      TEXT NOT NULL REFERENCES devices(id),
         stream         TEXT NOT NULL,
         time_ms        INTEGER NOT NULL,
         kind           TEXT NOT NULL CHECK (kind IN ('text', 'bool', 'data')),
         value_text     TEXT,
         value_bool     INTEGER,
         value_bytes    BLOB,
         received_at_ms INTEGER NOT NULL,
         PRIMARY KEY (device_id, stream)
     ) WITHOUT ROWID;",
];

/// The number of schema versions this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The columns of a summary row, in the order [`stored_summary_from_row`] reads them.
pub(crate) const SUMMARY_COLUMNS: &str =
    "device_id, stream, window_start_ms, window_end_ms, revision, count,
     min, max, mean, stddev, first_value, first_time_ms, last_value, last_time_ms,
     unit, received_at_ms, score_value, score_alert, score_model,
     q_p50, q_p90, q_p99, q_relative_error";

/// The per-summary columns of an insert, in the order [`bind_summary`] binds them; every row
/// also gets `device_id` (`?1`) and `received_at_ms` (`?2`), bound once per statement.
pub(crate) const ROW_COLUMNS: [&str; 21] = [
    "stream",
    "window_start_ms",
    "window_end_ms",
    "revision",
    "count",
    "min",
    "max",
    "mean",
    "stddev",
    "first_value",
    "first_time_ms",
    "last_value",
    "last_time_ms",
    "unit",
    "score_value",
    "score_alert",
    "score_model",
    "q_p50",
    "q_p90",
    "q_p99",
    "q_relative_error",
];
const PARAMS_PER_ROW: usize = ROW_COLUMNS.len();

/// Rows per multi-row insert, largest first. A batch is cut into these sizes (500 rows: 256 +
/// 128 + 64 + 32 + 16 + 4), so at most this many insert statements are ever prepared; the
/// largest stays far below SQLite's 32,766 bound parameters per statement.
const ROWS_PER_STATEMENT: [usize; 9] = [256, 128, 64, 32, 16, 8, 4, 2, 1];

/// `INSERT .. ON CONFLICT DO NOTHING` of `rows` summaries, numbered for [`bind_summary`]: row
/// `r`'s columns are `?1, ?2` and then `3 + r * PARAMS_PER_ROW ..` (a bare `?` takes the next
/// number after the largest so far).
fn insert_new_sql(rows: usize) -> String {
    let mut sql = format!(
        "INSERT INTO summaries (device_id, received_at_ms, {}) VALUES ",
        ROW_COLUMNS.join(", ")
    );
    for r in 0..rows {
        sql.push_str(if r == 0 { "(?1,?2" } else { ",(?1,?2" });
        sql.push_str(&",?".repeat(PARAMS_PER_ROW));
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (device_id, stream, window_start_ms) DO NOTHING");
    sql
}

/// [`insert_new_sql`] for each of [`ROWS_PER_STATEMENT`], built once.
static INSERT_NEW_SQL: LazyLock<Vec<(usize, String)>> = LazyLock::new(|| {
    ROWS_PER_STATEMENT
        .iter()
        .map(|&n| (n, insert_new_sql(n)))
        .collect()
});

/// Replaces one stored window with a higher revision (numbered like one row of
/// [`insert_new_sql`]).
const REVISE_SQL: &str = "UPDATE summaries SET
     window_end_ms = ?5, revision = ?6, count = ?7, min = ?8, max = ?9, mean = ?10,
     stddev = ?11, first_value = ?12, first_time_ms = ?13, last_value = ?14,
     last_time_ms = ?15, unit = ?16, received_at_ms = ?2,
     score_value = ?17, score_alert = ?18, score_model = ?19, q_p50 = ?20, q_p90 = ?21,
     q_p99 = ?22, q_relative_error = ?23
 WHERE device_id = ?1 AND stream = ?3 AND window_start_ms = ?4 AND revision < ?6";

/// Binds one summary's [`ROW_COLUMNS`] from parameter index `first` on.
fn bind_summary(
    stmt: &mut rusqlite::Statement<'_>,
    first: usize,
    s: &WindowSummary,
) -> rusqlite::Result<()> {
    // Checked by check_batch: the count fits.
    let count = i64::try_from(s.count).unwrap_or(i64::MAX);
    let score = s.score.as_ref();
    let q = s.quantiles.as_ref();
    let values: [&dyn rusqlite::ToSql; PARAMS_PER_ROW] = [
        &s.stream,
        &s.window_start_ms,
        &s.window_end_ms,
        &s.revision,
        &count,
        &s.min,
        &s.max,
        &s.mean,
        &s.stddev,
        &s.first_value,
        &s.first_time_ms,
        &s.last_value,
        &s.last_time_ms,
        &s.unit,
        &score.map(|x| x.value),
        &score.map(|x| x.alert),
        &score.map(|x| x.model.as_str()),
        &q.map(|x| x.p50),
        &q.map(|x| x.p90),
        &q.map(|x| x.p99),
        &q.map(|x| x.relative_error),
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(first + i, v)?;
    }
    Ok(())
}

/// The receiver's SQLite database. Clones share its connection and its writer.
#[derive(Clone)]
pub struct Store {
    /// Authentication, queries and device management.
    conn: Arc<Mutex<Connection>>,
    /// Batches ([`writer`]).
    writer: Arc<writer::Writer>,
    hasher: TokenHasher,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database file, brings its schema up to date and starts its
    /// writer. `path` is a file (the writer opens connections of its own to it).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Answers the mode in effect: "wal" for a file (in-memory databases stay "memory").
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The multi-row inserts alone take up to ROWS_PER_STATEMENT.len() slots.
        conn.set_prepared_statement_cache_capacity(32);
        // Statement journals (each multi-row insert keeps one) in memory, not in temp files:
        // about a tenth less CPU per stored summary under the load client.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        migrate(&mut conn)?;
        let writer = writer::Writer::start(path)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            writer: Arc::new(writer),
            hasher: TokenHasher::default(),
        })
    }

    /// Hashes tokens with `hasher` from now on. A keyed hasher first rewrites every plain
    /// SHA-256 token hash to its keyed form (one transaction; devices keep their tokens). An
    /// unkeyed one is refused if the database already holds keyed hashes (see [`crate::auth`]).
    pub fn with_token_hasher(mut self, hasher: TokenHasher) -> Result<Store, StoreError> {
        {
            let mut conn = self.lock();
            // IMMEDIATE, as the writer's: it reads the hashes, then rewrites them, and a deferred
            // transaction fails at once ("database is locked") if another connection holds the
            // write lock or commits in between, instead of waiting out the busy timeout.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let rows: Vec<(String, String)> = {
                let mut stmt = tx.prepare("SELECT id, token_hash FROM devices")?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?
            };
            let keyed = rows.iter().filter(|(_, h)| TokenHash::is_keyed(h)).count();
            if !hasher.is_keyed() && keyed > 0 {
                return Err(StoreError::TokenKeyRequired { keyed });
            }
            let mut upgraded = 0;
            for (id, stored) in &rows {
                if let Some(new) = hasher.upgrade(stored) {
                    upgraded += tx.execute(
                        "UPDATE devices SET token_hash = ?1 WHERE id = ?2 AND token_hash = ?3",
                        params![new.as_hex(), id, stored],
                    )?;
                }
            }
            tx.commit()?;
            if upgraded > 0 {
                tracing::info!(upgraded, "device token hashes migrated to the keyed format");
            }
        }
        self.hasher = hasher;
        Ok(self)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done write behind: an open
        // transaction rolls back when dropped. So the connection is still good to use.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(current_version(&self.lock())?)
    }

    /// Answers whether the database responds (for `/healthz`).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.lock().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    /// Registers a device and returns its new token, which is stored only as a hash: show it to
    /// the operator once.
    pub fn add_device(&self, device_id: &str) -> Result<String, StoreError> {
        check_device_id(device_id)?;
        let token = DeviceToken::generate();
        let conn = self.lock();
        let result = conn.execute(
            "INSERT INTO devices (id, token_hash, created_at_ms) VALUES (?1, ?2, ?3)",
            params![
                device_id,
                self.hasher.hash(token.as_str()).as_hex(),
                now_ms()
            ],
        );
        match result {
            Ok(_) => Ok(token.into_string()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::DeviceExists(device_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives a device a new token (returned once; stored hashed) and lifts a revocation. The old
    /// token stops working at once.
    pub fn rotate_token(&self, device_id: &str) -> Result<String, StoreError> {
        let token = DeviceToken::generate();
        let changed = self.lock().execute(
            "UPDATE devices SET token_hash = ?1, revoked = 0 WHERE id = ?2",
            params![self.hasher.hash(token.as_str()).as_hex(), device_id],
        )?;
        if changed == 0 {
            return Err(StoreError::UnknownDevice(device_id.to_owned()));
        }
        Ok(token.into_string())
    }

    /// Revokes a device's token; its data stays. Returns `false` if no such device exists.
    pub fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let changed = self
            .lock()
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [device_id])?;
        Ok(changed > 0)
    }

    /// The device a token belongs to, if the token is valid and not revoked.
    ///
    /// The lookup is by the token's hash ([`TokenHasher`]), and the found hash is compared again
    /// in constant time, so the stored secret is never compared byte by byte with input.
    pub fn authenticate(&self, token: &str) -> Result<Option<String>, StoreError> {
        let hash = self.hasher.hash(token);
        let conn = self.lock();
        let found = conn
            .query_row(
                "SELECT id, token_hash FROM devices WHERE token_hash = ?1 AND revoked = 0",
                [hash.as_hex()],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()?;
        Ok(found.and_then(|(id, stored)| hash.matches(&stored).then_some(id)))
    }

    /// Stores a batch of `device_id`'s summaries idempotently, in one transaction, and marks the
    /// device as seen. Refuses the whole batch if any summary is invalid or not the device's own.
    pub fn ingest(
        &self,
        device_id: &str,
        summaries: &[WindowSummary],
    ) -> Result<IngestOutcome, StoreError> {
        self.ingest_batch(device_id, summaries, &[])
    }

    /// [`Store::ingest`] with the batch's gap records, stored idempotently by `(device, seq)` in
    /// the same transaction.
    pub fn ingest_batch(
        &self,
        device_id: &str,
        summaries: &[WindowSummary],
        gaps: &[Gap],
    ) -> Result<IngestOutcome, StoreError> {
        let batch = CheckedBatch::new(device_id.to_owned(), summaries.to_vec(), gaps.to_vec())?;
        self.store_checked(batch)
    }

    /// Stores a checked batch, all or nothing, through the writer ([`writer`]): blocks until
    /// the group commit holding it has committed. Async callers use
    /// [`crate::store::Storage::store_batch`], which awaits instead.
    pub fn store_checked(&self, batch: CheckedBatch) -> Result<IngestOutcome, StoreError> {
        self.writer.store_blocking(batch)
    }

    /// [`Store::store_checked`] for async callers.
    pub(crate) async fn store_async(
        &self,
        batch: CheckedBatch,
    ) -> Result<IngestOutcome, StoreError> {
        self.writer.store(batch).await
    }

    /// Stored summaries matching `q`, oldest window first.
    pub fn summaries(&self, q: &SummaryQuery) -> Result<Vec<StoredSummary>, StoreError> {
        self.summary_page(&SummaryFilter {
            query: q.clone(),
            ..SummaryFilter::default()
        })
    }

    /// Stored summaries matching `f`, in `(window_start_ms, device_id, stream)` order.
    pub fn summary_page(&self, f: &SummaryFilter) -> Result<Vec<StoredSummary>, StoreError> {
        let (sql, args) = summary_sql(f, |_| "?".to_owned());
        let args: Vec<Value> = args.into_iter().map(Value::from).collect();
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), stored_summary_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Stored gap records matching `q`, by device then seq.
    pub fn gaps(&self, q: &GapQuery) -> Result<Vec<StoredGap>, StoreError> {
        self.rows(gap_sql(q, |_| "?".to_owned()), |row| {
            let streams: String = row.get(2)?;
            gap_from_parts(
                row.get(0)?,
                row.get(1)?,
                &streams,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
            )
        })
    }

    /// Stored latest values matching `q`, by device then stream.
    pub fn latest(&self, q: &LatestQuery) -> Result<Vec<StoredLatest>, StoreError> {
        self.rows(latest_sql(q, |_| "?".to_owned()), |row| {
            let kind: String = row.get(3)?;
            Ok(StoredLatest {
                device_id: row.get(0)?,
                stream: row.get(1)?,
                time_ms: row.get(2)?,
                value: value_from_columns(&kind, row.get(4)?, row.get(5)?, row.get(6)?)?,
                received_at_ms: row.get(7)?,
            })
        })
    }

    /// Runs a query from one of the shared `*_sql` builders, reading each row with `read`.
    fn rows<T>(
        &self,
        (sql, args): (String, Vec<Arg>),
        read: impl Fn(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let args: Vec<Value> = args.into_iter().map(Value::from).collect();
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            found.push(read(row)?);
        }
        Ok(found)
    }

    /// Every registered device with its counts, by id.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(DEVICES_SQL)?;
        let rows = stmt.query_map([], |row| {
            Ok(DeviceInfo {
                id: row.get(0)?,
                created_at_ms: row.get(1)?,
                last_seen_ms: row.get(2)?,
                revoked: row.get::<_, i64>(3)? != 0,
                summary_count: non_negative(row, 4)?,
                alert_count: non_negative(row, 5)?,
                evicted_count: non_negative(row, 6)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Writes a checked batch inside the caller's transaction (the writer's savepoint), with
/// `received_at_ms` on every row, and marks the device as seen.
///
/// Summaries go in with multi-row `INSERT .. ON CONFLICT DO NOTHING` statements (as many
/// rows per statement as [`ROWS_PER_STATEMENT`] allows; the batch is cut into those sizes, so
/// a handful of cached statements serve every batch size). The rows changed are the new
/// windows. Only when some were not new does a second pass run a guarded `UPDATE .. WHERE
/// revision < new revision` per summary: a row changed there is a revision, and the rest
/// (already stored at the same or a higher revision, including rows this batch has just
/// inserted) are duplicates.
pub(crate) fn write_batch(
    conn: &Connection,
    batch: &CheckedBatch,
    received_at_ms: i64,
) -> Result<IngestOutcome, StoreError> {
    let device_id = batch.device_id();
    let known = conn.execute(
        "UPDATE devices SET last_seen_ms = ?2 WHERE id = ?1",
        params![device_id, received_at_ms],
    )?;
    if known == 0 {
        return Err(StoreError::UnknownDevice(device_id.to_owned()));
    }
    let mut outcome = IngestOutcome {
        duplicates: batch.in_batch_duplicates(),
        ..IngestOutcome::default()
    };
    let rows = batch.summaries();
    let mut rest = rows;
    while !rest.is_empty() {
        let Some((n, sql)) = INSERT_NEW_SQL.iter().find(|(n, _)| *n <= rest.len()) else {
            break; // unreachable: the sizes end with 1
        };
        let (chunk, tail) = rest.split_at(*n);
        rest = tail;
        let mut insert = conn.prepare_cached(sql)?;
        insert.raw_bind_parameter(1, device_id)?;
        insert.raw_bind_parameter(2, received_at_ms)?;
        for (r, s) in chunk.iter().enumerate() {
            bind_summary(&mut insert, 3 + r * PARAMS_PER_ROW, s)?;
        }
        outcome.inserted += insert.raw_execute()? as u64;
    }
    let stored = rows.len() as u64;
    if outcome.inserted < stored {
        let mut revise = conn.prepare_cached(REVISE_SQL)?;
        for s in rows {
            revise.raw_bind_parameter(1, device_id)?;
            revise.raw_bind_parameter(2, received_at_ms)?;
            bind_summary(&mut revise, 3, s)?;
            outcome.revised += revise.raw_execute()? as u64;
        }
        outcome.duplicates += stored - outcome.inserted - outcome.revised;
    }
    {
        let mut write_gap = conn.prepare_cached(
            "INSERT INTO gaps (device_id, seq, streams, from_ms, to_ms, count, reason,
                               recorded_at_ms, received_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (device_id, seq) DO NOTHING",
        )?;
        for g in batch.gaps() {
            // Checked by check_batch: seq and count fit.
            let changed = write_gap.execute(params![
                device_id,
                i64::try_from(g.seq).unwrap_or(i64::MAX),
                streams_json(&g.streams),
                g.from_ms,
                g.to_ms,
                i64::try_from(g.count).unwrap_or(i64::MAX),
                g.reason,
                g.recorded_at_ms,
                received_at_ms,
            ])?;
            if changed == 1 {
                outcome.gaps_inserted += 1;
            } else {
                outcome.gaps_duplicate += 1;
            }
        }
    }
    store_latest(conn, batch, received_at_ms, &mut outcome)?;
    Ok(outcome)
}

/// Stores the batch's latest values in the caller's transaction: each replaces the stored value of
/// its stream only if its `time_ms` is newer, and counts as stored or ignored.
fn store_latest(
    conn: &Connection,
    batch: &CheckedBatch,
    received_at_ms: i64,
    outcome: &mut IngestOutcome,
) -> Result<(), StoreError> {
    outcome.latest_ignored += batch.in_batch_ignored_latest();
    if batch.latest().is_empty() {
        return Ok(());
    }
    let mut upsert = conn.prepare_cached(&format!(
        "INSERT INTO latest_values (device_id, stream, time_ms, kind, value_text, value_bool,
                                    value_bytes, received_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) {UPSERT_NEWER}"
    ))?;
    for v in batch.latest() {
        let c = ValueColumns::of(&v.value);
        let changed = upsert.execute(params![
            batch.device_id(),
            v.stream,
            v.time_ms,
            c.kind,
            c.text,
            c.flag,
            c.bytes,
            received_at_ms,
        ])?;
        if changed == 1 {
            outcome.latest_stored += 1;
        } else {
            outcome.latest_ignored += 1;
        }
    }
    Ok(())
}

/// Devices with their counts; the same text runs on both backends.
pub(crate) const DEVICES_SQL: &str = "SELECT d.id, d.created_at_ms, d.last_seen_ms, d.revoked,
        (SELECT COUNT(*) FROM summaries s WHERE s.device_id = d.id),
        (SELECT COUNT(*) FROM summaries s WHERE s.device_id = d.id AND s.score_alert = 1),
        (SELECT CAST(COALESCE(SUM(g.count), 0) AS BIGINT) FROM gaps g WHERE g.device_id = d.id)
     FROM devices d ORDER BY d.id";

/// A query argument, for both backends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

impl From<Arg> for Value {
    fn from(a: Arg) -> Self {
        match a {
            Arg::Text(s) => Value::Text(s),
            Arg::Int(i) => Value::Integer(i),
        }
    }
}

/// A query being written for either backend: `SELECT .. WHERE 1 = 1`, then `AND` clauses whose
/// `?` become numbered placeholders (`param(n)` writes the n-th, 1-based: `?` for SQLite, `$n`
/// for PostgreSQL), then the order and a capped limit.
pub(crate) struct Select<P> {
    sql: String,
    args: Vec<Arg>,
    param: P,
}

impl<P: Fn(usize) -> String> Select<P> {
    /// `select` is everything before the `WHERE`.
    pub(crate) fn new(select: &str, param: P) -> Self {
        Select {
            sql: format!("{select} WHERE 1 = 1"),
            args: Vec::new(),
            param,
        }
    }

    /// Appends ` AND {clause}`; each `?` in it takes the next of `args`, in order.
    pub(crate) fn and(&mut self, clause: &str, args: impl IntoIterator<Item = Arg>) {
        let mut args = args.into_iter();
        let mut parts = clause.split('?');
        self.sql.push_str(" AND ");
        self.sql.push_str(parts.next().unwrap_or_default());
        for part in parts {
            self.args.extend(args.next());
            self.sql.push_str(&(self.param)(self.args.len()));
            self.sql.push_str(part);
        }
    }

    /// ` AND {column} = ?` when `value` is given.
    pub(crate) fn equal(&mut self, column: &str, value: &Option<String>) {
        if let Some(v) = value {
            self.and(&format!("{column} = ?"), [Arg::Text(v.clone())]);
        }
    }

    /// Ends with ` ORDER BY {order} LIMIT ?` (at most [`MAX_QUERY_LIMIT`]): the SQL and its
    /// arguments.
    pub(crate) fn finish(mut self, order: &str, limit: usize) -> (String, Vec<Arg>) {
        // At most MAX_QUERY_LIMIT, so it fits.
        self.args.push(Arg::Int(limit.min(MAX_QUERY_LIMIT) as i64));
        let limit = (self.param)(self.args.len());
        self.sql
            .push_str(&format!(" ORDER BY {order} LIMIT {limit}"));
        (self.sql, self.args)
    }
}

/// The summary query's SQL and arguments; `param(n)` writes the n-th (1-based) placeholder.
pub(crate) fn summary_sql(
    f: &SummaryFilter,
    param: impl Fn(usize) -> String,
) -> (String, Vec<Arg>) {
    let q = &f.query;
    let mut select = Select::new(&format!("SELECT {SUMMARY_COLUMNS} FROM summaries"), param);
    select.equal("device_id", &q.device);
    select.equal("stream", &q.stream);
    if let Some(from) = q.from_ms {
        select.and("window_start_ms >= ?", [Arg::Int(from)]);
    }
    if let Some(to) = q.to_ms {
        select.and("window_start_ms < ?", [Arg::Int(to)]);
    }
    if f.alerts_only {
        select.and("score_alert = 1", []);
    }
    if let Some(after) = &f.after {
        select.and(
            "(window_start_ms, device_id, stream) > (?, ?, ?)",
            [
                Arg::Int(after.window_start_ms),
                Arg::Text(after.device_id.clone()),
                Arg::Text(after.stream.clone()),
            ],
        );
    }
    select.finish("window_start_ms, device_id, stream", q.limit)
}

/// The gap query's SQL and arguments, as [`summary_sql`].
pub(crate) fn gap_sql(q: &GapQuery, param: impl Fn(usize) -> String) -> (String, Vec<Arg>) {
    let mut select = Select::new(
        "SELECT device_id, seq, streams, from_ms, to_ms, count, reason, recorded_at_ms,
                received_at_ms
         FROM gaps",
        param,
    );
    select.equal("device_id", &q.device);
    if let Some(from) = q.from_ms {
        select.and("to_ms >= ?", [Arg::Int(from)]);
    }
    if let Some(to) = q.to_ms {
        select.and("from_ms < ?", [Arg::Int(to)]);
    }
    if let Some((device, seq)) = &q.after {
        let seq = i64::try_from(*seq).unwrap_or(i64::MAX);
        select.and(
            "(device_id, seq) > (?, ?)",
            [Arg::Text(device.clone()), Arg::Int(seq)],
        );
    }
    select.finish("device_id, seq", q.limit)
}

/// Gap streams are stored as a JSON array of strings.
pub(crate) fn streams_json(streams: &[String]) -> String {
    serde_json::to_string(streams).unwrap_or_else(|_| "[]".to_owned())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gap_from_parts(
    device_id: String,
    seq: i64,
    streams: &str,
    from_ms: i64,
    to_ms: i64,
    count: i64,
    reason: String,
    recorded_at_ms: i64,
    received_at_ms: i64,
) -> Result<StoredGap, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("gap {device_id}/{seq}: {what}"));
    Ok(StoredGap {
        seq: u64::try_from(seq).map_err(|_| corrupt("negative seq"))?,
        count: u64::try_from(count).map_err(|_| corrupt("negative count"))?,
        streams: serde_json::from_str(streams).map_err(|_| corrupt("streams are not JSON"))?,
        device_id,
        from_ms,
        to_ms,
        reason,
        recorded_at_ms,
        received_at_ms,
    })
}

fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version       INTEGER PRIMARY KEY NOT NULL,
             applied_at_ms INTEGER NOT NULL
         )",
    )?;
    let found = current_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
            params![version, now_ms()],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

fn stored_summary_from_row(row: &Row<'_>) -> rusqlite::Result<StoredSummary> {
    let device_id: String = row.get(0)?;
    let revision = row.get::<_, i64>(4)?;
    let revision = u32::try_from(revision).map_err(|e| out_of_range(4, e))?;
    let score = match row.get::<_, Option<f64>>(16)? {
        None => None,
        Some(value) => Some(Score {
            value,
            alert: row.get::<_, Option<i64>>(17)?.unwrap_or(0) != 0,
            model: row.get::<_, Option<String>>(18)?.unwrap_or_default(),
        }),
    };
    let quantiles = match row.get::<_, Option<f64>>(19)? {
        None => None,
        Some(p50) => Some(Quantiles {
            p50,
            p90: row.get::<_, Option<f64>>(20)?.unwrap_or(p50),
            p99: row.get::<_, Option<f64>>(21)?.unwrap_or(p50),
            relative_error: row.get::<_, Option<f64>>(22)?.unwrap_or(0.0),
        }),
    };
    Ok(StoredSummary {
        summary: WindowSummary {
            agent_id: device_id.clone(),
            stream: row.get(1)?,
            window_start_ms: row.get(2)?,
            window_end_ms: row.get(3)?,
            revision,
            count: non_negative(row, 5)?,
            min: row.get(6)?,
            max: row.get(7)?,
            mean: row.get(8)?,
            stddev: row.get(9)?,
            first_value: row.get(10)?,
            first_time_ms: row.get(11)?,
            last_value: row.get(12)?,
            last_time_ms: row.get(13)?,
            unit: row.get(14)?,
            score,
            quantiles,
        },
        device_id,
        received_at_ms: row.get(15)?,
    })
}

fn non_negative(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| out_of_range(idx, e))
}

fn out_of_range(idx: usize, e: std::num::TryFromIntError) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Integer, Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SummaryKey;
    use edgewise_protocol::{LatestValue, StateValue};

    fn outcome(inserted: u64, duplicates: u64, revised: u64) -> IngestOutcome {
        IngestOutcome {
            inserted,
            duplicates,
            revised,
            ..IngestOutcome::default()
        }
    }

    pub(super) fn summary(
        agent: &str,
        stream: &str,
        start_ms: i64,
        revision: u32,
    ) -> WindowSummary {
        WindowSummary {
            agent_id: agent.to_owned(),
            stream: stream.to_owned(),
            window_start_ms: start_ms,
            window_end_ms: start_ms + 10_000,
            revision,
            count: 3,
            min: 20.0,
            max: 22.0,
            mean: 21.0,
            stddev: 0.8,
            first_value: 20.0,
            first_time_ms: start_ms + 500,
            last_value: 22.0,
            last_time_ms: start_ms + 9_500,
            unit: Some("Cel".to_owned()),
            score: None,
            quantiles: None,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("cloud.db")).expect("open store");
        (dir, store)
    }

    fn all(store: &Store) -> Vec<StoredSummary> {
        store.summaries(&SummaryQuery::default()).expect("query")
    }

    #[test]
    fn open_creates_the_current_schema_in_wal_mode_and_reopens() {
        let (dir, store) = open();
        assert_eq!(store.schema_version().unwrap(), 6);
        let mode: String = store
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        store.add_device("gw-1").unwrap();
        drop(store);
        let again = Store::open(&dir.path().join("cloud.db")).unwrap();
        assert_eq!(again.schema_version().unwrap(), 6);
        assert_eq!(again.devices().unwrap().len(), 1);
    }

    #[test]
    fn refuses_a_schema_newer_than_it_knows() {
        let (dir, store) = open();
        store
            .lock()
            .execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (99, 0)",
                [],
            )
            .unwrap();
        drop(store);
        let err = Store::open(&dir.path().join("cloud.db")).unwrap_err();
        assert!(matches!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                known: SCHEMA_VERSION
            }
        ));
    }

    #[test]
    fn same_summary_twice_is_one_row_and_one_duplicate() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let s = summary("gw-1", "n1/temp", 1_000_000, 0);
        let first = store.ingest("gw-1", std::slice::from_ref(&s)).unwrap();
        assert_eq!(first, outcome(1, 0, 0));
        let second = store.ingest("gw-1", std::slice::from_ref(&s)).unwrap();
        assert_eq!(second, outcome(0, 1, 0));
        let rows = all(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary, s);
        assert_eq!(rows[0].device_id, "gw-1");
    }

    #[test]
    fn a_large_batch_is_stored_whole_across_statement_sizes() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        // 300 windows: statements of 256 + 32 + 8 + 4 rows.
        let first: Vec<WindowSummary> = (0..300)
            .map(|i| {
                let mut s = summary("gw-1", &format!("n{}/temp", i % 7), i * 10_000, 1);
                s.mean = 20.0 + (i % 13) as f64 * 0.1;
                s.unit = (i % 5 != 0).then(|| "Cel".to_owned());
                s.score = (i % 3 == 0).then(|| Score {
                    value: i as f64 / 300.0,
                    alert: i % 30 == 0,
                    model: "m@1".to_owned(),
                });
                s
            })
            .collect();
        assert_eq!(store.ingest("gw-1", &first).unwrap(), outcome(300, 0, 0));
        let key = |s: &WindowSummary| (s.window_start_ms, s.stream.clone());
        let mut stored: Vec<WindowSummary> = all(&store).into_iter().map(|s| s.summary).collect();
        stored.sort_by_key(key);
        assert_eq!(stored, first);

        // One batch mixing 100 new windows, 100 higher revisions and 200 duplicates.
        let mut second: Vec<WindowSummary> = first
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.clone();
                s.revision = [2, 0, 1][i % 3];
                s
            })
            .collect();
        second.extend((300..400).map(|i| summary("gw-1", "n9/temp", i * 10_000, 0)));
        assert_eq!(
            store.ingest("gw-1", &second).unwrap(),
            outcome(100, 200, 100)
        );
        let stored = all(&store);
        assert_eq!(stored.len(), 400);
        for s in &stored[..300] {
            let i = s.summary.window_start_ms / 10_000;
            assert_eq!(
                s.summary.revision,
                if i % 3 == 0 { 2 } else { 1 },
                "window {i}"
            );
        }
    }

    #[test]
    fn higher_revision_replaces_the_window() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        store
            .ingest("gw-1", &[summary("gw-1", "n1/temp", 0, 0)])
            .unwrap();
        let mut rev1 = summary("gw-1", "n1/temp", 0, 1);
        rev1.count = 4;
        rev1.max = 30.0;
        let out = store.ingest("gw-1", std::slice::from_ref(&rev1)).unwrap();
        assert_eq!(out, outcome(0, 0, 1));
        let rows = all(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary, rev1);
    }

    #[test]
    fn lower_or_equal_revision_is_a_duplicate_and_changes_nothing() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let rev2 = summary("gw-1", "n1/temp", 0, 2);
        store.ingest("gw-1", std::slice::from_ref(&rev2)).unwrap();
        let mut rev1 = summary("gw-1", "n1/temp", 0, 1);
        rev1.mean = 20.5;
        let mut rev2_other = rev2.clone();
        rev2_other.mean = 21.5;
        let out = store.ingest("gw-1", &[rev1, rev2_other]).unwrap();
        assert_eq!(out, outcome(0, 2, 0));
        assert_eq!(all(&store)[0].summary, rev2);
    }

    #[test]
    fn query_filters_by_device_stream_and_half_open_time_range() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        store.add_device("gw-2").unwrap();
        let gw1: Vec<_> = (0..5)
            .map(|i| summary("gw-1", "n1/temp", i * 10_000, 0))
            .chain([summary("gw-1", "n1/hum", 0, 0)])
            .collect();
        store.ingest("gw-1", &gw1).unwrap();
        store
            .ingest("gw-2", &[summary("gw-2", "n1/temp", 0, 0)])
            .unwrap();

        let q = |device: Option<&str>, stream: Option<&str>, from, to, limit| SummaryQuery {
            device: device.map(str::to_owned),
            stream: stream.map(str::to_owned),
            from_ms: from,
            to_ms: to,
            limit,
        };
        assert_eq!(all(&store).len(), 7);
        let by_device = store
            .summaries(&q(Some("gw-2"), None, None, None, 100))
            .unwrap();
        assert_eq!(by_device.len(), 1);
        assert_eq!(by_device[0].device_id, "gw-2");
        let by_stream = store
            .summaries(&q(Some("gw-1"), Some("n1/hum"), None, None, 100))
            .unwrap();
        assert_eq!(by_stream.len(), 1);
        assert_eq!(by_stream[0].summary.stream, "n1/hum");
        // [10_000, 30_000) holds the windows starting at 10_000 and 20_000, not 30_000.
        let range = store
            .summaries(&q(
                Some("gw-1"),
                Some("n1/temp"),
                Some(10_000),
                Some(30_000),
                100,
            ))
            .unwrap();
        let starts: Vec<i64> = range.iter().map(|r| r.summary.window_start_ms).collect();
        assert_eq!(starts, [10_000, 20_000]);
        let limited = store.summaries(&q(None, None, None, None, 2)).unwrap();
        assert_eq!(limited.len(), 2);
        assert!(limited.iter().all(|r| r.summary.window_start_ms == 0));
    }

    #[test]
    fn tokens_authenticate_their_device_only() {
        let (_dir, store) = open();
        let t1 = store.add_device("gw-1").unwrap();
        let t2 = store.add_device("gw-2").unwrap();
        assert_ne!(t1, t2);
        assert_eq!(store.authenticate(&t1).unwrap().as_deref(), Some("gw-1"));
        assert_eq!(store.authenticate(&t2).unwrap().as_deref(), Some("gw-2"));
        assert_eq!(store.authenticate("not-a-token").unwrap(), None);
        assert_eq!(store.authenticate("").unwrap(), None);
        // Only the hash is stored.
        let stored: String = store
            .lock()
            .query_row(
                "SELECT token_hash FROM devices WHERE id = 'gw-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_ne!(stored, t1);
        assert_eq!(stored, TokenHash::of(&t1).as_hex());
        assert!(matches!(
            store.add_device("gw-1"),
            Err(StoreError::DeviceExists(_))
        ));
        assert!(matches!(
            store.add_device(""),
            Err(StoreError::InvalidDeviceId(_))
        ));
        assert!(matches!(
            store.add_device("a b"),
            Err(StoreError::InvalidDeviceId(_))
        ));
    }

    #[test]
    fn revoked_token_is_refused() {
        let (_dir, store) = open();
        let token = store.add_device("gw-1").unwrap();
        assert!(store.revoke_device("gw-1").unwrap());
        assert!(!store.revoke_device("nobody").unwrap());
        assert_eq!(store.authenticate(&token).unwrap(), None);
        assert!(store.devices().unwrap()[0].revoked);
    }

    #[test]
    fn a_bad_summary_rejects_the_whole_batch() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let mut bad = summary("gw-1", "n1/temp", 20_000, 0);
        bad.mean = f64::NAN;
        let batch = [
            summary("gw-1", "n1/temp", 0, 0),
            summary("gw-1", "n1/temp", 10_000, 0),
            bad,
        ];
        let err = store.ingest("gw-1", &batch).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSummary { index: 2, .. }));
        let foreign = [
            summary("gw-1", "n1/temp", 0, 0),
            summary("gw-2", "n1/temp", 0, 0),
        ];
        let err = store.ingest("gw-1", &foreign).unwrap_err();
        assert!(matches!(err, StoreError::ForeignSummary { index: 1, .. }));
        let err = store
            .ingest("ghost", &[summary("ghost", "n1/temp", 0, 0)])
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownDevice(_)));
        assert!(all(&store).is_empty());
    }

    #[test]
    fn devices_report_counts_and_last_seen() {
        let (_dir, store) = open();
        store.add_device("gw-b").unwrap();
        store.add_device("gw-a").unwrap();
        store
            .ingest(
                "gw-b",
                &[summary("gw-b", "s", 0, 0), summary("gw-b", "s", 10_000, 0)],
            )
            .unwrap();
        let devices = store.devices().unwrap();
        let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["gw-a", "gw-b"]);
        assert_eq!(devices[0].summary_count, 0);
        assert_eq!(devices[0].last_seen_ms, None);
        assert_eq!(devices[1].summary_count, 2);
        assert!(devices[1].last_seen_ms.is_some());
        assert!(!devices[1].revoked);
    }

    #[test]
    fn stored_summary_json_is_flat_with_hex_id() {
        let s = StoredSummary {
            device_id: "gw-1".into(),
            summary: summary("gw-1", "n1/temp", 0, 0),
            received_at_ms: 5,
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["id"], s.summary.id().to_string());
        assert_eq!(json["stream"], "n1/temp");
        assert_eq!(json["received_at_ms"], 5);
        assert_eq!(json["mean"], 21.0);
        let back: StoredSummary = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    fn scored(mut s: WindowSummary, value: f64, alert: bool) -> WindowSummary {
        s.score = Some(Score {
            value,
            alert,
            model: "anomaly@3f2a9c1d".to_owned(),
        });
        s
    }

    fn gap(agent: &str, seq: u64, from_ms: i64, to_ms: i64) -> Gap {
        Gap {
            agent_id: agent.to_owned(),
            seq,
            streams: vec!["n1/temp".to_owned(), "n2/hum".to_owned()],
            from_ms,
            to_ms,
            count: 7,
            reason: "buffer_full".to_owned(),
            recorded_at_ms: to_ms + 1,
        }
    }

    #[test]
    fn scores_are_stored_and_alerts_are_queryable() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let plain = summary("gw-1", "n1/temp", 0, 0);
        let calm = scored(summary("gw-1", "n1/temp", 10_000, 0), 0.1, false);
        let alert = scored(summary("gw-1", "n1/temp", 20_000, 0), 0.97, true);
        store
            .ingest("gw-1", &[plain.clone(), calm.clone(), alert.clone()])
            .unwrap();
        let got: Vec<_> = all(&store).into_iter().map(|r| r.summary).collect();
        assert_eq!(got, [plain, calm, alert.clone()]);
        let alerts = store
            .summary_page(&SummaryFilter {
                alerts_only: true,
                ..SummaryFilter::default()
            })
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].summary, alert);
        assert_eq!(store.devices().unwrap()[0].alert_count, 1);
        // A higher revision without a score clears it.
        let rev1 = summary("gw-1", "n1/temp", 20_000, 1);
        store.ingest("gw-1", std::slice::from_ref(&rev1)).unwrap();
        assert_eq!(all(&store)[2].summary, rev1);
        assert_eq!(store.devices().unwrap()[0].alert_count, 0);
    }

    #[test]
    fn quantiles_are_stored_returned_and_replaced_by_a_revision() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let mut with = summary("gw-1", "n1/temp", 0, 0);
        with.quantiles = Some(Quantiles {
            p50: with.mean,
            p90: with.max,
            p99: with.max,
            relative_error: 0.01,
        });
        let without = summary("gw-1", "n1/temp", 10_000, 0);
        store
            .ingest("gw-1", &[with.clone(), without.clone()])
            .unwrap();
        let got: Vec<_> = all(&store).into_iter().map(|r| r.summary).collect();
        assert_eq!(got, [with.clone(), without]);
        // JSON carries them as an object, and null without.
        let json = serde_json::to_value(&all(&store)[0]).unwrap();
        assert_eq!(json["quantiles"]["p99"], with.max);
        assert_eq!(json["quantiles"]["relative_error"], 0.01);
        assert!(serde_json::to_value(&all(&store)[1]).unwrap()["quantiles"].is_null());
        // A revision without quantiles clears them.
        let rev1 = summary("gw-1", "n1/temp", 0, 1);
        store.ingest("gw-1", std::slice::from_ref(&rev1)).unwrap();
        assert_eq!(all(&store)[0].summary, rev1);
    }

    #[test]
    fn gaps_are_stored_once_per_seq_and_queryable_by_overlap() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        store.add_device("gw-2").unwrap();
        let g1 = gap("gw-1", 1, 0, 10_000);
        let g2 = gap("gw-1", 2, 50_000, 60_000);
        let out = store
            .ingest_batch(
                "gw-1",
                &[summary("gw-1", "s", 0, 0)],
                &[g1.clone(), g2.clone()],
            )
            .unwrap();
        assert_eq!(
            (out.inserted, out.gaps_inserted, out.gaps_duplicate),
            (1, 2, 0)
        );
        let again = store
            .ingest_batch("gw-1", &[], std::slice::from_ref(&g2))
            .unwrap();
        assert_eq!((again.gaps_inserted, again.gaps_duplicate), (0, 1));
        store
            .ingest_batch("gw-2", &[], &[gap("gw-2", 1, 0, 1)])
            .unwrap();

        let gaps = store.gaps(&GapQuery::default()).unwrap();
        assert_eq!(gaps.len(), 3);
        assert_eq!(gaps[0].device_id, "gw-1");
        assert_eq!(gaps[0].seq, 1);
        assert_eq!(gaps[0].streams, g1.streams);
        assert_eq!(
            (gaps[0].from_ms, gaps[0].to_ms, gaps[0].count),
            (0, 10_000, 7)
        );
        assert_eq!(gaps[0].reason, "buffer_full");
        let q = |device: Option<&str>, from, to| GapQuery {
            device: device.map(str::to_owned),
            from_ms: from,
            to_ms: to,
            ..GapQuery::default()
        };
        let seqs =
            |q: GapQuery| -> Vec<u64> { store.gaps(&q).unwrap().iter().map(|g| g.seq).collect() };
        assert_eq!(seqs(q(Some("gw-1"), None, None)), [1, 2]);
        // Overlap with [10_000, 50_000): g1 ends at 10_000 (inclusive), g2 starts at 50_000.
        assert_eq!(seqs(q(Some("gw-1"), Some(10_000), Some(50_000))), [1]);
        assert_eq!(seqs(q(Some("gw-1"), Some(10_001), Some(50_001))), [2]);
        let after = GapQuery {
            after: Some(("gw-1".to_owned(), 1)),
            ..GapQuery::default()
        };
        let rest: Vec<_> = store
            .gaps(&after)
            .unwrap()
            .into_iter()
            .map(|g| (g.device_id, g.seq))
            .collect();
        assert_eq!(rest, [("gw-1".to_owned(), 2), ("gw-2".to_owned(), 1)]);
        assert_eq!(store.devices().unwrap()[0].evicted_count, 14);
        // A foreign gap refuses the whole batch.
        let err = store
            .ingest_batch(
                "gw-1",
                &[summary("gw-1", "s", 90_000, 0)],
                &[gap("gw-2", 9, 0, 1)],
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignGap { index: 0, .. }));
        assert_eq!(all(&store).len(), 1);
    }

    #[test]
    fn two_connections_to_one_file_both_store_everything() {
        let (dir, first) = open();
        let second = Store::open(&dir.path().join("cloud.db")).unwrap();
        first.add_device("gw-1").unwrap();
        first.add_device("gw-2").unwrap();
        let writers: Vec<_> = [("gw-1", first.clone()), ("gw-2", second)]
            .into_iter()
            .map(|(device, store)| {
                std::thread::spawn(move || {
                    for b in 0..20 {
                        let batch: Vec<WindowSummary> = (0..50)
                            .map(|i| summary(device, "n1/temp", (b * 50 + i) * 10_000, 0))
                            .collect();
                        assert_eq!(store.ingest(device, &batch).unwrap(), outcome(50, 0, 0));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let devices = first.devices().unwrap();
        assert_eq!(
            devices.iter().map(|d| d.summary_count).collect::<Vec<_>>(),
            [1_000, 1_000]
        );
    }

    #[test]
    fn paging_by_cursor_visits_every_row_once() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        store.add_device("gw-2").unwrap();
        for dev in ["gw-1", "gw-2"] {
            let batch: Vec<_> = (0..7)
                .flat_map(|i| {
                    [
                        summary(dev, "a", i * 10_000, 0),
                        summary(dev, "b", i * 10_000, 0),
                    ]
                })
                .collect();
            store.ingest(dev, &batch).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .summary_page(&SummaryFilter {
                    query: SummaryQuery {
                        limit: 4,
                        ..SummaryQuery::default()
                    },
                    after: after.clone(),
                    ..SummaryFilter::default()
                })
                .unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(SummaryKey::of);
            seen.extend(page.iter().map(SummaryKey::of));
        }
        assert_eq!(seen.len(), 28);
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| {
            (a.window_start_ms, &a.device_id, &a.stream).cmp(&(
                b.window_start_ms,
                &b.device_id,
                &b.stream,
            ))
        });
        sorted.dedup();
        assert_eq!(seen, sorted);
    }

    #[test]
    fn a_v1_file_is_migrated_to_the_current_schema_keeping_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL,
                                                 applied_at_ms INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 0);",
            )
            .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO devices (id, token_hash, created_at_ms) VALUES ('gw-1', 'h', 0);
                 INSERT INTO summaries VALUES ('gw-1', 's', 0, 10000, 0, 3, 20, 22, 21, 0.8,
                     20, 500, 22, 9500, 'Cel', 'x', 1);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let rows = all(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary, summary("gw-1", "s", 0, 0));
        let rev = scored(summary("gw-1", "s", 0, 1), 0.9, true);
        store.ingest("gw-1", std::slice::from_ref(&rev)).unwrap();
        assert_eq!(all(&store)[0].summary, rev);
    }

    fn latest(stream: &str, time_ms: i64, value: StateValue) -> LatestValue {
        LatestValue {
            stream: stream.to_owned(),
            time_ms,
            value,
        }
    }

    fn text(s: &str) -> StateValue {
        StateValue::Text(s.to_owned())
    }

    /// Stores `values` (and nothing else) as one batch of `device`; answers (stored, ignored).
    fn store_latest_values(store: &Store, device: &str, values: &[LatestValue]) -> (u64, u64) {
        let batch = CheckedBatch::new(device.to_owned(), vec![], vec![])
            .and_then(|b| b.with_latest(values.to_vec()))
            .unwrap();
        let out = store.store_checked(batch).unwrap();
        (out.latest_stored, out.latest_ignored)
    }

    /// Every stored latest value as `(device, stream, time_ms, value)`.
    fn latest_rows(store: &Store) -> Vec<(String, String, i64, StateValue)> {
        store
            .latest(&LatestQuery::default())
            .unwrap()
            .into_iter()
            .map(|r| (r.device_id, r.stream, r.time_ms, r.value))
            .collect()
    }

    #[test]
    fn latest_values_are_stored_and_a_newer_one_replaces_them() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        store.add_device("gw-2").unwrap();
        let first = [
            latest("n1/door", 1_000, text("open")),
            latest("n1/alarm", 1_000, StateValue::Bool(false)),
            latest("n1/fw", 1_000, StateValue::Data(vec![0, 1, 2])),
            latest("n1/empty", 1_000, StateValue::Data(Vec::new())),
            latest("n1/note", 1_000, text("")),
        ];
        assert_eq!(store_latest_values(&store, "gw-1", &first), (5, 0));
        assert_eq!(
            store_latest_values(&store, "gw-2", &[latest("n1/door", 5, text("shut"))]),
            (1, 0)
        );
        let row = |d: &str, s: &str, t, v| (d.to_owned(), s.to_owned(), t, v);
        assert_eq!(
            latest_rows(&store),
            [
                row("gw-1", "n1/alarm", 1_000, StateValue::Bool(false)),
                row("gw-1", "n1/door", 1_000, text("open")),
                row("gw-1", "n1/empty", 1_000, StateValue::Data(Vec::new())),
                row("gw-1", "n1/fw", 1_000, StateValue::Data(vec![0, 1, 2])),
                row("gw-1", "n1/note", 1_000, text("")),
                row("gw-2", "n1/door", 5, text("shut")),
            ]
        );
        // A newer value replaces the stored one, even of another kind.
        let newer = [
            latest("n1/door", 2_000, StateValue::Bool(true)),
            latest("n1/alarm", 1_001, StateValue::Bool(true)),
        ];
        assert_eq!(store_latest_values(&store, "gw-1", &newer), (2, 0));
        let rows = latest_rows(&store);
        assert_eq!(
            rows[0],
            row("gw-1", "n1/alarm", 1_001, StateValue::Bool(true))
        );
        assert_eq!(
            rows[1],
            row("gw-1", "n1/door", 2_000, StateValue::Bool(true))
        );
        assert_eq!(rows[5], row("gw-2", "n1/door", 5, text("shut")));
        // Filters and paging.
        let q = |device: Option<&str>, stream: Option<&str>, after: Option<(&str, &str)>| {
            let q = LatestQuery {
                device: device.map(str::to_owned),
                stream: stream.map(str::to_owned),
                after: after.map(|(d, s)| (d.to_owned(), s.to_owned())),
                limit: 2,
            };
            let rows = store.latest(&q).unwrap();
            rows.into_iter()
                .map(|r| format!("{}:{}", r.device_id, r.stream))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            q(None, Some("n1/door"), None),
            ["gw-1:n1/door", "gw-2:n1/door"]
        );
        assert_eq!(q(Some("gw-2"), None, None), ["gw-2:n1/door"]);
        assert_eq!(
            q(None, None, Some(("gw-1", "n1/fw"))),
            ["gw-1:n1/note", "gw-2:n1/door"]
        );
    }

    #[test]
    fn an_older_or_re_sent_latest_value_changes_nothing() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let kept = latest("n1/door", 2_000, text("closed"));
        assert_eq!(
            store_latest_values(&store, "gw-1", std::slice::from_ref(&kept)),
            (1, 0)
        );
        let received_at = store.latest(&LatestQuery::default()).unwrap()[0].received_at_ms;
        let stale = [
            kept.clone(),
            latest("n1/door", 2_000, text("open")), // same time, other value
            latest("n1/door", 1_999, text("open")),
        ];
        // The batch keeps its newest (the first at 2_000); the store ignores that one too.
        assert_eq!(store_latest_values(&store, "gw-1", &stale), (0, 3));
        assert_eq!(
            store_latest_values(&store, "gw-1", std::slice::from_ref(&kept)),
            (0, 1)
        );
        let stored = store.latest(&LatestQuery::default()).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!((stored[0].time_ms, &stored[0].value), (2_000, &kept.value));
        assert_eq!(stored[0].received_at_ms, received_at);
    }

    #[test]
    fn latest_values_are_stored_with_the_batch_or_not_at_all() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let mut bad = summary("gw-1", "n1/temp", 0, 0);
        bad.count = 0;
        let refused = CheckedBatch::new("gw-1".to_owned(), vec![bad], vec![])
            .and_then(|b| b.with_latest(vec![latest("n1/door", 1, text("open"))]));
        assert!(matches!(refused, Err(StoreError::InvalidSummary { .. })));
        let refused =
            CheckedBatch::new("gw-1".to_owned(), vec![summary("gw-1", "s", 0, 0)], vec![])
                .and_then(|b| b.with_latest(vec![latest("n1/door", 1, text(&"x".repeat(1025)))]));
        assert!(matches!(
            refused,
            Err(StoreError::InvalidLatest { index: 0, .. })
        ));
        // An unknown device: the transaction stores nothing.
        let ghost = CheckedBatch::new("ghost".to_owned(), vec![], vec![])
            .and_then(|b| b.with_latest(vec![latest("n1/door", 1, text("open"))]))
            .unwrap();
        assert!(matches!(
            store.store_checked(ghost),
            Err(StoreError::UnknownDevice(_))
        ));
        assert!(latest_rows(&store).is_empty());
        assert!(all(&store).is_empty());
    }

    #[test]
    fn a_v4_file_gains_latest_values_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL,
                                                 applied_at_ms INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 0), (2, 0), (3, 0), (4, 0);",
            )
            .unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
        }
        let gap = gap("gw-1", 1, 0, 10_000);
        let scored_summary = scored(summary("gw-1", "s", 0, 0), 0.9, true);
        {
            // Written by the v4 code path: the store at v4 held this data.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "INSERT INTO devices (id, token_hash, created_at_ms) VALUES ('gw-1', 'h', 0);
                 INSERT INTO gaps VALUES ('gw-1', 1, '[\"n1/temp\",\"n2/hum\"]', 0, 10000, 7,
                     'buffer_full', 10001, 1);
                 INSERT INTO summaries (device_id, stream, window_start_ms, window_end_ms,
                     revision, count, min, max, mean, stddev, first_value, first_time_ms,
                     last_value, last_time_ms, unit, summary_id, received_at_ms, score_value,
                     score_alert, score_model)
                 VALUES ('gw-1', 's', 0, 10000, 0, 3, 20, 22, 21, 0.8, 20, 500, 22, 9500, 'Cel',
                     'x', 1, 0.9, 1, 'anomaly@3f2a9c1d');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(all(&store)[0].summary, scored_summary);
        let gaps = store.gaps(&GapQuery::default()).unwrap();
        assert_eq!(
            (gaps.len(), &gaps[0].streams, gaps[0].count),
            (1, &gap.streams, gap.count)
        );
        assert!(latest_rows(&store).is_empty());
        assert_eq!(
            store_latest_values(&store, "gw-1", &[latest("n1/door", 1, text("open"))]),
            (1, 0)
        );
        assert_eq!(latest_rows(&store).len(), 1);
        assert_eq!(store.devices().unwrap()[0].summary_count, 1);
    }
}
