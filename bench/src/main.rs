//! `edgewise-bench`: brokers' ceilings and the agent's sustained rate, CPU and memory, in one run.
//!
//! `cargo run --release -p edgewise-bench` runs every case (Mosquitto and the embedded broker,
//! QoS 0 and 1, 100 and 10,000 sensors); flags pick fewer. It prints the expected duration up
//! front, one line per step, a table at the end, and writes JSON (`--json`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use edgewise_bench::mosquitto::{MACHINE_CONFIG, Mosquitto};
use edgewise_bench::report::{CaseResult, ConsumerKind, StepResult, step_line, table};
use edgewise_bench::search::{Search, sim_interval, step_down, unreachable_rates};
use edgewise_bench::trial::{Env, Step, run_step};
use edgewise_cloud::{Receiver, ServerConfig, Store as CloudStore};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "edgewise-bench",
    about = "End-to-end load harness: broker ceiling vs. the agent's sustained rate"
)]
struct Args {
    /// Brokers to test: `mosquitto` (the machine's config, private copy on a free port) and/or
    /// `embedded` (the agent's rumqttd, in this process).
    #[arg(long, value_delimiter = ',', default_value = "mosquitto,embedded")]
    brokers: Vec<String>,
    /// Publish (and subscribe) QoS levels.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    qos: Vec<u8>,
    /// Fleet sizes (simulated sensor nodes; each message holds 2 readings).
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    sensors: Vec<usize>,
    /// Consumers: `subscriber` (counts only: the broker's ceiling) and/or `agent`.
    #[arg(long, value_delimiter = ',', default_value = "subscriber,agent")]
    consumers: Vec<String>,
    /// Length of a confirming step: a rate counts as sustained only if it held this long.
    #[arg(long, default_value_t = 30)]
    step_seconds: u64,
    /// Length of the search's probe steps.
    #[arg(long, default_value_t = 5)]
    probe_seconds: u64,
    /// Most probe steps per consumer and case.
    #[arg(long, default_value_t = 7)]
    max_probes: usize,
    /// First probed rate (messages/s) of the subscriber; the agent starts at the ceiling.
    #[arg(long, default_value_t = 8_000.0)]
    start_rate: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 400_000.0)]
    max_rate: f64,
    /// Fixed rates instead of the search: one full-length step per rate and consumer.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// MQTT connections the simulated sensors share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long after publishing stops the consumer may take to have every message (at most a
    /// fifteenth of the step, at least 500 ms: 500 ms after a 5 s probe).
    #[arg(long, default_value_t = 2_000)]
    grace_ms: u64,
    /// The Mosquitto config to copy.
    #[arg(long, default_value = MACHINE_CONFIG)]
    mosquitto_config: PathBuf,
    /// Extra Mosquitto config lines, e.g. `--mosquitto-option "max_inflight_messages 100"`.
    #[arg(long)]
    mosquitto_option: Vec<String>,
    /// The agent's `ingest.commit_interval_ms`.
    #[arg(long, default_value_t = 5)]
    commit_interval_ms: u64,
    /// The agent's `ingest.commit_max_messages`.
    #[arg(long, default_value_t = 1000)]
    commit_max_messages: usize,
    /// The agent's `mqtt.broker_max_inflight` (commit as soon as this many QoS 1 messages wait
    /// for their ack; 0: never early). Default: with the embedded broker half its window (500),
    /// else the agent's (100 with MQTT 3.1.1, the receive maximum with MQTT 5).
    #[arg(long)]
    broker_max_inflight: Option<usize>,
    /// The MQTT version of the agent and of the counting subscriber: `3.1.1` or `5`.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    mqtt_protocol: String,
    /// With `--mqtt-protocol 5`: the receive maximum the agent and the counting subscriber
    /// send (how many QoS 1 messages the broker may send before their acks).
    #[arg(long, default_value_t = edgewise_agent::config::DEFAULT_RECEIVE_MAXIMUM)]
    receive_maximum: u16,
    /// The agent's `mqtt.connections` (more than one: shared subscriptions, each connection
    /// with its own in-flight window).
    #[arg(long, default_value_t = 1)]
    agent_connections: usize,
    /// The agent's `window.window_seconds`.
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// The agent binary; default: next to this one (built first when run by `cargo run`).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The ONNX model the agent scores with.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/anomaly/anomaly.onnx"))]
    model: PathBuf,
    /// Where the results go.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Keep the temporary directory (databases, configs, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

const BUILD: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    edgewise_agent::install_crypto_provider();
    check(&args)?;
    for note in unreachable_rates(&args.sensors, &args.rates) {
        println!("{note}");
    }
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => build_agent()?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args, agent_bin))
}

fn check(args: &Args) -> anyhow::Result<()> {
    for b in &args.brokers {
        if b != "mosquitto" && b != "embedded" {
            bail!("--brokers: unknown broker {b:?} (mosquitto, embedded)");
        }
    }
    for c in &args.consumers {
        if c != "subscriber" && c != "agent" {
            bail!("--consumers: unknown consumer {c:?} (subscriber, agent)");
        }
    }
    if let Some(q) = args.qos.iter().find(|q| **q > 1) {
        bail!("--qos: {q} is not 0 or 1");
    }
    if let Some(s) = args.sensors.iter().find(|s| !(1..=10_000).contains(*s)) {
        bail!("--sensors: {s} is not in 1..=10000");
    }
    if args.step_seconds == 0 || args.probe_seconds == 0 {
        bail!("--step-seconds and --probe-seconds must be at least 1");
    }
    if !args.model.is_file() {
        bail!("--model: {} is not a file", args.model.display());
    }
    Ok(())
}

/// The agent binary next to this one; built first (same profile) when run by `cargo run`.
fn build_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin = exe
        .parent()
        .context("this binary has no directory")?
        .join("edgewise-agent");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "edgewise-agent", "--bin", "edgewise-agent"]);
        if BUILD == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build for the agent")?;
        if !status.success() {
            bail!("building the agent failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p edgewise-agent) or pass --agent-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Rough duration of the run, in seconds: typical and worst case.
fn expected_seconds(args: &Args) -> (u64, u64) {
    let cases = (args.brokers.len() * args.qos.len() * args.sensors.len()) as u64;
    let per_consumer = |overhead: u64| -> (u64, u64) {
        if !args.rates.is_empty() {
            let n = args.rates.len() as u64 * (args.step_seconds + overhead);
            return (n, n);
        }
        let probe = args.probe_seconds + overhead;
        let confirm = args.step_seconds + overhead;
        let probes = args.max_probes as u64;
        (
            probes.min(5) * probe + confirm,
            probes * probe + 3 * confirm,
        )
    };
    let mut total = (0, 0);
    for c in &args.consumers {
        let (typical, worst) = per_consumer(if c == "agent" { 8 } else { 2 });
        total.0 += typical * cases;
        total.1 += worst * cases;
    }
    total
}

async fn run(args: Args, agent_bin: PathBuf) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("edgewise-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let result = run_in(&args, agent_bin, dir.path()).await;
    if args.keep {
        println!("files kept in {}", dir.keep().display());
    }
    result
}

async fn run_in(args: &Args, agent_bin: PathBuf, dir: &Path) -> anyhow::Result<()> {
    let cloud_db = dir.join("cloud.db");
    let store = CloudStore::open(&cloud_db).context("opening the receiver's database")?;
    let receiver = Receiver::start(
        ([127, 0, 0, 1], 0).into(),
        store,
        ServerConfig {
            rate_limit: None,
            ..ServerConfig::default()
        },
    )
    .await
    .context("starting the receiver")?;
    let run_id = format!("{}", std::process::id());
    let env = Env {
        agent_bin,
        model: args.model.clone(),
        dir: dir.to_path_buf(),
        cloud_db,
        cloud_addr: receiver.local_addr(),
        ticks_per_second: edgewise_bench::procfs::clock_ticks_per_second(),
        connections: args.connections,
        grace: Duration::from_millis(args.grace_ms),
        window_seconds: args.window_seconds,
        commit_interval_ms: args.commit_interval_ms,
        commit_max_messages: args.commit_max_messages,
        mqtt5: args.mqtt_protocol == "5",
        receive_maximum: args.receive_maximum,
        agent_connections: args.agent_connections,
        run_id,
    };

    let mut brokers = Vec::new();
    let mut _mosquitto = None;
    for name in &args.brokers {
        // (address, process, the agent's in-flight limit when not given: the embedded broker's
        // window is known; over MQTT 3.1.1 the agent would assume 100).
        let (addr, pid, agent_max_inflight) = if name == "mosquitto" {
            let mdir = dir.join("mosquitto");
            std::fs::create_dir_all(&mdir).context("creating the Mosquitto directory")?;
            let m = Mosquitto::start(&mdir, &args.mosquitto_config, &args.mosquitto_option)?;
            let (addr, pid) = (m.addr, m.pid());
            _mosquitto = Some(m);
            (addr, Some(pid), None)
        } else {
            let embedded =
                edgewise_agent::broker::EmbeddedBroker::start(([127, 0, 0, 1], 0).into(), 1 << 20)
                    .context("starting the embedded broker")?;
            let inflight = edgewise_agent::broker::AGENT_MAX_INFLIGHT;
            (embedded.addr, None, Some(inflight))
        };
        let agent_max_inflight = args.broker_max_inflight.or(agent_max_inflight);
        brokers.push((name.clone(), addr, pid, agent_max_inflight));
    }

    let (typical, worst) = expected_seconds(args);
    println!(
        "edgewise-bench ({BUILD} build): brokers {:?}, QoS {:?}, sensors {:?}, consumers {:?}; \
         {} s confirming steps, {} s probes",
        args.brokers, args.qos, args.sensors, args.consumers, args.step_seconds, args.probe_seconds
    );
    println!(
        "expected duration: about {} min (at most {} min)",
        typical.div_ceil(60),
        worst.div_ceil(60)
    );
    if BUILD == "debug" {
        println!("warning: a debug build; measure with --release");
    }
    println!(
        "agent {}, receiver http://{}, files in {}",
        env.agent_bin.display(),
        env.cloud_addr,
        dir.display()
    );
    for (name, addr, _, _) in &brokers {
        println!("broker {name} on {addr}");
    }

    let started = std::time::Instant::now();
    let mut cases = Vec::new();
    let mut seq = 0;
    for (name, addr, pid, agent_max_inflight) in &brokers {
        for &qos in &args.qos {
            for &sensors in &args.sensors {
                println!("\n== {name}, QoS {qos}, {sensors} sensors ==");
                let mut steps = Vec::new();
                let base = Step {
                    broker_name: name.clone(),
                    broker: *addr,
                    broker_pid: *pid,
                    agent_max_inflight: *agent_max_inflight,
                    consumer: ConsumerKind::Subscriber,
                    qos,
                    sensors,
                    rate: 0.0,
                    seconds: 0,
                    phase: "probe",
                };
                let mut ceiling = None;
                if args.consumers.iter().any(|c| c == "subscriber") {
                    let step = Step {
                        consumer: ConsumerKind::Subscriber,
                        ..base.clone()
                    };
                    ceiling = find(
                        args,
                        &env,
                        &step,
                        args.start_rate,
                        args.max_rate,
                        &mut seq,
                        &mut steps,
                    )
                    .await;
                }
                if args.consumers.iter().any(|c| c == "agent") {
                    let step = Step {
                        consumer: ConsumerKind::Agent,
                        ..base.clone()
                    };
                    let start = ceiling.unwrap_or(args.start_rate);
                    let max = ceiling.unwrap_or(args.max_rate);
                    find(args, &env, &step, start, max, &mut seq, &mut steps).await;
                }
                cases.push(CaseResult::new(name, qos, sensors, steps));
                write_json(args, &cases, started.elapsed())?;
            }
        }
    }
    receiver.stop().await;
    println!("\n{}", table(&cases));
    println!(
        "{} s in all; results in {}",
        started.elapsed().as_secs(),
        args.json.display()
    );
    Ok(())
}

/// Searches (or, with `--rates`, steps through) the rates for one consumer; returns the
/// achieved rate of its best confirmed step.
async fn find(
    args: &Args,
    env: &Env,
    step: &Step,
    start: f64,
    max: f64,
    seq: &mut usize,
    steps: &mut Vec<StepResult>,
) -> Option<f64> {
    let quantize = |r: f64| sim_interval(step.sensors, r).1;
    let mut run = async |rate: f64, seconds: u64, phase: &'static str| -> Option<StepResult> {
        *seq += 1;
        let s = Step {
            rate,
            seconds,
            phase,
            ..step.clone()
        };
        match run_step(env, &s, *seq).await {
            Ok(r) => {
                println!("{}", step_line(&r));
                steps.push(r.clone());
                Some(r)
            }
            Err(e) => {
                println!("  step at {rate:.0}/s failed to run: {e:#}");
                None
            }
        }
    };
    let mut best = None;
    if !args.rates.is_empty() {
        for &rate in &args.rates {
            if let Some(r) = run(quantize(rate), args.step_seconds, "confirm").await
                && r.sustained
            {
                best = Some(best.map_or(r.achieved_rate, |b: f64| b.max(r.achieved_rate)));
            }
        }
        return best;
    }
    let full_probes = args.probe_seconds >= args.step_seconds;
    let mut search = Search::new(start, max, args.max_probes, 0.15);
    while let Some(rate) = search.next_rate(quantize) {
        let phase = if full_probes { "confirm" } else { "probe" };
        let sustained = run(rate, args.probe_seconds, phase)
            .await
            .is_some_and(|r| r.sustained);
        search.record(rate, sustained);
        if full_probes && sustained {
            best = Some(best.map_or(rate, |b: f64| b.max(rate)));
        }
    }
    if full_probes {
        return best;
    }
    // Confirm at full length, stepping down 15% at a time (three tries at most).
    let mut candidate = search.best();
    for _ in 0..3 {
        let Some(rate) = candidate else { break };
        if let Some(r) = run(rate, args.step_seconds, "confirm").await
            && r.sustained
        {
            return Some(r.achieved_rate);
        }
        candidate = step_down(step.sensors, rate, 0.85);
    }
    None
}

fn write_json(args: &Args, cases: &[CaseResult], elapsed: Duration) -> anyhow::Result<()> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let doc = serde_json::json!({
        "tool": "edgewise-bench",
        "build": BUILD,
        "command": std::env::args().collect::<Vec<_>>(),
        "elapsed_seconds": elapsed.as_secs(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": load.trim(),
        "settings": {
            "step_seconds": args.step_seconds,
            "probe_seconds": args.probe_seconds,
            "connections": args.connections,
            "grace_ms": args.grace_ms,
            "mosquitto_options": args.mosquitto_option,
            "commit_interval_ms": args.commit_interval_ms,
            "commit_max_messages": args.commit_max_messages,
            "broker_max_inflight": args.broker_max_inflight,
            "mqtt_protocol": args.mqtt_protocol,
            "receive_maximum": args.receive_maximum,
            "agent_connections": args.agent_connections,
            "window_seconds": args.window_seconds,
        },
        "cases": cases,
    });
    let text = serde_json::to_string_pretty(&doc).context("encoding the results")?;
    std::fs::write(&args.json, text).with_context(|| format!("writing {}", args.json.display()))
}
