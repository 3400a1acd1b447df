//! Sync: the outbox, in order, to the receiver's `POST /v1/ingest`.
//!
//! The [`Uploader`] reads the oldest summaries from the outbox, posts them as one CBOR
//! [`Batch`], and deletes exactly those rows only after a 2xx. A failed or unanswered request
//! leaves them in place, so they are sent again: the receiver's insert is idempotent by summary id,
//! which makes "at least once" on the wire "exactly once" in the cloud.
//!
//! Responses:
//! - 2xx: delete the rows.
//! - 429 / 503: wait `Retry-After` (capped by `backoff_max_ms`) or back off.
//! - 413 with more than one summary: halve the batch and retry.
//! - 400, 413 for a single summary, 422: the data itself is refused. The rows move to the
//!   dead-letter table with the receiver's message (counted, kept, never silently dropped) so one
//!   bad summary cannot block the queue forever.
//! - 401, 403, other statuses, network errors: exponential back-off with jitter, retry forever
//!   (an operator can fix a token without losing data).
//!
//! Tested end to end in `tests/` with a real receiver on loopback, including one that is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewise_protocol::Batch;
use reqwest::StatusCode;
use tokio::sync::{Notify, watch};

use crate::config::AgentConfig;
use crate::ingest::wall_ms;
use crate::metrics::Metrics;
use crate::store::{OutboxRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Config(String),
    #[error("opening the outbox: {0}")]
    Store(#[from] StoreError),
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
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
    interval: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

enum Outcome {
    Sent,
    Idle,
    Retry(Option<Duration>),
}

impl Uploader {
    /// Opens its own connection to the agent's SQLite file.
    pub fn new(cfg: &AgentConfig, metrics: Arc<Metrics>) -> Result<Uploader, SyncError> {
        let token = cfg.sync_token().map_err(SyncError::Config)?;
        let store = Store::open(&cfg.store.path, cfg.store.dead_letter_max_rows)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.sync.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.sync.timeout_ms.min(5000)))
            .build()?;
        Ok(Uploader {
            http,
            ingest_url: format!("{}/v1/ingest", cfg.sync.url.trim_end_matches('/')),
            token,
            agent_id: cfg.agent_id.clone(),
            store: Arc::new(Mutex::new(store)),
            metrics,
            batch_max: cfg.sync.batch_max_summaries,
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
            let wait = match self.send_once(&mut limit).await {
                Outcome::Sent => {
                    backoff = self.backoff_initial;
                    continue;
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
        let max = *limit;
        let rows = match self.with_store(move |s| s.outbox_peek(max)).await {
            Ok(rows) => rows,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "reading the outbox failed");
                return Outcome::Retry(None);
            }
        };
        self.refresh_gauges().await;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Outcome::Idle;
        };
        let (first_seq, last_seq, n) = (first.seq, last.seq, rows.len());
        let body = Batch::new(
            self.agent_id.clone(),
            wall_ms(),
            rows.into_iter().map(|r: OutboxRow| r.summary).collect(),
        )
        .to_cbor();
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
                tracing::warn!(error = %e, "upload failed; will retry");
                return Outcome::Retry(None);
            }
        };
        let status = response.status();
        if status.is_success() {
            let removed = self
                .with_store(move |s| s.outbox_remove(first_seq, last_seq))
                .await;
            if let Err(e) = removed {
                // The cloud has them; resending later is harmless (idempotent).
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "deleting acknowledged summaries failed");
                return Outcome::Retry(None);
            }
            self.metrics.summaries_synced.add(n as u64);
            self.metrics.sync_requests_ok.inc();
            self.metrics.sync_bytes_sent.add(body_len);
            *limit = self.batch_max;
            self.refresh_gauges().await;
            return Outcome::Sent;
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
            StatusCode::PAYLOAD_TOO_LARGE if n > 1 => {
                *limit = (n / 2).max(1);
                tracing::warn!(
                    summaries = n,
                    "batch too large for the receiver; halving it"
                );
                Outcome::Sent
            }
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => {
                let reason = format!("receiver refused ({status}): {message}");
                tracing::error!(summaries = n, %reason, "moving refused summaries to the dead-letter table");
                let now = wall_ms();
                match self
                    .with_store(move |s| s.outbox_reject(first_seq, last_seq, &reason, now))
                    .await
                {
                    Ok(moved) => {
                        self.metrics.summaries_rejected.add(moved as u64);
                        Outcome::Sent
                    }
                    Err(e) => {
                        self.metrics.store_errors.inc();
                        tracing::error!(error = %e, "moving refused summaries failed");
                        Outcome::Retry(None)
                    }
                }
            }
            _ => {
                tracing::warn!(%status, %message, "upload refused; will retry");
                Outcome::Retry(None)
            }
        }
    }

    async fn refresh_gauges(&self) {
        if let Ok((rows, bytes)) = self.with_store(|s| s.outbox_size()).await {
            self.metrics.outbox_rows.set(rows);
            self.metrics.outbox_bytes.set(bytes);
        }
    }
}
