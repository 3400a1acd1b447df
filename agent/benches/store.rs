//! Store benchmarks: journal throughput and drain speed, with same-run baselines.
//!
//! `cargo bench -p edgewise-agent --bench store` (release build). Environment:
//! `EDGEWISE_BENCH_READINGS` (default 2,000,000), `EDGEWISE_BENCH_SUMMARIES` (default 100,000),
//! `EDGEWISE_BENCH_DIR` (default: a temporary directory under /var/tmp, i.e. a real disk).
//!
//! 1. Journal: `Store::commit_ingest` in group commits of 1000 readings over 1000 streams, with
//!    `sync = "normal"` (the target: >= 300,000 readings/s) and `sync = "full"`; then the whole
//!    `Pipeline::ingest` (SenML decode, contract, journal, windows). Baseline: plain SQLite
//!    inserts of the same rows into a table without the unique key, same transaction size.
//! 2. Journal with releases, as the pipeline runs it: 20,000 streams, a reading each every
//!    500 ms, 10 s tumbling windows; at each boundary a close releases the window's rows, and
//!    one release step follows every batch (`Store::delete_released_journal`). Baseline, same
//!    run: the journal as it was before its tables, one table with the same key, the released
//!    rows deleted row by row, 8,192 per step.
//! 3. Drain: a buffer of N summaries to a real `edgewise_cloud::Receiver` on loopback (its own
//!    SQLite store) by the real `Uploader` (target: >= 20,000 summaries/s). Baseline: the
//!    receiver's store ingesting the same summaries directly (no HTTP, no agent).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewise_agent::config::{AgentConfig, SyncMode};
use edgewise_agent::metrics::Metrics;
use edgewise_agent::pipeline::{Message, Pipeline};
use edgewise_agent::store::{Store, StoreOptions, journal};
use edgewise_agent::sync::Uploader;
use edgewise_agent::window::ClosedWindow;
use edgewise_protocol::senml::{Record, encode_pack};
use edgewise_protocol::{Reading, WindowSummary};

const BATCH: usize = 1000;
const STREAMS: usize = 1000;
const JOURNAL_TARGET: f64 = 300_000.0;
const DRAIN_TARGET: f64 = 20_000.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| Reading {
            stream: format!("node-{}/temperature", i % STREAMS),
            time_ms: 1_700_000_000_000 + (i / STREAMS) as i64 * 10,
            value: (i % 1000) as f64 / 10.0,
            unit: Some("Cel".into()),
        })
        .collect()
}

fn journal(dir: &Path, name: &str, sync: SyncMode, rs: &[Reading]) -> f64 {
    let opts = StoreOptions {
        sync,
        ..StoreOptions::default()
    };
    let mut store = Store::open_with(&dir.join(name), &opts).expect("open store");
    let mut inserted = Vec::with_capacity(BATCH);
    let started = Instant::now();
    for chunk in rs.chunks(BATCH) {
        store
            .commit_ingest(chunk.iter().map(Reading::as_view), &[], &[], &mut inserted)
            .expect("commit");
    }
    rs.len() as f64 / started.elapsed().as_secs_f64()
}

fn baseline_inserts(dir: &Path, rs: &[Reading]) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("baseline.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("sync");
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, stream TEXT, time_ms INTEGER, value REAL, unit TEXT)",
    )
    .expect("create");
    let mut conn = conn;
    let started = Instant::now();
    for chunk in rs.chunks(BATCH) {
        let tx = conn.transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO t (stream, time_ms, value, unit) VALUES (?1, ?2, ?3, ?4)",
                )
                .expect("prepare");
            for r in chunk {
                st.execute(rusqlite::params![r.stream, r.time_ms, r.value, r.unit])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    rs.len() as f64 / started.elapsed().as_secs_f64()
}

const RELEASE_STREAMS: usize = 20_000;
const RELEASE_EVERY_MS: i64 = 500;
const RELEASE_WINDOW_MS: i64 = 10_000;

/// 20,000 streams, a reading each every 500 ms, spread over the 500 ms.
fn release_readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| Reading {
            stream: format!("node-{:05}/{}", i % RELEASE_STREAMS / 2, i % 2),
            // Each stream at its own offset within the round.
            time_ms: 1_700_000_000_000
                + (i / RELEASE_STREAMS) as i64 * RELEASE_EVERY_MS
                + (i % RELEASE_STREAMS) as i64 * RELEASE_EVERY_MS / RELEASE_STREAMS as i64,
            value: (i % 1000) as f64 / 10.0,
            unit: Some("Cel".into()),
        })
        .collect()
}

/// The horizon once `r` is in: the start of its window (everything before has closed).
fn release_horizon(r: &Reading) -> i64 {
    r.time_ms.div_euclid(RELEASE_WINDOW_MS) * RELEASE_WINDOW_MS
}

/// The store: batches in, a close at each window boundary, one release step after each batch.
/// Returns readings/s and the rows left in the journal.
fn journal_with_releases(dir: &Path, rs: &[Reading]) -> (f64, u64) {
    let mut store =
        Store::open_with(&dir.join("release.db"), &StoreOptions::default()).expect("open store");
    let mut inserted = Vec::with_capacity(BATCH);
    let mut horizon = i64::MIN;
    let started = Instant::now();
    for chunk in rs.chunks(BATCH) {
        store
            .commit_ingest(chunk.iter().map(Reading::as_view), &[], &[], &mut inserted)
            .expect("commit");
        let now = chunk.last().map(release_horizon).unwrap_or(horizon);
        if now > horizon {
            horizon = now;
            let mut summary = summaries(1).remove(0);
            summary.window_start_ms = now - RELEASE_WINDOW_MS;
            summary.window_end_ms = now;
            store
                .commit_closed(&[ClosedWindow::final_window(summary)], horizon, 0)
                .expect("close");
        } else if store.released_journal_left() {
            store.delete_released_journal(horizon).expect("release");
        }
    }
    let rate = rs.len() as f64 / started.elapsed().as_secs_f64();
    (rate, store.journal_len().expect("count"))
}

/// The same with the journal as it was: one table, released rows deleted row by row, 8,192 per
/// step (a step in the close's transaction, then one per batch).
fn baseline_releases(dir: &Path, rs: &[Reading]) -> (f64, u64) {
    let mut conn = rusqlite::Connection::open(dir.join("release-baseline.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("sync");
    conn.execute_batch(&journal::create_table_sql("journal"))
        .expect("create");
    let step = |conn: &rusqlite::Connection, before: i64| -> bool {
        let cutoff: Option<i64> = conn
            .prepare_cached(
                "SELECT time_ms FROM journal WHERE time_ms < ?1 ORDER BY time_ms LIMIT 1 OFFSET 8192",
            )
            .expect("prepare")
            .query_row([before], |r| r.get(0))
            .ok();
        let mut delete = conn
            .prepare_cached("DELETE FROM journal WHERE time_ms < ?1")
            .expect("prepare");
        if let Some(cutoff) = cutoff {
            // A chunk; a millisecond holding a whole chunk goes whole.
            if delete.execute([cutoff]).expect("delete") == 0 {
                delete.execute([cutoff + 1]).expect("delete");
            }
        } else {
            delete.execute([before]).expect("delete");
        }
        cutoff.is_some()
    };
    let (mut horizon, mut left, mut arrival) = (i64::MIN, false, 0i64);
    let started = Instant::now();
    for chunk in rs.chunks(BATCH) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("tx");
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO journal (time_ms, stream, arrival, value, unit)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .expect("prepare");
            for r in chunk {
                arrival += 1;
                st.execute(rusqlite::params![
                    r.time_ms, r.stream, arrival, r.value, r.unit
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
        let now = chunk.last().map(release_horizon).unwrap_or(horizon);
        if now > horizon || left {
            horizon = now;
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .expect("tx");
            left = step(&tx, horizon);
            tx.commit().expect("commit");
        }
    }
    let rate = rs.len() as f64 / started.elapsed().as_secs_f64();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))
        .expect("count");
    (rate, rows as u64)
}

fn config(dir: &Path, cloud: &str, token: &str) -> AgentConfig {
    let mut cfg = AgentConfig::parse(&format!(
        r#"
        agent_id = "bench"
        [window]
        window_seconds = 1
        allowed_lateness_ms = 100000
        idle_timeout_ms = 100000000
        [[filter]]
        stream = "+/temperature"
        min = -40.0
        max = 85.0
        [sync]
        url = "{cloud}"
        token = "{token}"
        batch_max_summaries = 2000
        "#
    ))
    .expect("bench config");
    cfg.store.path = dir.join("pipeline.db");
    cfg
}

fn pipeline(dir: &Path, n: usize) -> f64 {
    let cfg = config(dir, "http://127.0.0.1:1", "x");
    let mut p = Pipeline::open(&cfg, Arc::new(Metrics::default())).expect("pipeline");
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let node = format!("node-{}", i % STREAMS);
            let t = 1_700_000_000_000 + (i / STREAMS) as i64 * 10;
            let rec = [Record {
                name: "temperature",
                unit: Some("Cel"),
                value: (i % 800) as f64 / 10.0,
                time_offset_s: 0.0,
            }];
            let mut buf = [0u8; 128];
            let len = encode_pack(&format!("{node}/"), t as f64 / 1000.0, &rec, &mut buf)
                .expect("encode");
            (format!("sensors/{node}"), buf[..len].to_vec())
        })
        .collect();
    let started = Instant::now();
    for chunk in payloads.chunks(BATCH) {
        let msgs: Vec<Message<'_>> = chunk
            .iter()
            .map(|(t, p)| Message {
                topic: t,
                payload: p,
            })
            .collect();
        p.ingest(&msgs, 0, 0).expect("ingest");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn summaries(n: usize) -> Vec<WindowSummary> {
    (0..n)
        .map(|i| {
            let start = 1_700_000_000_000 + (i / STREAMS) as i64 * 1000;
            WindowSummary {
                agent_id: "bench".into(),
                stream: format!("node-{}/temperature", i % STREAMS),
                window_start_ms: start,
                window_end_ms: start + 1000,
                revision: 0,
                count: 100,
                min: 10.0,
                max: 30.0,
                mean: 20.0,
                stddev: 3.0,
                first_value: 11.0,
                first_time_ms: start,
                last_value: 29.0,
                last_time_ms: start + 990,
                unit: Some("Cel".into()),
                score: None,
                quantiles: None,
            }
        })
        .collect()
}

async fn drain(dir: &Path, n: usize) -> (f64, f64) {
    let all = summaries(n);
    // Baseline: the receiver's store alone.
    let base_store = edgewise_cloud::Store::open(&dir.join("cloud-baseline.db")).expect("cloud");
    base_store.add_device("bench").expect("device");
    let started = Instant::now();
    for chunk in all.chunks(2000) {
        base_store.ingest("bench", chunk).expect("ingest");
    }
    let baseline = n as f64 / started.elapsed().as_secs_f64();

    let cloud = edgewise_cloud::Store::open(&dir.join("cloud.db")).expect("cloud");
    let token = cloud.add_device("bench").expect("device");
    let receiver = edgewise_cloud::Receiver::start(
        "127.0.0.1:0".parse().expect("addr"),
        cloud,
        edgewise_cloud::ServerConfig::default(),
    )
    .await
    .expect("receiver");
    let cfg = config(dir, &format!("http://{}", receiver.local_addr()), &token);
    {
        let mut store =
            Store::open_with(&cfg.store.path, &StoreOptions::from_config(&cfg)).expect("store");
        let closed: Vec<ClosedWindow> = all.into_iter().map(ClosedWindow::final_window).collect();
        for chunk in closed.chunks(5000) {
            store.commit_closed(chunk, i64::MAX, 0).expect("fill");
        }
    }
    let metrics = Arc::new(Metrics::default());
    let uploader = Uploader::new(&cfg, metrics.clone()).expect("uploader");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(uploader.run(Arc::new(tokio::sync::Notify::new()), stop_rx));
    while metrics.summaries_synced.get() < n as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain stalled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = task.await;
    let stored = receiver.metrics().snapshot().summaries_inserted;
    assert_eq!(stored, n as u64, "the receiver stored every summary");
    receiver.stop().await;
    (rate, baseline)
}

fn main() {
    edgewise_agent::install_crypto_provider();
    let n = env_usize("EDGEWISE_BENCH_READINGS", 2_000_000);
    let s = env_usize("EDGEWISE_BENCH_SUMMARIES", 100_000);
    let dir = match std::env::var_os("EDGEWISE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir_in("/var/tmp"),
    }
    .expect("bench dir");
    println!("edgewise store benchmarks in {}", dir.path().display());
    let rs = readings(n);

    let base = baseline_inserts(dir.path(), &rs);
    let normal = journal(dir.path(), "normal.db", SyncMode::Normal, &rs);
    let full = journal(dir.path(), "full.db", SyncMode::Full, &rs);
    let pipe = pipeline(dir.path(), n.min(1_000_000));
    let rel = release_readings(n);
    let (released, released_left) = journal_with_releases(dir.path(), &rel);
    let (old_way, old_left) = baseline_releases(dir.path(), &rel);
    println!(
        "journal, sync=normal, group commit {BATCH}: {normal:>10.0} readings/s  \
         ({:.2}x target {JOURNAL_TARGET:.0}, {:.2}x plain-insert baseline {base:.0}/s)",
        normal / JOURNAL_TARGET,
        normal / base
    );
    println!(
        "journal, sync=full,   group commit {BATCH}: {full:>10.0} readings/s  ({:.2}x target)",
        full / JOURNAL_TARGET
    );
    println!(
        "pipeline (decode+contract+journal+window): {pipe:>10.0} readings/s  ({:.2}x target)",
        pipe / JOURNAL_TARGET
    );

    println!(
        "journal with releases, 20,000 streams, 10 s windows: {released:>10.0} readings/s  \
         ({:.2}x the single table deleting row by row, {old_way:.0}/s; rows left {released_left} / {old_left})",
        released / old_way
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (rate, baseline) = rt.block_on(drain(dir.path(), s));
    println!(
        "drain {s} summaries to a local receiver:   {rate:>10.0} summaries/s ({:.2}x target {DRAIN_TARGET:.0}, \
         {:.2}x receiver-store-only baseline {baseline:.0}/s)",
        rate / DRAIN_TARGET,
        rate / baseline
    );
}
