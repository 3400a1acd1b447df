//! [`Receiver`]: a running HTTP server over any [`Storage`] backend, with start and graceful stop.
//!
//! The listen address, the store and the configuration are passed in, so tests run many
//! receivers on port 0 in one process, each with its own database and [`Metrics`].
//! [`Receiver::stop`] stops accepting, lets in-flight requests finish (idle keep-alive
//! connections close at once), and returns only once the listening socket is closed, so the same
//! port can be bound again (tokio sets `SO_REUSEADDR`). Dropping a `Receiver` without `stop`
//! also starts a graceful shutdown, in the background.
//!
//! Tested by `tests/api.rs` (including stop, restart on the same port, and serving the same data).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{ServerConfig, router};
use crate::metrics::Metrics;
use crate::store::Storage;
use crate::tls::TlsListener;

/// How long [`Receiver::stop`] waits for in-flight requests before cutting them off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    /// Binds `listen` (port 0 picks a free port) and serves on a spawned task.
    pub async fn start<S: Storage>(
        listen: SocketAddr,
        store: S,
        cfg: ServerConfig,
    ) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(listen).await?;
        Self::serve_on(listener, store, cfg)
    }

    /// Like [`Receiver::start`], serving HTTPS with `tls` (see [`crate::tls::server_config`]).
    pub async fn start_tls<S: Storage>(
        listen: SocketAddr,
        store: S,
        cfg: ServerConfig,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Receiver> {
        let tcp = TcpListener::bind(listen).await?;
        Self::serve_on(TlsListener::new(tcp, tls)?, store, cfg)
    }

    fn serve_on<L, S>(listener: L, store: S, cfg: ServerConfig) -> std::io::Result<Receiver>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
        S: Storage,
    {
        let local_addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let app = router(store, Arc::clone(&metrics), &cfg);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            // A dropped sender (the Receiver was dropped) also means: shut down.
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve.into_future());
        tracing::info!(%local_addr, max_body_bytes = cfg.max_body_bytes, "receiver listening");
        Ok(Receiver {
            local_addr,
            metrics,
            shutdown,
            task,
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A handle to the counters that outlives the receiver.
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Graceful shutdown; returns once the listener is closed and the server task has ended
    /// (requests still running after [`SHUTDOWN_GRACE`] are cut off).
    pub async fn stop(self) {
        let Receiver {
            local_addr,
            shutdown,
            mut task,
            ..
        } = self;
        let _ = shutdown.send(());
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => tracing::info!(%local_addr, "receiver stopped"),
            Ok(Ok(Err(e))) => {
                tracing::warn!(%local_addr, error = %e, "receiver ended with an error")
            }
            Ok(Err(e)) => tracing::warn!(%local_addr, error = %e, "receiver task failed"),
            Err(_) => {
                tracing::warn!(%local_addr, "requests still running after the grace period; cutting them off");
                task.abort();
                let _ = task.await;
            }
        }
    }
}
