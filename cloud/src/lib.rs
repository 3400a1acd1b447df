//! The Edgewise ingestion receiver: authenticates devices, stores their window summaries exactly
//! once in SQLite, and serves them back, with Prometheus metrics and a health check.
//!
//! # Layout
//!
//! - [`auth`]: device tokens (random, shown once, stored as SHA-256) and bearer header parsing.
//! - [`store`]: storage of devices, summaries (with scores) and gap records: shared types and
//!   checks, and the SQLite backend ([`Store`]): schema migrations, idempotent one-transaction
//!   ingest keyed by `(device, stream, window start)` with revisions, and by `(device, gap seq)`.
//! - [`limit`]: per-device token-bucket rate limiting of ingest (429 with `Retry-After`).
//! - [`metrics`]: per-receiver atomic counters ([`Metrics`]) rendered as Prometheus text.
//! - [`api`]: the axum routes and handlers, request checks, and errors mapped to statuses.
//! - [`server`]: [`Receiver`], a running server (HTTP, or HTTPS with [`tls`]) with graceful stop.
//! - [`tls`]: rustls configuration from PEM files and a listener that completes handshakes in
//!   the background.
//!
//! The binary (`src/main.rs`) is a thin CLI over these: `serve`, `device add|list|revoke`.
//!
//! Unit tests live in each module; `tests/api.rs` drives a real receiver over HTTP on loopback
//! with a fresh SQLite file per test.

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
    AnyStore, DeviceInfo, GapQuery, IngestOutcome, PgConfig, PgStore, Storage, Store, StoreError,
    StoredGap, StoredSummary, SummaryFilter, SummaryKey, SummaryQuery,
};
