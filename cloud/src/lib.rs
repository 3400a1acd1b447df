//! The Edgewise ingestion receiver: authenticates devices, stores their window summaries (with
//! anomaly scores), gap records and the latest text/boolean/data value of each stream exactly
//! once in SQLite or PostgreSQL, and serves them back through a query API, an OpenAPI document
//! and a dashboard, with Prometheus metrics and a health check.
//!
//! # Layout
//!
//! - [`auth`]: device tokens (random, shown once, stored as SHA-256) and bearer header parsing.
//! - [`store`]: storage of devices, summaries (with scores), gap records and latest values:
//!   shared types and checks, and the SQLite ([`Store`]) and PostgreSQL ([`PgStore`]) backends:
//!   schema migrations, idempotent all-or-nothing ingest keyed by `(device, stream, window
//!   start)` with revisions, by `(device, gap seq)`, and by `(device, stream)` keeping the newest
//!   latest value; on SQLite written by one writer thread that commits concurrent batches
//!   together (`store::sqlite::writer`).
//! - [`limit`]: per-device token-bucket rate limiting of ingest (429 with `Retry-After`).
//! - [`metrics`]: per-receiver atomic counters ([`Metrics`]) rendered as Prometheus text.
//! - [`api`]: the axum routes and handlers, request checks, and errors mapped to statuses.
//! - [`server`]: [`Receiver`], a running server (HTTP, or HTTPS with [`tls`]) with graceful stop.
//! - [`tls`]: rustls configuration from PEM files and a listener that completes handshakes in
//!   the background.
//!
//! The binary (`src/main.rs`) is a thin CLI over these: `serve`, `device add|list|revoke`.
//!
//! Unit tests live in each module. `tests/api.rs` drives a real receiver over HTTP on loopback on
//! both backends (PostgreSQL when `EDGEWISE_TEST_PG_URL` is set); `tests/replicas.rs`,
//! `tests/pg_restart.rs`, `tests/dashboard.rs` (headless Chromium) and `tests/tls.rs` cover
//! replicas, database loss, the page and HTTPS. `examples/load.rs` is the load client.

pub mod api;
pub mod auth;
pub mod limit;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tls;

pub use api::{ApiError, MAX_SUMMARIES_PER_BATCH, ServerConfig};
pub use auth::DeviceToken;
pub use limit::RateLimit;
pub use metrics::{Metrics, MetricsSnapshot, RejectReason};
pub use server::Receiver;
pub use store::{
    AnyStore, DeviceInfo, GapQuery, IngestOutcome, LatestQuery, MAX_LATEST_PER_BATCH, PgConfig,
    PgStore, Storage, Store, StoreError, StoredGap, StoredLatest, StoredSummary, SummaryFilter,
    SummaryKey, SummaryQuery,
};
