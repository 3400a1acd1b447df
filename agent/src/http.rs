//! The agent's local HTTP endpoint: `/metrics` (Prometheus text) and `/healthz`.
//!
//! `/healthz` answers 200 while the agent runs, with a small JSON status (broker connection,
//! outbox backlog) for operators; it does not fail when the broker or the cloud is away, since
//! buffering through such outages is the agent's job.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .with_state(metrics)
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "status": "ok",
        "mqtt_connected": m.mqtt_connected.get() >= 1,
        "mqtt_connections_up": m.mqtt_connected.get(),
        "outbox_rows": m.outbox_rows.get(),
        "open_windows": m.open_windows.get(),
    }))
}

/// Binds `listen` and serves until `shutdown` turns true. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router(metrics))
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok((addr, task))
}
