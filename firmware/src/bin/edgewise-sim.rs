//! `edgewise-sim`: run N simulated sensor nodes against an MQTT broker, print a progress line
//! every second and the final report.
//!
//! `edgewise-sim --broker 127.0.0.1:1883 --nodes 50 --interval-ms 1000 --seconds 10 --qos 1 --malformed 0.01`
//! Faults: `--out-of-range --malformed --late --late-by-ms` (payloads), `--burst --burst-size
//! --drop --out-of-order` (traffic).
//! Without `--seconds` it runs until Ctrl-C. Exits non-zero if the broker is unreachable or did
//! not acknowledge every QoS 1 publish.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use edgewise_firmware::sim::{
    Faults, SimConfig, Simulator, TrafficFaults, unique_client_id_prefix,
};
use tokio::time::{Instant, MissedTickBehavior};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Simulated Edgewise sensor nodes publishing SenML-CBOR over MQTT"
)]
struct Args {
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883", env = "EDGEWISE_SIM_BROKER")]
    broker: String,
    /// Number of virtual nodes (1..=10000).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Each node publishes one pack every interval, in milliseconds (fractions allowed, at
    /// least 1: `--interval-ms 1.25`).
    #[arg(long, default_value_t = 1_000.0)]
    interval_ms: f64,
    /// Run time; without it, run until Ctrl-C.
    #[arg(long)]
    seconds: Option<u64>,
    /// MQTT connections the nodes share (capped at --nodes).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Client ids are "{prefix}-{connection}"; default: unique per run.
    #[arg(long)]
    client_id_prefix: Option<String>,
    /// Nodes publish to "{topic_prefix}/{node_id}".
    #[arg(long, default_value = "sensors")]
    topic_prefix: String,
    /// Node ids are "{node_id_prefix}-{index:05}".
    #[arg(long, default_value = "node")]
    node_id_prefix: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of readings far outside the physical range.
    #[arg(long, default_value_t = 0.0)]
    out_of_range: f64,
    /// Fraction of messages that are not SenML.
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Fraction of packs whose base time is --late-by-ms in the past.
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    #[arg(long, default_value_t = 60_000)]
    late_by_ms: i64,
    /// Fraction of node intervals that send a burst of --burst-size packs at once.
    #[arg(long, default_value_t = 0.0)]
    burst: f64,
    #[arg(long, default_value_t = 5)]
    burst_size: u32,
    /// Fraction of messages lost on the way (never published; counted).
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// Fraction of messages held back and sent after the node's next one.
    #[arg(long, default_value_t = 0.0)]
    out_of_order: f64,
    /// Event-time origin, ms since the Unix epoch (default: now).
    #[arg(long)]
    start_time_ms: Option<i64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let Some((host, port)) = args.broker.rsplit_once(':') else {
        bail!("--broker {:?}: expected host:port", args.broker);
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("--broker {:?}: bad port", args.broker))?;
    let cfg = SimConfig {
        broker_host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        broker_port: port,
        nodes: args.nodes,
        interval_us: interval_us(args.interval_ms)?,
        connections: args.connections,
        qos: args.qos,
        client_id_prefix: args
            .client_id_prefix
            .unwrap_or_else(unique_client_id_prefix),
        topic_prefix: args.topic_prefix,
        node_id_prefix: args.node_id_prefix,
        seed: args.seed,
        faults: Faults {
            out_of_range: args.out_of_range,
            malformed: args.malformed,
            late: args.late,
            late_by_ms: args.late_by_ms,
        },
        traffic: TrafficFaults {
            burst: args.burst,
            burst_size: args.burst_size,
            drop: args.drop,
            out_of_order: args.out_of_order,
        },
        start_time_ms: args.start_time_ms,
        ..SimConfig::default()
    };
    let sim = Simulator::new(cfg).context("checking the simulator options")?;
    let cfg = sim.config().clone();
    println!(
        "{} nodes on {} connections to {}:{}, one pack per node every {} ms, QoS {}",
        cfg.nodes,
        cfg.connections,
        cfg.broker_host,
        cfg.broker_port,
        cfg.interval_us as f64 / 1_000.0,
        cfg.qos
    );

    let counters = sim.counters();
    let started = Instant::now();
    let progress = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tick.tick().await;
        let mut last = counters.snapshot();
        loop {
            tick.tick().await;
            let now = counters.snapshot();
            println!(
                "{:>6.1}s  {:>6} msg/s  {}",
                started.elapsed().as_secs_f64(),
                now.messages_published - last.messages_published,
                now
            );
            last = now;
        }
    });

    let seconds = args.seconds;
    let stop = async move {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                // If Ctrl-C cannot be hooked, run until the process is killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let result = sim.run(stop).await;
    progress.abort();
    let report = result.context("running the simulation")?;
    println!("final: {report}");
    Ok(())
}

/// `--interval-ms` in whole microseconds; the simulator refuses less than 1 ms.
fn interval_us(ms: f64) -> anyhow::Result<u64> {
    if !ms.is_finite() || ms < 0.0 {
        bail!("--interval-ms {ms}: expected a number of milliseconds, at least 1");
    }
    Ok((ms * 1_000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::interval_us;

    #[test]
    fn interval_takes_fractions_of_a_millisecond() {
        assert_eq!(interval_us(1_000.0).unwrap(), 1_000_000);
        assert_eq!(interval_us(1.25).unwrap(), 1_250);
        assert!(interval_us(f64::NAN).is_err());
        assert!(interval_us(-1.0).is_err());
    }
}
