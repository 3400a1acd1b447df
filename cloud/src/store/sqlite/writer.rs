//! The SQLite write path for batches: one thread owns the write connection and commits the
//! batches that arrive together in ONE transaction (group commit); another thread copies the
//! write-ahead log into the database file (checkpoints), so the writer never does that work or
//! waits for its fsync.
//!
//! # Group commit
//!
//! Requests queue their [`CheckedBatch`] with a reply channel. The writer takes the first one and
//! everything else already queued (at most [`MAX_GROUP_BATCHES`] batches and about
//! [`MAX_GROUP_SUMMARIES`] summaries), opens one `BEGIN IMMEDIATE` transaction, stores each batch
//! inside its own `SAVEPOINT` in arrival order, and commits once. Then it answers every request.
//!
//! - A batch that fails (unknown device, a constraint) is rolled back to its savepoint and answered
//!   with its error; the rest of the group commits without it.
//! - Every answer is sent after `COMMIT` returned, so an `Ok` means the batch is as durable as if
//!   it had been committed on its own (WAL, `synchronous=NORMAL`: it survives a crash of the
//!   process; on power loss, commits since the last checkpoint's fsync may roll back).
//! - If the transaction itself fails (`BEGIN`, `COMMIT`, or an error after which SQLite rolled
//!   the whole transaction back), nothing of the group is stored and every batch in it is
//!   answered with an error: [`StoreError::Unavailable`] when the file is locked by another
//!   process past the busy timeout, [`StoreError::NotStored`] otherwise.
//! - Batches are applied one after another, so overlapping batches in one group are counted
//!   exactly as if committed one after another: the later one sees the earlier one's rows.
//!
//! # Checkpoints
//!
//! The writer connection runs with `wal_autocheckpoint=0` and pokes the checkpointer after each
//! commit. The checkpointer waits [`CHECKPOINT_INTERVAL`] (pages written several times in that
//! time are copied once), then runs a `PASSIVE` checkpoint, which never blocks the writer. Under
//! sustained writes a passive checkpoint may never catch up with the end of the log, so the log
//! would not start over; once it holds more than [`RESTART_LOG_FRAMES`] frames the checkpointer
//! runs a `RESTART` checkpoint, which waits for the writer's current transaction, holds the next
//! one back until the log is copied, and lets the log start over (trimmed to
//! [`LOG_SIZE_LIMIT_BYTES`] on disk).
//!
//! Tested by the unit tests below (concurrent overlapping batches stored exactly once; a failing
//! batch does not fail its neighbours; the log is checkpointed) and by every test that stores
//! through [`crate::Store`].

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::{BUSY_TIMEOUT, write_batch};
use crate::store::{CheckedBatch, IngestOutcome, StoreError, now_ms};

/// Most batches committed in one transaction.
pub const MAX_GROUP_BATCHES: usize = 64;
/// A group stops taking batches once it holds this many summaries.
pub const MAX_GROUP_SUMMARIES: usize = 16_384;
/// How long the checkpointer lets the log grow after a commit before copying it.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// Log size (in pages) above which the checkpointer makes the log start over.
pub const RESTART_LOG_FRAMES: i64 = 16_384;
/// The log file is trimmed to this size when it starts over.
pub const LOG_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;
/// Page cache of the writer connection: a whole group's dirty pages stay in memory until
/// `COMMIT` instead of spilling into the log mid-transaction.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

type Outcome = Result<IngestOutcome, StoreError>;

/// Where a batch's outcome goes.
enum Reply {
    /// An async caller awaiting it.
    Task(oneshot::Sender<Outcome>),
    /// A thread blocked on it.
    Thread(std_mpsc::SyncSender<Outcome>),
}

impl Reply {
    fn send(self, outcome: Outcome) {
        // A caller that went away (its HTTP client hung up) no longer needs the answer; the batch
        // is stored or not all the same, as when a connection drops after a commit.
        let _ = match self {
            Reply::Task(tx) => tx.send(outcome).map_err(drop),
            Reply::Thread(tx) => tx.send(outcome).map_err(drop),
        };
    }
}

struct Job {
    batch: CheckedBatch,
    reply: Reply,
}

/// The running writer thread. Dropping it lets the thread finish the queued batches, close its
/// connection and stop the checkpointer, and waits for that.
pub(crate) struct Writer {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Opens the writer's and the checkpointer's connections to the database file at `path`
    /// (already migrated) and starts both threads.
    pub(crate) fn start(path: &Path) -> Result<Writer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", LOG_SIZE_LIMIT_BYTES)?;
        conn.set_prepared_statement_cache_capacity(32);
        let checkpointer = Checkpointer::start(path)?;
        // The queue is unbounded, but each queued batch belongs to a request that is waiting
        // for it and already holds its body: the queue never holds more than the requests in
        // flight.
        let (jobs, queue) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || run(conn, queue, checkpointer))
            .map_err(|e| StoreError::Task(format!("starting the SQLite writer: {e}")))?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Stores `batch` in the next group commit; answers once that has committed (or failed).
    pub(crate) async fn store(&self, batch: CheckedBatch) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.submit(batch, Reply::Task(tx))?;
        rx.await.map_err(|_| writer_gone())?
    }

    /// [`Writer::store`] for synchronous callers: blocks the calling thread.
    pub(crate) fn store_blocking(&self, batch: CheckedBatch) -> Outcome {
        let (tx, rx) = std_mpsc::sync_channel(1);
        self.submit(batch, Reply::Thread(tx))?;
        rx.recv().map_err(|_| writer_gone())?
    }

    fn submit(&self, batch: CheckedBatch, reply: Reply) -> Result<(), StoreError> {
        let jobs = self.jobs.as_ref().ok_or_else(writer_gone)?;
        jobs.send(Job { batch, reply }).map_err(|_| writer_gone())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered everything queued.
        self.jobs.take();
        join(self.thread.take(), "writer");
    }
}

/// Waits for a thread that has been told to stop.
fn join(thread: Option<JoinHandle<()>>, name: &str) {
    if let Some(thread) = thread
        && thread.join().is_err()
    {
        tracing::error!("the SQLite {name} thread panicked");
    }
}

fn writer_gone() -> StoreError {
    StoreError::Task("the SQLite writer thread has stopped".to_owned())
}

/// The writer thread: group commits until the queue is closed.
fn run(mut conn: Connection, mut queue: mpsc::UnboundedReceiver<Job>, checkpointer: Checkpointer) {
    while let Some(first) = queue.blocking_recv() {
        let mut summaries = first.batch.summaries().len();
        let mut group = vec![first];
        while group.len() < MAX_GROUP_BATCHES && summaries < MAX_GROUP_SUMMARIES {
            let Ok(job) = queue.try_recv() else { break };
            summaries += job.batch.summaries().len();
            group.push(job);
        }
        let outcomes = commit_group(&mut conn, &group);
        for (job, outcome) in group.into_iter().zip(outcomes) {
            job.reply.send(outcome);
        }
        checkpointer.poke();
    }
}

/// Stores `group` in one transaction; one outcome per job, in order.
fn commit_group(conn: &mut Connection, group: &[Job]) -> Vec<Outcome> {
    match try_commit_group(conn, group) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::warn!(error = %e, batches = group.len(), "group commit failed; none of its batches was stored");
            group.iter().map(|_| Err(group_failure(&e))).collect()
        }
    }
}

/// `Err` when the transaction as a whole failed: then nothing of the group is stored.
fn try_commit_group(conn: &mut Connection, group: &[Job]) -> rusqlite::Result<Vec<Outcome>> {
    let received_at_ms = now_ms();
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        let savepoint = tx.savepoint()?;
        let outcome = write_batch(&savepoint, &job.batch, received_at_ms);
        if outcome.is_ok() {
            savepoint.commit()?;
        } else {
            // ROLLBACK TO and RELEASE; fails if SQLite has already rolled back the whole
            // transaction (I/O error, disk full), which fails the group.
            savepoint.finish()?;
        }
        outcomes.push(outcome);
    }
    tx.commit()?;
    Ok(outcomes)
}

fn group_failure(e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(format!("the database file is locked: {e}"))
        }
        _ => StoreError::NotStored(e.to_string()),
    }
}

/// The checkpointer thread and the channel that wakes it.
struct Checkpointer {
    poke: Option<std_mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        // RESTART waits up to this long for the writer's transaction to end.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let (poke, pokes) = std_mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || checkpoint_loop(&conn, &pokes))
            .map_err(|e| StoreError::Task(format!("starting the SQLite checkpointer: {e}")))?;
        Ok(Checkpointer {
            poke: Some(poke),
            thread: Some(thread),
        })
    }

    /// Tells the checkpointer a commit happened (pokes while it is busy coalesce into one).
    fn poke(&self) {
        if let Some(poke) = &self.poke {
            let _ = poke.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.poke.take();
        join(self.thread.take(), "checkpointer");
    }
}

fn checkpoint_loop(conn: &Connection, pokes: &std_mpsc::Receiver<()>) {
    while pokes.recv().is_ok() {
        // Let the log grow for a while; stop at once when the writer goes away (the last
        // connection to close checkpoints the rest).
        let deadline = Instant::now() + CHECKPOINT_INTERVAL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match pokes.recv_timeout(left) {
                Ok(()) => continue,
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        match checkpoint(conn, "PASSIVE") {
            Ok(log_frames) if log_frames > RESTART_LOG_FRAMES => {
                if let Err(e) = checkpoint(conn, "RESTART") {
                    tracing::warn!(error = %e, "restarting the SQLite write-ahead log failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed"),
        }
    }
}

/// Runs `PRAGMA wal_checkpoint(mode)`; answers the log's size in frames.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    // Columns: busy (another checkpoint ran, or RESTART could not finish), log frames,
    // frames checkpointed.
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get::<_, i64>(1)
    })
}

#[cfg(test)]
mod tests {
    use crate::Store;
    use crate::store::sqlite::tests::summary;
    use crate::store::{CheckedBatch, IngestOutcome, StoreError, SummaryQuery};

    fn batch(device: &str, windows: std::ops::Range<i64>, revision: u32) -> CheckedBatch {
        let summaries = windows
            .map(|w| summary(device, "n1/temp", w * 10_000, revision))
            .collect();
        CheckedBatch::new(device.to_owned(), summaries, vec![]).unwrap()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cloud.db")).unwrap();
        (dir, store)
    }

    /// Many tasks post overlapping batches of two devices at once (so the writer commits them
    /// in groups): every window is stored once, and the outcomes add up to exactly that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_overlapping_batches_are_stored_exactly_once() {
        use crate::store::Storage;
        let (_dir, store) = open();
        for device in ["gw-1", "gw-2"] {
            store.add_device(device).unwrap();
        }
        let mut tasks = Vec::new();
        for i in 0..64i64 {
            let store = store.clone();
            let device = if i % 2 == 0 { "gw-1" } else { "gw-2" };
            // Windows [10 k, 10 k + 30): each overlaps its neighbours; some are revision 1.
            let b = batch(device, (i / 2) * 10..(i / 2) * 10 + 30, (i % 3 == 0) as u32);
            tasks.push(tokio::spawn(async move { store.store_batch(b).await }));
        }
        let mut total = IngestOutcome::default();
        for t in tasks {
            let o = t.await.unwrap().unwrap();
            total.inserted += o.inserted;
            total.duplicates += o.duplicates;
            total.revised += o.revised;
        }
        // 32 batches per device over windows 0..340: 340 distinct windows each.
        assert_eq!(total.inserted, 2 * 340);
        assert_eq!(total.inserted + total.duplicates + total.revised, 64 * 30);
        let rows = store
            .summaries(&SummaryQuery {
                limit: 10_000,
                ..SummaryQuery::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 2 * 340);
        let mut keys: Vec<_> = rows
            .iter()
            .map(|r| (r.device_id.clone(), r.summary.window_start_ms))
            .collect();
        keys.dedup();
        assert_eq!(keys.len(), 2 * 340);
        // Every window that some batch sent at revision 1 holds revision 1.
        for r in &rows {
            let w = r.summary.window_start_ms / 10_000;
            let first_batch = if r.device_id == "gw-1" { 0 } else { 1 };
            let revised = (first_batch..64)
                .step_by(2)
                .filter(|i| ((i / 2) * 10..(i / 2) * 10 + 30).contains(&w))
                .any(|i| i % 3 == 0);
            assert_eq!(
                r.summary.revision, revised as u32,
                "{} window {w}",
                r.device_id
            );
        }
    }

    /// Batches queued together commit in one group; one failing inside it (unknown device) is
    /// answered with its error and the others are stored. The writer is held up by another
    /// connection holding the file's write lock while the batches queue.
    #[test]
    fn a_failing_batch_does_not_fail_its_neighbours_in_a_group() {
        let (dir, store) = open();
        store.add_device("gw-1").unwrap();
        let blocker = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let writer = std::sync::Arc::clone(&store.writer);
        // The first batch makes the writer wait for the lock; the others queue behind it.
        let handles: Vec<_> = [
            batch("gw-1", 0..10, 0),
            batch("gw-1", 0..10, 1),
            batch("ghost", 0..10, 0),
            batch("gw-1", 10..20, 0),
        ]
        .into_iter()
        .map(|b| {
            let writer = std::sync::Arc::clone(&writer);
            let h = std::thread::spawn(move || writer.store_blocking(b));
            std::thread::sleep(std::time::Duration::from_millis(50));
            h
        })
        .collect();
        blocker.execute_batch("COMMIT").unwrap();
        let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = |i: usize| *outcomes[i].as_ref().unwrap();
        assert_eq!((ok(0).inserted, ok(0).revised), (10, 0));
        assert!(matches!(outcomes[2], Err(StoreError::UnknownDevice(_))));
        assert_eq!(ok(3).inserted, 10);
        // The revision batch committed after the first (arrival order, in one or two groups).
        assert_eq!(ok(1).revised, 10);
        let rows = store.summaries(&SummaryQuery::default()).unwrap();
        assert_eq!(rows.len(), 20);
        assert!(rows[..10].iter().all(|r| r.summary.revision == 1));
    }

    /// Under a stream of commits the checkpointer copies the log into the database file.
    #[test]
    fn the_log_is_checkpointed_in_the_background() {
        let (dir, store) = open();
        store.add_device("gw-1").unwrap();
        let before = std::fs::metadata(dir.path().join("cloud.db"))
            .unwrap()
            .len();
        for b in 0..20 {
            store
                .ingest(
                    "gw-1",
                    &(b * 100..(b + 1) * 100)
                        .map(|w| summary("gw-1", "n1/temp", w * 10_000, 0))
                        .collect::<Vec<_>>(),
                )
                .unwrap();
        }
        let db = dir.path().join("cloud.db");
        let started = std::time::Instant::now();
        // The database file grows only by checkpoints (the rows are in the log first).
        while std::fs::metadata(&db).unwrap().len() < before + 20 * 4096 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no checkpoint within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
