//! Storage of devices, window summaries (with their anomaly scores), gap records and the latest
//! text/boolean/data value of each stream.
//!
//! Two backends share the types, the checks and the SQL shape defined here:
//! - [`sqlite`]: [`Store`], one file, zero setup: the default and the embedded choice.
//! - [`postgres`]: [`PgStore`], for many stateless receivers on one database.
//! - [`latest`]: what both share for latest values (checks, query, JSON shape, SQL).
//!
//! [`Storage`] is the one interface the HTTP layer uses; [`AnyStore`] picks a backend at run
//! time (the binary, and the tests that run one suite over both).
//!
//! Invariants every backend keeps (and the shared HTTP suite in `tests/api.rs` checks on both
//! when `EDGEWISE_TEST_PG_URL` is set):
//! - At most one summary row per `(device_id, stream, window_start_ms)`: the highest revision
//!   received. An equal or lower revision changes nothing and counts as a duplicate; a higher one
//!   replaces the row (exactly-once storage over at-least-once delivery).
//! - At most one gap row per `(device_id, seq)`; a re-sent gap is a duplicate.
//! - At most one latest value per `(device_id, stream)`: the one with the greatest `time_ms`; an
//!   older or re-sent value changes nothing and counts as ignored (see [`latest`]).
//! - A batch is stored all or nothing, in one transaction (on SQLite, possibly together with
//!   other batches, each in its own savepoint: see [`sqlite::writer`]). It is durable when
//!   `ingest` returns `Ok`.
//! - Every stored record passed [`check_batch`] (latest values: [`CheckedBatch::with_latest`]):
//!   valid, and the writing device's own.
//! - Only SHA-256 hashes of device tokens are stored.
//!
//! The SQL is plain: `INSERT .. ON CONFLICT .. DO UPDATE .. WHERE`, row-value comparisons for
//! keyset paging, no stored procedures or PG-only types, so it also runs on PostgreSQL-compatible
//! distributed engines (Citus, TimescaleDB).

use std::time::{SystemTime, UNIX_EPOCH};

use edgewise_protocol::{Gap, LatestValue, Quantiles, Score, WindowSummary};
use serde::{Deserialize, Serialize};

pub mod latest;
pub mod postgres;
pub mod sqlite;

pub use latest::{LatestQuery, MAX_LATEST_PER_BATCH, StoredLatest};
pub use postgres::{PgConfig, PgStore};
pub use sqlite::Store;

/// Rows returned by a query when it does not say.
pub const DEFAULT_QUERY_LIMIT: usize = 1_000;
/// Most rows a query returns, whatever it asks.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// Longest accepted device id, in bytes (the same bound as a summary's agent id).
pub const MAX_DEVICE_ID_BYTES: usize = WindowSummary::MAX_NAME_BYTES;
/// Most gap records accepted in one batch.
pub const MAX_GAPS_PER_BATCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached right now (connection lost, restarting, pool exhausted):
    /// worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("bad database address or pool settings: {0}")]
    BadUrl(String),
    #[error("database task failed: {0}")]
    Task(String),
    /// The transaction holding the batch failed as a whole; nothing of it was stored.
    #[error("the batch was not stored: {0}")]
    NotStored(String),
    #[error("database schema version {found} is newer than this build understands ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("device id is invalid: {0}")]
    InvalidDeviceId(&'static str),
    #[error(
        "{keyed} device token(s) in this database are stored as keyed hashes: the token key \
         (--token-key-file) is required"
    )]
    TokenKeyRequired { keyed: usize },
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
    #[error(
        "gap {index} has agent_id {agent_id:?}, but device {device_id:?} may only write its own data"
    )]
    ForeignGap {
        index: usize,
        agent_id: String,
        device_id: String,
    },
    #[error("gap {index} is invalid: {reason}")]
    InvalidGap { index: usize, reason: String },
    #[error("latest value {index} is invalid: {reason}")]
    InvalidLatest { index: usize, reason: String },
    #[error("a stored value is out of range: {0}")]
    Corrupt(String),
}

/// What one ingest call did with each record of the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IngestOutcome {
    /// New windows.
    pub inserted: u64,
    /// Summaries already stored at the same or a higher revision (nothing changed).
    pub duplicates: u64,
    /// Higher revisions that replaced a stored window.
    pub revised: u64,
    /// New gap records.
    #[serde(default)]
    pub gaps_inserted: u64,
    /// Gap records already stored (same device and seq).
    #[serde(default)]
    pub gaps_duplicate: u64,
    /// Latest values stored: the stream's first, or newer than the one stored.
    #[serde(default)]
    pub latest_stored: u64,
    /// Latest values not newer than the one stored or another in the batch (nothing changed).
    #[serde(default)]
    pub latest_ignored: u64,
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

/// A [`SummaryQuery`] with the query API's extras: only alerts, and keyset paging.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SummaryFilter {
    pub query: SummaryQuery,
    /// Only summaries whose score is an alert.
    pub alerts_only: bool,
    /// Only rows after this one in the query's order (the previous page's last row).
    pub after: Option<SummaryKey>,
}

/// The sort key of a summary row: `(window_start_ms, device_id, stream)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryKey {
    pub window_start_ms: i64,
    pub device_id: String,
    pub stream: String,
}

impl SummaryKey {
    pub fn of(s: &StoredSummary) -> Self {
        SummaryKey {
            window_start_ms: s.summary.window_start_ms,
            device_id: s.device_id.clone(),
            stream: s.summary.stream.clone(),
        }
    }

    /// An opaque cursor: `start.hex(device).hex(stream)`.
    pub fn to_cursor(&self) -> String {
        format!(
            "{}.{}.{}",
            self.window_start_ms,
            hex::encode(&self.device_id),
            hex::encode(&self.stream)
        )
    }

    pub fn from_cursor(cursor: &str) -> Option<Self> {
        let mut parts = cursor.split('.');
        let start = parts.next()?.parse().ok()?;
        let device = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
        let stream = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(SummaryKey {
            window_start_ms: start,
            device_id: device,
            stream,
        })
    }
}

/// Filter for gap records: those whose `[from_ms, to_ms]` overlaps `[from_ms, to_ms)` of the
/// query, ordered by device, then seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapQuery {
    pub device: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Only gaps after this `(device_id, seq)`.
    pub after: Option<(String, u64)>,
    pub limit: usize,
}

impl Default for GapQuery {
    fn default() -> Self {
        GapQuery {
            device: None,
            from_ms: None,
            to_ms: None,
            after: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}

/// A summary as stored, with who sent it and when it arrived.
///
/// Serializes to JSON as one flat object: `id` (hex [`edgewise_protocol::SummaryId`]),
/// `device_id`, every [`WindowSummary`] field (`score` as `{value, alert, model}` or null,
/// `quantiles` as `{p50, p90, p99, relative_error}` or null), and `received_at_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "FlatSummary", from = "FlatSummary")]
pub struct StoredSummary {
    pub device_id: String,
    pub summary: WindowSummary,
    pub received_at_ms: i64,
}

/// The JSON shape of a [`StoredSummary`].
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = StoredSummary)]
pub struct FlatSummary {
    /// Hex summary id (agent, stream, window start, revision).
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
    #[serde(default)]
    score: Option<ScoreJson>,
    /// Quantile estimates, or null when the agent computes none.
    #[serde(default)]
    quantiles: Option<QuantilesJson>,
    received_at_ms: i64,
}

/// The JSON shape of [`Quantiles`]: each estimate is within `relative_error` (relative) of the
/// true quantile of the window's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuantilesJson {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub relative_error: f64,
}

/// The JSON shape of a [`Score`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScoreJson {
    pub value: f64,
    pub alert: bool,
    pub model: String,
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
            score: w.score.map(|s| ScoreJson {
                value: s.value,
                alert: s.alert,
                model: s.model,
            }),
            quantiles: w.quantiles.map(|q| QuantilesJson {
                p50: q.p50,
                p90: q.p90,
                p99: q.p99,
                relative_error: q.relative_error,
            }),
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
                score: f.score.map(|s| Score {
                    value: s.value,
                    alert: s.alert,
                    model: s.model,
                }),
                quantiles: f.quantiles.map(|q| Quantiles {
                    p50: q.p50,
                    p90: q.p90,
                    p99: q.p99,
                    relative_error: q.relative_error,
                }),
            },
            received_at_ms: f.received_at_ms,
        }
    }
}

/// A gap record as stored: what a device's buffer had to evict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredGap {
    pub device_id: String,
    pub seq: u64,
    pub streams: Vec<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub count: u64,
    pub reason: String,
    pub recorded_at_ms: i64,
    pub received_at_ms: i64,
}

/// A registered device, as listed by [`Store::devices`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    pub id: String,
    pub created_at_ms: i64,
    /// When the device last posted a batch; `None` if never.
    pub last_seen_ms: Option<i64>,
    pub revoked: bool,
    pub summary_count: u64,
    /// Stored summaries whose score is an alert.
    #[serde(default)]
    pub alert_count: u64,
    /// Summaries the device reported as evicted from its buffer (sum of its gaps' counts).
    #[serde(default)]
    pub evicted_count: u64,
}

/// What the HTTP layer needs from a storage backend. Every method takes owned arguments and
/// returns a `Send` future, so handlers can be generic over the backend.
pub trait Storage: Clone + Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn authenticate(
        &self,
        token: String,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// Stores a checked batch in one transaction (see the module invariants).
    fn store_batch(
        &self,
        batch: CheckedBatch,
    ) -> impl Future<Output = Result<IngestOutcome, StoreError>> + Send;
    fn find_summaries(
        &self,
        filter: SummaryFilter,
    ) -> impl Future<Output = Result<Vec<StoredSummary>, StoreError>> + Send;
    fn find_gaps(
        &self,
        query: GapQuery,
    ) -> impl Future<Output = Result<Vec<StoredGap>, StoreError>> + Send;
    fn find_latest(
        &self,
        query: LatestQuery,
    ) -> impl Future<Output = Result<Vec<StoredLatest>, StoreError>> + Send;
    fn list_devices(&self) -> impl Future<Output = Result<Vec<DeviceInfo>, StoreError>> + Send;
    /// Registers a device; answers its token (shown once, stored hashed).
    fn register_device(
        &self,
        device_id: String,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Revokes a device's token; `false` if there is no such device.
    fn revoke(&self, device_id: String) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Runs a synchronous SQLite call on the blocking pool.
async fn blocking<T, F>(call: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Task(e.to_string())),
    }
}

impl Storage for Store {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        let s = self.clone();
        blocking(move || s.ping()).await
    }
    async fn authenticate(&self, token: String) -> Result<Option<String>, StoreError> {
        let s = self.clone();
        blocking(move || s.authenticate(&token)).await
    }
    async fn store_batch(&self, batch: CheckedBatch) -> Result<IngestOutcome, StoreError> {
        self.store_async(batch).await
    }
    async fn find_summaries(
        &self,
        filter: SummaryFilter,
    ) -> Result<Vec<StoredSummary>, StoreError> {
        let s = self.clone();
        blocking(move || s.summary_page(&filter)).await
    }
    async fn find_gaps(&self, query: GapQuery) -> Result<Vec<StoredGap>, StoreError> {
        let s = self.clone();
        blocking(move || s.gaps(&query)).await
    }
    async fn find_latest(&self, query: LatestQuery) -> Result<Vec<StoredLatest>, StoreError> {
        let s = self.clone();
        blocking(move || s.latest(&query)).await
    }
    async fn list_devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let s = self.clone();
        blocking(move || s.devices()).await
    }
    async fn register_device(&self, device_id: String) -> Result<String, StoreError> {
        let s = self.clone();
        blocking(move || s.add_device(&device_id)).await
    }
    async fn revoke(&self, device_id: String) -> Result<bool, StoreError> {
        let s = self.clone();
        blocking(move || s.revoke_device(&device_id)).await
    }
}

impl Storage for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        PgStore::ping(self).await
    }
    async fn authenticate(&self, token: String) -> Result<Option<String>, StoreError> {
        PgStore::authenticate(self, &token).await
    }
    async fn store_batch(&self, batch: CheckedBatch) -> Result<IngestOutcome, StoreError> {
        self.store_checked(&batch).await
    }
    async fn find_summaries(
        &self,
        filter: SummaryFilter,
    ) -> Result<Vec<StoredSummary>, StoreError> {
        self.summary_page(&filter).await
    }
    async fn find_gaps(&self, query: GapQuery) -> Result<Vec<StoredGap>, StoreError> {
        self.gaps(&query).await
    }
    async fn find_latest(&self, query: LatestQuery) -> Result<Vec<StoredLatest>, StoreError> {
        self.latest(&query).await
    }
    async fn list_devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        self.devices().await
    }
    async fn register_device(&self, device_id: String) -> Result<String, StoreError> {
        self.add_device(&device_id).await
    }
    async fn revoke(&self, device_id: String) -> Result<bool, StoreError> {
        self.revoke_device(&device_id).await
    }
}

/// A backend chosen at run time.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Sqlite(Store),
    Postgres(PgStore),
}

impl From<Store> for AnyStore {
    fn from(s: Store) -> Self {
        AnyStore::Sqlite(s)
    }
}

impl From<PgStore> for AnyStore {
    fn from(s: PgStore) -> Self {
        AnyStore::Postgres(s)
    }
}

impl AnyStore {
    /// See [`Store::with_token_hasher`].
    pub async fn with_token_hasher(
        self,
        hasher: crate::auth::TokenHasher,
    ) -> Result<AnyStore, StoreError> {
        match self {
            AnyStore::Sqlite(s) => {
                blocking(move || s.with_token_hasher(hasher).map(AnyStore::Sqlite)).await
            }
            AnyStore::Postgres(s) => s.with_token_hasher(hasher).await.map(AnyStore::Postgres),
        }
    }

    /// See [`Store::rotate_token`].
    pub async fn rotate_token(&self, device_id: String) -> Result<String, StoreError> {
        match self {
            AnyStore::Sqlite(s) => {
                let s = s.clone();
                blocking(move || s.rotate_token(&device_id)).await
            }
            AnyStore::Postgres(s) => s.rotate_token(&device_id).await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Storage for AnyStore {
    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(s) => s.backend(),
            AnyStore::Postgres(s) => s.backend(),
        }
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => Storage::ping(s))
    }
    async fn authenticate(&self, token: String) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => Storage::authenticate(s, token))
    }
    async fn store_batch(&self, batch: CheckedBatch) -> Result<IngestOutcome, StoreError> {
        dispatch!(self, s => s.store_batch(batch))
    }
    async fn find_summaries(
        &self,
        filter: SummaryFilter,
    ) -> Result<Vec<StoredSummary>, StoreError> {
        dispatch!(self, s => s.find_summaries(filter))
    }
    async fn find_gaps(&self, query: GapQuery) -> Result<Vec<StoredGap>, StoreError> {
        dispatch!(self, s => s.find_gaps(query))
    }
    async fn find_latest(&self, query: LatestQuery) -> Result<Vec<StoredLatest>, StoreError> {
        dispatch!(self, s => s.find_latest(query))
    }
    async fn list_devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        dispatch!(self, s => s.list_devices())
    }
    async fn register_device(&self, device_id: String) -> Result<String, StoreError> {
        dispatch!(self, s => s.register_device(device_id))
    }
    async fn revoke(&self, device_id: String) -> Result<bool, StoreError> {
        dispatch!(self, s => s.revoke(device_id))
    }
}

/// Checks a batch before it is stored: every summary and gap is the device's own and valid.
/// Pure; the API calls it to answer 403/400, and every backend calls it again as an invariant.
pub fn check_batch(
    device_id: &str,
    summaries: &[WindowSummary],
    gaps: &[Gap],
) -> Result<(), StoreError> {
    for (index, s) in summaries.iter().enumerate() {
        if s.agent_id != device_id {
            return Err(StoreError::ForeignSummary {
                index,
                agent_id: s.agent_id.clone(),
                device_id: device_id.to_owned(),
            });
        }
    }
    for (index, g) in gaps.iter().enumerate() {
        if g.agent_id != device_id {
            return Err(StoreError::ForeignGap {
                index,
                agent_id: g.agent_id.clone(),
                device_id: device_id.to_owned(),
            });
        }
    }
    for (index, s) in summaries.iter().enumerate() {
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
    if gaps.len() > MAX_GAPS_PER_BATCH {
        return Err(StoreError::InvalidGap {
            index: MAX_GAPS_PER_BATCH,
            reason: format!("at most {MAX_GAPS_PER_BATCH} gaps are accepted per batch"),
        });
    }
    for (index, g) in gaps.iter().enumerate() {
        check_gap(g).map_err(|reason| StoreError::InvalidGap { index, reason })?;
    }
    Ok(())
}

fn check_gap(g: &Gap) -> Result<(), String> {
    const MAX: usize = WindowSummary::MAX_NAME_BYTES;
    if i64::try_from(g.seq).is_err() {
        return Err(format!("seq {} is larger than {}", g.seq, i64::MAX));
    }
    if i64::try_from(g.count).is_err() {
        return Err(format!("count {} is larger than {}", g.count, i64::MAX));
    }
    if g.streams.len() > Gap::MAX_STREAMS {
        return Err(format!(
            "names {} streams; at most {} are accepted",
            g.streams.len(),
            Gap::MAX_STREAMS
        ));
    }
    if g.streams.iter().any(|s| s.is_empty() || s.len() > MAX) {
        return Err(format!("a stream name is empty or longer than {MAX} bytes"));
    }
    if g.reason.is_empty() || g.reason.len() > MAX {
        return Err(format!("reason is empty or longer than {MAX} bytes"));
    }
    if g.from_ms > g.to_ms {
        return Err("from_ms is after to_ms".to_owned());
    }
    Ok(())
}

pub(crate) fn check_device_id(id: &str) -> Result<(), StoreError> {
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

/// A batch that passed [`check_batch`], ready to store: its summaries deduplicated (only the
/// highest revision of each window is kept) and sorted by `(stream, window_start_ms)`; with
/// [`CheckedBatch::with_latest`], its latest values, valid and only the newest of each stream,
/// sorted by stream.
///
/// Backends take only this type, so the checks and the deduplication run once per batch,
/// before any database lock or connection is taken. The sort order is the
/// primary key's order (within one device): B-tree inserts walk the index in order, and
/// concurrent transactions that touch the same rows take their locks in the same order.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBatch {
    device_id: String,
    summaries: Vec<WindowSummary>,
    gaps: Vec<Gap>,
    in_batch_duplicates: u64,
    latest: Vec<LatestValue>,
    in_batch_ignored_latest: u64,
}

impl CheckedBatch {
    /// Checks `device_id`'s batch ([`check_batch`]) and prepares it for storage.
    pub fn new(
        device_id: String,
        mut summaries: Vec<WindowSummary>,
        gaps: Vec<Gap>,
    ) -> Result<CheckedBatch, StoreError> {
        check_batch(&device_id, &summaries, &gaps)?;
        let received = summaries.len();
        // Highest revision first within a key, so dedup keeps it.
        summaries.sort_unstable_by(|a, b| {
            (a.stream.as_str(), a.window_start_ms)
                .cmp(&(b.stream.as_str(), b.window_start_ms))
                .then(b.revision.cmp(&a.revision))
        });
        summaries.dedup_by(|later, kept| {
            later.window_start_ms == kept.window_start_ms && later.stream == kept.stream
        });
        Ok(CheckedBatch {
            device_id,
            in_batch_duplicates: (received - summaries.len()) as u64,
            summaries,
            gaps,
            latest: Vec::new(),
            in_batch_ignored_latest: 0,
        })
    }

    /// Adds the batch's latest values: each must be valid ([`LatestValue::validate`]), at most
    /// [`MAX_LATEST_PER_BATCH`]; only the newest of each stream is kept.
    pub fn with_latest(mut self, latest: Vec<LatestValue>) -> Result<CheckedBatch, StoreError> {
        let (kept, ignored) = latest::newest_per_stream(latest)?;
        self.latest = kept;
        self.in_batch_ignored_latest = ignored;
        Ok(self)
    }

    /// The newest latest value of each stream in the batch, by stream.
    pub fn latest(&self) -> &[LatestValue] {
        &self.latest
    }

    /// Latest values dropped for a newer (or equal) one of the same stream in the batch itself:
    /// counted as ignored.
    pub fn in_batch_ignored_latest(&self) -> u64 {
        self.in_batch_ignored_latest
    }

    /// The device writing the batch (every record is its own).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// One summary per window, in key order.
    pub fn summaries(&self) -> &[WindowSummary] {
        &self.summaries
    }

    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Summaries dropped because the batch itself held a higher or equal revision of the same
    /// window: counted as duplicates.
    pub fn in_batch_duplicates(&self) -> u64 {
        self.in_batch_duplicates
    }
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

    fn gap(agent: &str, seq: u64) -> Gap {
        Gap {
            agent_id: agent.to_owned(),
            seq,
            streams: vec!["n1/temp".to_owned()],
            from_ms: 0,
            to_ms: 10_000,
            count: 3,
            reason: "buffer_full".to_owned(),
            recorded_at_ms: 11_000,
        }
    }

    #[test]
    fn check_batch_names_foreign_and_invalid_gaps() {
        assert!(check_batch("gw-1", &[], &[gap("gw-1", 1)]).is_ok());
        assert!(matches!(
            check_batch("gw-1", &[], &[gap("gw-1", 1), gap("gw-2", 2)]),
            Err(StoreError::ForeignGap { index: 1, .. })
        ));
        let mut bad = gap("gw-1", 1);
        bad.from_ms = 20_000;
        assert!(matches!(
            check_batch("gw-1", &[], &[bad]),
            Err(StoreError::InvalidGap { index: 0, .. })
        ));
        let mut big = gap("gw-1", u64::MAX);
        assert!(check_batch("gw-1", &[], std::slice::from_ref(&big)).is_err());
        big.seq = 1;
        big.streams = vec!["s".to_owned(); Gap::MAX_STREAMS + 1];
        assert!(check_batch("gw-1", &[], &[big]).is_err());
        let mut no_reason = gap("gw-1", 1);
        no_reason.reason.clear();
        assert!(check_batch("gw-1", &[], &[no_reason]).is_err());
    }

    fn summary(stream: &str, start_ms: i64, revision: u32) -> WindowSummary {
        WindowSummary {
            agent_id: "gw-1".to_owned(),
            stream: stream.to_owned(),
            window_start_ms: start_ms,
            window_end_ms: start_ms + 10_000,
            revision,
            count: 3,
            min: 1.0,
            max: 3.0,
            mean: 2.0,
            stddev: 0.8,
            first_value: 1.0,
            first_time_ms: start_ms,
            last_value: 3.0,
            last_time_ms: start_ms + 9_000,
            unit: None,
            score: None,
            quantiles: None,
        }
    }

    #[test]
    fn checked_batch_keeps_the_highest_revision_of_each_window_in_key_order() {
        let batch = CheckedBatch::new(
            "gw-1".to_owned(),
            vec![
                summary("b", 0, 0),
                summary("a", 10_000, 1),
                summary("b", 0, 2),
                summary("a", 0, 0),
                summary("b", 0, 1),
                summary("a", 10_000, 1),
            ],
            vec![gap("gw-1", 1)],
        )
        .unwrap();
        let kept: Vec<(&str, i64, u32)> = batch
            .summaries()
            .iter()
            .map(|s| (s.stream.as_str(), s.window_start_ms, s.revision))
            .collect();
        assert_eq!(kept, [("a", 0, 0), ("a", 10_000, 1), ("b", 0, 2)]);
        assert_eq!(batch.in_batch_duplicates(), 3);
        assert_eq!(batch.gaps().len(), 1);
        assert!(matches!(
            CheckedBatch::new("gw-2".to_owned(), vec![summary("a", 0, 0)], vec![]),
            Err(StoreError::ForeignSummary { index: 0, .. })
        ));
    }

    #[test]
    fn cursor_round_trips_any_names_and_refuses_garbage() {
        let k = SummaryKey {
            window_start_ms: -5,
            device_id: "gw.1".to_owned(),
            stream: "n1/t.e mp".to_owned(),
        };
        assert_eq!(SummaryKey::from_cursor(&k.to_cursor()), Some(k));
        for bad in ["", "x", "1.zz.00", "1.00", "1.61.61.61"] {
            assert_eq!(SummaryKey::from_cursor(bad), None, "{bad}");
        }
    }
}
