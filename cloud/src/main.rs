//! `edgewise-cloud`: run the receiver, and manage device tokens.
//!
//! ```text
//! edgewise-cloud serve --listen 127.0.0.1:8080 --db edgewise-cloud.db [--max-body-bytes N]
//! edgewise-cloud serve --pg-url postgres://user@host/db [--pg-max-connections N]
//! edgewise-cloud device add ID --db FILE       # prints the new token once, on stdout
//! edgewise-cloud device list --db FILE
//! edgewise-cloud device revoke ID --db FILE
//! edgewise-cloud device rotate ID --db FILE     # prints a new token once; the old one stops
//! ```
//!
//! `--token-key-file FILE` (every command) hashes device tokens with a keyed hash at rest (see
//! `auth`). `--tls-cert FILE --tls-key FILE` serves HTTPS directly (rustls); without them, plain HTTP
//! (put a TLS-terminating proxy in front). `--pg-url` (or `EDGEWISE_CLOUD_PG_URL`) selects PostgreSQL instead of the SQLite file; every
//! command takes it.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). `serve` stops gracefully on
//! ctrl-c or SIGTERM. The library does the work; this file only parses arguments and reports.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use edgewise_cloud::auth::{TokenHasher, TokenKey};
use edgewise_cloud::{
    AnyStore, PgConfig, PgStore, RateLimit, Receiver, ServerConfig, Storage, Store,
};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "edgewise-cloud",
    version,
    about = "The Edgewise ingestion receiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the data lives: a SQLite file, or PostgreSQL when `--pg-url` is given.
#[derive(Debug, clap::Args)]
struct DbArgs {
    /// SQLite database file (created if missing); ignored with --pg-url.
    #[arg(long, env = "EDGEWISE_CLOUD_DB", default_value = "edgewise-cloud.db")]
    db: PathBuf,
    /// PostgreSQL URL, e.g. postgres://edgewise@db.internal:5432/edgewise.
    #[arg(long, env = "EDGEWISE_CLOUD_PG_URL")]
    pg_url: Option<String>,
    /// Most PostgreSQL connections this process opens.
    #[arg(long, env = "EDGEWISE_CLOUD_PG_MAX_CONNECTIONS", default_value_t = PgConfig::default().max_connections)]
    pg_max_connections: usize,
    /// Key for hashing device tokens at rest (HMAC-SHA256): a file holding at least 64 hex
    /// characters (`openssl rand -hex 32`), mode 600. Without it tokens are stored as plain
    /// SHA-256 (a warning at start); with it, existing plain hashes are migrated on open.
    #[arg(long, env = "EDGEWISE_CLOUD_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP receiver.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "EDGEWISE_CLOUD_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        db: DbArgs,
        /// Largest accepted request body in bytes; larger ones get 413.
        #[arg(long, env = "EDGEWISE_CLOUD_MAX_BODY_BYTES", default_value_t = ServerConfig::default().max_body_bytes)]
        max_body_bytes: usize,
        /// Ingest requests per second per device (0 turns the limit off); above it, 429.
        #[arg(long, env = "EDGEWISE_CLOUD_RATE_LIMIT_PER_SECOND", default_value_t = RateLimit::default().per_second)]
        rate_limit_per_second: f64,
        /// Requests a device may send at once above its rate.
        #[arg(long, env = "EDGEWISE_CLOUD_RATE_LIMIT_BURST", default_value_t = RateLimit::default().burst)]
        rate_limit_burst: u32,
        /// PEM certificate chain: serve HTTPS (with --tls-key) instead of plain HTTP.
        #[arg(long, env = "EDGEWISE_CLOUD_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, env = "EDGEWISE_CLOUD_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Manage devices and their tokens.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register a device and print its token (shown only once).
    Add {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List devices with their summary counts.
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Give a device a new token (printed once; the old one stops working at once, a revocation
    /// is lifted). The agent keeps its data buffered until it runs with the new token.
    Rotate {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a device's token (its data stays).
    Revoke {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    match cli.command {
        Command::Serve {
            listen,
            db,
            max_body_bytes,
            rate_limit_per_second,
            rate_limit_burst,
            tls_cert,
            tls_key,
        } => {
            let cfg = ServerConfig {
                max_body_bytes,
                rate_limit: (rate_limit_per_second > 0.0).then_some(RateLimit {
                    per_second: rate_limit_per_second,
                    burst: rate_limit_burst,
                }),
            };
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(
                    edgewise_cloud::tls::server_config(&cert, &key)
                        .context("loading the TLS certificate and key")?,
                ),
                _ => None,
            };
            serve(listen, open(&db).await?, cfg, tls).await
        }
        Command::Device { command } => match command {
            DeviceCommand::Add { id, db } => {
                let token = open(&db)
                    .await?
                    .register_device(id.clone())
                    .await
                    .with_context(|| format!("adding device {id:?}"))?;
                println!("{token}");
                eprintln!(
                    "token for device {id:?} printed above; it is shown only once, store it now"
                );
                Ok(())
            }
            DeviceCommand::List { db } => {
                let devices = open(&db)
                    .await?
                    .list_devices()
                    .await
                    .context("listing devices")?;
                println!("id\tcreated_at_ms\tlast_seen_ms\tsummaries\talerts\tevicted\trevoked");
                for d in devices {
                    let last_seen = d.last_seen_ms.map_or("-".to_owned(), |t| t.to_string());
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        d.id,
                        d.created_at_ms,
                        last_seen,
                        d.summary_count,
                        d.alert_count,
                        d.evicted_count,
                        d.revoked
                    );
                }
                Ok(())
            }
            DeviceCommand::Rotate { id, db } => {
                let token = open(&db)
                    .await?
                    .rotate_token(id.clone())
                    .await
                    .with_context(|| format!("rotating the token of device {id:?}"))?;
                println!("{token}");
                eprintln!(
                    "new token for device {id:?} printed above (shown only once); the old one no longer works"
                );
                Ok(())
            }
            DeviceCommand::Revoke { id, db } => {
                let revoked = open(&db)
                    .await?
                    .revoke(id.clone())
                    .await
                    .with_context(|| format!("revoking device {id:?}"))?;
                if !revoked {
                    bail!("no device {id:?}");
                }
                eprintln!("device {id:?} revoked");
                Ok(())
            }
        },
    }
}

async fn open(db: &DbArgs) -> anyhow::Result<AnyStore> {
    let hasher = match &db.token_key_file {
        Some(path) => TokenHasher::keyed(TokenKey::load(path).context("--token-key-file")?),
        None => {
            tracing::warn!(
                "device tokens are hashed at rest with plain SHA-256; set --token-key-file \
                 (EDGEWISE_CLOUD_TOKEN_KEY_FILE) for a keyed hash"
            );
            TokenHasher::default()
        }
    };
    let store = open_backend(db).await?;
    store
        .with_token_hasher(hasher)
        .await
        .context("setting up token hashing")
}

async fn open_backend(db: &DbArgs) -> anyhow::Result<AnyStore> {
    match &db.pg_url {
        Some(url) => {
            let cfg = PgConfig {
                max_connections: db.pg_max_connections,
                ..PgConfig::default()
            };
            // The URL may carry a password: do not echo it.
            Ok(PgStore::connect(url, &cfg)
                .await
                .context("connecting to PostgreSQL (--pg-url)")?
                .into())
        }
        None => Ok(Store::open(&db.db)
            .with_context(|| format!("opening database {}", db.db.display()))?
            .into()),
    }
}

async fn serve(
    listen: SocketAddr,
    store: AnyStore,
    cfg: ServerConfig,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let backend = store.backend();
    let https = tls.is_some();
    let receiver = match tls {
        Some(tls) => Receiver::start_tls(listen, store, cfg, tls).await,
        None => Receiver::start(listen, store, cfg).await,
    }
    .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(addr = %receiver.local_addr(), backend, https, "edgewise-cloud serving");
    shutdown_signal()
        .await
        .context("waiting for a shutdown signal")?;
    tracing::info!("shutting down");
    receiver.stop().await;
    Ok(())
}

/// Resolves on ctrl-c, or on SIGTERM where there is one.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
