//! Edgewise agent: runs on a gateway, turns MQTT sensor readings into window summaries, keeps
//! them durable in SQLite while offline, and syncs them to the cloud receiver.
//!
//! # Layout
//!
//! Pure stages (no I/O, unit- and property-tested):
//! - [`decode`]: SenML JSON / SenML CBOR / plain JSON payloads -> [`edgewise_protocol::Reading`]s.
//! - [`filter`]: per-stream data contracts (valid range).
//! - [`window`]: tumbling event-time windows with watermarks -> [`edgewise_protocol::WindowSummary`].
//! - [`arena`]: the readings a batch keeps, their names in one reused buffer (no allocation per
//!   reading on the ingest path).
//!
//! Edges (I/O):
//! - [`store`]: the SQLite journal, outbox (byte-capped, evicting by value into gap records),
//!   stream state and dead letters; integrity check and recovery on open.
//! - [`pipeline`]: one batch of messages -> one journal transaction; closed windows -> outbox.
//! - [`ingest`]: the MQTT connection and the group-commit loop that acks after the commit.
//! - [`sync`]: the outbox -> `POST /v1/ingest`, deleted only after the receiver's ack.
//! - [`http`]: `/metrics` and `/healthz`.
//! - [`tls`]: TLS client settings for the broker and the cloud (CA file or system roots, pins,
//!   client certificates); [`secret`]: the token and password, from files or the environment.
//! - [`service`]: systemd notifications (readiness, watchdog) and the SIGHUP reload plan.
//! - [`broker`] (feature `embedded-broker`): an MQTT broker inside the agent.
//! - [`demo`] (feature `demo`): broker, simulated sensors, agent and receiver in one process.
//!
//! [`Agent`] wires them together; [`config`] is its TOML file.

pub mod arena;
pub mod config;
pub mod decode;
pub mod filter;
pub mod http;
pub mod infer;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod secret;
pub mod service;
pub mod store;
pub mod sync;
pub mod tls;
pub mod window;

#[cfg(feature = "embedded-broker")]
pub mod broker;
#[cfg(feature = "demo")]
pub mod demo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

pub use config::AgentConfig;
pub use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error(transparent)]
    Sync(#[from] sync::SyncError),
    #[error("binding the metrics endpoint {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs rustls' ring crypto provider for the process (reqwest is built without one).
pub fn install_crypto_provider() {
    // Err only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running agent. Dropping it without [`Agent::stop`] aborts nothing: call `stop`.
pub struct Agent {
    metrics: Arc<Metrics>,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    stopping: Arc<AtomicBool>,
    /// One per MQTT connection (`mqtt.connections`), with its task.
    clients: Vec<ingest::Client>,
    pipeline: JoinHandle<()>,
    connections: Vec<JoinHandle<()>>,
    uploader: JoinHandle<()>,
    http: JoinHandle<()>,
}

impl Agent {
    /// Opens the store (rebuilding open windows), then starts the metrics endpoint, the MQTT
    /// connection, the pipeline and the uploader. `cfg` must have passed [`AgentConfig::problems`].
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        install_crypto_provider();
        for w in cfg.warnings() {
            tracing::warn!(key = %w.key, "insecure configuration: {}", w.message);
        }
        let metrics = Arc::new(Metrics::default());
        let pipeline = {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || pipeline::Pipeline::open(&cfg, metrics))
                .await
                .map_err(|e| AgentError::Config(format!("opening the store panicked: {e}")))??
        };
        let uploader = sync::Uploader::new(&cfg, metrics.clone())?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (http_addr, http) = http::serve(cfg.http.listen, metrics.clone(), shutdown_rx.clone())
            .await
            .map_err(|source| AgentError::Http {
                addr: cfg.http.listen,
                source,
            })?;
        let (tx, rx) = mpsc::channel(cfg.ingest.queue_messages);
        let stopping = Arc::new(AtomicBool::new(false));
        let topics = cfg.subscription_filters();
        let mut clients = Vec::new();
        let mut connections = Vec::new();
        for index in 0..cfg.mqtt.connections.max(1) {
            let (client, session) = ingest::connect(&cfg, index).map_err(AgentError::Config)?;
            let connection = ingest::Connection {
                session,
                client: client.clone(),
                index,
                topics: topics.clone(),
            };
            connections.push(tokio::spawn(ingest::run_connection(
                connection,
                tx.clone(),
                metrics.clone(),
                Duration::from_millis(cfg.mqtt.reconnect_max_backoff_ms),
                stopping.clone(),
            )));
            clients.push(client);
        }
        drop(tx);
        let outbox_ready = Arc::new(Notify::new());
        let pipeline = tokio::spawn(ingest::run_pipeline(
            pipeline,
            rx,
            clients.clone(),
            ingest::BatchPolicy::from_config(&cfg),
            metrics.clone(),
            outbox_ready.clone(),
            shutdown_rx.clone(),
        ));
        let uploader = tokio::spawn(uploader.run(outbox_ready, shutdown_rx));
        tracing::info!(agent_id = %cfg.agent_id, broker = %cfg.mqtt.url, cloud = %cfg.sync.url, metrics = %http_addr, "agent started");
        Ok(Agent {
            metrics,
            http_addr,
            shutdown,
            stopping,
            clients,
            pipeline,
            connections,
            uploader,
            http,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` and `/healthz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops cleanly: the batch in hand is committed and acked, the upload in flight finishes,
    /// the MQTT session is closed. Open windows stay in the journal for the next start.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.pipeline.await;
        self.stopping.store(true, Ordering::Relaxed);
        // Queued behind the last acks, so those reach the broker first.
        for client in &self.clients {
            let _ = client.try_disconnect();
        }
        for mut connection in self.connections {
            if tokio::time::timeout(Duration::from_secs(3), &mut connection)
                .await
                .is_err()
            {
                connection.abort();
            }
        }
        let _ = self.uploader.await;
        let _ = self.http.await;
    }

    /// Simulates a crash for tests: every task is aborted at once, nothing is flushed, acks in
    /// flight are lost. (A real `kill -9` is tested with the binary.)
    pub fn abort(self) {
        self.pipeline.abort();
        for connection in &self.connections {
            connection.abort();
        }
        self.uploader.abort();
        self.http.abort();
    }
}
