//! `edgewise-agent demo`: the whole product on one machine, with no services installed.
//!
//! Starts an embedded MQTT broker on a free port, a cloud receiver on a temporary SQLite file,
//! the agent, and the firmware simulator with a few dozen sensors (some out-of-range values, some
//! malformed payloads, some late readings). Midway, the receiver is stopped for a few seconds so
//! the agent buffers, then restarted so it drains. At the end every open window is closed by the
//! idle timeout, and a report compares what was published, accepted, closed and stored.
//!
//! The demo passes (exit 0) only if every closed window's summary is at the cloud exactly once,
//! the stored counts add up to the accepted readings, every published reading is accounted for,
//! and nothing is left buffered.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgewise_cloud::store::MAX_QUERY_LIMIT;
use edgewise_cloud::{
    Receiver, ServerConfig, Store as CloudStore, SummaryFilter, SummaryKey, SummaryQuery,
};
use edgewise_firmware::sim::{Faults, SimConfig, Simulator};
use tokio::time::Instant;

use crate::broker::EmbeddedBroker;
use crate::config::AgentConfig;
use crate::{Agent, Metrics};

const DEVICE: &str = "demo-gateway";

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long the sensors publish.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Simulated sensor nodes (each publishes temperature and humidity).
    #[arg(long, default_value_t = 24)]
    pub nodes: usize,
    /// Each node publishes every this many milliseconds.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// How long the cloud is cut off, midway through the run.
    #[arg(long, default_value_t = 4)]
    pub outage_seconds: u64,
    /// Keep the temporary directory (databases) and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the demo; `Ok(true)` when every check passed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("edgewise-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let ok = run_in(&args, dir.path()).await?;
    if args.keep {
        let path = dir.keep();
        println!("databases kept in {}", path.display());
    }
    Ok(ok)
}

async fn run_in(args: &DemoArgs, dir: &Path) -> anyhow::Result<bool> {
    let broker = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0)), 256 * 1024)
        .context("starting the embedded MQTT broker")?;
    let cloud_db = dir.join("cloud.db");
    let store = CloudStore::open(&cloud_db).context("opening the receiver's database")?;
    let token = store
        .add_device(DEVICE)
        .context("registering the demo device")?;
    let mut receiver = Some(
        Receiver::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            store,
            ServerConfig::default(),
        )
        .await
        .context("starting the receiver")?,
    );
    let cloud_addr = receiver
        .as_ref()
        .map(|r| r.local_addr())
        .context("receiver")?;

    let cfg = demo_config(dir, broker.addr, cloud_addr, &token)?;
    let connections = cfg.mqtt.connections as u64;
    let agent = Agent::start(cfg).await.context("starting the agent")?;
    let metrics = agent.metrics().clone();
    wait_until(Duration::from_secs(10), || {
        metrics.mqtt_subscribed.get() == connections
    })
    .await
    .context("the agent did not subscribe to the broker within 10 s")?;

    println!(
        "edgewise demo: broker mqtt://{}, receiver http://{}, agent metrics http://{}/metrics",
        broker.addr,
        cloud_addr,
        agent.http_addr()
    );
    println!(
        "{} nodes x 2 metrics every {} ms for {} s; the cloud goes offline for {} s midway\n",
        args.nodes, args.interval_ms, args.seconds, args.outage_seconds
    );

    let sim = Simulator::new(SimConfig {
        broker_host: broker.addr.ip().to_string(),
        broker_port: broker.addr.port(),
        nodes: args.nodes,
        interval_us: args.interval_ms.saturating_mul(1_000),
        connections: 4,
        qos: 1,
        client_id_prefix: format!("demo-sim-{}", std::process::id()),
        topic_prefix: "sensors".into(),
        seed: 7,
        faults: Faults {
            out_of_range: 0.01,
            malformed: 0.01,
            late: 0.01,
            late_by_ms: 30_000,
        },
        start_time_ms: None,
        ..SimConfig::default()
    })
    .context("configuring the simulator")?;
    let sim_counters = sim.counters();
    let publish_for = Duration::from_secs(args.seconds);
    let sim_task = tokio::spawn(sim.run(tokio::time::sleep(publish_for)));

    // Progress, and the outage in the middle.
    let started = Instant::now();
    let outage_at = publish_for.saturating_sub(Duration::from_secs(args.outage_seconds)) / 2;
    let outage_end = outage_at + Duration::from_secs(args.outage_seconds);
    let mut cloud_duplicates = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !sim_task.is_finished() {
        tick.tick().await;
        let t = started.elapsed();
        if t >= outage_at && t < outage_end && receiver.is_some() {
            if let Some(r) = receiver.take() {
                cloud_duplicates += r.metrics().snapshot().summaries_duplicate;
                r.stop().await;
                println!("  -- cloud offline: the agent buffers --");
            }
        } else if t >= outage_end && receiver.is_none() {
            let store = CloudStore::open(&cloud_db).context("reopening the receiver's database")?;
            receiver = Some(
                Receiver::start(cloud_addr, store, ServerConfig::default())
                    .await
                    .context("restarting the receiver")?,
            );
            println!("  -- cloud back online: the agent drains --");
        }
        progress(
            t,
            sim_counters.snapshot().readings_published,
            &metrics,
            receiver.is_some(),
        );
    }
    let sim_report = sim_task
        .await
        .context("simulator task")?
        .context("simulator")?;
    if receiver.is_none() {
        let store = CloudStore::open(&cloud_db)?;
        receiver = Some(Receiver::start(cloud_addr, store, ServerConfig::default()).await?);
    }

    // Every message the broker acked to the simulator reaches the agent; then the idle timeout
    // closes the remaining windows and the uploader drains the outbox.
    let drained = wait_until(Duration::from_secs(30), || {
        metrics.messages_received.get() >= sim_report.messages_published
            && metrics.open_windows.get() == 0
            && metrics.outbox_rows.get() == 0
            && metrics.summaries_synced.get() + metrics.summaries_rejected.get()
                >= metrics.windows_closed.get()
    })
    .await;
    progress(
        started.elapsed(),
        sim_report.readings_published,
        &metrics,
        true,
    );
    if drained.is_err() {
        println!("  (drain did not finish within 30 s)");
    }
    agent.stop().await;
    if let Some(r) = receiver.take() {
        cloud_duplicates += r.metrics().snapshot().summaries_duplicate;
        r.stop().await;
    }

    // The cloud's view, straight from its database.
    let stored = CloudTotals::read(&cloud_db, DEVICE)?;
    let summary_bytes = metrics.sync_bytes_sent.get();

    let m = &metrics;
    let rejected = m.readings_rejected.snapshot();
    let rejected_total: u64 = rejected.iter().map(|(_, n)| n).sum();
    println!("\n== Edgewise demo report ==");
    println!(
        "published by sensors  {:>8} readings in {} messages ({} malformed messages, {} out-of-range and {} late readings injected)",
        sim_report.readings_published,
        sim_report.messages_published,
        sim_report.malformed_messages,
        sim_report.out_of_range_readings,
        sim_report.late_readings
    );
    println!(
        "received by agent     {:>8} messages",
        m.messages_received.get()
    );
    println!(
        "accepted              {:>8} readings",
        m.readings_accepted.get()
    );
    println!(
        "rejected              {:>8} readings {}",
        rejected_total,
        by_reason(&rejected)
    );
    println!(
        "undecodable           {:>8} messages {}",
        m.messages_rejected.total(),
        by_reason(&m.messages_rejected.snapshot())
    );
    println!("windows closed        {:>8}", m.windows_closed.get());
    println!(
        "summaries at cloud    {:>8} ({} distinct windows, {} readings)",
        stored.rows, stored.distinct_windows, stored.readings
    );
    println!("still buffered        {:>8}", m.outbox_rows.get());
    println!(
        "bytes: {} raw payload bytes published, {} bytes sent to the cloud ({:.1}x less)",
        sim_report.payload_bytes,
        summary_bytes,
        sim_report.payload_bytes as f64 / summary_bytes.max(1) as f64
    );
    println!("re-sent summaries the receiver recognised as duplicates: {cloud_duplicates}");

    let checks = [
        (
            "every message published reached the agent",
            m.messages_received.get() == sim_report.messages_published,
        ),
        (
            "every published reading is accepted or rejected with a reason",
            m.readings_accepted.get() + rejected_total == sim_report.readings_published,
        ),
        (
            "every closed window is at the cloud exactly once",
            stored.rows == m.windows_closed.get() && stored.distinct_windows == stored.rows,
        ),
        (
            "the stored summaries count exactly the accepted readings",
            stored.readings == m.readings_accepted.get(),
        ),
        ("nothing is left buffered", m.outbox_rows.get() == 0),
    ];
    println!();
    let mut ok = true;
    for (what, passed) in checks {
        println!("[{}] {what}", if passed { "ok" } else { "FAIL" });
        ok &= passed;
    }
    println!("\n{}", if ok { "demo passed" } else { "demo FAILED" });
    Ok(ok)
}

/// What the receiver stored for one device: summaries, the readings they count, and distinct
/// `(stream, window start)` keys (equal to `rows` when no window is there twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudTotals {
    pub rows: u64,
    pub readings: u64,
    pub distinct_windows: u64,
}

impl CloudTotals {
    /// Reads the receiver's SQLite database at `db` (blocking), page by page: a query returns
    /// at most `MAX_QUERY_LIMIT` rows.
    pub fn read(db: &Path, device: &str) -> anyhow::Result<CloudTotals> {
        let store = CloudStore::open(db)?;
        let mut filter = SummaryFilter {
            query: SummaryQuery {
                device: Some(device.into()),
                stream: None,
                from_ms: None,
                to_ms: None,
                limit: MAX_QUERY_LIMIT,
            },
            ..SummaryFilter::default()
        };
        let mut keys: Vec<(String, i64)> = Vec::new();
        let mut totals = CloudTotals {
            rows: 0,
            readings: 0,
            distinct_windows: 0,
        };
        loop {
            let page = store.summary_page(&filter)?;
            for s in &page {
                totals.rows += 1;
                totals.readings += s.summary.count;
                keys.push((s.summary.stream.clone(), s.summary.window_start_ms));
            }
            match page.last() {
                Some(last) if page.len() == MAX_QUERY_LIMIT => {
                    filter.after = Some(SummaryKey::of(last));
                }
                _ => break,
            }
        }
        keys.sort_unstable();
        keys.dedup();
        totals.distinct_windows = keys.len() as u64;
        Ok(totals)
    }
}

fn demo_config(
    dir: &Path,
    broker: SocketAddr,
    cloud: SocketAddr,
    token: &str,
) -> anyhow::Result<AgentConfig> {
    let text = format!(
        r#"
        agent_id = "{DEVICE}"
        [mqtt]
        url = "mqtt://{broker}"
        client_id = "edgewise-demo-{pid}"
        [store]
        path = "{db}"
        [window]
        window_seconds = 2
        allowed_lateness_ms = 1000
        idle_timeout_ms = 3000
        [[filter]]
        stream = "+/temperature"
        min = -40.0
        max = 85.0
        [[filter]]
        stream = "+/humidity"
        min = 0.0
        max = 100.0
        [sync]
        url = "http://{cloud}"
        token = "{token}"
        interval_ms = 250
        backoff_initial_ms = 100
        backoff_max_ms = 1000
        timeout_ms = 2000
        [http]
        listen = "127.0.0.1:0"
        "#,
        pid = std::process::id(),
        db = dir.join("agent.db").display(),
    );
    let cfg = AgentConfig::parse(&text).map_err(anyhow::Error::msg)?;
    let problems = cfg.problems();
    anyhow::ensure!(problems.is_empty(), "demo config: {problems:?}");
    Ok(cfg)
}

fn progress(t: Duration, published: u64, m: &Arc<Metrics>, online: bool) {
    println!(
        "t={:>3}s published={:>7} accepted={:>7} windows closed={:>5} synced={:>5} buffered={:>4} cloud={}",
        t.as_secs(),
        published,
        m.readings_accepted.get(),
        m.windows_closed.get(),
        m.summaries_synced.get(),
        m.outbox_rows.get(),
        if online { "online" } else { "OFFLINE" }
    );
}

fn by_reason(reasons: &[(&'static str, u64)]) -> String {
    if reasons.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    format!("({})", parts.join(", "))
}

async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
