//! HTTP routes, their handlers, and how each failure maps to a status.
//!
//! | Route                  | Answer                                                        |
//! |------------------------|---------------------------------------------------------------|
//! | `POST /v1/ingest`      | store a CBOR [`Batch`]; 200 [`IngestOutcome`] counts          |
//! | `GET /v1/devices`      | JSON list of [`DeviceInfo`]                                   |
//! | `GET /v1/summaries`    | JSON list of [`StoredSummary`]; `device, stream, from, to, limit` |
//! | `GET /metrics`         | Prometheus text 0.0.4                                         |
//! | `GET /healthz`         | 200 `ok` when the database answers, else 503                  |
//! | `GET /v1/alerts`       | like `/v1/summaries`, only summaries whose score is an alert  |
//! | `GET /v1/gaps`         | JSON list of [`StoredGap`]; `device, from, to, limit, after`  |
//! | `GET /v1/latest`       | JSON list of [`StoredLatest`]; `device, stream, limit, after` |
//! | `GET /openapi.json`    | the OpenAPI document of these routes ([`ApiDoc`])             |
//! | `GET /`                | the dashboard (`assets/dashboard.html`, embedded)             |
//!
//! Query routes page by keyset: a full page carries a `next-cursor` header; pass it back as
//! `after`. Ingest bodies may be gzip (`Content-Encoding: gzip`); the size limit applies to the
//! decompressed body. Each device is rate limited (token bucket, 429 with `Retry-After`); a
//! database that cannot be reached answers 503 with `Retry-After`.
//!
//! Ingest checks, in order: bearer token (401), body size (413), CBOR batch and version (400),
//! at most [`MAX_SUMMARIES_PER_BATCH`] summaries (400), `batch.agent_id` and every
//! `summary.agent_id` equal to the authenticated device (403), every summary, gap and latest
//! value valid, at most [`crate::store::MAX_GAPS_PER_BATCH`] gaps and
//! [`crate::store::MAX_LATEST_PER_BATCH`] latest values (400 naming the index and reason). Any
//! refusal stores nothing: the batch is all or nothing.
//! The token is checked before the body is read, so an unauthenticated client cannot make the
//! receiver buffer a body.
//!
//! The query routes (`/v1/devices`, `/v1/summaries`, ...) are NOT authenticated yet: put the
//! receiver behind a private network or a proxy until operator auth lands.
//!
//! Errors answer `{"error": "<message>"}`; a 500 says only "internal server error" and the cause
//! goes to the log. Tested through real HTTP in `tests/api.rs`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use edgewise_protocol::Batch;
use serde::Deserialize;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::trace::TraceLayer;

use crate::auth::bearer_token;
use crate::limit::{RateLimit, RateLimiter};
use crate::metrics::{Metrics, PROMETHEUS_CONTENT_TYPE, RejectReason};
use crate::store::latest::{LatestJson, LatestKind, LatestValueJson};
use crate::store::{
    CheckedBatch, DEFAULT_QUERY_LIMIT, DeviceInfo, FlatSummary, GapQuery, IngestOutcome,
    LatestQuery, MAX_QUERY_LIMIT, QuantilesJson, ScoreJson, Storage, StoreError, StoredGap,
    StoredLatest, StoredSummary, SummaryFilter, SummaryKey, SummaryQuery,
};

/// Most summaries accepted in one batch.
pub const MAX_SUMMARIES_PER_BATCH: usize = 10_000;

/// How the HTTP server treats requests.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Largest accepted request body, after gzip decompression; larger ones get 413.
    /// Default 1 MiB.
    pub max_body_bytes: usize,
    /// Per-device ingest rate limit (429 with `Retry-After` above it); `None` for no limit.
    pub rate_limit: Option<RateLimit>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 1024 * 1024,
            rate_limit: Some(RateLimit::default()),
        }
    }
}

/// A refused request: its status and the message the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing, unknown or revoked device token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// The ingest body is not a batch this receiver reads.
    #[error("{0}")]
    Malformed(String),
    /// The batch decodes but its content is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A bad query parameter.
    #[error("{0}")]
    BadRequest(String),
    #[error("device {device:?} is over its rate limit; retry in {retry_after_s} s")]
    TooManyRequests { device: String, retry_after_s: u64 },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The database cannot be reached now; the client should retry (503 with `Retry-After`).
    #[error("the database is unavailable; retry later")]
    Unavailable(String),
    /// The cause is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Malformed(_) | ApiError::Invalid(_) | ApiError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The rejection counter an ingest refusal goes to (`None` for server faults).
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            ApiError::Unauthorized => Some(RejectReason::Unauthorized),
            ApiError::Forbidden(_) => Some(RejectReason::Forbidden),
            ApiError::Malformed(_) => Some(RejectReason::Malformed),
            ApiError::Invalid(_) => Some(RejectReason::Invalid),
            ApiError::PayloadTooLarge { .. } => Some(RejectReason::TooLarge),
            ApiError::TooManyRequests { .. } => Some(RejectReason::RateLimited),
            ApiError::BadRequest(_) | ApiError::Unavailable(_) | ApiError::Internal(_) => None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // The handler checks these first; the store checks them again as its own invariant.
            StoreError::ForeignSummary { .. } | StoreError::ForeignGap { .. } => {
                ApiError::Forbidden(e.to_string())
            }
            StoreError::InvalidSummary { .. }
            | StoreError::InvalidGap { .. }
            | StoreError::InvalidLatest { .. } => ApiError::Invalid(e.to_string()),
            // The device was removed between authentication and storing.
            StoreError::UnknownDevice(_) => ApiError::Unauthorized,
            StoreError::Unavailable(cause) => ApiError::Unavailable(cause),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                "internal server error".to_owned()
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                self.to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        let retry_after = match self {
            ApiError::Unavailable(_) => Some(1),
            ApiError::TooManyRequests { retry_after_s, .. } => Some(retry_after_s),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}

/// The JSON body of every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// The OpenAPI document of these routes, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Edgewise cloud receiver", description = "Ingest of window summaries from Edgewise agents, and the query API."),
    paths(dashboard, ingest, list_devices, list_summaries, list_alerts, list_gaps, list_latest, render_metrics, healthz, openapi_json),
    components(schemas(IngestOutcome, DeviceInfo, FlatSummary, ScoreJson, QuantilesJson, StoredGap, LatestJson, LatestKind, LatestValueJson, ErrorBody)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "device_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The dashboard page, shipped inside the binary.
const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");

/// The fleet dashboard: one self-contained HTML page (inline CSS and JS, SVG charts) that reads
/// the query API of this same receiver; it loads nothing from anywhere else.
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, description = "HTML page", body = String, content_type = "text/html")))]
async fn dashboard() -> Response {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:",
            ),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> Response {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi()).into_response()
}

#[derive(Clone)]
struct AppState<S> {
    store: S,
    limiter: Option<Arc<RateLimiter>>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
}

/// The receiver's routes over `store`, counting into `metrics`.
pub fn router<S: Storage>(store: S, metrics: Arc<Metrics>, cfg: &ServerConfig) -> Router {
    let state = AppState {
        store,
        limiter: cfg.rate_limit.map(|l| Arc::new(RateLimiter::new(l))),
        metrics,
        max_body_bytes: cfg.max_body_bytes,
    };
    Router::new()
        .route(
            "/v1/ingest",
            post(ingest::<S>).layer(RequestDecompressionLayer::new().gzip(true)),
        )
        .route("/v1/devices", get(list_devices::<S>))
        .route("/v1/summaries", get(list_summaries::<S>))
        .route("/v1/alerts", get(list_alerts::<S>))
        .route("/v1/gaps", get(list_gaps::<S>))
        .route("/v1/latest", get(list_latest::<S>))
        .route("/metrics", get(render_metrics::<S>))
        .route("/healthz", get(healthz::<S>))
        .route("/openapi.json", get(openapi_json))
        .route("/", get(dashboard))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Store a CBOR batch of window summaries, gap records and latest values.
#[utoipa::path(post, path = "/v1/ingest", tag = "ingest",
    request_body(content = Vec<u8>, content_type = "application/cbor",
                 description = "A protocol Batch, optionally with Content-Encoding: gzip"),
    security(("device_token" = [])),
    responses(
        (status = 200, description = "Stored (idempotent)", body = IngestOutcome),
        (status = 400, description = "Not a batch, or an invalid record", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked token", body = ErrorBody),
        (status = 403, description = "Another device's data", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Encoding"),
        (status = 429, description = "Over the device's rate limit; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database unavailable; see Retry-After", body = ErrorBody),
    ))]
async fn ingest<S: Storage>(State(state): State<AppState<S>>, request: Request) -> Response {
    let response = match ingest_batch(&state, request).await {
        Ok(outcome) => {
            state.metrics.record_outcome(&outcome);
            Json(outcome).into_response()
        }
        Err(e) => {
            if let Some(reason) = e.reject_reason() {
                state.metrics.record_rejection(reason);
            }
            if !matches!(e, ApiError::Internal(_)) {
                tracing::debug!(error = %e, "ingest refused");
            }
            e.into_response()
        }
    };
    state.metrics.record_ingest_status(response.status());
    response
}

async fn ingest_batch<S: Storage>(
    state: &AppState<S>,
    request: Request,
) -> Result<IngestOutcome, ApiError> {
    let token = bearer_token(request.headers())
        .map_err(|_| ApiError::Unauthorized)?
        .to_owned();
    let device = state
        .store
        .authenticate(token)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if let Some(limiter) = &state.limiter
        && let Err(wait) = limiter.check(&device, std::time::Instant::now())
    {
        return Err(ApiError::TooManyRequests {
            device,
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }

    // Honours the DefaultBodyLimit layer (refuses early on a large Content-Length).
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.max_body_bytes,
                }
            } else {
                ApiError::Malformed(rejection.body_text())
            }
        })?;
    let batch = Batch::from_cbor(&body).map_err(|e| ApiError::Malformed(e.to_string()))?;

    if batch.summaries.len() > MAX_SUMMARIES_PER_BATCH {
        return Err(ApiError::Invalid(format!(
            "batch holds {} summaries; at most {MAX_SUMMARIES_PER_BATCH} are accepted per batch",
            batch.summaries.len()
        )));
    }
    if batch.agent_id != device {
        return Err(ApiError::Forbidden(format!(
            "batch agent_id {:?} is not the authenticated device {device:?}",
            batch.agent_id
        )));
    }
    let batch =
        CheckedBatch::new(device, batch.summaries, batch.gaps)?.with_latest(batch.latest)?;
    Ok(state.store.store_batch(batch).await?)
}

/// Registered devices with last-seen time and counts.
#[utoipa::path(get, path = "/v1/devices", tag = "query",
    responses((status = 200, description = "Devices by id", body = Vec<DeviceInfo>),
              (status = 503, description = "Database unavailable; retry", body = ErrorBody)))]
async fn list_devices<S: Storage>(
    State(state): State<AppState<S>>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    Ok(Json(state.store.list_devices().await?))
}

/// Raw `/v1/summaries` and `/v1/alerts` parameters; empty values count as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryParams {
    device: Option<String>,
    stream: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

fn present(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

fn millis(name: &str, v: Option<String>) -> Result<Option<i64>, ApiError> {
    present(v)
        .map(|s| {
            s.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "{name} must be milliseconds since the Unix epoch (an integer), got {s:?}"
                ))
            })
        })
        .transpose()
}

fn time_range(
    from: Option<String>,
    to: Option<String>,
) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let from_ms = millis("from", from)?;
    let to_ms = millis("to", to)?;
    if let (Some(from), Some(to)) = (from_ms, to_ms)
        && from >= to
    {
        return Err(ApiError::BadRequest(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    Ok((from_ms, to_ms))
}

fn limit(v: Option<String>) -> Result<usize, ApiError> {
    match present(v) {
        None => Ok(DEFAULT_QUERY_LIMIT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_QUERY_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "limit must be an integer from 1 to {MAX_QUERY_LIMIT}, got {s:?}"
            ))),
        },
    }
}

fn bad_cursor(s: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "after must be a cursor from a previous page's next-cursor header, got {s:?}"
    ))
}

impl SummaryParams {
    fn parse(self, alerts_only: bool) -> Result<SummaryFilter, ApiError> {
        let (from_ms, to_ms) = time_range(self.from, self.to)?;
        let after = present(self.after)
            .map(|s| SummaryKey::from_cursor(&s).ok_or_else(|| bad_cursor(&s)))
            .transpose()?;
        Ok(SummaryFilter {
            query: SummaryQuery {
                device: present(self.device),
                stream: present(self.stream),
                from_ms,
                to_ms,
                limit: limit(self.limit)?,
            },
            alerts_only,
            after,
        })
    }
}

/// The header that carries the cursor of the next page, present when a page is full.
pub const NEXT_CURSOR: &str = "next-cursor";

fn page<T: serde::Serialize>(
    rows: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> String,
) -> Response {
    let next = (rows.len() == limit)
        .then(|| rows.last().map(&cursor))
        .flatten();
    let mut response = Json(rows).into_response();
    if let Some(next) = next
        && let Ok(value) = axum::http::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert(NEXT_CURSOR, value);
    }
    response
}

async fn summary_page<S: Storage>(
    state: &AppState<S>,
    filter: SummaryFilter,
) -> Result<Response, ApiError> {
    let limit = filter.query.limit;
    let rows = state.store.find_summaries(filter).await?;
    Ok(page(rows, limit, |r: &StoredSummary| {
        SummaryKey::of(r).to_cursor()
    }))
}

/// Summaries by device, stream and window-start range, oldest first, paged.
#[utoipa::path(get, path = "/v1/summaries", tag = "query",
    params(
        ("device" = Option<String>, Query, description = "Device id"),
        ("stream" = Option<String>, Query, description = "Stream name, e.g. node-1/temperature"),
        ("from" = Option<i64>, Query, description = "Window start at or after, ms since the Unix epoch"),
        ("to" = Option<i64>, Query, description = "Window start before, ms since the Unix epoch"),
        ("limit" = Option<u32>, Query, description = "Rows per page, 1 to 10000 (default 1000)", minimum = 1, maximum = 10000),
        ("after" = Option<String>, Query, description = "The next-cursor header of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of summaries; a full page carries a next-cursor header", body = Vec<FlatSummary>),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ))]
async fn list_summaries<S: Storage>(
    State(state): State<AppState<S>>,
    params: Result<Query<SummaryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    summary_page(&state, params.parse(false)?).await
}

/// Summaries whose anomaly score is an alert, filtered and paged like /v1/summaries.
#[utoipa::path(get, path = "/v1/alerts", tag = "query",
    params(
        ("device" = Option<String>, Query, description = "Device id"),
        ("stream" = Option<String>, Query, description = "Stream name, e.g. node-1/temperature"),
        ("from" = Option<i64>, Query, description = "Window start at or after, ms since the Unix epoch"),
        ("to" = Option<i64>, Query, description = "Window start before, ms since the Unix epoch"),
        ("limit" = Option<u32>, Query, description = "Rows per page, 1 to 10000 (default 1000)", minimum = 1, maximum = 10000),
        ("after" = Option<String>, Query, description = "The next-cursor header of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of alerts", body = Vec<FlatSummary>),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ))]
async fn list_alerts<S: Storage>(
    State(state): State<AppState<S>>,
    params: Result<Query<SummaryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    summary_page(&state, params.parse(true)?).await
}

/// Raw `/v1/gaps` parameters; empty values count as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GapParams {
    device: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

fn gap_cursor(g: &StoredGap) -> String {
    format!("{}.{}", hex::encode(&g.device_id), g.seq)
}

fn parse_gap_cursor(s: &str) -> Option<(String, u64)> {
    let (device, seq) = s.split_once('.')?;
    let device = String::from_utf8(hex::decode(device).ok()?).ok()?;
    Some((device, seq.parse().ok()?))
}

/// Gap records (what devices had to evict), by device and overlapping time range, paged.
#[utoipa::path(get, path = "/v1/gaps", tag = "query",
    params(
        ("device" = Option<String>, Query, description = "Device id"),
        ("from" = Option<i64>, Query, description = "Gaps ending at or after, ms"),
        ("to" = Option<i64>, Query, description = "Gaps starting before, ms"),
        ("limit" = Option<u32>, Query, description = "Rows per page, 1 to 10000", minimum = 1, maximum = 10000),
        ("after" = Option<String>, Query, description = "The next-cursor header of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of gaps", body = Vec<StoredGap>),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ))]
async fn list_gaps<S: Storage>(
    State(state): State<AppState<S>>,
    params: Result<Query<GapParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (from_ms, to_ms) = time_range(p.from, p.to)?;
    let query = GapQuery {
        device: present(p.device),
        from_ms,
        to_ms,
        after: present(p.after)
            .map(|s| parse_gap_cursor(&s).ok_or_else(|| bad_cursor(&s)))
            .transpose()?,
        limit: limit(p.limit)?,
    };
    let limit = query.limit;
    let rows = state.store.find_gaps(query).await?;
    Ok(page(rows, limit, gap_cursor))
}

/// Raw `/v1/latest` parameters; empty values count as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatestParams {
    device: Option<String>,
    stream: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

fn latest_cursor(v: &StoredLatest) -> String {
    format!("{}.{}", hex::encode(&v.device_id), hex::encode(&v.stream))
}

fn parse_latest_cursor(s: &str) -> Option<(String, String)> {
    let (device, stream) = s.split_once('.')?;
    let text = |h: &str| String::from_utf8(hex::decode(h).ok()?).ok();
    Some((text(device)?, text(stream)?))
}

/// The newest text, boolean or data value of each stream (`kind` says which; data is base64url),
/// by device and stream, paged.
#[utoipa::path(get, path = "/v1/latest", tag = "query",
    params(
        ("device" = Option<String>, Query, description = "Device id"),
        ("stream" = Option<String>, Query, description = "Stream name, e.g. node-1/door"),
        ("limit" = Option<u32>, Query, description = "Rows per page, 1 to 10000 (default 1000)", minimum = 1, maximum = 10000),
        ("after" = Option<String>, Query, description = "The next-cursor header of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of latest values, by device then stream; a full page carries a next-cursor header", body = Vec<LatestJson>),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ))]
async fn list_latest<S: Storage>(
    State(state): State<AppState<S>>,
    params: Result<Query<LatestParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = LatestQuery {
        device: present(p.device),
        stream: present(p.stream),
        after: present(p.after)
            .map(|s| parse_latest_cursor(&s).ok_or_else(|| bad_cursor(&s)))
            .transpose()?,
        limit: limit(p.limit)?,
    };
    let limit = query.limit;
    let rows = state.store.find_latest(query).await?;
    Ok(page(rows, limit, latest_cursor))
}

/// Prometheus text exposition of this receiver's counters.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text 0.0.4", body = String, content_type = "text/plain")))]
async fn render_metrics<S: Storage>(State(state): State<AppState<S>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.metrics.render_prometheus(),
    )
}

/// Liveness: 200 when the database answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", body = String, content_type = "text/plain"),
              (status = 503, description = "Database unavailable", body = String, content_type = "text/plain")))]
async fn healthz<S: Storage>(State(state): State<AppState<S>>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check: database does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}
