//! The agent's durable buffer: one SQLite file (WAL) holding the journal, the outbox, gap
//! records, per-stream state and dead letters.
//!
//! - `journal_000` to `journal_063` (the journal, see [`journal`]): every accepted reading,
//!   until its window closes, in the table of its slice of event time. Keyed by
//!   `(time_ms, stream)` (`WITHOUT ROWID` tables): a message the broker redelivers (after a
//!   reconnect or a restart, before our ack reached it) meets its first copy in the same table
//!   and is ignored instead of counted twice, and since readings arrive roughly in time order,
//!   a group commit appends to the right edge of a B-tree instead of touching a page per stream
//!   (18k readings/s with a `(stream, time_ms)` index over 1,000 streams; see
//!   `benches/store.rs` for today's figure). `arrival` keeps the arrival order, so a rebuild
//!   replays readings exactly as they came. Empty when the journal is disabled
//!   ([`StoreOptions::journal`] = false).
//! - `outbox`: encoded summaries waiting for the cloud, with their size, alert flag, stream and
//!   window (for eviction and drain order without decoding).
//! - `gap`: eviction records ([`Gap`]) waiting for the cloud; never evicted themselves.
//! - `buffer_usage`: one row with the outbox and gap rows and bytes, kept exact by triggers in
//!   the same transaction as every insert and delete (whichever connection makes it).
//! - `stream_state`: per stream, `closed_until_ms` (see [`crate::window`]).
//! - `window_revision`: with `late_policy = "revise"`, the last emitted revision and count of
//!   each closed window that late readings may still revise (see [`crate::window`]).
//! - `dead_letter`: undecodable payloads and refused summaries, bounded to the newest N rows.
//! - `latest_value`: per stream with text, boolean or data readings, the newest such value
//!   ([`LatestValue`], CBOR) and whether the cloud has it yet (`pending`). At most
//!   [`StoreOptions::max_latest_streams`] rows: a new stream past that is refused (counted). Not
//!   part of the buffer cap: it is one small row per stream, replaced in place.
//!
//! What is durable when:
//! - [`Store::commit_ingest`] writes a whole batch of readings (and dead letters) in one
//!   transaction; the caller acks the MQTT messages only after it returns `Ok`. With
//!   `synchronous = NORMAL` a committed transaction survives a process crash (it is in the WAL,
//!   in the OS page cache) but the last commits may be lost on power loss; with `FULL` the WAL is
//!   fsynced at each commit and survives power loss too.
//! - [`Store::commit_closed`] inserts closed summaries into the outbox, advances `closed_until`,
//!   records revisions, deletes the journal rows no stream needs any more (before
//!   [`crate::window::Windows::journal_horizon`], the earliest release time of any active
//!   stream, see [`ClosedWindow::release_ms`]) and, if the buffer is over its cap, evicts and
//!   records the gap, all in ONE transaction: a crash leaves either the readings or the summary,
//!   never both and never neither, and never an eviction without its gap record. Rows of a
//!   stream that are past its own release time but not yet past the global horizon stay until
//!   they are; they are dead from the commit that moved the release time: a rebuild skips them
//!   ([`crate::window::Windows::add`] ignores readings before the release time) and a
//!   redelivery of them is refused as late before it reaches the journal.
//! - The journal rows a commit of closed windows releases go a step at a time
//!   ([`journal::Journal::release`]): mostly whole tables emptied at once, which SQLite does
//!   without visiting the rows; row by row, [`journal::DELETE_CHUNK`] at a time, only in a table
//!   that holds readings of two turns of its ring. That commit takes the first step, and
//!   [`Store::delete_released_journal`] (called by the pipeline after every batch) the rest, one
//!   step per call. All windows of a tumbling spec close together, so one close releases every
//!   stream's readings of a whole window at once (two million rows at 100,000 messages/s with
//!   10 s windows): deleted row by row in one go, that took the ingest loop away from the broker
//!   for seconds, and in chunks it still cost a tenth of the agent's CPU. The rows are dead from
//!   the commit that released them (above), so deleting them later (a table whose newest rows
//!   are not released yet waits for them), or after a restart (the next close deletes them
//!   again), changes nothing a rebuild sees. Each later step deletes only up to the horizon of
//!   that moment: a stream that became active in between may have journaled readings older than
//!   the last close's horizon.
//! - Outbox and gap rows are deleted by [`Store::outbox_remove`] only after the receiver's 2xx;
//!   a latest value is marked sent then, unless a newer one replaced it meanwhile.
//!
//! Buffer cap: the outbox plus gap records never hold more than `max_buffer_bytes` (each row
//! counted as its encoded body plus [`ROW_OVERHEAD_BYTES`]) after a commit. Over the cap, plain
//! summaries go first, then alerts, oldest (lowest seq) first, down to 95% of the cap, and one
//! gap record names what went. The journal is not capped: it holds only open windows.
//!
//! Checkpoints: SQLite copies the WAL back into the database file at a checkpoint, and fsyncs
//! both (also with `synchronous = NORMAL`). By default the connection whose commit takes the
//! WAL past 1,000 pages runs it, inside that commit: on the ingest thread, where an fsync of
//! 100-330 ms was measured under load, long enough for the broker to drop messages.
//! [`Store::checkpoint_in_background`] (the pipeline's store) turns that off for this
//! connection and runs passive checkpoints on a thread of its own with its own connection:
//! they never block a writer, and the fsync waits there.
//!
//! Faults: SQLITE_FULL is [`StoreError::DiskFull`] (nothing in the failed transaction happened,
//! retry later). [`Store::open_or_recover`] runs SQLite's integrity check on start and moves a
//! corrupt or truncated file aside instead of failing, so the agent never crash-loops on it.
//!
//! Tested by the unit tests below on real SQLite files, and end to end in `tests/`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use edgewise_protocol::{Gap, LatestValue, Reading, ReadingView, WindowSummary};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, params};

use crate::config::{AgentConfig, DrainOrder, SyncMode};
use crate::window::ClosedWindow;

pub mod journal;
use journal::Journal;

/// Longest payload kept in a dead letter; the rest is cut off.
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 4096;

/// Bytes charged per buffered row on top of its encoded body: the 16-byte id, seq, the extra
/// columns and the index entries, rounded up.
pub const ROW_OVERHEAD_BYTES: u64 = 64;

/// Gap reason: the buffer reached `max_buffer_bytes`.
pub const REASON_BUFFER_FULL: &str = "buffer_full";
/// Gap reason: the database was corrupt on start and moved aside with whatever it held.
pub const REASON_STORE_CORRUPT: &str = "store_corrupt";

/// Gap records sent per batch at most.
const GAPS_PER_BATCH: usize = 64;

/// Latest values sent per batch at most.
const LATEST_PER_BATCH: usize = 256;

const SCHEMA_VERSION: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite: {0}")]
    Sqlite(rusqlite::Error),
    /// The disk (or the configured `max_db_bytes`) is full. The transaction did nothing.
    #[error("the disk or the database size limit is full: {0}")]
    DiskFull(rusqlite::Error),
    #[error("the database file is corrupt: {0}")]
    Corrupt(String),
    #[error("moving the corrupt database {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox row {seq} is not a valid record: {message}")]
    CorruptRow { seq: i64, message: String },
    #[error("the latest value of stream {stream:?} is not a valid record: {message}")]
    CorruptLatest { stream: String, message: String },
    #[error("the operation was cancelled by shutdown")]
    Cancelled,
    #[error("database schema version {0} is newer than this agent understands ({SCHEMA_VERSION})")]
    SchemaTooNew(i64),
    #[error("starting the WAL checkpoint thread: {0}")]
    Thread(std::io::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::DiskFull(e),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

impl From<rusqlite::types::FromSqlError> for StoreError {
    fn from(e: rusqlite::types::FromSqlError) -> Self {
        // Our own columns hold the wrong type: the file is damaged.
        StoreError::Corrupt(format!("unexpected column value: {e}"))
    }
}

impl StoreError {
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull(_))
    }
}

/// How a [`Store`] is opened; see [`crate::config::StoreConfig`] for the meaning of each.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub agent_id: String,
    pub dead_letter_max_rows: u64,
    pub sync: SyncMode,
    pub journal: bool,
    pub max_buffer_bytes: u64,
    pub max_db_bytes: Option<u64>,
    /// Streams whose latest non-numeric value is kept at most (`window.max_streams`).
    pub max_latest_streams: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            agent_id: String::new(),
            dead_letter_max_rows: 1000,
            sync: SyncMode::Normal,
            journal: true,
            max_buffer_bytes: u64::MAX,
            max_db_bytes: None,
            max_latest_streams: 10_000,
        }
    }
}

impl StoreOptions {
    pub fn from_config(cfg: &AgentConfig) -> Self {
        StoreOptions {
            agent_id: cfg.agent_id.clone(),
            dead_letter_max_rows: cfg.store.dead_letter_max_rows,
            sync: cfg.store.sync,
            journal: cfg.store.journal,
            max_buffer_bytes: cfg.store.max_buffer_bytes,
            max_db_bytes: cfg.store.max_db_bytes,
            max_latest_streams: cfg.window.max_streams as u64,
        }
    }
}

/// An undecodable message, kept for inspection.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub received_ms: i64,
    pub topic: String,
    pub reason: String,
    pub payload: Vec<u8>,
}

impl DeadLetter {
    pub fn new(received_ms: i64, topic: &str, reason: &str, payload: &[u8]) -> Self {
        DeadLetter {
            received_ms,
            topic: topic.to_string(),
            reason: reason.to_string(),
            payload: payload[..payload.len().min(DEAD_LETTER_MAX_PAYLOAD)].to_vec(),
        }
    }
}

/// A summary waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub summary: WindowSummary,
    pub bytes: usize,
}

/// A gap record waiting to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct GapRow {
    pub gap: Gap,
    pub bytes: usize,
}

/// What to send next: gap records first, then latest values, then alerts, then plain
/// summaries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Drain {
    pub gaps: Vec<GapRow>,
    pub latest: Vec<LatestValue>,
    pub summaries: Vec<OutboxRow>,
    /// Sum of the encoded bodies.
    pub body_bytes: u64,
}

impl Drain {
    pub fn is_empty(&self) -> bool {
        self.gaps.is_empty() && self.latest.is_empty() && self.summaries.is_empty()
    }

    /// The keys of what this drain holds, for [`Store::outbox_remove`] and
    /// [`Store::outbox_reject`] once the receiver answered.
    pub fn keys(&self) -> SentKeys {
        SentKeys {
            summaries: self.summaries.iter().map(|r| r.seq).collect(),
            gaps: self.gaps.iter().map(|g| g.gap.seq).collect(),
            latest: self
                .latest
                .iter()
                .map(|l| (l.stream.clone(), l.time_ms))
                .collect(),
        }
    }
}

/// Which buffered records one request carried: outbox seqs, gap seqs, and latest values by
/// stream and time (a value replaced since it was sent stays pending).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SentKeys {
    pub summaries: Vec<i64>,
    pub gaps: Vec<u64>,
    pub latest: Vec<(String, i64)>,
}

impl SentKeys {
    pub fn len(&self) -> usize {
        self.summaries.len() + self.gaps.len() + self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`Store::commit_ingest`] did with the batch's latest values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatestOutcome {
    /// New or newer than the one kept: stored, to be sent.
    pub stored: u64,
    /// Not newer than the value kept (a redelivery, or out of order): ignored.
    pub stale: u64,
    /// A new stream past [`StoreOptions::max_latest_streams`]: refused.
    pub refused: u64,
}

/// What [`Store::commit_closed`] did beyond inserting the summaries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CloseOutcome {
    /// Summaries evicted to stay under the cap (recorded in `gap`).
    pub evicted: u64,
    /// Journal rows deleted because no window needs them any more.
    pub journal_deleted: u64,
    pub gap: Option<Gap>,
}

/// Buffered rows and bytes (outbox and gap records), as counted against the cap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BufferUsage {
    pub summaries: u64,
    pub gaps: u64,
    pub bytes: u64,
}

/// What [`Store::open_or_recover`] did with a corrupt file.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub moved_to: PathBuf,
    pub reason: String,
}

pub struct Store {
    conn: Connection,
    opts: StoreOptions,
    /// `arrival` of the next journaled reading.
    next_arrival: i64,
    /// The journal tables' row counts and time ranges.
    journal: Journal,
    /// Rows in `latest_value`, tracked without a COUNT(*) per batch.
    latest_rows: u64,
    /// The last chunk deletion stopped short: released journal rows may be left to delete
    /// (memory only: after a restart the next close releases them again).
    released_left: bool,
    /// Runs the checkpoints when [`Store::checkpoint_in_background`] was called.
    checkpointer: Option<Checkpointer>,
}

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)` every
/// `interval` until dropped (see the module docs).
struct Checkpointer {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path, interval: std::time::Duration) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::Builder::new()
                .name("edgewise-checkpoint".into())
                .spawn(move || {
                    let (lock, wake) = &*stop;
                    let Ok(mut stopped) = lock.lock() else { return };
                    loop {
                        stopped = match wake.wait_timeout(stopped, interval) {
                            Ok((guard, _)) => guard,
                            Err(_) => return,
                        };
                        if *stopped {
                            return;
                        }
                        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                        if let Err(e) = done {
                            tracing::warn!(error = %e, "background WAL checkpoint failed; retrying");
                        }
                    }
                })
                .map_err(StoreError::Thread)?
        };
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Statements kept prepared per connection: more than the store has.
const STATEMENT_CACHE: usize = 64;

/// Begins a transaction that takes the write lock at once (`BEGIN IMMEDIATE`), waiting for it
/// up to the busy timeout. A deferred transaction that reads before it writes (the journal
/// deletion selects its cutoff first) fails at once with "database is locked" when another
/// connection (the uploader's) holds the write lock then or committed in between: SQLite cannot
/// wait for the lock, or move the read snapshot forward, inside a transaction that already
/// reads, so the busy timeout does not apply. Every transaction the
/// store writes in starts here.
fn write_transaction(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

impl Store {
    /// Opens (creating if needed) the database with default options (journal on, no cap).
    pub fn open(path: &Path, dead_letter_max_rows: u64) -> Result<Store, StoreError> {
        Store::open_with(
            path,
            &StoreOptions {
                dead_letter_max_rows,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens (creating if needed) the database and brings its schema up to date. No integrity
    /// check: see [`Store::open_or_recover`].
    pub fn open_with(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays prepared (rusqlite keeps 16 by default; with
        // more, the ingest and close paths evicted and re-prepared each other's statements).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match opts.sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        // After a checkpoint, truncate the WAL back to this size so it cannot grow forever.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Freed pages are not overwritten with zeros (some builds of SQLite do by default): an
        // emptied journal table then costs a few pages of WAL instead of all of its own.
        conn.pragma_update(None, "secure_delete", "OFF")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew(version));
        }
        if version < 1 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS journal (
                     id INTEGER PRIMARY KEY,
                     stream TEXT NOT NULL,
                     time_ms INTEGER NOT NULL,
                     value REAL NOT NULL,
                     unit TEXT,
                     UNIQUE (stream, time_ms)
                 );
                 CREATE TABLE IF NOT EXISTS outbox (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     summary_id BLOB NOT NULL UNIQUE,
                     body BLOB NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS stream_state (
                     stream TEXT PRIMARY KEY,
                     closed_until_ms INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS dead_letter (
                     id INTEGER PRIMARY KEY,
                     received_ms INTEGER NOT NULL,
                     topic TEXT NOT NULL,
                     reason TEXT NOT NULL,
                     payload BLOB NOT NULL
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if version < 2 {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(&format!(
                "ALTER TABLE outbox ADD COLUMN alert INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE outbox ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE outbox ADD COLUMN stream TEXT NOT NULL DEFAULT '';
                 ALTER TABLE outbox ADD COLUMN window_start_ms INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE outbox ADD COLUMN window_end_ms INTEGER NOT NULL DEFAULT 0;
                 UPDATE outbox SET bytes = LENGTH(body) + {ROW_OVERHEAD_BYTES};
                 CREATE INDEX outbox_drain ON outbox (alert, seq);
                 CREATE TABLE gap (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     body BLOB NOT NULL,
                     bytes INTEGER NOT NULL
                 );
                 CREATE TABLE buffer_usage (
                     id INTEGER PRIMARY KEY CHECK (id = 1),
                     summaries INTEGER NOT NULL,
                     gaps INTEGER NOT NULL,
                     bytes INTEGER NOT NULL
                 );
                 INSERT INTO buffer_usage VALUES (1, (SELECT COUNT(*) FROM outbox), 0,
                     (SELECT COALESCE(SUM(bytes), 0) FROM outbox));
                 CREATE TRIGGER outbox_added AFTER INSERT ON outbox BEGIN
                     UPDATE buffer_usage SET summaries = summaries + 1, bytes = bytes + NEW.bytes;
                 END;
                 CREATE TRIGGER outbox_removed AFTER DELETE ON outbox BEGIN
                     UPDATE buffer_usage SET summaries = summaries - 1, bytes = bytes - OLD.bytes;
                 END;
                 CREATE TRIGGER gap_added AFTER INSERT ON gap BEGIN
                     UPDATE buffer_usage SET gaps = gaps + 1, bytes = bytes + NEW.bytes;
                 END;
                 CREATE TRIGGER gap_removed AFTER DELETE ON gap BEGIN
                     UPDATE buffer_usage SET gaps = gaps - 1, bytes = bytes - OLD.bytes;
                 END;
                 PRAGMA user_version = 2;"
            ))?;
            // Gap seqs must keep increasing even across a database that was moved aside and
            // recreated, so the cloud never mistakes a new gap for a re-sent old one: start
            // from the wall clock in ms (a previous file would need more gaps than elapsed
            // milliseconds to collide).
            tx.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('gap', ?1)",
                params![crate::ingest::wall_ms().max(0)],
            )?;
            tx.commit()?;
        }
        // Not schema versions of their own: an older file simply has no revisions or latest
        // values to keep.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS window_revision (
                 stream TEXT NOT NULL,
                 window_start_ms INTEGER NOT NULL,
                 revision INTEGER NOT NULL,
                 count INTEGER NOT NULL,
                 PRIMARY KEY (stream, window_start_ms)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS latest_value (
                 stream TEXT PRIMARY KEY,
                 time_ms INTEGER NOT NULL,
                 body BLOB NOT NULL,
                 pending INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS latest_value_pending ON latest_value (pending)
                 WHERE pending = 1;",
        )?;
        if version < 3 {
            // The journal keyed by time instead of stream (see the module docs); rows keep
            // their arrival order.
            conn.execute_batch(&format!(
                "BEGIN;
                 {}
                 INSERT OR IGNORE INTO journal_by_time (time_ms, stream, arrival, value, unit)
                     SELECT time_ms, stream, id, value, unit FROM journal;
                 DROP TABLE journal;
                 ALTER TABLE journal_by_time RENAME TO journal;
                 PRAGMA user_version = 3;
                 COMMIT;",
                journal::create_table_sql("journal_by_time")
            ))?;
        }
        if version < 4 {
            // The journal split by time into tables that are emptied whole (see `journal`).
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(&journal::create_tables_sql())?;
            journal::migrate_single_table(&tx)?;
            tx.execute_batch("PRAGMA user_version = 4;")?;
            tx.commit()?;
        }
        let (journal, next_arrival) = Journal::load(&conn)?;
        let latest_rows: i64 =
            conn.query_row("SELECT COUNT(*) FROM latest_value", [], |r| r.get(0))?;
        let mut store = Store {
            conn,
            opts: opts.clone(),
            next_arrival,
            journal,
            latest_rows: latest_rows.max(0) as u64,
            released_left: false,
            checkpointer: None,
        };
        store.set_max_db_bytes(opts.max_db_bytes)?;
        Ok(store)
    }

    /// Opens the database after SQLite's integrity check. A corrupt, truncated or foreign file
    /// is moved aside (`<name>.corrupt-<unix ms>`, with its `-wal`), a fresh database is created
    /// in its place, and a `store_corrupt` gap record tells the cloud that what it held is gone.
    pub fn open_or_recover(
        path: &Path,
        opts: &StoreOptions,
    ) -> Result<(Store, Option<Recovered>), StoreError> {
        let reason = match Store::open_with(path, opts).and_then(|s| s.integrity_check().map(|_| s))
        {
            Ok(store) => return Ok((store, None)),
            Err(StoreError::Corrupt(reason)) => reason,
            Err(e) => return Err(e),
        };
        let now = crate::ingest::wall_ms();
        let moved_to = move_aside(path, now)?;
        tracing::error!(
            path = %path.display(),
            moved_to = %moved_to.display(),
            %reason,
            "the agent database failed its integrity check: moved it aside and started a fresh one; \
             its buffered summaries and open windows are lost (reported to the cloud as a gap)"
        );
        let mut store = Store::open_with(path, opts)?;
        let gap = Gap {
            agent_id: opts.agent_id.clone(),
            seq: 0,
            streams: Vec::new(),
            from_ms: 0,
            to_ms: now,
            count: 0,
            reason: REASON_STORE_CORRUPT.into(),
            recorded_at_ms: now,
        };
        let tx = write_transaction(&mut store.conn)?;
        insert_gap(&tx, gap)?;
        tx.commit()?;
        Ok((store, Some(Recovered { moved_to, reason })))
    }

    /// Moves this connection's WAL checkpoints to a thread of their own, run every `interval`
    /// (see the module docs), on the same database file. Stops with the store.
    pub fn checkpoint_in_background(
        &mut self,
        interval: std::time::Duration,
    ) -> Result<(), StoreError> {
        if self.checkpointer.is_none() {
            // The file this connection opened (rusqlite says `Some("")` for in-memory and
            // temporary databases, which have no WAL to checkpoint).
            let Some(path) = self
                .conn
                .path()
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
            else {
                return Ok(());
            };
            self.checkpointer = Some(Checkpointer::start(&path, interval)?);
            self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        }
        Ok(())
    }

    /// `PRAGMA integrity_check`: `Err(Corrupt)` unless SQLite answers `ok`.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check(8)")?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        if lines.len() == 1 && lines[0] == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(lines.join("; ")))
        }
    }

    /// Caps the database file (`PRAGMA max_page_count`); `None` lifts the cap. Writes beyond
    /// it fail with [`StoreError::DiskFull`], exactly as on a full disk.
    pub fn set_max_db_bytes(&mut self, max: Option<u64>) -> Result<(), StoreError> {
        let page_size: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages = match max {
            Some(bytes) => (bytes / page_size.max(512) as u64).max(1) as i64,
            None => 0xFFFF_FFFE,
        };
        let _: i64 = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })?;
        self.opts.max_db_bytes = max;
        Ok(())
    }

    /// Persisted `closed_until_ms` of every stream.
    pub fn closed_streams(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT stream, closed_until_ms FROM stream_state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Last emitted `(stream, window start, revision, count)` of every closed window that late
    /// readings may still revise.
    pub fn window_revisions(&self) -> Result<Vec<(String, i64, u32, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT stream, window_start_ms, revision, count FROM window_revision")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// All journaled readings in arrival order: the open windows' contents, and possibly
    /// readings of closed windows not deleted yet, which the caller's windows refuse as late.
    pub fn journal_readings(&self) -> Result<Vec<Reading>, StoreError> {
        Ok(Journal::readings(&self.conn)?)
    }

    /// Journals `readings`, records `dead` and keeps the newest of `latest` per stream, in one
    /// transaction. `inserted[i]` is false where reading `i` was already journaled (a
    /// redelivery), which the caller must not count again. With the journal disabled, readings
    /// are not written and all count as new; latest values are kept either way.
    pub fn commit_ingest<'r>(
        &mut self,
        readings: impl ExactSizeIterator<Item = ReadingView<'r>>,
        dead: &[DeadLetter],
        latest: &[LatestValue],
        inserted: &mut Vec<bool>,
    ) -> Result<LatestOutcome, StoreError> {
        inserted.clear();
        let count = readings.len();
        if !self.opts.journal {
            inserted.resize(count, true);
            if dead.is_empty() && latest.is_empty() {
                return Ok(LatestOutcome::default());
            }
        }
        let journaled = self.opts.journal;
        // Updated with the transaction, kept only once it committed.
        let mut journal = self.journal.clone();
        let tx = write_transaction(&mut self.conn)?;
        {
            if journaled {
                let readings: Vec<ReadingView<'r>> = readings.collect();
                inserted.resize(count, false);
                journal.insert(&tx, &readings, self.next_arrival, inserted)?;
            }
            if !dead.is_empty() {
                let mut dl = tx.prepare_cached(
                    "INSERT INTO dead_letter (received_ms, topic, reason, payload) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for d in dead {
                    dl.execute(params![d.received_ms, d.topic, d.reason, d.payload])?;
                }
                tx.execute(
                    "DELETE FROM dead_letter WHERE id <= (SELECT MAX(id) FROM dead_letter) - ?1",
                    params![self.opts.dead_letter_max_rows as i64],
                )?;
            }
        }
        let outcome = keep_latest(&tx, latest, self.latest_rows, self.opts.max_latest_streams)?;
        tx.commit()?;
        if journaled {
            self.next_arrival += count as i64;
            self.journal = journal;
        }
        self.latest_rows += outcome.new_streams;
        Ok(outcome.counts)
    }

    /// Moves closed windows to the outbox, deletes the journal rows with `time_ms` before
    /// `journal_before_ms` (no stream needs them any more:
    /// [`crate::window::Windows::journal_horizon`]), and evicts over the cap, in one transaction.
    pub fn commit_closed(
        &mut self,
        closed: &[ClosedWindow],
        journal_before_ms: i64,
        now_ms: i64,
    ) -> Result<CloseOutcome, StoreError> {
        if closed.is_empty() {
            return Ok(CloseOutcome::default());
        }
        let tx = write_transaction(&mut self.conn)?;
        {
            let mut out = tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox
                     (summary_id, body, alert, bytes, stream, window_start_ms, window_end_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut keep_revision = tx.prepare_cached(
                "INSERT INTO window_revision (stream, window_start_ms, revision, count)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (stream, window_start_ms) DO UPDATE SET
                     revision = MAX(revision, excluded.revision), count = MAX(count, excluded.count)",
            )?;
            let mut final_revisions = tx.prepare_cached(
                "DELETE FROM window_revision WHERE stream = ?1 AND window_start_ms < ?2",
            )?;

            let mut state = tx.prepare_cached(
                "INSERT INTO stream_state (stream, closed_until_ms) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET closed_until_ms =
                     MAX(closed_until_ms, excluded.closed_until_ms)",
            )?;
            let mut body = Vec::with_capacity(256);
            for c in closed {
                let s = &c.summary;
                body.clear();
                // Encoding into a Vec cannot fail: the writer is infallible.
                let _ = minicbor::encode(s, &mut body);
                let bytes = body.len() as u64 + ROW_OVERHEAD_BYTES;
                out.execute(params![
                    &s.id().0[..],
                    body,
                    s.is_alert(),
                    bytes as i64,
                    s.stream,
                    s.window_start_ms,
                    s.window_end_ms
                ])?;
                state.execute(params![s.stream, c.closed_until_ms])?;
                if c.keep_revision {
                    keep_revision.execute(params![
                        s.stream,
                        s.window_start_ms,
                        s.revision,
                        i64::try_from(s.count).unwrap_or(i64::MAX)
                    ])?;
                    final_revisions.execute(params![s.stream, c.release_ms])?;
                }
            }
        }
        let mut journal = self.journal.clone();
        let (journal_deleted, released_left) = if self.opts.journal {
            journal.release(&tx, journal_before_ms)?
        } else {
            (0, false)
        };
        let outcome = enforce_cap(&tx, &self.opts, now_ms)?;
        tx.commit()?;
        self.journal = journal;
        self.released_left = released_left;
        Ok(CloseOutcome {
            journal_deleted,
            ..outcome
        })
    }

    /// Whether released journal rows may be left to delete (see
    /// [`Store::delete_released_journal`]).
    pub fn released_journal_left(&self) -> bool {
        self.released_left
    }

    /// Deletes the next chunk of the journal rows before `journal_before_ms`, which must be the
    /// current [`crate::window::Windows::journal_horizon`] (not the one of the last close: a
    /// stream that became active since may need older rows); returns how many.
    pub fn delete_released_journal(&mut self, journal_before_ms: i64) -> Result<u64, StoreError> {
        if !self.released_left {
            return Ok(0);
        }
        let mut journal = self.journal.clone();
        let tx = write_transaction(&mut self.conn)?;
        let (deleted, left) = journal.release(&tx, journal_before_ms)?;
        tx.commit()?;
        self.journal = journal;
        self.released_left = left;
        Ok(deleted)
    }

    /// The next batch to send, at most `max_rows` summaries and about `max_bytes` of bodies
    /// (always at least one record if any waits): unsent gap records first, then alerts, then
    /// plain summaries, each in `order` of their seq.
    pub fn outbox_drain(
        &self,
        order: DrainOrder,
        max_rows: usize,
        max_bytes: u64,
    ) -> Result<Drain, StoreError> {
        let mut drain = Drain::default();
        let fits = |d: &Drain, len: usize| {
            d.is_empty() || d.body_bytes.saturating_add(len as u64) <= max_bytes
        };
        {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT seq, body FROM gap ORDER BY seq LIMIT ?1")?;
            let mut rows = stmt.query(params![GAPS_PER_BATCH as i64])?;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let body = row.get_ref(1)?.as_blob()?;
                if !fits(&drain, body.len()) {
                    return Ok(drain);
                }
                let gap = minicbor::decode::<Gap>(body).map_err(|e| StoreError::CorruptRow {
                    seq,
                    message: e.to_string(),
                })?;
                drain.body_bytes += body.len() as u64;
                drain.gaps.push(GapRow {
                    gap,
                    bytes: body.len(),
                });
            }
        }
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT stream, body FROM latest_value WHERE pending = 1 LIMIT ?1",
            )?;
            let mut rows = stmt.query(params![LATEST_PER_BATCH as i64])?;
            while let Some(row) = rows.next()? {
                let body = row.get_ref(1)?.as_blob()?;
                if !fits(&drain, body.len()) {
                    return Ok(drain);
                }
                let value = minicbor::decode::<LatestValue>(body).map_err(|e| {
                    StoreError::CorruptLatest {
                        stream: row.get(0).unwrap_or_default(),
                        message: e.to_string(),
                    }
                })?;
                drain.body_bytes += body.len() as u64;
                drain.latest.push(value);
            }
        }
        let sql = match order {
            DrainOrder::OldestFirst => {
                "SELECT seq, body FROM outbox WHERE alert = ?1 ORDER BY seq ASC LIMIT ?2"
            }
            DrainOrder::NewestFirst => {
                "SELECT seq, body FROM outbox WHERE alert = ?1 ORDER BY seq DESC LIMIT ?2"
            }
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        for alert in [true, false] {
            let room = max_rows.saturating_sub(drain.summaries.len());
            if room == 0 {
                break;
            }
            let mut rows = stmt.query(params![alert, room as i64])?;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let body = row.get_ref(1)?.as_blob()?;
                if !fits(&drain, body.len()) {
                    return Ok(drain);
                }
                let summary = minicbor::decode::<WindowSummary>(body).map_err(|e| {
                    StoreError::CorruptRow {
                        seq,
                        message: e.to_string(),
                    }
                })?;
                drain.body_bytes += body.len() as u64;
                drain.summaries.push(OutboxRow {
                    seq,
                    summary,
                    bytes: body.len(),
                });
            }
        }
        Ok(drain)
    }

    /// The oldest `max` outbox summaries, in order (alerts are not put first).
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM outbox ORDER BY seq LIMIT ?1")?;
        let rows = stmt.query_map(params![max as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row?;
            let summary =
                minicbor::decode::<WindowSummary>(&body).map_err(|e| StoreError::CorruptRow {
                    seq,
                    message: e.to_string(),
                })?;
            out.push(OutboxRow {
                seq,
                summary,
                bytes: body.len(),
            });
        }
        Ok(out)
    }

    /// Deletes the sent summaries (by outbox seq) and gap records (by gap seq) and marks the
    /// sent latest values as delivered, after the cloud's ack, in one transaction. Returns how
    /// many rows went (latest values not counted).
    pub fn outbox_remove(&mut self, sent: &SentKeys) -> Result<usize, StoreError> {
        let tx = write_transaction(&mut self.conn)?;
        let mut n = 0;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in &sent.summaries {
                n += del.execute(params![seq])?;
            }
            let mut del = tx.prepare_cached("DELETE FROM gap WHERE seq = ?1")?;
            for seq in &sent.gaps {
                n += del.execute(params![*seq as i64])?;
            }
            mark_latest_sent(&tx, &sent.latest)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Moves records the receiver refused for good into the dead-letter table, so they stop
    /// blocking the queue but are kept (and counted) rather than lost silently.
    pub fn outbox_reject(
        &mut self,
        sent: &SentKeys,
        reason: &str,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let (summary_seqs, gap_seqs) = (&sent.summaries, &sent.gaps);
        let tx = write_transaction(&mut self.conn)?;
        let mut n = 0;
        {
            let mut keep = tx.prepare_cached(
                "INSERT INTO dead_letter (received_ms, topic, reason, payload)
                 SELECT ?2, 'outbox', ?3, body FROM outbox WHERE seq = ?1",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in summary_seqs {
                keep.execute(params![seq, now_ms, reason])?;
                n += del.execute(params![seq])?;
            }
            let mut keep = tx.prepare_cached(
                "INSERT INTO dead_letter (received_ms, topic, reason, payload)
                 SELECT ?2, 'gap', ?3, body FROM gap WHERE seq = ?1",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM gap WHERE seq = ?1")?;
            for seq in gap_seqs {
                keep.execute(params![*seq as i64, now_ms, reason])?;
                n += del.execute(params![*seq as i64])?;
            }
            let mut keep = tx.prepare_cached(
                "INSERT INTO dead_letter (received_ms, topic, reason, payload)
                 SELECT ?3, 'latest', ?4, body FROM latest_value
                 WHERE stream = ?1 AND time_ms = ?2 AND pending = 1",
            )?;
            for (stream, time_ms) in &sent.latest {
                n += keep.execute(params![stream, time_ms, now_ms, reason])?;
            }
            mark_latest_sent(&tx, &sent.latest)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Latest values the cloud does not have yet, and all kept, as `(pending, total)` (counted:
    /// another connection may have changed them; the table is bounded).
    pub fn latest_counts(&self) -> Result<(u64, u64), StoreError> {
        let (pending, total): (i64, i64) = self.conn.query_row(
            "SELECT COALESCE(SUM(pending), 0), COUNT(*) FROM latest_value",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((pending.max(0) as u64, total.max(0) as u64))
    }

    /// Rows and bytes buffered (outbox and gap records), O(1).
    pub fn buffer_usage(&self) -> Result<BufferUsage, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT summaries, gaps, bytes FROM buffer_usage WHERE id = 1")?
            .query_row([], |r| {
                Ok(BufferUsage {
                    summaries: r.get::<_, i64>(0)?.max(0) as u64,
                    gaps: r.get::<_, i64>(1)?.max(0) as u64,
                    bytes: r.get::<_, i64>(2)?.max(0) as u64,
                })
            })?)
    }

    /// `(summaries, bytes)` buffered for the cloud (bytes include gap records).
    pub fn outbox_size(&self) -> Result<(u64, u64), StoreError> {
        let u = self.buffer_usage()?;
        Ok((u.summaries, u.bytes))
    }

    /// Gap records not yet acknowledged by the cloud, oldest first.
    pub fn pending_gaps(&self) -> Result<Vec<Gap>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, body FROM gap ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row?;
            out.push(
                minicbor::decode::<Gap>(&body).map_err(|e| StoreError::CorruptRow {
                    seq,
                    message: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// Rows in the journal (readings of open windows, and of closed ones not deleted yet), as
    /// the store counts them in memory: no query.
    pub fn journal_rows(&self) -> u64 {
        self.journal.rows()
    }

    /// [`Store::journal_rows`], counted by SQLite (tests, benchmarks).
    pub fn journal_len(&self) -> Result<u64, StoreError> {
        Ok(Journal::count(&self.conn)?)
    }

    /// The newest `limit` dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT received_ms, topic, reason, payload FROM dead_letter ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(DeadLetter {
                received_ms: r.get(0)?,
                topic: r.get(1)?,
                reason: r.get(2)?,
                payload: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Cheap liveness probe for `/healthz`.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .optional()?;
        Ok(())
    }
}

/// Evicts (plain before alerts, lowest seq first) until the buffer is at 95% of the cap, and
/// records one gap for what went. Runs inside the caller's transaction.
fn enforce_cap(
    tx: &Transaction<'_>,
    opts: &StoreOptions,
    now_ms: i64,
) -> Result<CloseOutcome, StoreError> {
    let cap = opts.max_buffer_bytes;
    let used: i64 = tx
        .prepare_cached("SELECT bytes FROM buffer_usage WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    let used = used.max(0) as u64;
    if used <= cap {
        return Ok(CloseOutcome::default());
    }
    let target = cap / 20 * 19;
    // Room for the gap record itself: its fixed fields plus up to MAX_STREAMS names.
    let mut need = used - target + ROW_OVERHEAD_BYTES + 128;
    let mut streams = BTreeSet::new();
    let (mut count, mut from_ms, mut to_ms) = (0u64, i64::MAX, i64::MIN);
    for alert in [false, true] {
        let mut last_seq = None;
        {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, bytes, stream, window_start_ms, window_end_ms FROM outbox
                 WHERE alert = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query(params![alert])?;
            while need > 0 {
                let Some(row) = rows.next()? else { break };
                let bytes = row.get::<_, i64>(1)?.max(0) as u64;
                let stream = row.get_ref(2)?.as_str()?;
                if !stream.is_empty()
                    && streams.len() < Gap::MAX_STREAMS
                    && !streams.contains(stream)
                {
                    need = need.saturating_add(stream.len() as u64 + 2);
                    streams.insert(stream.to_string());
                }
                from_ms = from_ms.min(row.get(3)?);
                to_ms = to_ms.max(row.get(4)?);
                count += 1;
                need = need.saturating_sub(bytes);
                last_seq = Some(row.get::<_, i64>(0)?);
            }
        }
        if let Some(last) = last_seq {
            tx.execute(
                "DELETE FROM outbox WHERE alert = ?1 AND seq <= ?2",
                params![alert, last],
            )?;
        }
        if need == 0 {
            break;
        }
    }
    if count == 0 {
        // Only gap records are left: they are never evicted.
        return Ok(CloseOutcome::default());
    }
    let gap = Gap {
        agent_id: opts.agent_id.clone(),
        seq: 0,
        streams: streams.into_iter().collect(),
        from_ms,
        to_ms,
        count,
        reason: REASON_BUFFER_FULL.into(),
        recorded_at_ms: now_ms,
    };
    let gap = insert_gap(tx, gap)?;
    tracing::warn!(
        evicted = count,
        from_ms,
        to_ms,
        max_buffer_bytes = cap,
        "buffer full: evicted summaries, recorded a gap for the cloud"
    );
    Ok(CloseOutcome {
        evicted: count,
        gap: Some(gap),
        ..CloseOutcome::default()
    })
}

/// Inserts `gap` with the next gap seq (which it returns filled in).
fn insert_gap(tx: &Transaction<'_>, mut gap: Gap) -> Result<Gap, StoreError> {
    let next: i64 = tx.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'gap'),
                         (SELECT MAX(seq) FROM gap), 0) + 1",
        [],
        |r| r.get(0),
    )?;
    gap.seq = next.max(1) as u64;
    let body = minicbor::to_vec(&gap).unwrap_or_default();
    tx.execute(
        "INSERT INTO gap (seq, body, bytes) VALUES (?1, ?2, ?3)",
        params![next, body, body.len() as i64 + ROW_OVERHEAD_BYTES as i64],
    )?;
    Ok(gap)
}

/// What [`keep_latest`] did, and how many rows it added.
struct KeptLatest {
    counts: LatestOutcome,
    new_streams: u64,
}

/// Keeps each value of `latest` that is newer than the one kept for its stream (pending until
/// the cloud has it). A stream not kept yet is added while fewer than `max_rows` are kept
/// (`rows` now), and refused after that.
fn keep_latest(
    tx: &Transaction<'_>,
    latest: &[LatestValue],
    rows: u64,
    max_rows: u64,
) -> Result<KeptLatest, StoreError> {
    let mut kept = KeptLatest {
        counts: LatestOutcome::default(),
        new_streams: 0,
    };
    if latest.is_empty() {
        return Ok(kept);
    }
    let mut current = tx.prepare_cached("SELECT time_ms FROM latest_value WHERE stream = ?1")?;
    let mut upsert = tx.prepare_cached(
        "INSERT INTO latest_value (stream, time_ms, body, pending) VALUES (?1, ?2, ?3, 1)
         ON CONFLICT (stream) DO UPDATE
             SET time_ms = excluded.time_ms, body = excluded.body, pending = 1",
    )?;
    for v in latest {
        let kept_time: Option<i64> = current
            .query_row(params![v.stream], |r| r.get(0))
            .optional()?;
        match kept_time {
            Some(t) if v.time_ms <= t => {
                kept.counts.stale += 1;
                continue;
            }
            None if rows + kept.new_streams >= max_rows => {
                kept.counts.refused += 1;
                continue;
            }
            None => kept.new_streams += 1,
            Some(_) => {}
        }
        // Encoding into a Vec cannot fail: the writer is infallible.
        let body = minicbor::to_vec(v).unwrap_or_default();
        upsert.execute(params![v.stream, v.time_ms, body])?;
        kept.counts.stored += 1;
    }
    Ok(kept)
}

/// Marks the latest values the cloud acknowledged (or refused) as no longer pending, unless a
/// newer value replaced one since it was sent.
fn mark_latest_sent(tx: &Transaction<'_>, sent: &[(String, i64)]) -> Result<(), StoreError> {
    let mut done = tx
        .prepare_cached("UPDATE latest_value SET pending = 0 WHERE stream = ?1 AND time_ms = ?2")?;
    for (stream, time_ms) in sent {
        done.execute(params![stream, time_ms])?;
    }
    Ok(())
}

/// Renames `path` (and its `-wal`; the `-shm` index is deleted) to `<path>.corrupt-<now_ms>`.
fn move_aside(path: &Path, now_ms: i64) -> Result<PathBuf, StoreError> {
    let with_suffix = |suffix: &str| {
        let mut s = path.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let moved_to = with_suffix(&format!(".corrupt-{now_ms}"));
    std::fs::rename(path, &moved_to).map_err(|source| StoreError::MoveAside {
        path: path.to_owned(),
        source,
    })?;
    let wal = with_suffix("-wal");
    if wal.exists() {
        let mut target = moved_to.as_os_str().to_owned();
        target.push("-wal");
        std::fs::rename(&wal, PathBuf::from(target)).map_err(|source| StoreError::MoveAside {
            path: wal.clone(),
            source,
        })?;
    }
    let shm = with_suffix("-shm");
    if shm.exists() {
        std::fs::remove_file(&shm).map_err(|source| StoreError::MoveAside { path: shm, source })?;
    }
    Ok(moved_to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Admission, WindowSpec, Windows};
    use edgewise_protocol::Score;

    fn reading(stream: &str, time_ms: i64, value: f64) -> Reading {
        Reading {
            stream: stream.into(),
            time_ms,
            value,
            unit: None,
        }
    }

    fn views(rs: &[Reading]) -> impl ExactSizeIterator<Item = ReadingView<'_>> {
        rs.iter().map(Reading::as_view)
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db"), 3).unwrap();
        (dir, store)
    }

    /// Offset of every test window, so all encode to the same size (4-byte CBOR integers).
    const T: i64 = 1_000_000;

    /// A closed window of `stream` starting at `T + start` (10 ms windows), optionally an alert.
    fn closed(stream: &str, start: i64, alert: bool) -> ClosedWindow {
        let start = T + start;
        ClosedWindow {
            summary: WindowSummary {
                agent_id: "gw".into(),
                stream: stream.into(),
                window_start_ms: start,
                window_end_ms: start + 10,
                revision: 0,
                count: 1,
                min: 1.0,
                max: 1.0,
                mean: 1.0,
                stddev: 0.0,
                first_value: 1.0,
                first_time_ms: start,
                last_value: 1.0,
                last_time_ms: start,
                unit: None,
                score: Some(Score {
                    value: if alert { 0.9 } else { 0.1 },
                    alert,
                    model: "m@1".into(),
                }),
                quantiles: None,
            },
            closed_until_ms: start + 10,
            release_ms: start + 10,
            keep_revision: false,
        }
    }

    fn row_bytes(c: &ClosedWindow) -> u64 {
        minicbor::to_vec(&c.summary).unwrap().len() as u64 + ROW_OVERHEAD_BYTES
    }

    fn starts(rows: &[OutboxRow]) -> Vec<(i64, bool)> {
        rows.iter()
            .map(|r| (r.summary.window_start_ms - T, r.summary.is_alert()))
            .collect()
    }

    #[test]
    fn redelivered_readings_are_journaled_once() {
        let (_dir, mut store) = open();
        let mut ins = Vec::new();
        let rs = [reading("s", 1, 1.0), reading("s", 2, 2.0)];
        store.commit_ingest(views(&rs), &[], &[], &mut ins).unwrap();
        assert_eq!(ins, vec![true, true]);
        store
            .commit_ingest(
                views(&[reading("s", 2, 2.0), reading("s", 3, 3.0)]),
                &[],
                &[],
                &mut ins,
            )
            .unwrap();
        assert_eq!(ins, vec![false, true]);
        assert_eq!(store.journal_len().unwrap(), 3);
    }

    #[test]
    fn a_version_2_journal_is_migrated_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE journal (id INTEGER PRIMARY KEY, stream TEXT NOT NULL,
                     time_ms INTEGER NOT NULL, value REAL NOT NULL, unit TEXT,
                     UNIQUE (stream, time_ms));
                 INSERT INTO journal (stream, time_ms, value, unit) VALUES
                     ('s', 20000, 2.0, 'Cel'), ('t', 5, 3.0, NULL), ('s', 10000, 1.0, 'Cel');
                 CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     summary_id BLOB NOT NULL UNIQUE, body BLOB NOT NULL);
                 CREATE TABLE stream_state (stream TEXT PRIMARY KEY,
                     closed_until_ms INTEGER NOT NULL);
                 CREATE TABLE dead_letter (id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL,
                     topic TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut store = Store::open(&path, 10).unwrap();
        let mut first = reading("s", 20_000, 2.0);
        first.unit = Some("Cel".into());
        let mut third = reading("s", 10_000, 1.0);
        third.unit = Some("Cel".into());
        let second = reading("t", 5, 3.0);
        // In arrival order, although each is in another of the journal's tables now.
        assert_eq!(
            store.journal_readings().unwrap(),
            vec![first, second, third]
        );
        let old_table: i64 = store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'journal'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_table, 0);
        // New readings come after the migrated ones, and redeliveries are still refused.
        let mut ins = Vec::new();
        store
            .commit_ingest(
                views(&[reading("s", 10_000, 1.0), reading("u", 1, 4.0)]),
                &[],
                &[],
                &mut ins,
            )
            .unwrap();
        assert_eq!(ins, vec![false, true]);
        assert_eq!(store.journal_readings().unwrap().len(), 4);
        assert_eq!(store.journal_readings().unwrap()[3].stream, "u");
    }

    #[test]
    fn without_the_journal_readings_are_not_written_but_dead_letters_and_latest_values_are() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            journal: false,
            ..StoreOptions::default()
        };
        let mut store = Store::open_with(&dir.path().join("a.db"), &opts).unwrap();
        let mut ins = Vec::new();
        let d = DeadLetter::new(1, "t", "not_json", b"x");
        store
            .commit_ingest(
                views(&[reading("s", 1, 1.0), reading("s", 1, 1.0)]),
                &[d],
                &[],
                &mut ins,
            )
            .unwrap();
        assert_eq!(ins, vec![true, true]);
        assert_eq!(store.journal_len().unwrap(), 0);
        assert_eq!(store.dead_letters(10).unwrap().len(), 1);
        let outcome = store
            .commit_ingest(views(&[]), &[], &[text("door", 1, "open")], &mut ins)
            .unwrap();
        assert_eq!(outcome.stored, 1);
        assert_eq!(store.latest_counts().unwrap(), (1, 1));
    }

    #[test]
    fn closing_moves_readings_to_the_outbox_atomically_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let spec = WindowSpec::tumbling(10, 0, 1000);
        {
            let mut store = Store::open(&path, 10).unwrap();
            let mut w = Windows::new("gw", spec);
            let rs = [
                reading("s", 1, 1.0),
                reading("s", 5, 3.0),
                reading("s", 12, 9.0),
            ];
            let mut ins = Vec::new();
            store.commit_ingest(views(&rs), &[], &[], &mut ins).unwrap();
            for r in &rs {
                w.add(r.as_view(), 0);
            }
            let closed = w.advance(0, usize::MAX);
            assert_eq!(closed.len(), 1);
            store
                .commit_closed(&closed, w.journal_horizon(), 0)
                .unwrap();
            // Closing the same window again (a retried transaction) does not duplicate it.
            store
                .commit_closed(&closed, w.journal_horizon(), 0)
                .unwrap();
        }
        let store = Store::open(&path, 10).unwrap();
        // The closed window's readings share their journal table with the open one's, so they
        // stay until it goes (see `journal`), released: the rebuilt windows below refuse them.
        let journal = store.journal_readings().unwrap();
        assert_eq!(journal.len(), 3);
        assert_eq!(journal.last(), Some(&reading("s", 12, 9.0)));
        // closed_until is the watermark (max event time 12 - lateness 0).
        assert_eq!(store.closed_streams().unwrap(), vec![("s".to_string(), 12)]);
        let rows = store.outbox_peek(10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary.count, 2);
        assert_eq!(rows[0].summary.mean, 2.0);
        assert_eq!(store.buffer_usage().unwrap().summaries, 1);
        // A rebuilt window state refuses the closed window.
        let mut w = Windows::new("gw", spec);
        for (s, c) in store.closed_streams().unwrap() {
            w.restore_closed(&s, c);
        }
        assert_eq!(w.admit(reading("s", 9, 0.0).as_view()), Admission::Late);
        for r in &journal[..2] {
            assert_eq!(w.admit(r.as_view()), Admission::Late);
        }
        assert_eq!(w.admit(journal[2].as_view()), Admission::Open);
    }

    /// One turn of the journal's ring of tables: readings this far apart share a table.
    const TURN_MS: i64 = journal::SLICE_MS * journal::TABLES as i64;

    #[test]
    fn released_rows_go_a_whole_table_at_a_time_and_a_table_partly_released_waits() {
        let (_dir, mut store) = open();
        // Three slices of time (tables 0, 1, 2), three streams a millisecond.
        let rs: Vec<Reading> = (0..3 * journal::SLICE_MS)
            .flat_map(|t| (0..3).map(move |s| reading(&format!("s{s}"), t, 1.0)))
            .collect();
        let mut ins = Vec::new();
        store.commit_ingest(views(&rs), &[], &[], &mut ins).unwrap();
        let total = rs.len() as u64;

        // The horizon inside table 1: table 0 goes, table 1's released rows wait for the rest.
        let horizon = journal::SLICE_MS + 10;
        let outcome = store
            .commit_closed(&[closed("s0", 0, false)], horizon, 0)
            .unwrap();
        assert_eq!(outcome.journal_deleted, total / 3);
        assert!(!store.released_journal_left());
        let left = store.journal_readings().unwrap();
        assert_eq!(left.len() as u64, total * 2 / 3);
        assert_eq!(left[0].time_ms, journal::SLICE_MS);

        // Past both: they go in one step.
        let outcome = store
            .commit_closed(&[closed("s0", 10, false)], 3 * journal::SLICE_MS, 0)
            .unwrap();
        assert_eq!(outcome.journal_deleted, total * 2 / 3);
        assert_eq!(store.journal_len().unwrap(), 0);
        assert!(!store.released_journal_left());
        // The emptied tables take rows again (and still refuse a copy).
        store
            .commit_ingest(views(&rs[..3]), &[], &[], &mut ins)
            .unwrap();
        store
            .commit_ingest(views(&rs[..3]), &[], &[], &mut ins)
            .unwrap();
        assert_eq!(ins, vec![false; 3]);
        assert_eq!(store.journal_len().unwrap(), 3);
    }

    /// Journals `n` readings in table 0 (spread over 4 s, plus a chunk's worth in one
    /// millisecond), then two a turn of the ring later, in the same table; returns both.
    fn two_turns(store: &mut Store, n: usize) -> (Vec<Reading>, Vec<Reading>) {
        let chunk = journal::DELETE_CHUNK as usize;
        let mut old: Vec<Reading> = (0..n)
            .map(|i| reading(&format!("s{i}"), (i * 4_000 / n) as i64, 1.0))
            .collect();
        old.extend((0..chunk + 5).map(|i| reading(&format!("c{i}"), 4_500, 2.0)));
        let later = vec![reading("s0", TURN_MS, 3.0), reading("s1", TURN_MS + 1, 4.0)];
        let mut ins = Vec::new();
        for rs in [&old, &later] {
            store.commit_ingest(views(rs), &[], &[], &mut ins).unwrap();
        }
        (old, later)
    }

    #[test]
    fn a_table_holding_two_turns_of_the_ring_is_cleaned_a_chunk_at_a_time() {
        let (_dir, mut store) = open();
        let chunk = journal::DELETE_CHUNK as usize;
        let (old, later) = two_turns(&mut store, chunk * 5 / 2);
        assert_eq!(store.journal_len().unwrap(), (old.len() + 2) as u64);

        let first = store
            .commit_closed(&[closed("s0", 0, false)], TURN_MS, 0)
            .unwrap()
            .journal_deleted;
        assert!(first > 0 && first <= chunk as u64, "{first}");
        let mut deleted = first;
        let mut calls = 0;
        loop {
            let n = store.delete_released_journal(TURN_MS).unwrap();
            if n == 0 {
                break;
            }
            // A chunk, or the crowded millisecond in one go.
            assert!(n <= chunk as u64 + 5, "{n}");
            deleted += n;
            calls += 1;
        }
        assert!(calls >= 2, "{calls} calls");
        assert_eq!(deleted, old.len() as u64);
        assert_eq!(store.journal_readings().unwrap(), later);
        // Nothing left: no work, and a later close releases nothing more.
        assert!(!store.released_journal_left());
        assert_eq!(store.delete_released_journal(TURN_MS).unwrap(), 0);
    }

    #[test]
    fn reopening_finds_the_tables_rows_and_releases_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let (old, _) = two_turns(&mut Store::open(&path, 10).unwrap(), 100);
        let mut store = Store::open(&path, 10).unwrap();
        // Arrival numbers go on after the rows already there.
        let mut ins = Vec::new();
        let next = [reading("s2", TURN_MS + 2, 5.0)];
        store
            .commit_ingest(views(&next), &[], &[], &mut ins)
            .unwrap();
        assert_eq!(store.journal_readings().unwrap().last(), next.last());
        let mut deleted = store
            .commit_closed(&[closed("s0", 0, false)], TURN_MS, 0)
            .unwrap()
            .journal_deleted;
        while store.released_journal_left() {
            deleted += store.delete_released_journal(TURN_MS).unwrap();
        }
        assert_eq!(deleted, old.len() as u64);
        assert_eq!(store.journal_len().unwrap(), 3);
    }

    /// The uploader's connection writes (deletes sent rows) while the ingest thread deletes
    /// released journal rows: the deletion waits for the other commit instead of failing with
    /// "database is locked" (it did, at once, while its transaction was deferred: it reads the
    /// cutoff before it deletes).
    #[test]
    fn deleting_released_rows_waits_for_another_connections_commit() {
        let (dir, mut store) = open();
        two_turns(&mut store, journal::DELETE_CHUNK as usize * 3);
        store
            .commit_closed(&[closed("s0", 0, false)], TURN_MS, 0)
            .unwrap();
        assert!(store.released_journal_left());

        let other = Connection::open(dir.path().join("agent.db")).unwrap();
        other
            .execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO dead_letter (received_ms, topic, reason, payload)
                     VALUES (0, 't', 'r', x'00');",
            )
            .unwrap();
        let (locked, release) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            locked.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            other.execute_batch("COMMIT").unwrap();
        });
        release.recv().unwrap();
        let started = std::time::Instant::now();
        let deleted = store.delete_released_journal(TURN_MS);
        writer.join().unwrap();
        assert!(deleted.is_ok(), "{deleted:?}");
        assert!(deleted.unwrap() > 0);
        // It did wait for the lock (and did not run before the other commit).
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    }

    #[test]
    fn a_later_chunk_keeps_the_readings_of_a_stream_that_became_active_since_the_close() {
        let (_dir, mut store) = open();
        two_turns(&mut store, journal::DELETE_CHUNK as usize * 2);
        let mut ins = Vec::new();
        store
            .commit_closed(&[closed("s", 0, false)], TURN_MS, 0)
            .unwrap();
        assert!(store.released_journal_left());
        // A new stream's readings from before that horizon: its open window needs them, so the
        // horizon is now below them.
        let late = [reading("new", 500, 2.0), reading("new", 600, 3.0)];
        store
            .commit_ingest(views(&late), &[], &[], &mut ins)
            .unwrap();
        while store.delete_released_journal(500).unwrap() > 0 {}
        let kept: Vec<Reading> = store
            .journal_readings()
            .unwrap()
            .into_iter()
            .filter(|r| r.stream == "new")
            .collect();
        assert_eq!(kept, late.to_vec());
        // Only rows before 500 went.
        assert!(
            store
                .journal_readings()
                .unwrap()
                .iter()
                .all(|r| r.time_ms >= 500)
        );
    }

    #[test]
    fn outbox_rows_go_only_when_removed_or_rejected() {
        let (_dir, mut store) = open();
        let all: Vec<_> = [0, 10, 20].iter().map(|&t| closed("s", t, false)).collect();
        store.commit_closed(&all, i64::MAX, 0).unwrap();
        let rows = store.outbox_peek(2).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(store.outbox_size().unwrap().0, 3);
        assert_eq!(
            store
                .outbox_remove(&SentKeys {
                    summaries: vec![rows[0].seq, rows[1].seq],
                    ..SentKeys::default()
                })
                .unwrap(),
            2
        );
        let rest = store.outbox_peek(10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].summary.window_start_ms, T + 20);
        assert_eq!(
            store
                .outbox_reject(
                    &SentKeys {
                        summaries: vec![rest[0].seq],
                        ..SentKeys::default()
                    },
                    "400: bad",
                    5
                )
                .unwrap(),
            1
        );
        assert_eq!(store.outbox_size().unwrap(), (0, 0));
        assert_eq!(store.dead_letters(10).unwrap()[0].reason, "400: bad");
    }

    #[test]
    fn buffer_usage_counts_exact_bytes_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut writer = Store::open(&path, 10).unwrap();
        let mut uploader = Store::open(&path, 10).unwrap();
        let all: Vec<_> = (0..5).map(|i| closed("s", i * 10, i == 2)).collect();
        writer.commit_closed(&all, i64::MAX, 0).unwrap();
        let total: u64 = all.iter().map(row_bytes).sum();
        assert_eq!(
            uploader.buffer_usage().unwrap(),
            BufferUsage {
                summaries: 5,
                gaps: 0,
                bytes: total
            }
        );
        let first = uploader.outbox_peek(1).unwrap()[0].seq;
        uploader
            .outbox_remove(&SentKeys {
                summaries: vec![first],
                ..SentKeys::default()
            })
            .unwrap();
        assert_eq!(
            writer.buffer_usage().unwrap().bytes,
            total - row_bytes(&all[0])
        );
    }

    #[test]
    fn over_the_cap_plain_summaries_go_oldest_first_then_alerts_with_a_gap_record() {
        let dir = tempfile::tempdir().unwrap();
        let one = row_bytes(&closed("s", 0, false));
        // Room for exactly 10 rows; the 95% target keeps 9 (minus the gap record's share).
        let opts = StoreOptions {
            agent_id: "gw".into(),
            max_buffer_bytes: one * 10,
            ..StoreOptions::default()
        };
        let mut store = Store::open_with(&dir.path().join("a.db"), &opts).unwrap();
        // 3 alerts among 10 rows: at the cap, nothing is evicted yet.
        let first: Vec<_> = (0..10)
            .map(|i| {
                closed(
                    if i % 2 == 0 { "a" } else { "b" },
                    i * 10,
                    [1, 4, 7].contains(&i),
                )
            })
            .collect();
        let out = store.commit_closed(&first, i64::MAX, 5).unwrap();
        assert_eq!(out.evicted, 0);
        assert_eq!(store.buffer_usage().unwrap().bytes, one * 10);

        // 5 more plain rows: everything plain that is older goes first, alerts stay.
        let more: Vec<_> = (10..15).map(|i| closed("c", i * 10, false)).collect();
        let out = store.commit_closed(&more, i64::MAX, 77).unwrap();
        let usage = store.buffer_usage().unwrap();
        assert!(usage.bytes <= opts.max_buffer_bytes, "{usage:?}");
        let kept = starts(&store.outbox_peek(100).unwrap());
        let gap = out.gap.clone().unwrap();
        assert_eq!(out.evicted as usize + kept.len(), 15);
        assert_eq!(usage.summaries as usize, kept.len());
        assert_eq!(usage.gaps, 1);
        // The three alerts survive; the evicted are exactly the oldest plain windows.
        for a in [10, 40, 70] {
            assert!(kept.contains(&(a, true)), "{kept:?}");
        }
        let plain_kept: Vec<i64> = kept.iter().filter(|k| !k.1).map(|k| k.0).collect();
        let all_plain: Vec<i64> = (0..15)
            .filter(|i| ![1, 4, 7].contains(i))
            .map(|i| i * 10)
            .collect();
        assert_eq!(plain_kept, all_plain[all_plain.len() - plain_kept.len()..]);
        assert_eq!(gap.count, out.evicted);
        assert_eq!(gap.reason, REASON_BUFFER_FULL);
        assert_eq!(gap.from_ms, T);
        assert_eq!(gap.to_ms, T + all_plain[out.evicted as usize - 1] + 10);
        assert_eq!(gap.recorded_at_ms, 77);
        assert_eq!(gap.agent_id, "gw");
        assert!(gap.streams.contains(&"a".to_string()));
        assert_eq!(store.pending_gaps().unwrap(), vec![gap.clone()]);

        // A flood of alerts: plain ones are all gone first, then the oldest alerts.
        let alerts: Vec<_> = (20..40).map(|i| closed("d", i * 10, true)).collect();
        let out = store.commit_closed(&alerts, i64::MAX, 99).unwrap();
        let kept = starts(&store.outbox_peek(100).unwrap());
        assert!(kept.iter().all(|k| k.1), "{kept:?}");
        assert_eq!(kept.last().unwrap().0, 390);
        assert!(store.buffer_usage().unwrap().bytes <= opts.max_buffer_bytes);
        let gaps = store.pending_gaps().unwrap();
        assert_eq!(gaps.len(), 2);
        assert!(gaps[1].seq > gaps[0].seq);
        assert_eq!(gaps[1].count, out.evicted);
    }

    #[test]
    fn drain_sends_gaps_then_alerts_then_summaries_in_the_configured_order_within_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let one = row_bytes(&closed("s", 0, false));
        let opts = StoreOptions {
            max_buffer_bytes: one * 6,
            ..StoreOptions::default()
        };
        let mut store = Store::open_with(&dir.path().join("a.db"), &opts).unwrap();
        let all: Vec<_> = (0..8)
            .map(|i| closed("s", i * 10, i == 5 || i == 6))
            .collect();
        let out = store.commit_closed(&all, i64::MAX, 0).unwrap();
        assert!(out.evicted > 0);
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 100, u64::MAX)
            .unwrap();
        assert_eq!(d.gaps.len(), 1);
        let order = starts(&d.summaries);
        assert_eq!(&order[..2], &[(50, true), (60, true)]);
        assert!(order[2..].windows(2).all(|w| w[0].0 < w[1].0 && !w[0].1));
        let d = store
            .outbox_drain(DrainOrder::NewestFirst, 100, u64::MAX)
            .unwrap();
        let order = starts(&d.summaries);
        assert_eq!(&order[..3], &[(60, true), (50, true), (70, false)]);
        // Byte budget: the gap plus at most what fits; never empty.
        let gap_len = d.gaps[0].bytes as u64;
        let body = one - ROW_OVERHEAD_BYTES;
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 100, gap_len + 2 * body)
            .unwrap();
        assert_eq!((d.gaps.len(), d.summaries.len()), (1, 2));
        assert_eq!(d.body_bytes, gap_len + 2 * body);
        let d = store.outbox_drain(DrainOrder::OldestFirst, 100, 1).unwrap();
        assert_eq!((d.gaps.len(), d.summaries.len()), (1, 0));
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 1, u64::MAX)
            .unwrap();
        assert_eq!(d.summaries.len(), 1);
        // Removing what was sent, gaps included.
        store.outbox_remove(&d.keys()).unwrap();
        assert_eq!(store.pending_gaps().unwrap(), vec![]);
        assert_eq!(store.buffer_usage().unwrap().gaps, 0);
    }

    #[test]
    fn disk_full_fails_the_transaction_cleanly_and_writes_resume_when_space_returns() {
        let (_dir, mut store) = open();
        let mut ins = Vec::new();
        store
            .commit_ingest(views(&[reading("s", 0, 0.0)]), &[], &[], &mut ins)
            .unwrap();
        // No room to grow: the file stays at its current size.
        store.set_max_db_bytes(Some(1)).unwrap();
        let big: Vec<Reading> = (1..20_000).map(|t| reading("s", t, t as f64)).collect();
        let err = store
            .commit_ingest(views(&big), &[], &[], &mut ins)
            .unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        // Nothing of the failed batch is there; what was committed before is.
        assert_eq!(store.journal_len().unwrap(), 1);
        store.set_max_db_bytes(None).unwrap();
        store
            .commit_ingest(views(&big), &[], &[], &mut ins)
            .unwrap();
        assert_eq!(store.journal_len().unwrap(), 20_000);
    }

    #[test]
    fn checkpoints_run_on_their_own_thread_not_in_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut store = Store::open(&path, 3).unwrap();
        store
            .checkpoint_in_background(std::time::Duration::from_millis(10))
            .unwrap();
        let autocheckpoint: i64 = store
            .conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(
            autocheckpoint, 0,
            "the committing connection never checkpoints"
        );
        let db_file = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = db_file();
        // Thousands of WAL pages: with no checkpoint the database file would not grow at all.
        let mut ins = Vec::new();
        for batch in 0..10 {
            let rs: Vec<Reading> = (0..5_000)
                .map(|i| reading(&format!("s{i}"), batch, i as f64))
                .collect();
            store.commit_ingest(views(&rs), &[], &[], &mut ins).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db_file() < before + 1_000_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            db_file() >= before + 1_000_000,
            "the checkpoint thread copied the WAL into the database file ({} -> {} bytes)",
            before,
            db_file()
        );
        // Dropping the store stops and joins the thread; the data is all there on reopen.
        drop(store);
        let store = Store::open(&path, 3).unwrap();
        assert_eq!(store.journal_len().unwrap(), 50_000);
    }

    fn assert_recovers(path: &Path, damage: impl FnOnce(&Path)) {
        {
            let mut store = Store::open(path, 10).unwrap();
            let mut ins = Vec::new();
            let rs: Vec<Reading> = (0..5000).map(|t| reading("s", t, 1.0)).collect();
            store.commit_ingest(views(&rs), &[], &[], &mut ins).unwrap();
            store
                .conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        damage(path);
        let opts = StoreOptions {
            agent_id: "gw".into(),
            ..StoreOptions::default()
        };
        let (store, recovered) = Store::open_or_recover(path, &opts).unwrap();
        let recovered = recovered.expect("the damage was detected");
        assert!(recovered.moved_to.exists());
        assert_eq!(store.journal_len().unwrap(), 0);
        let gaps = store.pending_gaps().unwrap();
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].reason, REASON_STORE_CORRUPT);
        // The fresh file is healthy: opening again finds nothing to recover.
        drop(store);
        let (_, again) = Store::open_or_recover(path, &opts).unwrap();
        assert_eq!(again, None);
    }

    #[test]
    fn a_truncated_database_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        assert_recovers(&path, |p| {
            let len = std::fs::metadata(p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(len / 3).unwrap();
        });
    }

    #[test]
    fn a_garbage_file_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        assert_recovers(&path, |p| {
            std::fs::write(p, vec![0xA5; 8192]).unwrap();
        });
    }

    #[test]
    fn a_corrupt_page_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        assert_recovers(&path, |p| {
            let mut bytes = std::fs::read(p).unwrap();
            let page = 4096;
            // Scribble over the middle of the file (b-tree pages), keep the header.
            let mid = bytes.len() / 2 / page * page;
            for b in &mut bytes[mid..mid + page] {
                *b = 0x5A;
            }
            std::fs::write(p, bytes).unwrap();
        });
    }

    #[test]
    fn dead_letters_are_bounded_to_the_newest() {
        let (_dir, mut store) = open();
        let mut ins = Vec::new();
        for i in 0..10 {
            let d = DeadLetter::new(i, "t", "not_json", &vec![b'x'; 10_000]);
            store
                .commit_ingest(views(&[]), &[d], &[], &mut ins)
                .unwrap();
        }
        let kept = store.dead_letters(100).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].received_ms, 9);
        assert_eq!(kept[0].payload.len(), DEAD_LETTER_MAX_PAYLOAD);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            Store::open(&path, 10),
            Err(StoreError::SchemaTooNew(99))
        ));
    }

    fn text(stream: &str, time_ms: i64, text: &str) -> LatestValue {
        LatestValue {
            stream: stream.to_string(),
            time_ms,
            value: edgewise_protocol::StateValue::Text(text.to_string()),
        }
    }

    #[test]
    fn latest_values_keep_the_newest_per_stream_up_to_the_cap_until_the_cloud_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let opts = StoreOptions {
            max_latest_streams: 2,
            ..StoreOptions::default()
        };
        let mut store = Store::open_with(&path, &opts).unwrap();
        let mut ins = Vec::new();
        let batch = [
            text("door", 10, "open"),
            text("door", 5, "closed"), // older than the one kept
            text("door", 10, "open"),  // a redelivery
            text("lock", 1, "on"),
            text("fan", 1, "off"), // a third stream: over the cap
        ];
        let outcome = store
            .commit_ingest(views(&[]), &[], &batch, &mut ins)
            .unwrap();
        assert_eq!(
            outcome,
            LatestOutcome {
                stored: 2,
                stale: 2,
                refused: 1
            }
        );
        // Sent before alerts and summaries, after gaps.
        store
            .commit_closed(&[closed("s", 0, true)], i64::MAX, 0)
            .unwrap();
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 100, u64::MAX)
            .unwrap();
        assert_eq!(
            d.latest,
            vec![text("door", 10, "open"), text("lock", 1, "on")]
        );
        assert_eq!(d.summaries.len(), 1);
        let sent = d.keys();
        assert_eq!(sent.len(), 3);

        // A newer door value arrives while the request is in flight: the ack of the old one
        // must not mark the new one as delivered.
        store
            .commit_ingest(views(&[]), &[], &[text("door", 20, "closed")], &mut ins)
            .unwrap();
        store.outbox_remove(&sent).unwrap();
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 100, u64::MAX)
            .unwrap();
        assert_eq!(d.latest, vec![text("door", 20, "closed")]);
        assert_eq!(store.latest_counts().unwrap(), (1, 2));

        // The rows and the cap survive a restart.
        drop(store);
        let mut store = Store::open_with(&path, &opts).unwrap();
        let outcome = store
            .commit_ingest(views(&[]), &[], &[text("fan", 2, "on")], &mut ins)
            .unwrap();
        assert_eq!(outcome.refused, 1);

        // Refused by the receiver for good: kept as a dead letter, no longer pending.
        let d = store
            .outbox_drain(DrainOrder::OldestFirst, 100, u64::MAX)
            .unwrap();
        assert_eq!(store.outbox_reject(&d.keys(), "400: bad", 7).unwrap(), 1);
        assert_eq!(store.latest_counts().unwrap(), (0, 2));
        let dead = store.dead_letters(10).unwrap();
        assert_eq!(
            (dead[0].topic.as_str(), dead[0].reason.as_str()),
            ("latest", "400: bad")
        );
        assert!(
            store
                .outbox_drain(DrainOrder::OldestFirst, 100, u64::MAX)
                .unwrap()
                .latest
                .is_empty()
        );
    }
}
