//! The journal's tables: readings split by event time into [`TABLES`] tables, so that the rows a
//! close releases go by emptying whole tables instead of deleting them one by one.
//!
//! A reading's table is fixed by its time alone ([`table_of`]: [`SLICE_MS`] of event time per
//! table, round the ring of [`TABLES`]), so a redelivered reading meets its first copy in the
//! same table and the `(time_ms, stream)` key still refuses it. Each table is the old single
//! journal's shape (`WITHOUT ROWID`, keyed by time, `arrival` for the replay order).
//!
//! Releasing rows before a horizon ([`Journal::release`]), one step per call:
//! - the tables whose rows are all before it (up to [`EMPTY_ROWS_PER_STEP`] rows) are emptied
//!   with `DELETE FROM <table>` and no `WHERE`, which SQLite runs as a truncation: it frees the
//!   table's pages without visiting rows one by one and writes hardly anything to the WAL.
//!   Measured on 1,000,000 journal rows (SQLite 3.40 through Python, `secure_delete` off, as
//!   the store sets it): 30 ms and 74 KB of WAL, against 537 ms and 64 MB for
//!   `DELETE ... WHERE time_ms < ?`.
//!   At 10,000 sensors that row-by-row deletion was a tenth of the agent's CPU in a profile, and
//!   its WAL frames a good part of the checkpoints' work.
//! - a table whose rows are partly before it waits: its released rows are dead already (see the
//!   store's module docs), and once the horizon passes the table's newest row, the whole table
//!   goes as above.
//! - only a table holding rows of more than one turn of the ring (readings over
//!   `TABLES * SLICE_MS` apart: windows longer than that, a device clock far off) has its
//!   released rows deleted row by row, [`DELETE_CHUNK`] at a time, as the single journal did.
//!
//! The store keeps each table's row count and time range ([`Span`]) in memory, from one scan of
//! every table at open, so choosing a step reads nothing.

use std::sync::LazyLock;

use edgewise_protocol::{Reading, ReadingView};
use rusqlite::{Connection, OptionalExtension, params};

/// Journal tables, a ring over event time.
pub const TABLES: usize = 64;

/// Event time per journal table: a close empties a table at most this long after the horizon
/// passed its first row. The ring covers `TABLES * SLICE_MS` (5 min 20 s, 64 tables: each
/// table costs each connection its schema entry); windows, lateness and idle streams that keep
/// rows longer than that mix turns in one table (see the module docs).
pub const SLICE_MS: i64 = 5_000;

/// Most rows one step empties whole tables of (at least one table): about 30 ms of work.
pub const EMPTY_ROWS_PER_STEP: u64 = 1_000_000;

/// Most journal rows one step deletes row by row (see the module docs): a few milliseconds of
/// work, so the ingest loop never stalls on it, and far more than a batch inserts, so deletion
/// keeps ahead of ingest.
pub const DELETE_CHUNK: i64 = 8192;

/// The table a reading at `time_ms` goes to.
pub fn table_of(time_ms: i64) -> usize {
    time_ms.div_euclid(SLICE_MS).rem_euclid(TABLES as i64) as usize
}

/// The SQL of one table, written once.
struct TableSql {
    name: String,
    insert: String,
    empty: String,
    first_after: String,
    delete_before: String,
    min_time: String,
}

static SQL: LazyLock<Vec<TableSql>> = LazyLock::new(|| {
    (0..TABLES)
        .map(|t| {
            let name = format!("journal_{t:03}");
            TableSql {
                insert: format!(
                    "INSERT OR IGNORE INTO {name} (time_ms, stream, arrival, value, unit)
                     VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                empty: format!("DELETE FROM {name}"),
                first_after: format!(
                    "SELECT time_ms FROM {name} WHERE time_ms < ?1 ORDER BY time_ms LIMIT 1 OFFSET ?2"
                ),
                delete_before: format!("DELETE FROM {name} WHERE time_ms < ?1"),
                min_time: format!("SELECT MIN(time_ms) FROM {name}"),
                name,
            }
        })
        .collect()
});

/// `CREATE TABLE` of one journal table (also the shape of the single table of schema
/// version 3).
pub fn create_table_sql(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
             time_ms INTEGER NOT NULL,
             stream TEXT NOT NULL,
             arrival INTEGER NOT NULL,
             value REAL NOT NULL,
             unit TEXT,
             PRIMARY KEY (time_ms, stream)
         ) WITHOUT ROWID;\n"
    )
}

/// `CREATE TABLE` of every journal table.
pub fn create_tables_sql() -> String {
    SQL.iter().map(|t| create_table_sql(&t.name)).collect()
}

/// Moves the rows of the single `journal` table (schema version 3) into the journal tables and
/// drops it. Runs inside the caller's transaction, after [`create_tables_sql`].
pub fn migrate_single_table(conn: &Connection) -> rusqlite::Result<()> {
    {
        let mut rows = conn.prepare("SELECT time_ms, stream, arrival, value, unit FROM journal")?;
        let mut rows = rows.query([])?;
        while let Some(r) = rows.next()? {
            let time_ms: i64 = r.get(0)?;
            conn.prepare_cached(&SQL[table_of(time_ms)].insert)?
                .execute(params![
                    time_ms,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, Option<String>>(4)?
                ])?;
        }
    }
    conn.execute_batch("DROP TABLE journal")
}

/// What the store knows of one table: its rows and the range of their times (meaningless
/// while `rows` is 0). `min_ms` may be below the oldest row (a bound, after a deletion).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub rows: u64,
    pub min_ms: i64,
    pub max_ms: i64,
}

impl Span {
    fn add(&mut self, time_ms: i64) {
        if self.rows == 0 {
            (self.min_ms, self.max_ms) = (time_ms, time_ms);
        } else {
            self.min_ms = self.min_ms.min(time_ms);
            self.max_ms = self.max_ms.max(time_ms);
        }
        self.rows += 1;
    }

    /// Every row is before `before_ms`: the whole table may go.
    fn all_before(&self, before_ms: i64) -> bool {
        self.rows > 0 && self.max_ms < before_ms
    }

    /// Rows before `before_ms` that can only go row by row: the table also holds rows of
    /// another turn of the ring, so it may never be all before a horizon.
    fn mixed_before(&self, before_ms: i64) -> bool {
        self.rows > 0
            && self.min_ms < before_ms
            && self.max_ms.saturating_sub(self.min_ms) >= SLICE_MS
    }
}

/// The journal tables' spans. The store updates a copy inside each transaction and keeps it
/// only once the transaction committed, so a failed commit leaves them as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    spans: Vec<Span>,
}

impl Journal {
    /// Reads every table's span, and the next arrival number.
    pub fn load(conn: &Connection) -> rusqlite::Result<(Journal, i64)> {
        let mut spans = Vec::with_capacity(TABLES);
        let mut next_arrival = 1;
        for t in SQL.iter() {
            let (rows, min_ms, max_ms, last): (i64, Option<i64>, Option<i64>, Option<i64>) = conn
                .query_row(
                &format!(
                    "SELECT COUNT(*), MIN(time_ms), MAX(time_ms), MAX(arrival) FROM {}",
                    t.name
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            spans.push(Span {
                rows: rows.max(0) as u64,
                min_ms: min_ms.unwrap_or(0),
                max_ms: max_ms.unwrap_or(0),
            });
            next_arrival = next_arrival.max(last.unwrap_or(0).saturating_add(1));
        }
        Ok((Journal { spans }, next_arrival))
    }

    /// Rows in all tables, as tracked.
    pub fn rows(&self) -> u64 {
        self.spans.iter().map(|s| s.rows).sum()
    }

    /// Inserts `readings` (reading `i` arrives as `first_arrival + i`) into their tables, in
    /// arrival order within each table; `inserted[i]` tells whether reading `i` was new (false:
    /// already journaled). `inserted` must hold `readings.len()` entries.
    pub fn insert(
        &mut self,
        conn: &Connection,
        readings: &[ReadingView<'_>],
        first_arrival: i64,
        inserted: &mut [bool],
    ) -> rusqlite::Result<()> {
        // Grouped by table (most batches touch one or two), each group in arrival order.
        let mut order: Vec<(u16, u32)> = readings
            .iter()
            .enumerate()
            .map(|(i, r)| (table_of(r.time_ms) as u16, i as u32))
            .collect();
        order.sort_unstable();
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let t = usize::from(group[0].0);
            let mut ins = conn.prepare_cached(&SQL[t].insert)?;
            for &(_, i) in group {
                let i = i as usize;
                let r = &readings[i];
                let arrival = first_arrival + i as i64;
                let new = ins.execute(params![r.time_ms, r.stream, arrival, r.value, r.unit])? == 1;
                if new {
                    self.spans[t].add(r.time_ms);
                }
                inserted[i] = new;
            }
        }
        Ok(())
    }

    /// One step of deleting the rows before `before_ms` (see the module docs): empties the
    /// tables whose rows are all before it, up to [`EMPTY_ROWS_PER_STEP`] rows, or if there are
    /// none, deletes a chunk of one table that mixes turns of the ring. Returns the rows deleted
    /// and whether such work is left.
    pub fn release(&mut self, conn: &Connection, before_ms: i64) -> rusqlite::Result<(u64, bool)> {
        let mut deleted = 0;
        for t in 0..TABLES {
            if deleted >= EMPTY_ROWS_PER_STEP {
                break;
            }
            if self.spans[t].all_before(before_ms) {
                conn.prepare_cached(&SQL[t].empty)?.execute([])?;
                deleted += std::mem::take(&mut self.spans[t]).rows;
            }
        }
        if deleted == 0
            && let Some(t) = self.spans.iter().position(|s| s.mixed_before(before_ms))
        {
            deleted = delete_chunk(conn, &SQL[t], before_ms)?;
            let span = &mut self.spans[t];
            span.rows = span.rows.saturating_sub(deleted);
            match conn
                .prepare_cached(&SQL[t].min_time)?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?
            {
                Some(min) => (span.min_ms, span.rows) = (min, span.rows.max(1)),
                None => *span = Span::default(),
            }
        }
        Ok((deleted, self.work_left(before_ms)))
    }

    /// Whether [`Journal::release`] has anything to do for `before_ms`.
    fn work_left(&self, before_ms: i64) -> bool {
        self.spans
            .iter()
            .any(|s| s.all_before(before_ms) || s.mixed_before(before_ms))
    }

    /// Rows in all tables, counted by SQLite.
    pub fn count(conn: &Connection) -> rusqlite::Result<u64> {
        let mut rows = 0u64;
        for t in SQL.iter() {
            let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {}", t.name), [], |r| {
                r.get(0)
            })?;
            rows += n.max(0) as u64;
        }
        Ok(rows)
    }

    /// Every journaled reading, in arrival order.
    pub fn readings(conn: &Connection) -> rusqlite::Result<Vec<Reading>> {
        let mut all: Vec<(i64, Reading)> = Vec::new();
        for t in SQL.iter() {
            let mut stmt = conn.prepare(&format!(
                "SELECT arrival, stream, time_ms, value, unit FROM {}",
                t.name
            ))?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    Reading {
                        stream: r.get(1)?,
                        time_ms: r.get(2)?,
                        value: r.get(3)?,
                        unit: r.get(4)?,
                    },
                ))
            })?;
            for row in rows {
                all.push(row?);
            }
        }
        all.sort_unstable_by_key(|(arrival, _)| *arrival);
        Ok(all.into_iter().map(|(_, r)| r).collect())
    }
}

/// Deletes the oldest rows of one table before `before_ms`, at most about [`DELETE_CHUNK`]
/// (always whole milliseconds, so a millisecond holding more rows than a chunk still goes).
fn delete_chunk(conn: &Connection, t: &TableSql, before_ms: i64) -> rusqlite::Result<u64> {
    // The time of the first row past a chunk, if there are more rows than that to delete.
    let cutoff: Option<i64> = conn
        .prepare_cached(&t.first_after)?
        .query_row(params![before_ms, DELETE_CHUNK], |r| r.get(0))
        .optional()?;
    let mut delete = conn.prepare_cached(&t.delete_before)?;
    let Some(cutoff) = cutoff else {
        return Ok(delete.execute(params![before_ms])? as u64);
    };
    let mut deleted = delete.execute(params![cutoff])?;
    if deleted == 0 {
        // The whole chunk shares one millisecond.
        deleted = delete.execute(params![cutoff.saturating_add(1)])?;
    }
    Ok(deleted as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_always_goes_to_the_table_of_its_slice_of_time() {
        assert_eq!(table_of(0), 0);
        assert_eq!(table_of(SLICE_MS - 1), 0);
        assert_eq!(table_of(SLICE_MS), 1);
        // Before 1970 the ring runs backwards from the last table.
        assert_eq!(table_of(-1), TABLES - 1);
        assert_eq!(table_of(-SLICE_MS), TABLES - 1);
        assert_eq!(table_of(-SLICE_MS - 1), TABLES - 2);
        // One turn of the ring later, the same table again.
        let turn = SLICE_MS * TABLES as i64;
        assert_eq!(
            table_of(1_767_000_123_456 + turn),
            table_of(1_767_000_123_456)
        );
        assert!(table_of(i64::MIN) < TABLES && table_of(i64::MAX) < TABLES);
    }

    #[test]
    fn a_span_tells_whole_tables_from_tables_that_mix_turns() {
        let mut s = Span::default();
        assert!(!s.all_before(i64::MAX) && !s.mixed_before(i64::MAX));
        s.add(10_000);
        s.add(12_000);
        assert!(s.all_before(12_001));
        assert!(!s.all_before(12_000));
        // Partly before, one slice: it waits.
        assert!(!s.mixed_before(11_000));
        // A row a turn later: the table can only be cleaned row by row.
        s.add(10_000 + SLICE_MS * TABLES as i64);
        assert!(s.mixed_before(11_000));
        assert!(!s.mixed_before(10_000));
    }
}
