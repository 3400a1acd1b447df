//! The PostgreSQL backend: [`PgStore`], a connection pool (deadpool-postgres over
//! tokio-postgres) that many stateless receivers share.
//!
//! Migrations: the same versions as SQLite (v1 devices and summaries, v2 scores and gaps),
//! applied at start inside one transaction per version that first takes
//! `LOCK TABLE schema_migrations`, so replicas starting together apply each version once.
//!
//! Ingest, in ONE transaction per batch:
//! 1. `UPDATE devices SET last_seen_ms` takes the device's row lock, so two replicas storing the
//!    same device's batches run one after the other (no deadlocks, no lost revisions).
//! 2. The batch is deduplicated (highest revision per window), sorted by key, and written with
//!    multi-row `INSERT .. ON CONFLICT DO NOTHING RETURNING key`: returned rows are new.
//! 3. The rest go through `INSERT .. ON CONFLICT DO UPDATE .. WHERE stored.revision <
//!    new.revision RETURNING key`: returned rows are revisions, the others duplicates.
//!
//! So the sum of `inserted` over every replica equals the number of distinct windows stored,
//! whatever the retries and overlaps: `tests/replicas.rs` checks exactly that.
//!
//! Connection loss (PostgreSQL restarted, network cut) surfaces as
//! [`StoreError::Unavailable`], which the API answers with 503 and `Retry-After`; the pool drops
//! broken connections and opens new ones on the next request, so a receiver recovers without
//! a restart of its own.
//!
//! The SQL is plain (no `COPY`, no PG-only types), so it runs on Citus or TimescaleDB too.
//! Tested by the shared HTTP suite (`tests/api.rs`) and `tests/replicas.rs`, when
//! `EDGEWISE_TEST_PG_URL` names a server.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use edgewise_protocol::{Gap, Score, WindowSummary};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::sqlite::{Arg, DEVICES_SQL, gap_from_parts, gap_sql, streams_json, summary_sql};
use super::{
    DeviceInfo, GapQuery, IngestOutcome, StoreError, StoredGap, StoredSummary, SummaryFilter,
    check_batch, check_device_id, dedup_batch, now_ms,
};
use crate::auth::{DeviceToken, TokenHash};

/// Schema migrations, applied in order; `MIGRATIONS[i]` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: devices and summaries.
    "CREATE TABLE devices (
         id            TEXT PRIMARY KEY NOT NULL,
         token_hash    TEXT NOT NULL UNIQUE,
         created_at_ms BIGINT NOT NULL,
         revoked       INTEGER NOT NULL DEFAULT 0,
         last_seen_ms  BIGINT
     );
     CREATE TABLE summaries (
         device_id       TEXT NOT NULL REFERENCES devices(id),
         stream          TEXT NOT NULL,
         window_start_ms BIGINT NOT NULL,
         window_end_ms   BIGINT NOT NULL,
         revision        BIGINT NOT NULL,
         count           BIGINT NOT NULL,
         min             DOUBLE PRECISION NOT NULL,
         max             DOUBLE PRECISION NOT NULL,
         mean            DOUBLE PRECISION NOT NULL,
         stddev          DOUBLE PRECISION NOT NULL,
         first_value     DOUBLE PRECISION NOT NULL,
         first_time_ms   BIGINT NOT NULL,
         last_value      DOUBLE PRECISION NOT NULL,
         last_time_ms    BIGINT NOT NULL,
         unit            TEXT,
         summary_id      TEXT NOT NULL,
         received_at_ms  BIGINT NOT NULL,
         PRIMARY KEY (device_id, stream, window_start_ms)
     );
     CREATE INDEX summaries_by_window_start ON summaries (window_start_ms);",
    // v2: anomaly scores on summaries (NULL when unscored), and gap records.
    "ALTER TABLE summaries ADD COLUMN score_value DOUBLE PRECISION;
     ALTER TABLE summaries ADD COLUMN score_alert INTEGER;
     ALTER TABLE summaries ADD COLUMN score_model TEXT;
     CREATE INDEX summaries_alerts ON summaries (score_alert, window_start_ms);
     CREATE TABLE gaps (
         device_id      TEXT NOT NULL REFERENCES devices(id),
         seq            BIGINT NOT NULL,
         streams        TEXT NOT NULL,
         from_ms        BIGINT NOT NULL,
         to_ms          BIGINT NOT NULL,
         count          BIGINT NOT NULL,
         reason         TEXT NOT NULL,
         recorded_at_ms BIGINT NOT NULL,
         received_at_ms BIGINT NOT NULL,
         PRIMARY KEY (device_id, seq)
     );",
];

/// The number of schema versions this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Summary columns written per row.
const INSERT_COLUMNS: &str = "device_id, stream, window_start_ms, window_end_ms, revision, count,
     min, max, mean, stddev, first_value, first_time_ms, last_value, last_time_ms,
     unit, summary_id, received_at_ms, score_value, score_alert, score_model";
const PARAMS_PER_ROW: usize = 20;
/// Rows per multi-row INSERT (PostgreSQL allows 65,535 parameters per statement).
const ROWS_PER_STATEMENT: usize = 1_000;

/// Pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// Most connections this receiver opens.
    pub max_connections: usize,
    /// How long a request waits for a connection (or to open one) before 503.
    pub timeout: Duration,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            max_connections: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The receiver's PostgreSQL database. Clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let retryable = match e.code() {
            // No SQLSTATE: the connection itself failed.
            None => true,
            Some(code) => {
                let c = code.code();
                c.starts_with("08") // connection exception
                    || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
            }
        };
        if retryable {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Postgres(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and brings the schema up to date.
    pub async fn connect(url: &str, cfg: &PgConfig) -> Result<PgStore, StoreError> {
        let pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::BadUrl(e.to_string()))?;
        Self::connect_with(pg, cfg).await
    }

    /// [`PgStore::connect`] with a parsed configuration.
    pub async fn connect_with(
        pg: tokio_postgres::Config,
        cfg: &PgConfig,
    ) -> Result<PgStore, StoreError> {
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.timeout))
            .create_timeout(Some(cfg.timeout))
            .recycle_timeout(Some(cfg.timeout))
            .build()
            .map_err(|e| StoreError::BadUrl(e.to_string()))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        // Concurrent CREATE TABLE IF NOT EXISTS can collide on the catalog; the loser retries.
        for attempt in 0.. {
            match client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                         version       BIGINT PRIMARY KEY NOT NULL,
                         applied_at_ms BIGINT NOT NULL
                     )",
                )
                .await
            {
                Ok(()) => break,
                Err(e)
                    if attempt < 3
                        && [
                            SqlState::UNIQUE_VIOLATION,
                            SqlState::DUPLICATE_OBJECT,
                            SqlState::DUPLICATE_TABLE,
                        ]
                        .iter()
                        .any(|c| e.code() == Some(c)) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        for (version, sql) in (1..).zip(MIGRATIONS) {
            let tx = client.transaction().await?;
            tx.batch_execute("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
                .await?;
            let found: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    known: SCHEMA_VERSION,
                });
            }
            if found >= version {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&version, &now_ms()],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }

    /// The schema version of the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn add_device(&self, device_id: &str) -> Result<String, StoreError> {
        check_device_id(device_id)?;
        let token = DeviceToken::generate();
        let client = self.client().await?;
        let result = client
            .execute(
                "INSERT INTO devices (id, token_hash, created_at_ms) VALUES ($1, $2, $3)",
                &[&device_id, &token.hash().as_hex(), &now_ms()],
            )
            .await;
        match result {
            Ok(_) => Ok(token.into_string()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::DeviceExists(device_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE devices SET revoked = 1 WHERE id = $1",
                &[&device_id],
            )
            .await?;
        Ok(n > 0)
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<String>, StoreError> {
        let hash = TokenHash::of(token);
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, token_hash FROM devices WHERE token_hash = $1 AND revoked = 0",
                &[&hash.as_hex()],
            )
            .await?;
        Ok(row.and_then(|r| {
            let stored: String = r.get(1);
            hash.matches(&stored).then(|| r.get(0))
        }))
    }

    pub async fn ingest_batch(
        &self,
        device_id: &str,
        summaries: &[WindowSummary],
        gaps: &[Gap],
    ) -> Result<IngestOutcome, StoreError> {
        check_batch(device_id, summaries, gaps)?;
        let (mut kept, in_batch_duplicates) = dedup_batch(summaries);
        kept.sort_by(|a, b| (&a.stream, a.window_start_ms).cmp(&(&b.stream, b.window_start_ms)));
        let received_at_ms = now_ms();

        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let known = tx
            .execute(
                "UPDATE devices SET last_seen_ms = $2 WHERE id = $1",
                &[&device_id, &received_at_ms],
            )
            .await?;
        if known == 0 {
            return Err(StoreError::UnknownDevice(device_id.to_owned()));
        }
        let mut outcome = IngestOutcome {
            duplicates: in_batch_duplicates,
            ..IngestOutcome::default()
        };
        let rows: Vec<SummaryRow> = kept
            .iter()
            .map(|s| SummaryRow::new(device_id, s, received_at_ms))
            .collect();
        let mut not_new: Vec<&SummaryRow> = Vec::new();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO summaries ({INSERT_COLUMNS}) VALUES {}
                 ON CONFLICT (device_id, stream, window_start_ms) DO NOTHING
                 RETURNING stream, window_start_ms",
                values_list(chunk.len())
            );
            let inserted = keys(
                &tx.query(&tx.prepare_cached(&sql).await?, &params(chunk))
                    .await?,
            );
            outcome.inserted += inserted.len() as u64;
            not_new.extend(
                chunk
                    .iter()
                    .filter(|r| !inserted.contains(&(r.stream.clone(), r.window_start_ms))),
            );
        }
        let not_new: Vec<SummaryRow> = not_new.into_iter().cloned().collect();
        for chunk in not_new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO summaries ({INSERT_COLUMNS}) VALUES {}
                 ON CONFLICT (device_id, stream, window_start_ms) DO UPDATE SET
                     window_end_ms = EXCLUDED.window_end_ms, revision = EXCLUDED.revision,
                     count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max,
                     mean = EXCLUDED.mean, stddev = EXCLUDED.stddev,
                     first_value = EXCLUDED.first_value, first_time_ms = EXCLUDED.first_time_ms,
                     last_value = EXCLUDED.last_value, last_time_ms = EXCLUDED.last_time_ms,
                     unit = EXCLUDED.unit, summary_id = EXCLUDED.summary_id,
                     received_at_ms = EXCLUDED.received_at_ms,
                     score_value = EXCLUDED.score_value, score_alert = EXCLUDED.score_alert,
                     score_model = EXCLUDED.score_model
                 WHERE summaries.revision < EXCLUDED.revision
                 RETURNING stream, window_start_ms",
                values_list(chunk.len())
            );
            let revised = tx
                .query(&tx.prepare_cached(&sql).await?, &params(chunk))
                .await?;
            outcome.revised += revised.len() as u64;
            outcome.duplicates += (chunk.len() - revised.len()) as u64;
        }
        for g in gaps {
            // Checked by check_batch: seq and count fit.
            let seq = i64::try_from(g.seq).unwrap_or(i64::MAX);
            let count = i64::try_from(g.count).unwrap_or(i64::MAX);
            let n = tx
                .execute(
                    "INSERT INTO gaps (device_id, seq, streams, from_ms, to_ms, count, reason,
                                       recorded_at_ms, received_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (device_id, seq) DO NOTHING",
                    &[
                        &device_id,
                        &seq,
                        &streams_json(&g.streams),
                        &g.from_ms,
                        &g.to_ms,
                        &count,
                        &g.reason,
                        &g.recorded_at_ms,
                        &received_at_ms,
                    ],
                )
                .await?;
            if n == 1 {
                outcome.gaps_inserted += 1;
            } else {
                outcome.gaps_duplicate += 1;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }

    pub async fn summary_page(&self, f: &SummaryFilter) -> Result<Vec<StoredSummary>, StoreError> {
        let (sql, args) = summary_sql(f, |n| format!("${n}"));
        let client = self.client().await?;
        let rows = client.query(&sql, &sql_args(&args)).await?;
        rows.iter().map(summary_from_row).collect()
    }

    pub async fn gaps(&self, q: &GapQuery) -> Result<Vec<StoredGap>, StoreError> {
        let (sql, args) = gap_sql(q, |n| format!("${n}"));
        let client = self.client().await?;
        let rows = client.query(&sql, &sql_args(&args)).await?;
        rows.iter()
            .map(|r| {
                let streams: String = r.try_get(2)?;
                gap_from_parts(
                    r.try_get(0)?,
                    r.try_get(1)?,
                    &streams,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                    r.try_get(7)?,
                    r.try_get(8)?,
                )
            })
            .collect()
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(DEVICES_SQL, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(DeviceInfo {
                    id: r.try_get(0)?,
                    created_at_ms: r.try_get(1)?,
                    last_seen_ms: r.try_get(2)?,
                    revoked: r.try_get::<_, i32>(3)? != 0,
                    summary_count: non_negative(r.try_get(4)?)?,
                    alert_count: non_negative(r.try_get(5)?)?,
                    evicted_count: non_negative(r.try_get(6)?)?,
                })
            })
            .collect()
    }
}

/// One summary's insert parameters, owned so the statement can borrow them.
#[derive(Clone)]
struct SummaryRow {
    device_id: String,
    stream: String,
    window_start_ms: i64,
    window_end_ms: i64,
    revision: i64,
    count: i64,
    stats: [f64; 6],
    first_time_ms: i64,
    last_time_ms: i64,
    unit: Option<String>,
    summary_id: String,
    received_at_ms: i64,
    score_value: Option<f64>,
    score_alert: Option<i32>,
    score_model: Option<String>,
}

impl SummaryRow {
    fn new(device_id: &str, s: &WindowSummary, received_at_ms: i64) -> Self {
        SummaryRow {
            device_id: device_id.to_owned(),
            stream: s.stream.clone(),
            window_start_ms: s.window_start_ms,
            window_end_ms: s.window_end_ms,
            revision: i64::from(s.revision),
            // Checked by check_batch: the count fits.
            count: i64::try_from(s.count).unwrap_or(i64::MAX),
            stats: [s.min, s.max, s.mean, s.stddev, s.first_value, s.last_value],
            first_time_ms: s.first_time_ms,
            last_time_ms: s.last_time_ms,
            unit: s.unit.clone(),
            summary_id: s.id().to_string(),
            received_at_ms,
            score_value: s.score.as_ref().map(|x| x.value),
            score_alert: s.score.as_ref().map(|x| i32::from(x.alert)),
            score_model: s.score.as_ref().map(|x| x.model.clone()),
        }
    }

    fn push_params<'a>(&'a self, out: &mut Vec<&'a (dyn ToSql + Sync)>) {
        let [min, max, mean, stddev, first_value, last_value] = &self.stats;
        out.extend_from_slice(&[
            &self.device_id,
            &self.stream,
            &self.window_start_ms,
            &self.window_end_ms,
            &self.revision,
            &self.count,
            min,
            max,
            mean,
            stddev,
            first_value,
            &self.first_time_ms,
            last_value,
            &self.last_time_ms,
            &self.unit,
            &self.summary_id,
            &self.received_at_ms,
            &self.score_value,
            &self.score_alert,
            &self.score_model,
        ]);
    }
}

fn params(rows: &[SummaryRow]) -> Vec<&(dyn ToSql + Sync)> {
    let mut out = Vec::with_capacity(rows.len() * PARAMS_PER_ROW);
    for r in rows {
        r.push_params(&mut out);
    }
    out
}

/// `($1, .., $20), ($21, .., $40), ..` for `rows` rows.
fn values_list(rows: usize) -> String {
    let mut s = String::with_capacity(rows * PARAMS_PER_ROW * 5);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..PARAMS_PER_ROW {
            if c > 0 {
                s.push_str(", ");
            }
            s.push('$');
            s.push_str(&(r * PARAMS_PER_ROW + c + 1).to_string());
        }
        s.push(')');
    }
    s
}

fn keys(rows: &[Row]) -> HashSet<(String, i64)> {
    rows.iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
        .collect()
}

fn sql_args(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            Arg::Text(s) => s as &(dyn ToSql + Sync),
            Arg::Int(i) => i as &(dyn ToSql + Sync),
        })
        .collect()
}

fn non_negative(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative count {v}")))
}

// Column order: super::sqlite::SUMMARY_COLUMNS.
fn summary_from_row(r: &Row) -> Result<StoredSummary, StoreError> {
    let device_id: String = r.try_get(0)?;
    let revision: i64 = r.try_get(4)?;
    let revision = u32::try_from(revision)
        .map_err(|_| StoreError::Corrupt(format!("revision {revision} is out of range")))?;
    let score = match r.try_get::<_, Option<f64>>(16)? {
        None => None,
        Some(value) => Some(Score {
            value,
            alert: r.try_get::<_, Option<i32>>(17)?.unwrap_or(0) != 0,
            model: r.try_get::<_, Option<String>>(18)?.unwrap_or_default(),
        }),
    };
    Ok(StoredSummary {
        summary: WindowSummary {
            agent_id: device_id.clone(),
            stream: r.try_get(1)?,
            window_start_ms: r.try_get(2)?,
            window_end_ms: r.try_get(3)?,
            revision,
            count: non_negative(r.try_get(5)?)?,
            min: r.try_get(6)?,
            max: r.try_get(7)?,
            mean: r.try_get(8)?,
            stddev: r.try_get(9)?,
            first_value: r.try_get(10)?,
            first_time_ms: r.try_get(11)?,
            last_value: r.try_get(12)?,
            last_time_ms: r.try_get(13)?,
            unit: r.try_get(14)?,
            score,
        },
        device_id,
        received_at_ms: r.try_get(15)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_list_numbers_every_parameter() {
        assert_eq!(values_list(0), "");
        let two = values_list(2);
        assert!(two.starts_with("($1, $2, "));
        assert!(two.contains("$20), ($21, "));
        assert!(two.ends_with("$40)"));
    }
}
