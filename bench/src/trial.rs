//! One load step, end to end: a consumer (a counting subscriber, or the agent binary as a child
//! process syncing to the in-process receiver), the firmware simulator publishing at a fixed
//! rate for a fixed time, then the accounting.
//!
//! A step is *sustained* when the publisher really produced its rate (at least 95%), the
//! consumer had every published message within the grace period after publishing stopped
//! ([`step_grace`]: so it kept up, rather than catching up from the broker's queue afterwards),
//! nothing arrived twice, and, for the agent, the receiver holds summaries counting exactly the
//! published readings, one per window. Each step uses its own topic prefix, agent id and
//! database, so steps never see each other's messages.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use edgewise_agent::demo::CloudTotals;
use edgewise_cloud::Store as CloudStore;
use edgewise_firmware::sim::{SIM_METRICS, SimConfig, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::procfs::{MachineTicks, ProcessUsage, cpu_seconds};
use crate::report::{ConsumerKind, MachineCpu, Memory, StepResult};
use crate::search::sim_interval;

/// Settings shared by every step of a run.
#[derive(Debug, Clone)]
pub struct Env {
    pub agent_bin: PathBuf,
    pub model: PathBuf,
    pub dir: PathBuf,
    pub cloud_db: PathBuf,
    pub cloud_addr: SocketAddr,
    pub ticks_per_second: u64,
    pub connections: usize,
    pub grace: Duration,
    pub window_seconds: u64,
    pub commit_interval_ms: u64,
    pub commit_max_messages: usize,
    /// MQTT 5 for the agent and the counting subscriber (3.1.1 otherwise).
    pub mqtt5: bool,
    /// Their receive maximum with MQTT 5.
    pub receive_maximum: u16,
    /// The agent's `mqtt.connections`.
    pub agent_connections: usize,
    pub run_id: String,
}

/// One step to run.
#[derive(Debug, Clone)]
pub struct Step {
    pub broker_name: String,
    pub broker: SocketAddr,
    /// The broker's process when it is not the harness itself (Mosquitto), for its CPU time.
    pub broker_pid: Option<u32>,
    /// The agent's `mqtt.broker_max_inflight` with this broker (`--broker-max-inflight`, else
    /// what the broker needs; `None`: the agent's default).
    pub agent_max_inflight: Option<usize>,
    pub consumer: ConsumerKind,
    pub qos: u8,
    pub sensors: usize,
    pub rate: f64,
    pub seconds: u64,
    pub phase: &'static str,
}

/// Runs one step; `seq` makes its names unique within the run.
pub async fn run_step(env: &Env, step: &Step, seq: usize) -> anyhow::Result<StepResult> {
    let topic_prefix = format!("bench/{}-{seq}", env.run_id);
    let filter = format!("{topic_prefix}/#");
    let qos = if step.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let agent_id = format!("bench-{}-{seq}", env.run_id);
    let mut consumer = match step.consumer {
        ConsumerKind::Subscriber => {
            Consumer::Subscriber(CountingSubscriber::start(env, step.broker, &filter, qos).await?)
        }
        ConsumerKind::Agent => {
            let streams = step.sensors * SIM_METRICS.len();
            Consumer::Agent(AgentProcess::start(env, &agent_id, step, &filter, streams).await?)
        }
    };

    let (interval_us, target_rate) = sim_interval(step.sensors, step.rate);
    let sim = Simulator::new(SimConfig {
        broker_host: step.broker.ip().to_string(),
        broker_port: step.broker.port(),
        nodes: step.sensors,
        interval_us,
        connections: env.connections,
        qos: step.qos,
        client_id_prefix: format!("bench-sim-{}-{seq}", env.run_id),
        topic_prefix,
        node_id_prefix: "s".into(),
        seed: seq as u64,
        drain_timeout_ms: 60_000,
        ..SimConfig::default()
    })
    .context("configuring the simulator")?;
    let counters = sim.counters();

    let before = consumer.usage(env)?;
    let busy_before = (Instant::now(), consumer.ingest_busy_seconds().await?);
    let machine_before = MachineSnapshot::read(env, step)?;
    let sim_result = sim
        .run(tokio::time::sleep(Duration::from_secs(step.seconds)))
        .await;
    let machine = MachineSnapshot::read(env, step)?.since(&machine_before);
    let busy_after = (Instant::now(), consumer.ingest_busy_seconds().await?);
    let during = consumer.usage(env)?;
    let published_at = Instant::now();
    let report = counters.snapshot();
    let sim_error = sim_result.err().map(|e| e.to_string());

    // Did the consumer have everything within the grace period?
    let mut catch_up_ms = None;
    let mut received = consumer.received().await?;
    let grace = step_grace(env.grace, step.seconds);
    let deadline = published_at + grace;
    loop {
        if received >= report.messages_published {
            catch_up_ms = Some(published_at.elapsed().as_millis() as u64);
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        received = consumer.received().await?;
    }

    let seconds = step.seconds as f64;
    let achieved_rate = report.messages_published as f64 / seconds;
    let mut result = StepResult {
        consumer: step.consumer,
        broker: step.broker_name.clone(),
        qos: step.qos,
        sensors: step.sensors,
        phase: step.phase,
        target_rate,
        interval_us,
        seconds,
        published_messages: report.messages_published,
        published_readings: report.readings_published,
        achieved_rate,
        received_messages: received,
        catch_up_ms,
        summaries: None,
        summary_readings: None,
        distinct_windows: None,
        readings_rejected: None,
        journal_commits: None,
        windows_scored: None,
        cpu_seconds: None,
        cpu_cores: None,
        ingest_busy: busy_share(busy_before, busy_after),
        machine,
        memory: None,
        sustained: false,
        verdict: String::new(),
    };

    let mut problems = Vec::new();
    if let Some(e) = sim_error {
        problems.push(format!("simulator: {e}"));
    }
    if achieved_rate < 0.95 * target_rate {
        problems.push(format!(
            "publisher behind ({:.0}% of target)",
            100.0 * achieved_rate / target_rate
        ));
    }
    if received > report.messages_published {
        problems.push(format!(
            "{} duplicate messages",
            received - report.messages_published
        ));
    } else if catch_up_ms.is_none() {
        problems.push(format!(
            "{} messages missing after {} ms",
            report.messages_published - received,
            grace.as_millis()
        ));
    }

    if let Consumer::Agent(agent) = &mut consumer {
        let (Some(before), Some(during)) = (before, during) else {
            bail!("the agent's /proc entries were unreadable");
        };
        let cpu = during.cpu_seconds - before.cpu_seconds;
        result.cpu_seconds = Some(cpu);
        result.cpu_cores = Some(cpu / seconds);
        let m = agent.drain(report.messages_published).await?;
        let after = agent.usage(env.ticks_per_second)?;
        result.memory = Some(Memory::of(&after));
        result.journal_commits = Some(metric(&m, "edgewise_agent_journal_commits_total"));
        result.windows_scored = Some(metric(&m, "edgewise_agent_windows_scored_total"));
        let accepted = metric(&m, "edgewise_agent_readings_accepted_total");
        result.readings_rejected = Some(by_reason(&m, "edgewise_agent_readings_rejected_total"));
        let cloud = at_receiver(&env.cloud_db, &agent_id).await?;
        result.summaries = Some(cloud.rows);
        result.summary_readings = Some(cloud.readings);
        result.distinct_windows = Some(cloud.distinct_windows);
        if accepted != report.readings_published {
            let rejected = result.readings_rejected.iter().flatten();
            let rejected: Vec<String> = rejected.map(|(r, n)| format!("{r} {n}")).collect();
            problems.push(format!(
                "agent accepted {accepted} of {} readings (rejected: {})",
                report.readings_published,
                rejected.join(", ")
            ));
        }
        if cloud.readings != report.readings_published {
            problems.push(format!(
                "receiver's summaries count {} of {} readings",
                cloud.readings, report.readings_published
            ));
        }
        if cloud.distinct_windows != cloud.rows {
            problems.push(format!(
                "{} duplicate summaries",
                cloud.rows - cloud.distinct_windows
            ));
        }
    }
    consumer.stop().await;

    result.sustained = problems.is_empty();
    result.verdict = if problems.is_empty() {
        "ok".into()
    } else {
        problems.join("; ")
    };
    Ok(result)
}

/// How long after publishing a step's consumer may take to have every message: `grace` (2 s by
/// default), but at most a fifteenth of the step (2 s of a 30 s step) and no less than 500 ms
/// (a 5 s probe; the simulator's own connections take up to about 70 ms to drain).
/// A consumer that falls behind by a fixed share of the rate builds a backlog in proportion to
/// the step's length: with a fixed 2 s and Mosquitto's queue raised (`max_queued_messages
/// 1000000`), 5 s probes ended up to 2 s behind and passed rates that every 30 s step failed.
pub fn step_grace(grace: Duration, step_seconds: u64) -> Duration {
    let share = Duration::from_secs(step_seconds) / 15;
    grace.min(share.max(MIN_GRACE))
}

/// The share of the time between two readings of the agent's ingest-busy seconds that its
/// ingest loop was busy (none for a subscriber).
fn busy_share(before: (Instant, Option<f64>), after: (Instant, Option<f64>)) -> Option<f64> {
    let seconds = (after.0 - before.0).as_secs_f64().max(f64::MIN_POSITIVE);
    Some((after.1? - before.1?) / seconds)
}

/// The least grace [`step_grace`] gives.
const MIN_GRACE: Duration = Duration::from_millis(500);

/// The CPU times behind [`MachineCpu`], at one moment.
struct MachineSnapshot {
    at: Instant,
    ticks_per_second: u64,
    machine: MachineTicks,
    broker: Option<f64>,
    harness: f64,
}

impl MachineSnapshot {
    fn read(env: &Env, step: &Step) -> anyhow::Result<MachineSnapshot> {
        let tps = env.ticks_per_second;
        Ok(MachineSnapshot {
            at: Instant::now(),
            ticks_per_second: tps,
            machine: MachineTicks::read()?,
            broker: step
                .broker_pid
                .map(|pid| cpu_seconds(pid, tps))
                .transpose()
                .context("the broker's CPU time")?,
            harness: cpu_seconds(std::process::id(), tps)?,
        })
    }

    /// What was used from `earlier` to this snapshot, in cores (CPU seconds per second between
    /// the two).
    fn since(&self, earlier: &MachineSnapshot) -> MachineCpu {
        let seconds = (self.at - earlier.at).as_secs_f64().max(f64::MIN_POSITIVE);
        let cores = |now: u64, then: u64| {
            now.saturating_sub(then) as f64 / self.ticks_per_second.max(1) as f64 / seconds
        };
        let machine_cores = self.machine.cpus as f64;
        MachineCpu {
            machine_busy_cores: (machine_cores - cores(self.machine.idle, earlier.machine.idle))
                .max(0.0),
            machine_cores,
            broker_cores: self
                .broker
                .zip(earlier.broker)
                .map(|(now, then)| (now - then) / seconds),
            harness_cores: (self.harness - earlier.harness) / seconds,
        }
    }
}

enum Consumer {
    Subscriber(CountingSubscriber),
    Agent(AgentProcess),
}

impl Consumer {
    async fn received(&self) -> anyhow::Result<u64> {
        match self {
            Consumer::Subscriber(s) => Ok(s.count.load(Ordering::Relaxed)),
            Consumer::Agent(a) => Ok(metric(
                &a.metrics().await?,
                "edgewise_agent_messages_received_total",
            )),
        }
    }

    /// The agent's `ingest_busy_microseconds_total`, in seconds (none for a subscriber).
    async fn ingest_busy_seconds(&self) -> anyhow::Result<Option<f64>> {
        match self {
            Consumer::Subscriber(_) => Ok(None),
            Consumer::Agent(a) => Ok(Some(
                metric(
                    &a.metrics().await?,
                    "edgewise_agent_ingest_busy_microseconds_total",
                ) as f64
                    / 1e6,
            )),
        }
    }

    fn usage(&self, env: &Env) -> anyhow::Result<Option<ProcessUsage>> {
        match self {
            Consumer::Subscriber(_) => Ok(None),
            Consumer::Agent(a) => Ok(Some(a.usage(env.ticks_per_second)?)),
        }
    }

    async fn stop(self) {
        match self {
            Consumer::Subscriber(s) => s.stop().await,
            Consumer::Agent(a) => a.stop().await,
        }
    }
}

/// An MQTT client that subscribes and counts publishes: the broker's own ceiling. It speaks the
/// agent's protocol version (`--mqtt-protocol`), with the same receive maximum under MQTT 5.
struct CountingSubscriber {
    count: Arc<AtomicU64>,
    client: SubscriberClient,
    task: JoinHandle<()>,
}

enum SubscriberClient {
    V311(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// What the counting subscriber's loop needs to know of an event.
enum Counted {
    Publish,
    SubAck,
    Other,
    Error(String),
}

/// An event loop of either protocol version, as the counting subscriber polls it.
trait CountSource: Send + 'static {
    fn next(&mut self) -> impl std::future::Future<Output = Counted> + Send;
}

impl CountSource for rumqttc::EventLoop {
    async fn next(&mut self) -> Counted {
        match self.poll().await {
            Ok(Event::Incoming(Packet::Publish(_))) => Counted::Publish,
            Ok(Event::Incoming(Packet::SubAck(_))) => Counted::SubAck,
            Ok(_) => Counted::Other,
            Err(e) => Counted::Error(e.to_string()),
        }
    }
}

impl CountSource for rumqttc::v5::EventLoop {
    async fn next(&mut self) -> Counted {
        use rumqttc::v5::{Event, mqttbytes::v5::Packet};
        match self.poll().await {
            Ok(Event::Incoming(Packet::Publish(_))) => Counted::Publish,
            Ok(Event::Incoming(Packet::SubAck(_))) => Counted::SubAck,
            Ok(_) => Counted::Other,
            Err(e) => Counted::Error(e.to_string()),
        }
    }
}

/// Polls `source`, counting publishes; the first SUBACK goes to `subscribed`.
fn spawn_counter(
    mut source: impl CountSource,
    count: Arc<AtomicU64>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match source.next().await {
                Counted::Publish => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Counted::SubAck => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Counted::Other => {}
                Counted::Error(e) => {
                    // A lost connection shows up as missing messages in the step.
                    tracing::warn!(error = %e, "counting subscriber: connection error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

impl CountingSubscriber {
    async fn start(env: &Env, broker: SocketAddr, filter: &str, qos: QoS) -> anyhow::Result<Self> {
        let id = format!(
            "{}-counter",
            filter.trim_end_matches("/#").replace('/', "-")
        );
        let (host, port) = (broker.ip().to_string(), broker.port());
        let count = Arc::new(AtomicU64::new(0));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let (client, task) = if env.mqtt5 {
            use rumqttc::v5;
            let mut opts = v5::MqttOptions::new(id, host, port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_clean_start(true)
                .set_receive_maximum(Some(env.receive_maximum))
                .set_max_packet_size(Some(1 << 20));
            let (client, eventloop) = v5::AsyncClient::new(opts, 64);
            let qos = match qos {
                QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
                QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
                QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
            };
            client
                .subscribe(filter, qos)
                .await
                .context("subscribing the counter")?;
            let task = spawn_counter(eventloop, Arc::clone(&count), subscribed_tx);
            (SubscriberClient::V5(client), task)
        } else {
            let mut opts = MqttOptions::new(id, host, port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, eventloop) = AsyncClient::new(opts, 64);
            client
                .subscribe(filter, qos)
                .await
                .context("subscribing the counter")?;
            let task = spawn_counter(eventloop, Arc::clone(&count), subscribed_tx);
            (SubscriberClient::V311(client), task)
        };
        match tokio::time::timeout(Duration::from_secs(10), subscribed).await {
            Ok(Ok(())) => Ok(CountingSubscriber {
                count,
                client,
                task,
            }),
            _ => {
                task.abort();
                bail!("the counting subscriber got no SUBACK from {broker} within 10 s")
            }
        }
    }

    async fn stop(self) {
        let _ = match &self.client {
            SubscriberClient::V311(c) => c.try_disconnect().is_ok(),
            SubscriberClient::V5(c) => c.try_disconnect().is_ok(),
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

/// The agent binary as a child process, with its own config, database and device token.
struct AgentProcess {
    child: Child,
    metrics_url: String,
    http: reqwest::Client,
    log: PathBuf,
}

impl AgentProcess {
    async fn start(
        env: &Env,
        agent_id: &str,
        step: &Step,
        filter: &str,
        streams: usize,
    ) -> anyhow::Result<Self> {
        let dir = env.dir.join(agent_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let token = {
            let (db, id) = (env.cloud_db.clone(), agent_id.to_string());
            tokio::task::spawn_blocking(move || CloudStore::open(&db)?.add_device(&id))
                .await
                .context("registering the agent at the receiver")?
                .context("registering the agent at the receiver")?
        };
        let http_addr = crate::free_loopback_addr()?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            agent_config(
                env, agent_id, step, filter, streams, &token, http_addr, &dir,
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("agent.log");
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&env.agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", env.agent_bin.display()))?;
        let mut agent = AgentProcess {
            child,
            metrics_url: format!("http://{http_addr}/metrics"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .context("building the HTTP client")?,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = agent.metrics().await
                && metric(&m, "edgewise_agent_mqtt_subscribed") == env.agent_connections as u64
            {
                return Ok(agent);
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                bail!("the agent exited ({status}) before subscribing:\n{log}");
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not subscribe within 30 s (log: {})",
                    agent.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn usage(&self, ticks_per_second: u64) -> anyhow::Result<ProcessUsage> {
        Ok(ProcessUsage::read(self.pid(), ticks_per_second)?)
    }

    async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_metrics(&text))
    }

    /// Waits until every window is closed, scored and synced (the idle timeout closes the last
    /// ones), or until nothing has moved for a while; returns the final metrics.
    async fn drain(&self, published: u64) -> anyhow::Result<HashMap<String, f64>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = (0, 0);
        let mut still_since = Instant::now();
        loop {
            let m = self.metrics().await?;
            let received = metric(&m, "edgewise_agent_messages_received_total");
            let synced = metric(&m, "edgewise_agent_summaries_synced_total")
                + metric(&m, "edgewise_agent_summaries_rejected_total");
            let done = metric(&m, "edgewise_agent_open_windows") == 0
                && metric(&m, "edgewise_agent_outbox_rows") == 0
                && synced >= metric(&m, "edgewise_agent_windows_closed_total");
            if done && received >= published {
                return Ok(m);
            }
            if (received, synced) != last {
                last = (received, synced);
                still_since = Instant::now();
            }
            // Lost messages never arrive: stop once everything that did arrive is synced.
            if (done && still_since.elapsed() > Duration::from_secs(3)) || Instant::now() > deadline
            {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The agent's config for one step: journal on, inference on with the shipped model, sync to
/// the run's receiver, room for every stream of the fleet.
#[allow(clippy::too_many_arguments)]
fn agent_config(
    env: &Env,
    agent_id: &str,
    step: &Step,
    filter: &str,
    streams: usize,
    token: &str,
    http: SocketAddr,
    dir: &Path,
) -> String {
    format!(
        r#"agent_id = "{agent_id}"
[mqtt]
url = "mqtt://{broker}"
client_id = "{agent_id}"
topics = ["{filter}"]
{protocol}{broker_max_inflight}{connections}[ingest]
commit_interval_ms = {commit_interval_ms}
commit_max_messages = {commit_max_messages}
[store]
path = "{db}"
journal = true
[window]
window_seconds = {window_seconds}
allowed_lateness_ms = 2000
idle_timeout_ms = 3000
max_streams = {streams}
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
interval_ms = 500
[http]
listen = "{http}"
[inference]
model_path = "{model}"
streams = ["+/temperature"]
"#,
        broker = step.broker,
        commit_interval_ms = env.commit_interval_ms,
        commit_max_messages = env.commit_max_messages,
        protocol = if env.mqtt5 {
            format!(
                "protocol = \"5\"\nreceive_maximum = {}\n",
                env.receive_maximum
            )
        } else {
            String::new()
        },
        broker_max_inflight = match step.agent_max_inflight {
            Some(n) => format!("broker_max_inflight = {n}\n"),
            None => String::new(),
        },
        // Only when set: an agent binary from before `mqtt.connections` can still be measured.
        connections = match env.agent_connections {
            1 => String::new(),
            n => format!("connections = {n}\n"),
        },
        db = dir.join("agent.db").display(),
        window_seconds = env.window_seconds,
        cloud = env.cloud_addr,
        model = env.model.display(),
    )
}

/// `name value` lines of the Prometheus text format (comments skipped; names keep labels).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A counter or gauge as a whole number (0 when absent).
fn metric(m: &HashMap<String, f64>, name: &str) -> u64 {
    m.get(name).copied().unwrap_or(0.0).max(0.0) as u64
}

/// The values of a labelled counter, by its `reason` label.
fn by_reason(m: &HashMap<String, f64>, name: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{name}{{reason=\"");
    m.iter()
        .filter_map(|(k, v)| {
            let reason = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            Some((reason.to_string(), v.max(0.0) as u64))
        })
        .collect()
}

/// The summaries the receiver stored for `device`.
async fn at_receiver(db: &Path, device: &str) -> anyhow::Result<CloudTotals> {
    let (db, device) = (db.to_path_buf(), device.to_string());
    tokio::task::spawn_blocking(move || CloudTotals::read(&db, &device))
        .await
        .context("querying the receiver's summaries")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_line_by_line() {
        let m = parse_metrics(
            "# HELP edgewise_agent_x X.\n# TYPE edgewise_agent_x counter\nedgewise_agent_x 42\n\
             edgewise_agent_rejected_total{reason=\"range\"} 3\nbroken\nedgewise_agent_y nan?\n",
        );
        assert_eq!(metric(&m, "edgewise_agent_x"), 42);
        assert_eq!(
            metric(&m, "edgewise_agent_rejected_total{reason=\"range\"}"),
            3
        );
        assert_eq!(metric(&m, "edgewise_agent_missing"), 0);
        assert_eq!(m.len(), 2);
        let r = by_reason(&m, "edgewise_agent_rejected_total");
        assert_eq!(
            r.into_iter().collect::<Vec<_>>(),
            [("range".to_string(), 3)]
        );
    }

    #[test]
    fn the_grace_is_at_most_a_fifteenth_of_the_step() {
        let two = Duration::from_secs(2);
        assert_eq!(step_grace(two, 30), two);
        assert_eq!(step_grace(two, 60), two);
        assert_eq!(step_grace(two, 15), Duration::from_secs(1));
        assert_eq!(step_grace(two, 5), Duration::from_millis(500));
        assert_eq!(step_grace(two, 1), Duration::from_millis(500));
        assert_eq!(
            step_grace(Duration::from_millis(100), 5),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn the_ingest_loops_busy_share_is_over_the_time_between_the_readings() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let share = busy_share((at(0), Some(10.0)), (at(30_000), Some(25.0)));
        assert!((share.unwrap_or(-1.0) - 0.5).abs() < 1e-9, "{share:?}");
        assert_eq!(busy_share((at(0), None), (at(30_000), None)), None);
    }

    #[test]
    fn the_machines_busy_cores_are_its_cores_less_its_idle_time() {
        let t0 = Instant::now();
        let snapshot = |secs: u64, idle: u64, broker: Option<f64>, harness: f64| MachineSnapshot {
            at: t0 + Duration::from_secs(secs),
            ticks_per_second: 100,
            machine: MachineTicks { idle, cpus: 2 },
            broker,
            harness,
        };
        // 10 s apart: 500 idle ticks (5 CPU seconds) of 20 CPU seconds, so 1.5 cores busy.
        let cpu = snapshot(10, 1_500, Some(4.0), 7.0).since(&snapshot(0, 1_000, Some(1.0), 2.0));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(cpu.machine_busy_cores, 1.5), "{cpu:?}");
        assert!(close(cpu.machine_cores, 2.0), "{cpu:?}");
        assert!(close(cpu.broker_cores.unwrap_or(-1.0), 0.3), "{cpu:?}");
        assert!(close(cpu.harness_cores, 0.5), "{cpu:?}");
        // The embedded broker has no process of its own.
        let cpu = snapshot(10, 1_000, None, 7.0).since(&snapshot(0, 1_000, None, 2.0));
        assert_eq!(cpu.broker_cores, None);
        assert!(close(cpu.machine_busy_cores, 2.0), "{cpu:?}");
    }
}
