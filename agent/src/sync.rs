//! Sync: the buffer, most valuable first, to the receiver's `POST /v1/ingest`.
//!
//! The [`Uploader`] takes the next batch from the store ([`Store::outbox_drain`]): pending gap
//! records, then the newest text/boolean/data value of streams whose value changed, then alerts,
//! then plain summaries in the configured [`DrainOrder`] (oldest first by
//! default), up to `batch_max_summaries` and `batch_max_bytes` of encoded records. It posts them
//! as one CBOR [`Batch`] and deletes exactly those rows only after a 2xx. A failed or unanswered
//! request leaves them in place, so they are sent again: the receiver's insert is idempotent by
//! summary id (and gap seq), which makes "at least once" on the wire "exactly once" in the cloud.
//! With `max_bytes_per_second` set, the next request waits until the average stays under it.
//!
//! Responses:
//! - 2xx: delete the rows.
//! - 429 / 503: wait `Retry-After` (capped by `backoff_max_ms`) or back off.
//! - 413 with more than one record: halve the batch and retry.
//! - 400, 413 for a single record, 422: the data itself is refused. The rows move to the
//!   dead-letter table with the receiver's message (counted, kept, never silently dropped) so one
//!   bad summary cannot block the queue forever.
//! - 401, 403, other statuses, network errors: exponential back-off with jitter, retry forever
//!   (an operator can fix a token without losing data).
//!
//! On shutdown a request in flight gets [`SHUTDOWN_GRACE`] to finish; abandoning it is safe (the
//! rows stay and are re-sent).
//!
//! TLS: see [`http_client`] and [`crate::tls`]; a receiver whose certificate does not verify is
//! never sent the token or the data (the request fails before either is written).
//!
//! Tested end to end in `tests/` with a real receiver on loopback, including one that is down,
//! and over HTTPS in `tests/tls.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewise_protocol::Batch;
use reqwest::StatusCode;
use tokio::sync::{Notify, watch};

use crate::config::{AgentConfig, DrainOrder};
use crate::ingest::wall_ms;
use crate::metrics::Metrics;
use crate::store::{Drain, Store, StoreError, StoreOptions};

/// An error and its sources, `: `-separated (reqwest's Display alone omits the TLS reason).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// How long a request in flight may take to finish once shutdown was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Config(String),
    #[error("opening the outbox: {0}")]
    Store(#[from] StoreError),
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The HTTP client for `sync.url`. For `https://` it verifies the receiver with `[sync.tls]`
/// (CA file or system roots, optional pins, optional client certificate) and refuses any
/// redirect or plaintext URL; for `http://` it is plain HTTP (which `check` warns about when
/// the receiver is not on this machine).
pub fn http_client(cfg: &AgentConfig) -> Result<reqwest::Client, SyncError> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.sync.timeout_ms))
        .connect_timeout(Duration::from_millis(cfg.sync.timeout_ms.min(5000)))
        // A redirect of an ingest request is never expected; following one could send the
        // token elsewhere.
        .redirect(reqwest::redirect::Policy::none());
    if cfg.sync.url.starts_with("https://") {
        let tls = cfg
            .sync
            .tls
            .client_config("sync.tls", &[b"h2", b"http/1.1"])?;
        builder = builder
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
            .https_only(true);
    }
    Ok(builder.build()?)
}

/// Uploads the outbox; see the module docs.
pub struct Uploader {
    http: reqwest::Client,
    ingest_url: String,
    token: String,
    agent_id: String,
    store: Arc<Mutex<Store>>,
    metrics: Arc<Metrics>,
    batch_max: usize,
    batch_max_bytes: u64,
    order: DrainOrder,
    max_bytes_per_second: Option<u64>,
    interval: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

enum Outcome {
    /// Sent (or moved aside); the next request may go after the pause (bandwidth limit).
    Sent(Duration),
    Idle,
    Retry(Option<Duration>),
}

impl Uploader {
    /// Opens its own connection to the agent's SQLite file.
    pub fn new(cfg: &AgentConfig, metrics: Arc<Metrics>) -> Result<Uploader, SyncError> {
        let token = cfg.sync_token().map_err(SyncError::Config)?;
        let store = Store::open_with(&cfg.store.path, &StoreOptions::from_config(cfg))?;
        let http = http_client(cfg)?;
        Ok(Uploader {
            http,
            ingest_url: format!("{}/v1/ingest", cfg.sync.url.trim_end_matches('/')),
            token,
            agent_id: cfg.agent_id.clone(),
            store: Arc::new(Mutex::new(store)),
            metrics,
            batch_max: cfg.sync.batch_max_summaries,
            batch_max_bytes: cfg.sync.batch_max_bytes,
            order: cfg.sync.order,
            max_bytes_per_second: cfg.sync.max_bytes_per_second,
            interval: Duration::from_millis(cfg.sync.interval_ms),
            backoff_initial: Duration::from_millis(cfg.sync.backoff_initial_ms),
            backoff_max: Duration::from_millis(cfg.sync.backoff_max_ms),
        })
    }

    /// Runs until `shutdown` turns true. A request in flight is finished first.
    pub async fn run(self, outbox_ready: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.backoff_initial;
        let mut limit = self.batch_max;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let outcome = tokio::select! {
                o = self.send_once(&mut limit) => o,
                _ = async {
                    let _ = shutdown.wait_for(|s| *s).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => return,
            };
            let wait = match outcome {
                Outcome::Sent(pause) if pause.is_zero() => {
                    backoff = self.backoff_initial;
                    continue;
                }
                Outcome::Sent(pause) => {
                    backoff = self.backoff_initial;
                    pause
                }
                Outcome::Idle => {
                    limit = self.batch_max;
                    tokio::select! {
                        _ = outbox_ready.notified() => {}
                        _ = tokio::time::sleep(self.interval) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
                Outcome::Retry(Some(after)) => after.min(self.backoff_max),
                Outcome::Retry(None) => {
                    let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                    backoff = (backoff * 2).min(self.backoff_max);
                    jittered
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .unwrap_or_else(|e| {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic())
            }
            Err(StoreError::Cancelled)
        })
    }

    async fn send_once(&self, limit: &mut usize) -> Outcome {
        let (max, max_bytes, order) = (*limit, self.batch_max_bytes, self.order);
        let drain = match self
            .with_store(move |s| s.outbox_drain(order, max, max_bytes))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "reading the outbox failed");
                return Outcome::Retry(None);
            }
        };
        if drain.is_empty() {
            self.refresh_gauges().await;
            return Outcome::Idle;
        }
        let started = tokio::time::Instant::now();
        let sent = drain.keys();
        let records = sent.len();
        let Drain {
            gaps,
            latest,
            summaries,
            ..
        } = drain;
        let mut batch = Batch::new(
            self.agent_id.clone(),
            wall_ms(),
            summaries.into_iter().map(|r| r.summary).collect(),
        );
        batch.gaps = gaps.into_iter().map(|g| g.gap).collect();
        batch.latest = latest;
        let body = batch.to_cbor();
        drop(batch);
        let body_len = body.len() as u64;
        let response = self
            .http
            .post(&self.ingest_url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/cbor")
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                self.metrics.sync_failures.inc();
                // The whole chain: the TLS reason (e.g. an unknown issuer) is in the sources.
                let chain = error_chain(&e);
                if chain.contains("invalid HTTP version") {
                    tracing::error!(error = %chain, "the receiver did not answer in HTTP: if it serves HTTPS, use https:// in sync.url; will retry");
                } else {
                    tracing::warn!(error = %chain, "upload failed; will retry");
                }
                return Outcome::Retry(None);
            }
        };
        let status = response.status();
        let pace = self.pace(body_len, started);
        if status.is_success() {
            let (n, g, l) = (
                sent.summaries.len() as u64,
                sent.gaps.len() as u64,
                sent.latest.len() as u64,
            );
            let removed = self.with_store(move |s| s.outbox_remove(&sent)).await;
            if let Err(e) = removed {
                // The cloud has them; resending later is harmless (idempotent).
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "deleting acknowledged summaries failed");
                return Outcome::Retry(None);
            }
            self.metrics.summaries_synced.add(n);
            self.metrics.gaps_synced.add(g);
            self.metrics.latest_values_synced.add(l);
            self.metrics.sync_requests_ok.inc();
            self.metrics.sync_bytes_sent.add(body_len);
            *limit = self.batch_max;
            self.refresh_gauges().await;
            return Outcome::Sent(pace);
        }
        self.metrics.sync_failures.inc();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let message: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                tracing::info!(%status, "receiver asks us to slow down");
                Outcome::Retry(retry_after)
            }
            StatusCode::PAYLOAD_TOO_LARGE if records > 1 => {
                *limit = (sent.summaries.len() / 2).max(1);
                tracing::warn!(records, "batch too large for the receiver; halving it");
                Outcome::Sent(pace)
            }
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => {
                let reason = format!("receiver refused ({status}): {message}");
                tracing::error!(records, %reason, "moving refused records to the dead-letter table");
                let now = wall_ms();
                match self
                    .with_store(move |s| s.outbox_reject(&sent, &reason, now))
                    .await
                {
                    Ok(moved) => {
                        self.metrics.summaries_rejected.add(moved as u64);
                        Outcome::Sent(pace)
                    }
                    Err(e) => {
                        self.metrics.store_errors.inc();
                        tracing::error!(error = %e, "moving refused records failed");
                        Outcome::Retry(None)
                    }
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::error!(%status, %message, "the receiver refused our device token (sync.token_file / EDGEWISE_SYNC_TOKEN); the data stays buffered; will retry");
                Outcome::Retry(None)
            }
            _ => {
                tracing::warn!(%status, %message, "upload refused; will retry");
                Outcome::Retry(None)
            }
        }
    }

    /// How long to wait after sending `body_len` bytes (request started at `started`) to stay
    /// under `max_bytes_per_second`.
    fn pace(&self, body_len: u64, started: tokio::time::Instant) -> Duration {
        match self.max_bytes_per_second {
            Some(rate) if rate > 0 => Duration::from_secs_f64(body_len as f64 / rate as f64)
                .saturating_sub(started.elapsed()),
            _ => Duration::ZERO,
        }
    }

    async fn refresh_gauges(&self) {
        if let Ok(u) = self.with_store(|s| s.buffer_usage()).await {
            self.metrics.outbox_rows.set(u.summaries);
            self.metrics.outbox_bytes.set(u.bytes);
            self.metrics.buffer_gap_rows.set(u.gaps);
        }
        if let Ok((pending, streams)) = self.with_store(|s| s.latest_counts()).await {
            self.metrics.latest_values_pending.set(pending);
            self.metrics.latest_value_streams.set(streams);
        }
    }
}
