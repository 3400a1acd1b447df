//! `edgewise-agent`: run the agent, check a config, or run the self-contained demo.
//!
//! `run` behaves as a systemd service (`Type=notify`, see `deploy/edgewise-agent.service`):
//! `READY=1` once the store is open and `/healthz` is served, `WATCHDOG=1` every half
//! `WatchdogSec` after a successful local `/healthz` probe, SIGHUP re-reads and checks the config
//! and applies it (see [`edgewise_agent::service`]), SIGTERM or Ctrl-C stops cleanly. With the
//! `embedded-broker` feature, `--embedded-broker ADDR` runs an MQTT broker in the process.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgewise_agent::Agent;
use edgewise_agent::config::{AgentConfig, ConfigError};
use edgewise_agent::service::{LoadedConfig, Notifier, ReloadPlan, plan_reload};
use tokio::signal::unix::{SignalKind, signal};

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
        /// Also run an MQTT broker in this process, listening here (e.g. 0.0.0.0:1883); point
        /// `mqtt.url` at it.
        #[cfg(feature = "embedded-broker")]
        #[arg(long, env = "EDGEWISE_EMBEDDED_BROKER")]
        embedded_broker: Option<std::net::SocketAddr>,
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

/// Default log filters (when `RUST_LOG` is unset), by command.
const LOG_RUN: &str = "info";
/// The demo's outage makes uploads fail on purpose, and rumqttd logs every client that leaves:
/// the report says what matters. RUST_LOG still overrides this.
#[cfg_attr(not(feature = "demo"), allow(dead_code))]
const LOG_DEMO: &str = "error,rumqttd=off,edgewise_agent::sync=off";
const LOG_OTHER: &str = "warn";

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(match cli.command {
        Command::Run { .. } => LOG_RUN,
        #[cfg(feature = "demo")]
        Command::Demo(_) => LOG_DEMO,
        _ => LOG_OTHER,
    });
    match run(cli.command, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` or else by `default` (see [`log_filter`]).
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let (filter, unusable) = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default);
    // Under systemd the journal adds the time and cannot show colours.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        tracing_subscriber::registry()
            .with(logs.without_time().with_filter(filter))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .init();
    }
    if let Some(problem) = unusable {
        tracing::warn!("{problem}; using {default:?}");
    }
}

/// The log filter for `RUST_LOG` (`level` or `target=level`, comma-separated, e.g.
/// `info,edgewise_agent::sync=debug`), or `default` when it is unset, empty or unusable (then with
/// the reason). `tracing_subscriber::filter::Targets`, not `EnvFilter`: it covers those
/// directives without linking a regex engine into the gateway binary.
fn log_filter(
    rust_log: Option<&str>,
    default: &str,
) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::Targets;
    let fallback = || {
        // `default` is one of this file's constants, which the tests parse.
        default
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match rust_log.filter(|v| !v.trim().is_empty()) {
        None => (fallback(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(e) => (
                fallback(),
                Some(format!("RUST_LOG={v:?} is not a log filter ({e})")),
            ),
        },
    }
}

fn run(command: Command, started: Instant) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { config } => Ok(check(&config)),
        Command::ExampleConfig => {
            print!("{}", edgewise_agent::config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            #[cfg(feature = "embedded-broker")]
            embedded_broker,
        } => {
            #[cfg(not(feature = "embedded-broker"))]
            let embedded_broker: Option<std::net::SocketAddr> = None;
            let embedded = embedded_broker.is_some();
            let loaded = load_config(&config, embedded)?;
            #[cfg(feature = "embedded-broker")]
            if let Some(listen) = embedded_broker {
                let broker = edgewise_agent::broker::EmbeddedBroker::start(
                    listen,
                    loaded.cfg.mqtt.max_packet_bytes,
                )
                .context("starting the embedded MQTT broker")?;
                tracing::info!(listen = %broker.addr, "embedded MQTT broker started");
            }
            let rt = runtime()?;
            let result = rt.block_on(run_agent(&config, loaded, started, embedded));
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

/// Loads the config file (at start and at a reload); with `--embedded-broker` fitted to the
/// embedded broker ([`fit_to_embedded_broker`]), so a reload keeps what the start set.
fn load_config(path: &Path, embedded_broker: bool) -> Result<LoadedConfig, ConfigError> {
    let loaded = LoadedConfig::load(path)?;
    if embedded_broker {
        return fit_to_embedded_broker(path, loaded);
    }
    Ok(loaded)
}

/// The agent's MQTT settings for reading from its own embedded broker
/// ([`edgewise_agent::broker::fit_agent`]); a file asking for MQTT 5 is invalid.
#[cfg(feature = "embedded-broker")]
fn fit_to_embedded_broker(
    path: &Path,
    mut loaded: LoadedConfig,
) -> Result<LoadedConfig, ConfigError> {
    edgewise_agent::broker::fit_agent(&mut loaded.cfg.mqtt).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        problems: vec![edgewise_agent::config::Problem {
            key: "mqtt.protocol".into(),
            message: e.to_string(),
        }],
    })?;
    Ok(loaded)
}

#[cfg(not(feature = "embedded-broker"))]
fn fit_to_embedded_broker(_: &Path, loaded: LoadedConfig) -> Result<LoadedConfig, ConfigError> {
    Ok(loaded)
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
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            // Files named in the config are read as `run` would: a problem there fails `check`.
            let problems = edgewise_agent::config::file_problems(&cfg);
            if !problems.is_empty() {
                println!("{}: {} problem(s):", path.display(), problems.len());
                for p in problems {
                    println!("  - {p}");
                }
                return ExitCode::FAILURE;
            }
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

async fn run_agent(
    path: &Path,
    loaded: LoadedConfig,
    started: Instant,
    embedded_broker: bool,
) -> anyhow::Result<()> {
    let notifier = Notifier::from_env().context("opening the NOTIFY_SOCKET")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut running = loaded;
    let mut token = running.cfg.sync_token().ok();
    let mut agent = Agent::start(running.cfg.clone())
        .await
        .context("starting the agent")?;
    let ready_ms = started.elapsed().as_millis();
    tracing::info!(ready_ms, http = %agent.http_addr(), "ready");
    notifier.send(&format!(
        "READY=1\nSTATUS=running, ready after {ready_ms} ms"
    ));
    let watchdog = edgewise_agent::service::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; break; }
            _ = term.recv() => break,
            _ = hup.recv() => {
                notifier.send("RELOADING=1\nSTATUS=reloading the config");
                let new_token = running.cfg.sync_token().ok();
                let new = load_config(path, embedded_broker);
                let plan = plan_reload(&running, new, new_token != token);
                (agent, running) = reload(agent, running, plan).await?;
                token = running.cfg.sync_token().ok();
                notifier.send("READY=1\nSTATUS=running");
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                // Only a runtime that still serves its own /healthz keeps systemd's watchdog fed.
                let probe = watchdog.unwrap_or_default() / 2;
                match tokio::time::timeout(probe, healthz_ok(agent.http_addr())).await {
                    Ok(Ok(())) => notifier.send("WATCHDOG=1"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "watchdog: /healthz probe failed"),
                    Err(_) => tracing::warn!("watchdog: /healthz probe timed out"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    notifier.send("STOPPING=1\nSTATUS=stopping");
    if let Err(e) = stop(agent).await {
        tracing::warn!("{e:#}; exiting anyway");
    } else {
        tracing::info!("stopped");
    }
    Ok(())
}

/// Stops the agent cleanly within [`SHUTDOWN_TIMEOUT`]; an error if it did not.
async fn stop(agent: Agent) -> anyhow::Result<()> {
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, agent.stop())
        .await
        .is_err()
    {
        // Nothing acked is at risk: acks follow commits, unacked messages are redelivered.
        anyhow::bail!(
            "clean shutdown took longer than {} s",
            SHUTDOWN_TIMEOUT.as_secs()
        );
    }
    Ok(())
}

/// Carries out a reload plan. Returns the agent that runs afterwards (the old one when nothing
/// is applied or the new config fails to start); an error only when the old agent could not be
/// stopped or restarted, so systemd restarts the whole process.
async fn reload(
    agent: Agent,
    running: LoadedConfig,
    plan: ReloadPlan,
) -> anyhow::Result<(Agent, LoadedConfig)> {
    let (next, applied, need_restart) = match plan {
        ReloadPlan::Invalid(e) => {
            tracing::error!("reload refused, the running config stays: {e}");
            return Ok((agent, running));
        }
        ReloadPlan::Unchanged => {
            tracing::info!("reload: the config is unchanged");
            return Ok((agent, running));
        }
        ReloadPlan::RestartOnly { need_restart } => {
            warn_restart_only(&need_restart);
            return Ok((agent, running));
        }
        ReloadPlan::Apply {
            next,
            applied,
            need_restart,
        } => (*next, applied, need_restart),
    };
    warn_restart_only(&need_restart);
    tracing::info!(keys = %applied.join(", "), "reload: applying changed keys (the agent's tasks restart)");
    stop(agent).await.context("reload: stopping the agent")?;
    match Agent::start(next.cfg.clone()).await {
        Ok(agent) => {
            tracing::info!(keys = %applied.join(", "), "reload: applied");
            Ok((agent, next))
        }
        Err(e) => {
            tracing::error!(error = %e, "reload: the new config does not start; going back to the running one");
            let agent = Agent::start(running.cfg.clone())
                .await
                .context("reload: restarting with the previous config")?;
            Ok((agent, running))
        }
    }
}

fn warn_restart_only(keys: &[String]) {
    if !keys.is_empty() {
        tracing::warn!(
            keys = %keys.join(", "),
            "reload: these changed keys need a restart (systemctl restart edgewise-agent); they keep their running values"
        );
    }
}

/// `GET /healthz` on the agent's own endpoint answers 200.
async fn healthz_ok(addr: std::net::SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    if head.starts_with(b"HTTP/1.") && &head[8..] == b" 200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&head)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn rust_log_overrides_the_default_and_an_unusable_one_is_reported() {
        for default in [LOG_RUN, LOG_DEMO, LOG_OTHER] {
            assert!(
                default
                    .parse::<tracing_subscriber::filter::Targets>()
                    .is_ok()
            );
        }
        let (f, problem) = log_filter(Some("warn,edgewise_agent::sync=debug"), LOG_RUN);
        assert!(problem.is_none());
        assert_eq!(f.default_level(), Some(LevelFilter::WARN));
        assert!(f.would_enable("edgewise_agent::sync", &tracing::Level::DEBUG));
        for unset in [None, Some(""), Some("  ")] {
            let (f, problem) = log_filter(unset, LOG_RUN);
            assert!(problem.is_none());
            assert_eq!(f.default_level(), Some(LevelFilter::INFO));
        }
        let (f, problem) = log_filter(Some("edgewise_agent=bogus"), LOG_DEMO);
        let problem = problem.expect("reported");
        assert!(
            problem.contains("RUST_LOG=\"edgewise_agent=bogus\""),
            "{problem}"
        );
        assert_eq!(f.default_level(), Some(LevelFilter::ERROR));
        assert!(!f.would_enable("rumqttd", &tracing::Level::ERROR));
    }
}
