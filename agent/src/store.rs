//! The agent's durable buffer: one SQLite file (WAL) with four tables.
//!
//! - `journal`: every accepted reading, until its window closes. Unique on `(stream, time_ms)`:
//!   a message the broker redelivers (after a reconnect or a restart, before our ack reached it)
//!   is ignored instead of counted twice.
//! - `outbox`: encoded summaries waiting for the cloud, in `seq` order.
//! - `stream_state`: per stream, `closed_until_ms` (see [`crate::window`]).
//! - `dead_letter`: undecodable payloads with their reason, bounded to the newest N rows.
//!
//! What is durable when:
//! - [`Store::commit_ingest`] writes a whole batch of readings (and dead letters) in one
//!   transaction; the caller acks the MQTT messages only after it returns `Ok`.
//! - [`Store::commit_closed`] inserts closed summaries into the outbox, deletes their journal rows
//!   and advances `closed_until` in ONE transaction: a crash leaves either the readings or the
//!   summary, never both and never neither.
//! - Outbox rows are deleted by [`Store::outbox_remove`] only after the receiver's 2xx.
//!
//! Tested by the unit tests below on real SQLite files, and end to end in `tests/`.

use std::path::Path;

use edgewise_protocol::{Reading, WindowSummary};
use rusqlite::{Connection, OptionalExtension, params};

use crate::window::ClosedWindow;

/// Longest payload kept in a dead letter; the rest is cut off.
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 4096;

const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox row {seq} is not a valid summary: {message}")]
    CorruptRow { seq: i64, message: String },
    #[error("the operation was cancelled by shutdown")]
    Cancelled,
    #[error("database schema version {0} is newer than this agent understands ({SCHEMA_VERSION})")]
    SchemaTooNew(i64),
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

pub struct Store {
    conn: Connection,
    dead_letter_max_rows: u64,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path, dead_letter_max_rows: u64) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
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
        Ok(Store {
            conn,
            dead_letter_max_rows,
        })
    }

    /// Persisted `closed_until_ms` of every stream.
    pub fn closed_streams(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT stream, closed_until_ms FROM stream_state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// All journaled readings in arrival order (the open windows' contents).
    pub fn journal_readings(&self) -> Result<Vec<Reading>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT stream, time_ms, value, unit FROM journal ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(Reading {
                stream: r.get(0)?,
                time_ms: r.get(1)?,
                value: r.get(2)?,
                unit: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Journals `readings` and records `dead` in one transaction. `inserted[i]` is false where
    /// reading `i` was already journaled (a redelivery), which the caller must not count again.
    pub fn commit_ingest(
        &mut self,
        readings: &[Reading],
        dead: &[DeadLetter],
        inserted: &mut Vec<bool>,
    ) -> Result<(), StoreError> {
        inserted.clear();
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO journal (stream, time_ms, value, unit) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in readings {
                let n = ins.execute(params![r.stream, r.time_ms, r.value, r.unit])?;
                inserted.push(n == 1);
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
                    params![self.dead_letter_max_rows as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves closed windows from the journal to the outbox, in one transaction.
    pub fn commit_closed(&mut self, closed: &[ClosedWindow]) -> Result<(), StoreError> {
        if closed.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut out = tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox (summary_id, body) VALUES (?1, ?2)",
            )?;
            let mut del = tx.prepare_cached(
                "DELETE FROM journal WHERE stream = ?1 AND time_ms >= ?2 AND time_ms < ?3",
            )?;
            let mut state = tx.prepare_cached(
                "INSERT INTO stream_state (stream, closed_until_ms) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET closed_until_ms =
                     MAX(closed_until_ms, excluded.closed_until_ms)",
            )?;
            for c in closed {
                let s = &c.summary;
                let body = minicbor::to_vec(s).unwrap_or_default();
                out.execute(params![&s.id().0[..], body])?;
                del.execute(params![s.stream, s.window_start_ms, s.window_end_ms])?;
                state.execute(params![s.stream, c.closed_until_ms])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The oldest `max` outbox rows, in order.
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

    /// Deletes the outbox rows with `first_seq <= seq <= last_seq` (after the cloud's ack).
    pub fn outbox_remove(&mut self, first_seq: i64, last_seq: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2",
            params![first_seq, last_seq],
        )?)
    }

    /// Moves outbox rows the receiver refused for good into the dead-letter table, so they stop
    /// blocking the queue but are kept (and counted) rather than lost silently.
    pub fn outbox_reject(
        &mut self,
        first_seq: i64,
        last_seq: i64,
        reason: &str,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO dead_letter (received_ms, topic, reason, payload)
             SELECT ?3, 'outbox', ?4, body FROM outbox WHERE seq BETWEEN ?1 AND ?2",
            params![first_seq, last_seq, now_ms, reason],
        )?;
        let n = tx.execute(
            "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2",
            params![first_seq, last_seq],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// `(rows, bytes)` waiting in the outbox.
    pub fn outbox_size(&self) -> Result<(u64, u64), StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Rows in the journal (readings of open windows).
    pub fn journal_len(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM journal", [], |r| r.get::<_, i64>(0))?
            as u64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Admission, WindowSpec, Windows};

    fn reading(stream: &str, time_ms: i64, value: f64) -> Reading {
        Reading {
            stream: stream.into(),
            time_ms,
            value,
            unit: None,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db"), 3).unwrap();
        (dir, store)
    }

    #[test]
    fn redelivered_readings_are_journaled_once() {
        let (_dir, mut store) = open();
        let mut ins = Vec::new();
        let rs = [reading("s", 1, 1.0), reading("s", 2, 2.0)];
        store.commit_ingest(&rs, &[], &mut ins).unwrap();
        assert_eq!(ins, vec![true, true]);
        store
            .commit_ingest(&[reading("s", 2, 2.0), reading("s", 3, 3.0)], &[], &mut ins)
            .unwrap();
        assert_eq!(ins, vec![false, true]);
        assert_eq!(store.journal_len().unwrap(), 3);
    }

    #[test]
    fn closing_moves_readings_to_the_outbox_atomically_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let spec = WindowSpec {
            size_ms: 10,
            allowed_lateness_ms: 0,
            idle_timeout_ms: 1000,
        };
        {
            let mut store = Store::open(&path, 10).unwrap();
            let mut w = Windows::new("gw", spec);
            let rs = [
                reading("s", 1, 1.0),
                reading("s", 5, 3.0),
                reading("s", 12, 9.0),
            ];
            let mut ins = Vec::new();
            store.commit_ingest(&rs, &[], &mut ins).unwrap();
            for r in &rs {
                w.add(r, 0);
            }
            let closed = w.advance(0);
            assert_eq!(closed.len(), 1);
            store.commit_closed(&closed).unwrap();
            // Closing the same window again (a retried transaction) does not duplicate it.
            store.commit_closed(&closed).unwrap();
        }
        let store = Store::open(&path, 10).unwrap();
        assert_eq!(
            store.journal_readings().unwrap(),
            vec![reading("s", 12, 9.0)]
        );
        // closed_until is the watermark (max event time 12 - lateness 0).
        assert_eq!(store.closed_streams().unwrap(), vec![("s".to_string(), 12)]);
        let rows = store.outbox_peek(10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary.count, 2);
        assert_eq!(rows[0].summary.mean, 2.0);
        // A rebuilt window state refuses the closed window.
        let mut w = Windows::new("gw", spec);
        for (s, c) in store.closed_streams().unwrap() {
            w.restore_closed(&s, c);
        }
        assert_eq!(w.admit(&reading("s", 9, 0.0)), Admission::Late);
    }

    #[test]
    fn outbox_rows_go_only_when_removed_or_rejected() {
        let (_dir, mut store) = open();
        let spec = WindowSpec {
            size_ms: 10,
            allowed_lateness_ms: 0,
            idle_timeout_ms: 1,
        };
        let mut w = Windows::new("gw", spec);
        for t in [1, 11, 21] {
            w.add(&reading("s", t, 1.0), 0);
        }
        store.commit_closed(&w.advance(10)).unwrap();
        let rows = store.outbox_peek(2).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(store.outbox_size().unwrap().0, 3);
        assert_eq!(store.outbox_remove(rows[0].seq, rows[1].seq).unwrap(), 2);
        let rest = store.outbox_peek(10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].summary.window_start_ms, 20);
        assert_eq!(
            store
                .outbox_reject(rest[0].seq, rest[0].seq, "400: bad", 5)
                .unwrap(),
            1
        );
        assert_eq!(store.outbox_size().unwrap(), (0, 0));
        assert_eq!(store.dead_letters(10).unwrap()[0].reason, "400: bad");
    }

    #[test]
    fn dead_letters_are_bounded_to_the_newest() {
        let (_dir, mut store) = open();
        let mut ins = Vec::new();
        for i in 0..10 {
            let d = DeadLetter::new(i, "t", "not_json", &vec![b'x'; 10_000]);
            store.commit_ingest(&[], &[d], &mut ins).unwrap();
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
}
