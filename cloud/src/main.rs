//! `edgewise-cloud`: run the receiver, and manage device tokens.
//!
//! ```text
//! edgewise-cloud serve --listen 127.0.0.1:8080 --db edgewise-cloud.db [--max-body-bytes N]
//! edgewise-cloud device add ID --db FILE       # prints the new token once, on stdout
//! edgewise-cloud device list --db FILE
//! edgewise-cloud device revoke ID --db FILE
//! ```
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). `serve` stops gracefully on
//! ctrl-c or SIGTERM. The library does the work; this file only parses arguments and reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use edgewise_cloud::{Receiver, ServerConfig, Store};
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP receiver.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "EDGEWISE_CLOUD_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// SQLite database file (created if missing).
        #[arg(long, env = "EDGEWISE_CLOUD_DB", default_value = "edgewise-cloud.db")]
        db: PathBuf,
        /// Largest accepted request body in bytes; larger ones get 413.
        #[arg(long, env = "EDGEWISE_CLOUD_MAX_BODY_BYTES", default_value_t = ServerConfig::default().max_body_bytes)]
        max_body_bytes: usize,
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
        #[arg(long, env = "EDGEWISE_CLOUD_DB", default_value = "edgewise-cloud.db")]
        db: PathBuf,
    },
    /// List devices with their summary counts.
    List {
        #[arg(long, env = "EDGEWISE_CLOUD_DB", default_value = "edgewise-cloud.db")]
        db: PathBuf,
    },
    /// Revoke a device's token (its data stays).
    Revoke {
        id: String,
        #[arg(long, env = "EDGEWISE_CLOUD_DB", default_value = "edgewise-cloud.db")]
        db: PathBuf,
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
        } => serve(listen, &db, ServerConfig { max_body_bytes }).await,
        Command::Device { command } => match command {
            DeviceCommand::Add { id, db } => {
                let token = open(&db)?
                    .add_device(&id)
                    .with_context(|| format!("adding device {id:?}"))?;
                println!("{token}");
                eprintln!(
                    "token for device {id:?} printed above; it is shown only once, store it now"
                );
                Ok(())
            }
            DeviceCommand::List { db } => {
                let devices = open(&db)?.devices().context("listing devices")?;
                println!("id\tcreated_at_ms\tlast_seen_ms\tsummaries\trevoked");
                for d in devices {
                    let last_seen = d.last_seen_ms.map_or("-".to_owned(), |t| t.to_string());
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        d.id, d.created_at_ms, last_seen, d.summary_count, d.revoked
                    );
                }
                Ok(())
            }
            DeviceCommand::Revoke { id, db } => {
                let revoked = open(&db)?
                    .revoke_device(&id)
                    .with_context(|| format!("revoking device {id:?}"))?;
                if !revoked {
                    bail!("no device {id:?} in {}", db.display());
                }
                eprintln!("device {id:?} revoked");
                Ok(())
            }
        },
    }
}

fn open(db: &Path) -> anyhow::Result<Store> {
    Store::open(db).with_context(|| format!("opening database {}", db.display()))
}

async fn serve(listen: SocketAddr, db: &Path, cfg: ServerConfig) -> anyhow::Result<()> {
    let store = open(db)?;
    let receiver = Receiver::start(listen, store, cfg)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(addr = %receiver.local_addr(), db = %db.display(), "edgewise-cloud serving");
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
