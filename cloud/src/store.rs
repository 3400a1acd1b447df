//! SQLite storage of devices and window summaries.
//!
//! One file, WAL journal, `synchronous=NORMAL`, a 5 s busy timeout. The schema is created by
//! versioned migrations recorded in `schema_migrations` (currently v1); a file written by a newer
//! build is refused rather than guessed at.
//!
//! Invariants:
//! - `summaries` holds at most one row per `(device_id, stream, window_start_ms)`: the highest
//!   revision received. Re-sending a summary, or sending a lower or equal revision, changes nothing
//!   and is counted as a duplicate; a higher revision replaces the row. This makes agent retries
//!   safe (exactly-once storage over at-least-once delivery).
//! - [`Store::ingest`] runs in ONE transaction: a batch is stored entirely or not at all, and it is
//!   durable (per WAL + `synchronous=NORMAL`: survives a process crash) when it returns `Ok`.
//! - Every stored summary passed [`WindowSummary::validate`] and belongs to the device that wrote
//!   it (`agent_id == device_id`); `ingest` checks both again, whatever the caller did.
//! - Only SHA-256 hashes of device tokens are stored.
//!
//! rusqlite is synchronous: async callers run these methods in `tokio::task::spawn_blocking`.
//! The connection sits behind a mutex, so a [`Store`] is cheap to clone and safe to share.
//!
//! Tested by the unit tests below on temporary files, and through HTTP in `tests/api.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgewise_protocol::WindowSummary;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::auth::{DeviceToken, TokenHash};

/// Rows returned by [`Store::summaries`] when the query does not say.
pub const DEFAULT_QUERY_LIMIT: usize = 1_000;
/// Most rows [`Store::summaries`] returns, whatever the query asks.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// Longest accepted device id, in bytes (the same bound as a summary's agent id).
pub const MAX_DEVICE_ID_BYTES: usize = WindowSummary::MAX_NAME_BYTES;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database schema version {found} is newer than this build understands ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("device id is invalid: {0}")]
    InvalidDeviceId(&'static str),
    #[error("device {0:?} already exists")]
    DeviceExists(String),
    #[error("device {0:?} does not exist")]
    UnknownDevice(String),
    #[error(
        "summary {index} has agent_id {agent_id:?}, but device {device_id:?} may only write its own data"
    )]
    ForeignSummary {
        index: usize,
        agent_id: String,
        device_id: String,
    },
    #[error("summary {index} is invalid: {reason}")]
    InvalidSummary { index: usize, reason: String },
    #[error("a stored value is out of range: {0}")]
    Corrupt(String),
}

/// What one [`Store::ingest`] call did with each summary of the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestOutcome {
    /// New windows.
    pub inserted: u64,
    /// Summaries already stored at the same or a higher revision (nothing changed).
    pub duplicates: u64,
    /// Higher revisions that replaced a stored window.
    pub revised: u64,
}

/// Filter for [`Store::summaries`]: `window_start_ms` in `[from_ms, to_ms)`, ordered by window
/// start, then device, then stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryQuery {
    pub device: Option<String>,
    pub stream: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Capped at [`MAX_QUERY_LIMIT`].
    pub limit: usize,
}

impl Default for SummaryQuery {
    fn default() -> Self {
        SummaryQuery {
            device: None,
            stream: None,
            from_ms: None,
            to_ms: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}

/// A summary as stored, with who sent it and when it arrived.
///
/// Serializes to JSON as one flat object: `id` (hex [`edgewise_protocol::SummaryId`]),
/// `device_id`, every [`WindowSummary`] field, and `received_at_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "FlatSummary", from = "FlatSummary")]
pub struct StoredSummary {
    pub device_id: String,
    pub summary: WindowSummary,
    pub received_at_ms: i64,
}

/// The JSON shape of a [`StoredSummary`].
#[derive(Serialize, Deserialize)]
struct FlatSummary {
    #[serde(default)]
    id: String,
    device_id: String,
    agent_id: String,
    stream: String,
    window_start_ms: i64,
    window_end_ms: i64,
    revision: u32,
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    stddev: f64,
    first_value: f64,
    first_time_ms: i64,
    last_value: f64,
    last_time_ms: i64,
    unit: Option<String>,
    received_at_ms: i64,
}

impl From<StoredSummary> for FlatSummary {
    fn from(s: StoredSummary) -> Self {
        let id = s.summary.id().to_string();
        let w = s.summary;
        FlatSummary {
            id,
            device_id: s.device_id,
            agent_id: w.agent_id,
            stream: w.stream,
            window_start_ms: w.window_start_ms,
            window_end_ms: w.window_end_ms,
            revision: w.revision,
            count: w.count,
            min: w.min,
            max: w.max,
            mean: w.mean,
            stddev: w.stddev,
            first_value: w.first_value,
            first_time_ms: w.first_time_ms,
            last_value: w.last_value,
            last_time_ms: w.last_time_ms,
            unit: w.unit,
            received_at_ms: s.received_at_ms,
        }
    }
}

impl From<FlatSummary> for StoredSummary {
    fn from(f: FlatSummary) -> Self {
        StoredSummary {
            device_id: f.device_id,
            summary: WindowSummary {
                agent_id: f.agent_id,
                stream: f.stream,
                window_start_ms: f.window_start_ms,
                window_end_ms: f.window_end_ms,
                revision: f.revision,
                count: f.count,
                min: f.min,
                max: f.max,
                mean: f.mean,
                stddev: f.stddev,
                first_value: f.first_value,
                first_time_ms: f.first_time_ms,
                last_value: f.last_value,
                last_time_ms: f.last_time_ms,
                unit: f.unit,
                score: None,
            },
            received_at_ms: f.received_at_ms,
        }
    }
}

/// A registered device, as listed by [`Store::devices`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub created_at_ms: i64,
    /// When the device last posted a batch; `None` if never.
    pub last_seen_ms: Option<i64>,
    pub revoked: bool,
    pub summary_count: u64,
}

/// The receiver's SQLite database. Clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Answers the mode in effect: "wal" for a file (in-memory databases stay "memory").
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
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
            params![device_id, token.hash().as_hex(), now_ms()],
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

    /// Revokes a device's token; its data stays. Returns `false` if no such device exists.
    pub fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let changed = self
            .lock()
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [device_id])?;
        Ok(changed > 0)
    }

    /// The device a token belongs to, if the token is valid and not revoked.
    ///
    /// The lookup is by the token's SHA-256, so the stored secret is never compared with input.
    pub fn authenticate(&self, token: &str) -> Result<Option<String>, StoreError> {
        let hash = TokenHash::of(token);
        let conn = self.lock();
        let found = conn
            .query_row(
                "SELECT id FROM devices WHERE token_hash = ?1 AND revoked = 0",
                [hash.as_hex()],
                |row| row.get::<_, String>(0),
            )
            .optional()?;
        Ok(found)
    }

    /// Stores a batch of `device_id`'s summaries idempotently, in one transaction, and marks the
    /// device as seen. Refuses the whole batch if any summary is invalid or not the device's own.
    pub fn ingest(
        &self,
        device_id: &str,
        summaries: &[WindowSummary],
    ) -> Result<IngestOutcome, StoreError> {
        for (index, s) in summaries.iter().enumerate() {
            if s.agent_id != device_id {
                return Err(StoreError::ForeignSummary {
                    index,
                    agent_id: s.agent_id.clone(),
                    device_id: device_id.to_owned(),
                });
            }
            s.validate().map_err(|reason| StoreError::InvalidSummary {
                index,
                reason: reason.to_string(),
            })?;
            if i64::try_from(s.count).is_err() {
                return Err(StoreError::InvalidSummary {
                    index,
                    reason: format!("count {} is larger than {}", s.count, i64::MAX),
                });
            }
        }

        let received_at_ms = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let known = tx.execute(
            "UPDATE devices SET last_seen_ms = ?2 WHERE id = ?1",
            params![device_id, received_at_ms],
        )?;
        if known == 0 {
            return Err(StoreError::UnknownDevice(device_id.to_owned()));
        }
        let mut outcome = IngestOutcome::default();
        {
            let mut stored_revision = tx.prepare_cached(
                "SELECT revision FROM summaries
                 WHERE device_id = ?1 AND stream = ?2 AND window_start_ms = ?3",
            )?;
            let mut write = tx.prepare_cached(
                "INSERT OR REPLACE INTO summaries (
                     device_id, stream, window_start_ms, window_end_ms, revision, count,
                     min, max, mean, stddev, first_value, first_time_ms, last_value, last_time_ms,
                     unit, summary_id, received_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?;
            for s in summaries {
                let current: Option<i64> = stored_revision
                    .query_row(params![device_id, s.stream, s.window_start_ms], |row| {
                        row.get(0)
                    })
                    .optional()?;
                match current {
                    Some(stored) if i64::from(s.revision) <= stored => {
                        outcome.duplicates += 1;
                        continue;
                    }
                    Some(_) => outcome.revised += 1,
                    None => outcome.inserted += 1,
                }
                // Checked above: the count fits.
                let count = i64::try_from(s.count).unwrap_or(i64::MAX);
                write.execute(params![
                    device_id,
                    s.stream,
                    s.window_start_ms,
                    s.window_end_ms,
                    s.revision,
                    count,
                    s.min,
                    s.max,
                    s.mean,
                    s.stddev,
                    s.first_value,
                    s.first_time_ms,
                    s.last_value,
                    s.last_time_ms,
                    s.unit,
                    s.id().to_string(),
                    received_at_ms,
                ])?;
            }
        }
        tx.commit()?;
        Ok(outcome)
    }

    /// Stored summaries matching `q`, oldest window first.
    pub fn summaries(&self, q: &SummaryQuery) -> Result<Vec<StoredSummary>, StoreError> {
        let mut sql = String::from(
            "SELECT device_id, stream, window_start_ms, window_end_ms, revision, count,
                    min, max, mean, stddev, first_value, first_time_ms, last_value, last_time_ms,
                    unit, received_at_ms
             FROM summaries WHERE 1 = 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if let Some(device) = &q.device {
            sql.push_str(" AND device_id = ?");
            args.push(Value::Text(device.clone()));
        }
        if let Some(stream) = &q.stream {
            sql.push_str(" AND stream = ?");
            args.push(Value::Text(stream.clone()));
        }
        if let Some(from) = q.from_ms {
            sql.push_str(" AND window_start_ms >= ?");
            args.push(Value::Integer(from));
        }
        if let Some(to) = q.to_ms {
            sql.push_str(" AND window_start_ms < ?");
            args.push(Value::Integer(to));
        }
        sql.push_str(" ORDER BY window_start_ms, device_id, stream LIMIT ?");
        // At most MAX_QUERY_LIMIT, so it fits.
        args.push(Value::Integer(q.limit.min(MAX_QUERY_LIMIT) as i64));

        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), stored_summary_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Every registered device with its number of stored summaries, by id.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT d.id, d.created_at_ms, d.last_seen_ms, d.revoked,
                    (SELECT COUNT(*) FROM summaries s WHERE s.device_id = d.id)
             FROM devices d ORDER BY d.id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(DeviceInfo {
                id: row.get(0)?,
                created_at_ms: row.get(1)?,
                last_seen_ms: row.get(2)?,
                revoked: row.get(3)?,
                summary_count: non_negative(row, 4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

fn check_device_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidDeviceId("it is empty"));
    }
    if id.len() > MAX_DEVICE_ID_BYTES {
        return Err(StoreError::InvalidDeviceId("it is longer than 256 bytes"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StoreError::InvalidDeviceId(
            "it contains whitespace or control characters",
        ));
    }
    Ok(())
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
    let known = MIGRATIONS.len() as i64;
    let found = current_version(conn)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
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
            score: None,
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

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(agent: &str, stream: &str, start_ms: i64, revision: u32) -> WindowSummary {
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
    fn open_creates_schema_v1_in_wal_mode_and_reopens() {
        let (dir, store) = open();
        assert_eq!(store.schema_version().unwrap(), 1);
        let mode: String = store
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        store.add_device("gw-1").unwrap();
        drop(store);
        let again = Store::open(&dir.path().join("cloud.db")).unwrap();
        assert_eq!(again.schema_version().unwrap(), 1);
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
                known: 1
            }
        ));
    }

    #[test]
    fn same_summary_twice_is_one_row_and_one_duplicate() {
        let (_dir, store) = open();
        store.add_device("gw-1").unwrap();
        let s = summary("gw-1", "n1/temp", 1_000_000, 0);
        let first = store.ingest("gw-1", std::slice::from_ref(&s)).unwrap();
        assert_eq!(
            first,
            IngestOutcome {
                inserted: 1,
                duplicates: 0,
                revised: 0
            }
        );
        let second = store.ingest("gw-1", std::slice::from_ref(&s)).unwrap();
        assert_eq!(
            second,
            IngestOutcome {
                inserted: 0,
                duplicates: 1,
                revised: 0
            }
        );
        let rows = all(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary, s);
        assert_eq!(rows[0].device_id, "gw-1");
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
        assert_eq!(
            out,
            IngestOutcome {
                inserted: 0,
                duplicates: 0,
                revised: 1
            }
        );
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
        assert_eq!(
            out,
            IngestOutcome {
                inserted: 0,
                duplicates: 2,
                revised: 0
            }
        );
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
}
