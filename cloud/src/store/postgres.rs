//! The PostgreSQL backend: [`PgStore`], a connection pool (deadpool-postgres over
//! tokio-postgres) that many stateless receivers share.
//!
//! Migrations: the same versions as SQLite (v1 devices and summaries, v2 scores and gaps, v3
//! quantiles, v4 a partial alerts index; here v4 also drops the per-row foreign key from
//! summaries to devices, see its comment; v5 drops the unread `summary_id` column; v6 latest values), applied at start inside one transaction per version
//! that first takes `LOCK TABLE schema_migrations`, so replicas starting together apply each
//! version once.
//!
//! Ingest, in ONE transaction per batch:
//! 1. `UPDATE devices SET last_seen_ms` takes the device's row lock, so two replicas storing the
//!    same device's batches run one after the other (no deadlocks, no lost revisions).
//! 2. The batch, already deduplicated (highest revision per window) and sorted by key by
//!    [`CheckedBatch`], is written by ONE statement whatever its size: `INSERT .. SELECT ..
//!    FROM UNNEST($3::text[], $4::bigint[], ..) ON CONFLICT DO NOTHING`, one array parameter per
//!    column. The rows it affects are the new windows.
//! 3. Only if some were not new, the same arrays go through `INSERT .. ON CONFLICT DO UPDATE
//!    .. WHERE stored.revision < new.revision`: the rows it affects are revisions (a row that
//!    step 2 has just inserted has the same revision, so it is not touched), and the rest are
//!    duplicates.
//! 4. Gap records, then the batch's latest values: one `INSERT .. SELECT .. FROM UNNEST(..) ON
//!    CONFLICT DO UPDATE .. WHERE stored.time_ms < new.time_ms` (see [`crate::store::latest`]).
//!
//! So the sum of `inserted` over every replica equals the number of distinct windows stored,
//! whatever the retries and overlaps: `tests/replicas.rs` checks exactly that.
//!
//! Connection loss (PostgreSQL restarted, network cut) surfaces as
//! [`StoreError::Unavailable`], which the API answers with 503 and `Retry-After`; the pool drops
//! broken connections and opens new ones on the next request, so a receiver recovers without
//! a restart of its own.
//!
//! The SQL is plain (`UNNEST` of arrays, no `COPY`, no temporary tables, no PG-only column
//! types), so it runs on Citus or TimescaleDB too.
//! Tested by the shared HTTP suite (`tests/api.rs`) and `tests/replicas.rs`, when
//! `EDGEWISE_TEST_PG_URL` names a server.

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use edgewise_protocol::{Gap, Quantiles, Score, WindowSummary};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::latest::{
    LatestQuery, StoredLatest, UPSERT_NEWER, ValueColumns, latest_sql, value_from_columns,
};
use super::sqlite::{
    Arg, DEVICES_SQL, ROW_COLUMNS, gap_from_parts, gap_sql, streams_json, summary_sql,
};
use super::{
    CheckedBatch, DeviceInfo, GapQuery, IngestOutcome, StoreError, StoredGap, StoredSummary,
    SummaryFilter, check_device_id, now_ms,
};
use crate::auth::{DeviceToken, TokenHash, TokenHasher};

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
    // v3: quantile estimates on summaries (NULL when the agent computes none).
    "ALTER TABLE summaries ADD COLUMN q_p50 DOUBLE PRECISION;
     ALTER TABLE summaries ADD COLUMN q_p90 DOUBLE PRECISION;
     ALTER TABLE summaries ADD COLUMN q_p99 DOUBLE PRECISION;
     ALTER TABLE summaries ADD COLUMN q_relative_error DOUBLE PRECISION;",
    // v4: only alerts in the alerts index (as on SQLite), and no per-row foreign key check
    // from summaries to devices: PostgreSQL runs that check as a trigger query per inserted
    // row (about a fifth of the insert's cost here), while ingest already checks the device
    // once per batch, holding its row lock (`UPDATE devices` first), and devices are never
    // deleted (revoking keeps the row).
    "DROP INDEX summaries_alerts;
     CREATE INDEX summaries_alerts ON summaries (window_start_ms) WHERE score_alert = 1;
     ALTER TABLE summaries DROP CONSTRAINT IF EXISTS summaries_device_id_fkey;",
    // v5 (as on SQLite): no `summary_id` column. It is derived from the key and the revision,
    // never read (the API computes the id), and it was a sixth of each row's bytes.
    "ALTER TABLE summaries DROP COLUMN summary_id;",
    // v6: the latest text, boolean or data value of each stream (see store::latest); the one
    // value column its kind names is set, the others are NULL.
    "CREATE TABLE latest_values (
         device_id      TEXT NOT NULL REFERENCES devices(id),
         stream         TEXT NOT NULL,
         time_ms        BIGINT NOT NULL,
         kind           TEXT NOT NULL CHECK (kind IN ('text', 'bool', 'data')),
         value_text     TEXT,
         value_bool     BOOLEAN,
         value_bytes    BYTEA,
         received_at_ms BIGINT NOT NULL,
         PRIMARY KEY (device_id, stream)
     );",
];

/// The number of schema versions this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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
    hasher: TokenHasher,
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
        let store = PgStore {
            pool,
            hasher: TokenHasher::default(),
        };
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

    /// [`crate::Store::with_token_hasher`] for PostgreSQL. Replicas migrating at the same time
    /// are harmless: each row is rewritten only while it still holds its plain hash.
    pub async fn with_token_hasher(mut self, hasher: TokenHasher) -> Result<PgStore, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx.query("SELECT id, token_hash FROM devices", &[]).await?;
        let keyed = rows
            .iter()
            .filter(|r| TokenHash::is_keyed(r.get::<_, &str>(1)))
            .count();
        if !hasher.is_keyed() && keyed > 0 {
            return Err(StoreError::TokenKeyRequired { keyed });
        }
        let mut upgraded = 0;
        for row in &rows {
            let (id, stored): (&str, &str) = (row.get(0), row.get(1));
            if let Some(new) = hasher.upgrade(stored) {
                upgraded += tx
                    .execute(
                        "UPDATE devices SET token_hash = $1 WHERE id = $2 AND token_hash = $3",
                        &[&new.as_hex(), &id, &stored],
                    )
                    .await?;
            }
        }
        tx.commit().await?;
        if upgraded > 0 {
            tracing::info!(upgraded, "device token hashes migrated to the keyed format");
        }
        drop(client);
        self.hasher = hasher;
        Ok(self)
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
                &[
                    &device_id,
                    &self.hasher.hash(token.as_str()).as_hex(),
                    &now_ms(),
                ],
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

    /// See [`crate::Store::rotate_token`].
    pub async fn rotate_token(&self, device_id: &str) -> Result<String, StoreError> {
        let token = DeviceToken::generate();
        let changed = self
            .client()
            .await?
            .execute(
                "UPDATE devices SET token_hash = $1, revoked = 0 WHERE id = $2",
                &[&self.hasher.hash(token.as_str()).as_hex(), &device_id],
            )
            .await?;
        if changed == 0 {
            return Err(StoreError::UnknownDevice(device_id.to_owned()));
        }
        Ok(token.into_string())
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
        let hash = self.hasher.hash(token);
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

    /// Checks and stores a batch (see [`PgStore::store_checked`]).
    pub async fn ingest_batch(
        &self,
        device_id: &str,
        summaries: &[WindowSummary],
        gaps: &[Gap],
    ) -> Result<IngestOutcome, StoreError> {
        let batch = CheckedBatch::new(device_id.to_owned(), summaries.to_vec(), gaps.to_vec())?;
        self.store_checked(&batch).await
    }

    /// Stores a checked batch in one transaction (the module docs give the steps).
    pub async fn store_checked(&self, batch: &CheckedBatch) -> Result<IngestOutcome, StoreError> {
        let device_id = batch.device_id();
        let received_at_ms = now_ms();
        let columns = SummaryColumns::of(batch);

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
            duplicates: batch.in_batch_duplicates(),
            ..IngestOutcome::default()
        };
        let stored = batch.summaries().len() as u64;
        if stored > 0 {
            let params = columns.params(&device_id, &received_at_ms);
            let insert = tx.prepare_cached(&INSERT_NEW_SQL).await?;
            outcome.inserted = tx.execute(&insert, &params).await?;
            if outcome.inserted < stored {
                let revise = tx.prepare_cached(&REVISE_SQL).await?;
                outcome.revised = tx.execute(&revise, &params).await?;
                outcome.duplicates += stored - outcome.inserted - outcome.revised;
            }
        }
        for g in batch.gaps() {
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
        store_latest(&tx, batch, received_at_ms, &mut outcome).await?;
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

    /// Stored latest values matching `q`, by device then stream.
    pub async fn latest(&self, q: &LatestQuery) -> Result<Vec<StoredLatest>, StoreError> {
        let (sql, args) = latest_sql(q, |n| format!("${n}"));
        let client = self.client().await?;
        let rows = client.query(&sql, &sql_args(&args)).await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(3)?;
                Ok(StoredLatest {
                    device_id: r.try_get(0)?,
                    stream: r.try_get(1)?,
                    time_ms: r.try_get(2)?,
                    value: value_from_columns(&kind, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?)?,
                    received_at_ms: r.try_get(7)?,
                })
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

/// A batch's summaries as one array per column ([`ROW_COLUMNS`] order), the parameters of
/// [`INSERT_NEW_SQL`] and [`REVISE_SQL`]. Every array has one entry per summary: `UNNEST` would
/// pad a shorter one with NULLs.
struct SummaryColumns<'a> {
    stream: Vec<&'a str>,
    window_start_ms: Vec<i64>,
    window_end_ms: Vec<i64>,
    revision: Vec<i64>,
    count: Vec<i64>,
    /// min, max, mean, stddev, first_value, last_value.
    stats: [Vec<f64>; 6],
    first_time_ms: Vec<i64>,
    last_time_ms: Vec<i64>,
    unit: Vec<Option<&'a str>>,
    score_value: Vec<Option<f64>>,
    score_alert: Vec<Option<i32>>,
    score_model: Vec<Option<&'a str>>,
    /// p50, p90, p99, relative error; NULL without quantiles.
    quantiles: [Vec<Option<f64>>; 4],
}

impl<'a> SummaryColumns<'a> {
    fn of(batch: &'a CheckedBatch) -> Self {
        let n = batch.summaries().len();
        let mut c = SummaryColumns {
            stream: Vec::with_capacity(n),
            window_start_ms: Vec::with_capacity(n),
            window_end_ms: Vec::with_capacity(n),
            revision: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
            stats: std::array::from_fn(|_| Vec::with_capacity(n)),
            first_time_ms: Vec::with_capacity(n),
            last_time_ms: Vec::with_capacity(n),
            unit: Vec::with_capacity(n),
            score_value: Vec::with_capacity(n),
            score_alert: Vec::with_capacity(n),
            score_model: Vec::with_capacity(n),
            quantiles: std::array::from_fn(|_| Vec::with_capacity(n)),
        };
        for s in batch.summaries() {
            c.stream.push(&s.stream);
            c.window_start_ms.push(s.window_start_ms);
            c.window_end_ms.push(s.window_end_ms);
            c.revision.push(i64::from(s.revision));
            // Checked by check_batch: the count fits.
            c.count.push(i64::try_from(s.count).unwrap_or(i64::MAX));
            let stats = [s.min, s.max, s.mean, s.stddev, s.first_value, s.last_value];
            for (column, v) in c.stats.iter_mut().zip(stats) {
                column.push(v);
            }
            c.first_time_ms.push(s.first_time_ms);
            c.last_time_ms.push(s.last_time_ms);
            c.unit.push(s.unit.as_deref());
            c.score_value.push(s.score.as_ref().map(|x| x.value));
            c.score_alert
                .push(s.score.as_ref().map(|x| i32::from(x.alert)));
            c.score_model
                .push(s.score.as_ref().map(|x| x.model.as_str()));
            let q = s.quantiles.as_ref();
            let quantiles = [
                q.map(|q| q.p50),
                q.map(|q| q.p90),
                q.map(|q| q.p99),
                q.map(|q| q.relative_error),
            ];
            for (column, v) in c.quantiles.iter_mut().zip(quantiles) {
                column.push(v);
            }
        }
        c
    }

    /// `$1` device id, `$2` received at, then one array per [`ROW_COLUMNS`] entry.
    fn params<'p>(
        &'p self,
        device_id: &'p &str,
        received_at_ms: &'p i64,
    ) -> [&'p (dyn ToSql + Sync); 2 + ROW_COLUMNS.len()] {
        let [min, max, mean, stddev, first_value, last_value] = &self.stats;
        let [p50, p90, p99, relative_error] = &self.quantiles;
        [
            device_id,
            received_at_ms,
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
            &self.score_value,
            &self.score_alert,
            &self.score_model,
            p50,
            p90,
            p99,
            relative_error,
        ]
    }
}

/// The PostgreSQL type of each [`ROW_COLUMNS`] entry.
const ROW_TYPES: [&str; ROW_COLUMNS.len()] = [
    "text", "bigint", "bigint", "bigint", "bigint", "float8", "float8", "float8", "float8",
    "float8", "bigint", "float8", "bigint", "text", "float8", "integer", "text", "float8",
    "float8", "float8", "float8",
];

/// `INSERT INTO summaries (..) SELECT $1, $2, * FROM UNNEST($3::text[], ..)`: the whole batch
/// in one statement with a fixed parameter list, whatever its size.
fn insert_from_arrays() -> String {
    let arrays: Vec<String> = ROW_TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 3))
        .collect();
    format!(
        "INSERT INTO summaries (device_id, received_at_ms, {})
         SELECT $1::text, $2::bigint, * FROM UNNEST({})
         ON CONFLICT (device_id, stream, window_start_ms)",
        ROW_COLUMNS.join(", "),
        arrays.join(", ")
    )
}

/// New windows only.
static INSERT_NEW_SQL: LazyLock<String> =
    LazyLock::new(|| format!("{} DO NOTHING", insert_from_arrays()));

/// Higher revisions replace stored windows; anything else is left alone.
static REVISE_SQL: LazyLock<String> = LazyLock::new(|| {
    let set: Vec<String> = ROW_COLUMNS
        .iter()
        .chain(&["received_at_ms"])
        .filter(|c| !matches!(**c, "stream" | "window_start_ms"))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "{} DO UPDATE SET {} WHERE summaries.revision < EXCLUDED.revision",
        insert_from_arrays(),
        set.join(", ")
    )
});

/// The batch's latest values, in one statement: each replaces the stored value of its stream
/// only if its `time_ms` is newer. `$1` device id, `$2` received at, then one array per column.
static UPSERT_LATEST_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO latest_values (device_id, received_at_ms, stream, time_ms, kind, value_text,
                                    value_bool, value_bytes)
         SELECT $1::text, $2::bigint, * FROM UNNEST($3::text[], $4::bigint[], $5::text[],
                                                    $6::text[], $7::boolean[], $8::bytea[])
         {UPSERT_NEWER}"
    )
});

/// Stores the batch's latest values in its transaction `tx`, counting each as stored or
/// ignored. The batch holds at most one value per stream, so no row is touched twice.
async fn store_latest(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &CheckedBatch,
    received_at_ms: i64,
    outcome: &mut IngestOutcome,
) -> Result<(), StoreError> {
    outcome.latest_ignored += batch.in_batch_ignored_latest();
    let latest = batch.latest();
    if latest.is_empty() {
        return Ok(());
    }
    let columns: Vec<ValueColumns<'_>> =
        latest.iter().map(|v| ValueColumns::of(&v.value)).collect();
    let stream: Vec<&str> = latest.iter().map(|v| v.stream.as_str()).collect();
    let time_ms: Vec<i64> = latest.iter().map(|v| v.time_ms).collect();
    let kind: Vec<&str> = columns.iter().map(|c| c.kind).collect();
    let text: Vec<Option<&str>> = columns.iter().map(|c| c.text).collect();
    let flag: Vec<Option<bool>> = columns.iter().map(|c| c.flag).collect();
    let bytes: Vec<Option<&[u8]>> = columns.iter().map(|c| c.bytes).collect();
    let upsert = tx.prepare_cached(&UPSERT_LATEST_SQL).await?;
    let stored = tx
        .execute(
            &upsert,
            &[
                &batch.device_id(),
                &received_at_ms,
                &stream,
                &time_ms,
                &kind,
                &text,
                &flag,
                &bytes,
            ],
        )
        .await?;
    outcome.latest_stored += stored;
    outcome.latest_ignored += (latest.len() as u64).saturating_sub(stored);
    Ok(())
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
    let quantiles = match r.try_get::<_, Option<f64>>(19)? {
        None => None,
        Some(p50) => Some(Quantiles {
            p50,
            p90: r.try_get::<_, Option<f64>>(20)?.unwrap_or(p50),
            p99: r.try_get::<_, Option<f64>>(21)?.unwrap_or(p50),
            relative_error: r.try_get::<_, Option<f64>>(22)?.unwrap_or(0.0),
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
            quantiles,
        },
        device_id,
        received_at_ms: r.try_get(15)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_insert_names_each_column_once_with_its_type() {
        assert!(INSERT_NEW_SQL.contains("$19::text[]"));
        assert!(INSERT_NEW_SQL.contains("$23::float8[]"));
        assert!(!INSERT_NEW_SQL.contains("$24"));
        assert!(INSERT_NEW_SQL.contains("$18::integer[]"));
        assert!(REVISE_SQL.contains("received_at_ms = EXCLUDED.received_at_ms"));
        assert!(REVISE_SQL.contains("q_relative_error = EXCLUDED.q_relative_error"));
        assert!(!REVISE_SQL.contains("stream = EXCLUDED"));
        assert!(!REVISE_SQL.contains("window_start_ms = EXCLUDED"));
        assert!(REVISE_SQL.ends_with("WHERE summaries.revision < EXCLUDED.revision"));
    }
}

/// Against a real server: run only when `EDGEWISE_TEST_PG_URL` names one (each test creates its
/// own database and drops it at the end); otherwise they pass without doing anything.
#[cfg(test)]
mod server_tests {
    use edgewise_protocol::{LatestValue, StateValue};

    use super::*;
    use crate::store::GapQuery;

    /// A new, empty database and a client of the server's default database to drop it with.
    async fn fresh_db(test: &str) -> Option<(tokio_postgres::Config, tokio_postgres::Client)> {
        let Some(url) = std::env::var("EDGEWISE_TEST_PG_URL")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            eprintln!("EDGEWISE_TEST_PG_URL is not set: skipped");
            return None;
        };
        let admin: tokio_postgres::Config = url.parse().unwrap();
        let (client, conn) = admin.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        let name = format!("ew_unit_{test}_{}", std::process::id());
        // One statement per call: DROP/CREATE DATABASE refuse to run in a multi-statement query.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            client.batch_execute(&sql).await.unwrap();
        }
        let mut config = admin;
        config.dbname(&name);
        Some((config, client))
    }

    async fn drop_db(config: &tokio_postgres::Config, admin: &tokio_postgres::Client) {
        let name = config.get_dbname().unwrap_or_default();
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
    }

    fn text(stream: &str, time_ms: i64, s: &str) -> LatestValue {
        LatestValue {
            stream: stream.to_owned(),
            time_ms,
            value: StateValue::Text(s.to_owned()),
        }
    }

    /// Stores `values` as one batch of `device`; answers (stored, ignored).
    async fn store(store: &PgStore, device: &str, values: &[LatestValue]) -> (u64, u64) {
        let batch = CheckedBatch::new(device.to_owned(), vec![], vec![])
            .and_then(|b| b.with_latest(values.to_vec()))
            .unwrap();
        let out = store.store_checked(&batch).await.unwrap();
        (out.latest_stored, out.latest_ignored)
    }

    async fn rows(store: &PgStore) -> Vec<(String, String, i64, StateValue)> {
        store
            .latest(&LatestQuery::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.device_id, r.stream, r.time_ms, r.value))
            .collect()
    }

    #[tokio::test]
    async fn latest_values_newest_wins_and_older_or_re_sent_ones_change_nothing() {
        let Some((config, admin)) = fresh_db("latest").await else {
            return;
        };
        let pg = PgStore::connect_with(config.clone(), &PgConfig::default())
            .await
            .unwrap();
        pg.add_device("gw-1").await.unwrap();
        let first = [
            text("n1/door", 1_000, "open"),
            LatestValue {
                stream: "n1/fw".to_owned(),
                time_ms: 1_000,
                value: StateValue::Data(vec![0, 1, 2]),
            },
            LatestValue {
                stream: "n1/alarm".to_owned(),
                time_ms: 1_000,
                value: StateValue::Bool(true),
            },
            LatestValue {
                stream: "n1/empty".to_owned(),
                time_ms: 1_000,
                value: StateValue::Data(Vec::new()),
            },
        ];
        assert_eq!(store(&pg, "gw-1", &first).await, (4, 0));
        let row = |s: &str, t, v| ("gw-1".to_owned(), s.to_owned(), t, v);
        assert_eq!(
            rows(&pg).await,
            [
                row("n1/alarm", 1_000, StateValue::Bool(true)),
                row("n1/door", 1_000, StateValue::Text("open".to_owned())),
                row("n1/empty", 1_000, StateValue::Data(Vec::new())),
                row("n1/fw", 1_000, StateValue::Data(vec![0, 1, 2])),
            ]
        );
        // Re-sent, same time with another value, older: all ignored, in the batch or the store.
        let stale = [
            text("n1/door", 1_000, "open"),
            text("n1/door", 1_000, "closed"),
            text("n1/door", 999, "closed"),
        ];
        assert_eq!(store(&pg, "gw-1", &stale).await, (0, 3));
        assert_eq!(store(&pg, "gw-1", &stale[..1]).await, (0, 1));
        // Newer: replaces, even with another kind; the rest of the batch is ignored.
        let newer = [
            text("n1/door", 2_000, "closed"),
            text("n1/fw", 999, "old"),
            LatestValue {
                stream: "n1/alarm".to_owned(),
                time_ms: 1_001,
                value: StateValue::Text("silenced".to_owned()),
            },
        ];
        assert_eq!(store(&pg, "gw-1", &newer).await, (2, 1));
        let now = rows(&pg).await;
        assert_eq!(
            now[0],
            row("n1/alarm", 1_001, StateValue::Text("silenced".to_owned()))
        );
        assert_eq!(
            now[1],
            row("n1/door", 2_000, StateValue::Text("closed".to_owned()))
        );
        assert_eq!(now[3], row("n1/fw", 1_000, StateValue::Data(vec![0, 1, 2])));
        // Paging after a row, and a filter by stream.
        let after = pg
            .latest(&LatestQuery {
                after: Some(("gw-1".to_owned(), "n1/empty".to_owned())),
                ..LatestQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].stream, "n1/fw");
        let door = pg
            .latest(&LatestQuery {
                stream: Some("n1/door".to_owned()),
                ..LatestQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(door.len(), 1);
        drop(pg);
        drop_db(&config, &admin).await;
    }

    #[tokio::test]
    async fn a_v4_database_gains_latest_values_and_keeps_its_data() {
        let Some((config, admin)) = fresh_db("v4").await else {
            return;
        };
        {
            let (client, conn) = config.connect(NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(
                    "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY NOT NULL,
                                                     applied_at_ms BIGINT NOT NULL);
                     INSERT INTO schema_migrations VALUES (1, 0), (2, 0), (3, 0), (4, 0);",
                )
                .await
                .unwrap();
            for sql in &MIGRATIONS[..4] {
                client.batch_execute(sql).await.unwrap();
            }
            client
                .batch_execute(
                    "INSERT INTO devices (id, token_hash, created_at_ms) VALUES ('gw-1', 'h', 0);
                     INSERT INTO gaps VALUES ('gw-1', 1, '[\"n1/temp\"]', 0, 10000, 7,
                         'buffer_full', 10001, 1);
                     INSERT INTO summaries (device_id, stream, window_start_ms, window_end_ms,
                         revision, count, min, max, mean, stddev, first_value, first_time_ms,
                         last_value, last_time_ms, unit, summary_id, received_at_ms, score_value,
                         score_alert, score_model, q_p50, q_p90, q_p99, q_relative_error)
                     VALUES ('gw-1', 's', 0, 10000, 0, 3, 20, 22, 21, 0.8, 20, 500, 22, 9500,
                         'Cel', 'x', 1, 0.9, 1, 'm@1', 21, 22, 22, 0.01);",
                )
                .await
                .unwrap();
        }
        let pg = PgStore::connect_with(config.clone(), &PgConfig::default())
            .await
            .unwrap();
        assert_eq!(pg.schema_version().await.unwrap(), SCHEMA_VERSION);
        let summaries = pg.summary_page(&SummaryFilter::default()).await.unwrap();
        assert_eq!(summaries.len(), 1);
        let s = &summaries[0].summary;
        assert_eq!((s.count, s.mean, s.unit.as_deref()), (3, 21.0, Some("Cel")));
        assert_eq!(s.score.as_ref().map(|x| x.alert), Some(true));
        assert_eq!(s.quantiles.as_ref().map(|q| q.p90), Some(22.0));
        let gaps = pg.gaps(&GapQuery::default()).await.unwrap();
        assert_eq!((gaps.len(), gaps[0].count), (1, 7));
        assert!(rows(&pg).await.is_empty());
        assert_eq!(
            store(&pg, "gw-1", &[text("n1/door", 1, "open")]).await,
            (1, 0)
        );
        assert_eq!(rows(&pg).await.len(), 1);
        drop(pg);
        drop_db(&config, &admin).await;
    }
}
