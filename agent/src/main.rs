//! `edgewise-agent`: run the agent, check a config, or run the self-contained demo.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgewise_agent::config::{AgentConfig, ConfigError};

/// Longest clean shutdown after SIGTERM before the agent exits anyway.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(6);
/// How long blocking work may linger after the clean shutdown.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(name = "edgewise-agent", version, about = "Edgewise gateway agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, short, env = "EDGEWISE_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file; print every problem with its key path (exit 1 if any).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a commented example config.
    ExampleConfig,
    /// Embedded broker + simulated sensors + agent + local receiver, with a report at the end.
    #[cfg(feature = "demo")]
    Demo(edgewise_agent::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match cli.command {
        Command::Run { .. } => "info",
        // The demo's outage makes uploads fail on purpose, and rumqttd logs every client that
        // leaves: the report says what matters. RUST_LOG still overrides this.
        #[cfg(feature = "demo")]
        Command::Demo(_) => "error,rumqttd=off,edgewise_agent::sync=off",
        _ => "warn",
    });
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { config } => Ok(check(&config)),
        Command::ExampleConfig => {
            print!("{}", edgewise_agent::config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            let rt = runtime()?;
            let result = rt.block_on(run_agent(cfg));
            // A blocking SQLite call still running must not hold the exit up for long: its
            // transaction either commits or is rolled back by SQLite on the next open.
            rt.shutdown_timeout(SHUTDOWN_LINGER);
            result?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            let ok = runtime()?.block_on(edgewise_agent::demo::run(args))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn check(path: &std::path::Path) -> ExitCode {
    match AgentConfig::load(path) {
        Ok(cfg) => {
            // Only a warning: systemd may provide EDGEWISE_SYNC_TOKEN at run time, which this
            // shell does not see. `run` refuses to start without a token.
            if let Err(e) = cfg.sync_token() {
                println!("warning: sync token: {e}");
            }
            // The model is loaded and validated against the configured inputs, as `run` would.
            if let Some(inference) = &cfg.inference
                && let Err(e) = edgewise_agent::infer::Scorer::load(inference)
            {
                println!(
                    "{}: 1 problem(s):\n  - inference.model_path: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid { path, problems }) => {
            println!("{}: {} problem(s):", path.display(), problems.len());
            for p in problems {
                println!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_agent(cfg: AgentConfig) -> anyhow::Result<()> {
    let agent = edgewise_agent::Agent::start(cfg)
        .await
        .context("starting the agent")?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, agent.stop())
        .await
        .is_err()
    {
        // Nothing acked is at risk: acks follow commits, unacked messages are redelivered.
        tracing::warn!(
            timeout_s = SHUTDOWN_TIMEOUT.as_secs(),
            "clean shutdown took too long; exiting anyway"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
