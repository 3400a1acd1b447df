//! Test harness: a real broker, a real receiver on loopback, agent configs on fresh SQLite files.
//!
//! The broker is the embedded rumqttd on a free port, or the broker named by
//! `EDGEWISE_TEST_MQTT_URL` (e.g. `mqtt://127.0.0.1:1883`, the machine's Mosquitto in CI). Every
//! test uses its own topic prefix and client ids, so runs never collide on a shared broker.
//! Logs are silent unless `RUST_LOG` is set.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgewise_agent::config::{AgentConfig, parse_mqtt_url};
use edgewise_cloud::{
    GapQuery, Receiver, ServerConfig, Store as CloudStore, StoredGap, StoredSummary, SummaryQuery,
};
use edgewise_protocol::senml::{Record, encode_pack};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub const DEVICE: &str = "gw-test";

pub fn init() {
    edgewise_agent::install_crypto_provider();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Host and port of the broker for this test.
pub fn broker() -> (String, u16) {
    if let Ok(url) = std::env::var("EDGEWISE_TEST_MQTT_URL") {
        return parse_mqtt_url(&url).expect("EDGEWISE_TEST_MQTT_URL");
    }
    let b = edgewise_agent::broker::EmbeddedBroker::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        256 * 1024,
    )
    .expect("embedded broker");
    (b.addr.ip().to_string(), b.addr.port())
}

/// Whether this run has an external broker (`EDGEWISE_TEST_MQTT_URL`, Mosquitto in CI). MQTT 5
/// tests need one: the embedded broker speaks 3.1.1 only. Without it they say so and pass.
pub fn external_broker(test: &str) -> bool {
    let set = std::env::var_os("EDGEWISE_TEST_MQTT_URL").is_some();
    if !set {
        eprintln!(
            "{test}: MQTT 5 needs an external broker (EDGEWISE_TEST_MQTT_URL); run by .ci/run against Mosquitto"
        );
    }
    set
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct Cloud {
    pub db: PathBuf,
    pub token: String,
}

impl Cloud {
    pub fn new(dir: &Path) -> Cloud {
        let db = dir.join("cloud.db");
        let token = CloudStore::open(&db).unwrap().add_device(DEVICE).unwrap();
        Cloud { db, token }
    }

    pub async fn start(&self, addr: SocketAddr) -> Receiver {
        let store = CloudStore::open(&self.db).unwrap();
        Receiver::start(addr, store, ServerConfig::default())
            .await
            .unwrap()
    }

    pub fn stored(&self) -> Vec<StoredSummary> {
        let mut v = CloudStore::open(&self.db)
            .unwrap()
            .summaries(&SummaryQuery {
                device: Some(DEVICE.into()),
                stream: None,
                from_ms: None,
                to_ms: None,
                limit: 10_000,
            })
            .unwrap();
        v.sort_by(|a, b| {
            (&a.summary.stream, a.summary.window_start_ms)
                .cmp(&(&b.summary.stream, b.summary.window_start_ms))
        });
        v
    }
}

impl Cloud {
    /// Gap records the receiver stored for the test device, by seq.
    pub fn gaps(&self) -> Vec<StoredGap> {
        CloudStore::open(&self.db)
            .unwrap()
            .gaps(&GapQuery {
                device: Some(DEVICE.into()),
                limit: 10_000,
                ..GapQuery::default()
            })
            .unwrap()
    }
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub broker: (String, u16),
    pub topic_root: String,
    pub cloud: Cloud,
}

impl Setup {
    pub fn new() -> Setup {
        init();
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::new(dir.path());
        Setup {
            broker: broker(),
            topic_root: unique("edgewise-test"),
            cloud,
            dir,
        }
    }

    /// Agent config: 10 s windows; lateness covers the tests' interleaved readings, so windows
    /// close only by the short idle timeout, whatever the broker's batching.
    pub fn agent_config(&self, cloud: SocketAddr) -> AgentConfig {
        let cfg = AgentConfig::parse(&self.agent_config_text(cloud)).unwrap();
        assert_eq!(cfg.problems(), vec![]);
        cfg
    }

    /// The TOML of [`Setup::agent_config`], for tests that run the binary (it reads a file).
    pub fn agent_config_text(&self, cloud: SocketAddr) -> String {
        format!(
            r#"
            agent_id = "{DEVICE}"
            [mqtt]
            url = "mqtt://{}:{}"
            client_id = "{}"
            topics = ["{}/#"]
            reconnect_max_backoff_ms = 500
            [store]
            path = "{}"
            [window]
            window_seconds = 10
            allowed_lateness_ms = 20000
            idle_timeout_ms = 600
            [[filter]]
            stream = "+/temperature"
            min = -40.0
            max = 85.0
            [sync]
            url = "http://{cloud}"
            token = "{}"
            interval_ms = 100
            backoff_initial_ms = 50
            backoff_max_ms = 300
            timeout_ms = 2000
            [http]
            listen = "127.0.0.1:0"
            "#,
            self.broker.0,
            self.broker.1,
            unique("agent"),
            self.topic_root,
            self.dir.path().join("agent.db").display(),
            self.cloud.token,
        )
    }

    pub fn topic(&self, node: &str) -> String {
        format!("{}/{node}", self.topic_root)
    }
}

/// One SenML CBOR pack with a single temperature record.
pub fn temperature(node: &str, time_ms: i64, value: f64) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let rec = [Record {
        name: "temperature",
        unit: Some("Cel"),
        value,
        time_offset_s: 0.0,
    }];
    let n = encode_pack(&format!("{node}/"), time_ms as f64 / 1000.0, &rec, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// Publishes every message with QoS 1 and returns once the broker acked them all.
pub async fn publish_all(broker: &(String, u16), messages: &[(String, Vec<u8>)]) {
    publish_all_at(broker, messages, QoS::AtLeastOnce).await;
}

/// [`publish_all`] at `qos`; at QoS 0, returns once every publish went out.
pub async fn publish_all_at(broker: &(String, u16), messages: &[(String, Vec<u8>)], qos: QoS) {
    let mut opts = MqttOptions::new(unique("pub"), broker.0.clone(), broker.1);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, eventloop) = AsyncClient::new(opts, 64);
    publish_on_at(client, eventloop, messages, qos).await;
}

/// [`publish_all`] over a connection the caller configured (e.g. TLS, credentials).
pub async fn publish_on(
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
    messages: &[(String, Vec<u8>)],
) {
    publish_on_at(client, eventloop, messages, QoS::AtLeastOnce).await;
}

async fn publish_on_at(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    messages: &[(String, Vec<u8>)],
    qos: QoS,
) {
    let total = messages.len();
    let poller = tokio::spawn(async move {
        // QoS 1: acked by the broker; QoS 0: written to the socket.
        let mut done = 0;
        while done < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => done += 1,
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    done += 1
                }
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), qos, false, payload.clone())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), poller)
        .await
        .expect("broker acked every publish within 20 s")
        .unwrap();
    let _ = client.disconnect().await;
}

/// `edgewise-agent check --config path`: its exit code and everything it printed.
pub fn run_check(path: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewise-agent"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Polls `done` every 20 ms; panics with `what` after `secs` seconds.
pub async fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn subscribed(agent: &edgewise_agent::Agent) {
    subscribed_on(agent, 1).await;
}

/// Waits until each of the agent's `connections` MQTT connections has subscribed.
pub async fn subscribed_on(agent: &edgewise_agent::Agent, connections: u64) {
    let m = agent.metrics().clone();
    wait_until(10, "the agent subscribed", || {
        m.mqtt_subscribed.get() == connections
    })
    .await;
}

/// One agent connection (`cfg`'s first), subscribed, delivering into a channel of `capacity`,
/// as the agent runs it but without its pipeline: the test takes the messages and acks them.
pub struct Listening {
    pub client: edgewise_agent::ingest::Client,
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    pub async fn start(
        cfg: &edgewise_agent::config::AgentConfig,
        capacity: usize,
    ) -> (
        Listening,
        tokio::sync::mpsc::Receiver<edgewise_agent::ingest::Delivery>,
    ) {
        use edgewise_agent::ingest::{Connection, connect, run_connection};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let (client, session) = connect(cfg, 0).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let metrics = Arc::new(edgewise_agent::Metrics::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_connection(
            Connection {
                session,
                client: client.clone(),
                index: 0,
                topics: cfg.subscription_filters(),
            },
            tx,
            metrics.clone(),
            std::time::Duration::from_millis(500),
            stopping.clone(),
        ));
        wait_until(10, "subscribed", || metrics.mqtt_subscribed.get() == 1).await;
        let listening = Listening {
            client,
            stopping,
            task,
        };
        (listening, rx)
    }

    pub async fn stop(self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.task).await;
    }
}
