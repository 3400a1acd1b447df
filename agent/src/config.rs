//! The agent's TOML configuration: parsing with documented defaults, and `check`.
//!
//! Parsing rejects unknown keys (`deny_unknown_fields`), so a typo is an error, not a silently
//! ignored setting. [`AgentConfig::problems`] then checks what the types cannot express (ranges,
//! URLs, filter patterns) and reports every problem with its key path, so `edgewise-agent check`
//! can print them all at once.
//!
//! Tested by the unit tests below (defaults, every problem reported, unknown keys refused).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::decode::{PayloadFormat, TopicFormat};
use crate::filter::{FilterConfig, RulePattern};
use crate::secret::{Secret, SecretError, SecretSource};
use crate::tls::TlsConfig;

/// The whole agent configuration, one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Identifies this gateway to the cloud; part of every summary id. Required.
    pub agent_id: String,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub window: WindowConfig,
    /// Data contracts (`[[contract]]`, formerly `[[filter]]`), checked in order; the first
    /// whose pattern matches a stream applies.
    #[serde(default, rename = "contract", alias = "filter")]
    pub filters: Vec<FilterConfig>,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// Local anomaly scoring of closed windows with an ONNX model; off when absent.
    #[serde(default)]
    pub inference: Option<crate::infer::InferenceConfig>,
}

/// Most MQTT connections an agent reads through (`mqtt.connections`).
pub const MAX_MQTT_CONNECTIONS: usize = 16;

/// `mqtt.receive_maximum` when not set: several batches (`ingest.commit_max_messages`, 1,000)
/// in flight, so the broker keeps sending while one commits, and a pause of 200 ms at 25,000
/// messages/s does not overflow Mosquitto's queue (`max_queued_messages`, 1,000). With 1,000 the
/// agent lost messages at 10,000 sensors and 25,000 msg/s; with 5,000 none (README,
/// "Broker settings"). About 1 MiB of small readings.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 5000;

/// The MQTT protocol version of the agent's connections (`mqtt.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (plaintext) or `mqtts://host:port` (TLS, see `[mqtt.tls]`).
    pub url: String,
    /// Stable across restarts so the broker keeps the persistent session; default `edgewise-<agent_id>`.
    pub client_id: Option<String>,
    /// Topic filters subscribed with QoS 1.
    pub topics: Vec<String>,
    pub keep_alive_seconds: u64,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_bytes: usize,
    /// Reconnect back-off doubles from 100 ms up to this.
    pub reconnect_max_backoff_ms: u64,
    /// Broker user name; the password comes from `password_file`, `password` or
    /// `EDGEWISE_MQTT_PASSWORD`.
    pub username: Option<String>,
    /// Inline password: discouraged (`check` warns); prefer `password_file`.
    pub password: Option<String>,
    /// File holding the broker password (mode 600).
    pub password_file: Option<PathBuf>,
    /// Trust and client certificate for `mqtts://`.
    pub tls: TlsConfig,
    /// The MQTT version the agent speaks: `"3.1.1"` (default; every broker, including the
    /// embedded one) or `"5"` (Mosquitto 1.6+, EMQX, HiveMQ). With 5 the agent tells the broker
    /// its receive maximum (`receive_maximum`), which Mosquitto uses instead of its
    /// `max_inflight_messages` for this client.
    pub protocol: MqttProtocol,
    /// MQTT 5 only: how many QoS 1 messages the broker may send each connection before they
    /// are acknowledged (1 to 65535). The agent acks after the journal commit, so this many can
    /// wait for one commit; Mosquitto's default for 3.1.1 clients is 20. Default 5,000.
    pub receive_maximum: u16,
    /// The broker's limit on QoS 1 messages sent to this client and not yet acknowledged
    /// (Mosquitto: `max_inflight_messages`; the embedded broker: 1,000,
    /// [`crate::broker::MAX_INFLIGHT`], a constant of the vendored rumqttd; 100 in rumqttd 0.20
    /// as published, which also counted QoS 0 messages on a QoS 1 subscription).
    /// The agent acks a message only after its journal commit, so once that many wait for the
    /// commit the broker sends nothing more: the batch then commits at once instead of waiting
    /// out `ingest.commit_interval_ms`. A limit set too high only costs that wait; one set too low
    /// only makes commits smaller. 0: never commit early. With several `connections` the limit
    /// is per connection. Default: 100 with MQTT 3.1.1 (500, half the embedded broker's window,
    /// when the agent runs it, `--embedded-broker`), `receive_maximum` with MQTT 5 (see
    /// [`AgentConfig::in_flight_limit`]).
    pub broker_max_inflight: Option<usize>,
    /// MQTT connections the agent reads through (1 to 16). With more than one, each connection
    /// subscribes to every topic filter as a shared subscription (`$share/<group>/<filter>`, the
    /// group named after the client id), so the broker splits the messages between them and
    /// each connection has its own in-flight window: more QoS 1 messages can wait for one
    /// journal commit. Connection 0 uses the client id, connection `i` the client id with `-i`
    /// appended; each keeps its persistent session. The broker must support shared
    /// subscriptions (Mosquitto 1.6+, rumqttd, EMQX, HiveMQ).
    pub connections: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            topics: vec!["sensors/#".into()],
            keep_alive_seconds: 30,
            max_packet_bytes: 256 * 1024,
            reconnect_max_backoff_ms: 10_000,
            username: None,
            password: None,
            password_file: None,
            tls: TlsConfig::default(),
            protocol: MqttProtocol::V311,
            receive_maximum: DEFAULT_RECEIVE_MAXIMUM,
            broker_max_inflight: None,
            connections: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// `auto`, `senml-json`, `senml-cbor` or `plain-json`: for topics no `topic_format` matches.
    pub format: PayloadFormat,
    /// Payload format per topic pattern (`[[ingest.topic_format]]`), first match wins.
    pub topic_format: Vec<TopicFormat>,
    /// A reading refused by its contract is copied into the dead-letter table at most once per
    /// this interval for each (contract, reason); all of them are counted.
    pub dead_letter_sample_ms: u64,
    /// Group commit: a journal commit at most this long after the first message of a batch...
    pub commit_interval_ms: u64,
    /// ...or as soon as this many messages are waiting, whichever comes first.
    pub commit_max_messages: usize,
    /// Messages buffered between the MQTT connection and the journal (backpressure beyond it).
    pub queue_messages: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            format: PayloadFormat::Auto,
            topic_format: Vec::new(),
            dead_letter_sample_ms: 1000,
            commit_interval_ms: 5,
            commit_max_messages: 1000,
            queue_messages: 4096,
        }
    }
}

/// SQLite's `synchronous` setting for the agent database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// A commit survives a crash of the agent process (kill -9, panic, OOM kill); the last
    /// commits before a power loss or kernel crash may be lost. No fsync per commit.
    Normal,
    /// Every commit is fsynced: it also survives power loss, at the cost of one fsync per
    /// group commit.
    Full,
}

/// Order in which buffered summaries are sent after an outage (alerts always go first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainOrder {
    OldestFirst,
    NewestFirst,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite file holding journal, outbox and dead letters.
    pub path: PathBuf,
    /// Undecodable payloads kept for inspection; the oldest are dropped beyond this.
    pub dead_letter_max_rows: u64,
    /// `normal` (survives process crashes) or `full` (also survives power loss).
    pub sync: SyncMode,
    /// Journal every reading before acking it (default). `false` acks readings once they are in
    /// memory: fewer writes (SD cards), but a crash loses the open windows.
    pub journal: bool,
    /// Hard cap on summaries and gap records waiting for the cloud; beyond it the agent evicts
    /// (plain summaries before alerts, oldest first) and records a gap.
    pub max_buffer_bytes: u64,
    /// Optional cap on the database file; writes beyond it fail like a full disk.
    pub max_db_bytes: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/edgewise/agent.db"),
            dead_letter_max_rows: 1000,
            sync: SyncMode::Normal,
            journal: true,
            max_buffer_bytes: 256 * 1024 * 1024,
            max_db_bytes: None,
        }
    }
}

/// What happens to a reading whose window has already closed (see [`crate::window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatePolicy {
    /// Refused and counted (`readings_rejected_total{reason="late"}`).
    #[default]
    Drop,
    /// Re-opens the window: a new revision of its summary is emitted, which the cloud keeps in
    /// place of the earlier one. Within `revise_horizon_ms`; older readings are dropped.
    Revise,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Window length in event time.
    pub window_seconds: u64,
    /// Hopping windows: a window starts every `slide_seconds` (must divide `window_seconds`).
    /// Absent: tumbling windows (`slide_seconds = window_seconds`).
    pub slide_seconds: Option<u64>,
    /// How far behind the newest event time of a stream a reading may arrive and still count:
    /// a window closes when the stream's newest event time minus this passes its end.
    pub allowed_lateness_ms: u64,
    /// A stream silent for this long (processing time) has its open windows closed.
    pub idle_timeout_ms: u64,
    /// `drop` or `revise`: what a reading for an already closed window does.
    pub late_policy: LatePolicy,
    /// With `late_policy = "revise"`: how long after a window closed (in its stream's event
    /// time) late readings still revise it. Absent: `allowed_lateness_ms`.
    pub revise_horizon_ms: Option<u64>,
    /// Most streams with open windows at once; readings of further streams are refused and
    /// counted (`readings_rejected_total{reason="stream_limit"}`).
    pub max_streams: usize,
    /// Add p50, p90 and p99 of each window's values to its summary (DDSketch).
    pub quantiles: bool,
    /// Relative error bound of those quantiles.
    pub quantile_relative_error: f64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            window_seconds: 60,
            slide_seconds: None,
            allowed_lateness_ms: 5_000,
            idle_timeout_ms: 120_000,
            late_policy: LatePolicy::Drop,
            revise_horizon_ms: None,
            max_streams: 10_000,
            quantiles: false,
            quantile_relative_error: 0.01,
        }
    }
}

impl WindowConfig {
    /// The revise horizon in effect.
    pub fn revise_horizon_ms(&self) -> u64 {
        self.revise_horizon_ms.unwrap_or(self.allowed_lateness_ms)
    }

    /// `(field, message)` for each problem in this section.
    fn problems(&self, journal: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.window_seconds == 0 || self.window_seconds > 86_400 {
            out.push(("window_seconds", "must be between 1 and 86400".into()));
        }
        if let Some(slide) = self.slide_seconds
            && (slide == 0
                || slide > self.window_seconds
                || !self.window_seconds.is_multiple_of(slide))
        {
            out.push((
                "slide_seconds",
                format!(
                    "must divide window_seconds ({}) and be at least 1",
                    self.window_seconds
                ),
            ));
        }
        if self.idle_timeout_ms == 0 {
            out.push(("idle_timeout_ms", "must be at least 1".into()));
        }
        if self.late_policy == LatePolicy::Revise {
            if self.revise_horizon_ms() == 0 {
                out.push((
                    "revise_horizon_ms",
                    "must be at least 1 with late_policy = \"revise\" (it defaults to allowed_lateness_ms, which is 0)".into(),
                ));
            }
            if !journal {
                out.push((
                    "late_policy",
                    "\"revise\" needs store.journal = true (revisions are rebuilt from the journal)".into(),
                ));
            }
        }
        if self.max_streams == 0 {
            out.push(("max_streams", "must be at least 1".into()));
        }
        if !(self.quantile_relative_error > 0.0 && self.quantile_relative_error <= 0.5) {
            out.push((
                "quantile_relative_error",
                "must be above 0 and at most 0.5".into(),
            ));
        }
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Base URL of the receiver; summaries go to `<url>/v1/ingest`.
    pub url: String,
    /// Device token. Prefer `token_file` or the `EDGEWISE_SYNC_TOKEN` environment variable.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub batch_max_summaries: usize,
    /// Largest request body (encoded summaries and gaps), in bytes; at least one record is sent.
    pub batch_max_bytes: u64,
    /// `oldest-first` or `newest-first`, after the alerts.
    pub order: DrainOrder,
    /// Upload bandwidth limit in request-body bytes per second; unset means no limit.
    pub max_bytes_per_second: Option<u64>,
    /// How often the outbox is checked when nothing signals new summaries.
    pub interval_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Per-request timeout.
    pub timeout_ms: u64,
    /// Trust (CA file or system roots), public-key pins and client certificate for `https://`.
    pub tls: TlsConfig,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            url: "http://127.0.0.1:8080".into(),
            token: None,
            token_file: None,
            batch_max_summaries: 500,
            batch_max_bytes: 512 * 1024,
            order: DrainOrder::OldestFirst,
            max_bytes_per_second: None,
            interval_ms: 1000,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            timeout_ms: 10_000,
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where `/metrics` and `/healthz` are served. Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9108)),
        }
    }
}

/// One thing wrong with a configuration, located by its key path (e.g. `window.window_seconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, or an unknown key; the message carries the line and key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n{}", .problems.len(), list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A parsed broker URL: `mqtt://host[:port]` (plaintext, default port 1883) or
/// `mqtts://host[:port]` (TLS, default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else {
            return Err(format!("`{url}` does not start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("`{p}` is not a port number"))?,
            ),
            None => (rest, default_port),
        };
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// Host and port of an `mqtt://` or `mqtts://` URL.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    BrokerUrl::parse(url).map(|u| (u.host, u.port))
}

/// True for `localhost` and loopback IP literals (traffic that never leaves the machine).
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host of an `http(s)://host[:port]/...` URL.
fn http_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(h, _)| h);
    }
    authority.split(':').next().unwrap_or(authority)
}

impl AgentConfig {
    /// Reads, parses and checks a config file; every problem is in the error.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = AgentConfig::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Parses TOML text without the semantic checks of [`AgentConfig::problems`].
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Everything wrong with this configuration that parsing could not catch.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if self.agent_id.trim().is_empty() {
            bad("agent_id", "must not be empty".into());
        } else if self.agent_id.len() > 128 || self.agent_id.chars().any(char::is_control) {
            bad(
                "agent_id",
                "must be at most 128 bytes with no control characters".into(),
            );
        }
        match BrokerUrl::parse(&self.mqtt.url) {
            Err(e) => bad("mqtt.url", e),
            Ok(u) if !u.tls && self.mqtt.tls.is_set() => bad(
                "mqtt.tls",
                "TLS settings are given but mqtt.url is plaintext mqtt://; use mqtts:// \
                 (the agent never falls back to plaintext)"
                    .into(),
            ),
            Ok(_) => {}
        }
        for (field, msg) in self.mqtt.tls.problems() {
            bad(&format!("mqtt.tls.{field}"), msg);
        }
        if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
            bad(
                "mqtt.password",
                "set either mqtt.password or mqtt.password_file, not both".into(),
            );
        }
        if self.mqtt.username.is_none()
            && (self.mqtt.password.is_some() || self.mqtt.password_file.is_some())
        {
            bad("mqtt.username", "a password needs a username".into());
        }
        if self.mqtt.topics.is_empty() {
            bad("mqtt.topics", "at least one topic filter is needed".into());
        }
        for (i, t) in self.mqtt.topics.iter().enumerate() {
            if let Err(e) = RulePattern::parse(t) {
                bad(&format!("mqtt.topics[{i}]"), e);
            }
        }
        if !(1..=MAX_MQTT_CONNECTIONS).contains(&self.mqtt.connections) {
            bad(
                "mqtt.connections",
                format!("must be 1 to {MAX_MQTT_CONNECTIONS}"),
            );
        }
        if self.mqtt.protocol == MqttProtocol::V5 && self.mqtt.receive_maximum == 0 {
            bad("mqtt.receive_maximum", "must be 1 to 65535".into());
        }
        if self.mqtt.keep_alive_seconds < 5 {
            bad("mqtt.keep_alive_seconds", "must be at least 5".into());
        }
        if self.mqtt.max_packet_bytes < 1024 {
            bad("mqtt.max_packet_bytes", "must be at least 1024".into());
        }
        if self.ingest.commit_max_messages == 0 {
            bad("ingest.commit_max_messages", "must be at least 1".into());
        }
        if self.ingest.queue_messages == 0 {
            bad("ingest.queue_messages", "must be at least 1".into());
        }
        if self.store.path.as_os_str().is_empty() {
            bad("store.path", "must not be empty".into());
        }
        if self.store.max_buffer_bytes < 64 * 1024 {
            bad(
                "store.max_buffer_bytes",
                "must be at least 65536 (64 KiB)".into(),
            );
        }
        if self.store.max_db_bytes.is_some_and(|m| m < 1024 * 1024) {
            bad(
                "store.max_db_bytes",
                "must be at least 1048576 (1 MiB)".into(),
            );
        }
        for (field, msg) in self.window.problems(self.store.journal) {
            bad(&format!("window.{field}"), msg);
        }
        for (i, t) in self.ingest.topic_format.iter().enumerate() {
            if let Err(e) = RulePattern::parse(&t.topic) {
                bad(&format!("ingest.topic_format[{i}].topic"), e);
            }
        }
        for (i, f) in self.filters.iter().enumerate() {
            for (field, msg) in f.problems() {
                bad(&format!("contract[{i}].{field}"), msg);
            }
        }
        if let Some(inference) = &self.inference {
            for (field, msg) in inference.problems() {
                bad(&format!("inference.{field}"), msg);
            }
        }
        if !(self.sync.url.starts_with("http://") || self.sync.url.starts_with("https://")) {
            bad("sync.url", "must start with http:// or https://".into());
        } else if self.sync.url.starts_with("http://") && self.sync.tls.is_set() {
            bad(
                "sync.tls",
                "TLS settings are given but sync.url is plaintext http://; use https:// \
                 (the agent never falls back to plaintext)"
                    .into(),
            );
        }
        for (field, msg) in self.sync.tls.problems() {
            bad(&format!("sync.tls.{field}"), msg);
        }
        if self.sync.token.is_some() && self.sync.token_file.is_some() {
            bad(
                "sync.token",
                "set either sync.token or sync.token_file, not both".into(),
            );
        }
        if self.sync.batch_max_summaries == 0 || self.sync.batch_max_summaries > 10_000 {
            bad(
                "sync.batch_max_summaries",
                "must be between 1 and 10000".into(),
            );
        }
        if self.sync.batch_max_bytes < 1024 {
            bad("sync.batch_max_bytes", "must be at least 1024".into());
        }
        if self.sync.max_bytes_per_second == Some(0) {
            bad(
                "sync.max_bytes_per_second",
                "must be at least 1 (leave it out for no limit)".into(),
            );
        }
        if self.sync.backoff_initial_ms == 0
            || self.sync.backoff_max_ms < self.sync.backoff_initial_ms
        {
            bad(
                "sync.backoff_max_ms",
                "backoff_initial_ms must be at least 1 and not above backoff_max_ms".into(),
            );
        }
        if self.sync.timeout_ms == 0 {
            bad("sync.timeout_ms", "must be at least 1".into());
        }
        out
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgewise-{}", self.agent_id))
    }

    /// How many QoS 1 messages the broker sends one connection before our acks: with MQTT 5
    /// our `receive_maximum`, unless `broker_max_inflight` names a lower limit of the broker's;
    /// with 3.1.1 `broker_max_inflight` (default 100). 0: never commit early.
    pub fn in_flight_limit(&self) -> usize {
        let broker = self.mqtt.broker_max_inflight;
        match self.mqtt.protocol {
            MqttProtocol::V311 => broker.unwrap_or(100),
            MqttProtocol::V5 => {
                let ours = usize::from(self.mqtt.receive_maximum);
                broker.map_or(ours, |b| b.min(ours))
            }
        }
    }

    /// The client id of MQTT connection `index` (see `mqtt.connections`).
    pub fn connection_client_id(&self, index: usize) -> String {
        match index {
            0 => self.client_id(),
            i => format!("{}-{i}", self.client_id()),
        }
    }

    /// The topic filters each connection subscribes to: `mqtt.topics` as they are with one
    /// connection, as shared subscriptions of one group with several. The group is the client
    /// id with the characters a share name may not hold (`/`, `+`, `#`) replaced by `_`.
    pub fn subscription_filters(&self) -> Vec<String> {
        if self.mqtt.connections <= 1 {
            return self.mqtt.topics.clone();
        }
        let group: String = self
            .client_id()
            .chars()
            .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
            .collect();
        self.mqtt
            .topics
            .iter()
            .map(|t| format!("$share/{group}/{t}"))
            .collect()
    }

    pub fn window_ms(&self) -> i64 {
        self.window.window_seconds as i64 * 1000
    }

    /// Where the device token comes from: `sync.token`, else `sync.token_file` (mode 600), else
    /// `EDGEWISE_SYNC_TOKEN`.
    pub fn sync_token_source(&self) -> SecretSource<'_> {
        SecretSource {
            key: "sync.token_file",
            inline: self.sync.token.as_deref(),
            file: self.sync.token_file.as_deref(),
            env: "EDGEWISE_SYNC_TOKEN",
        }
    }

    /// The device token (see [`AgentConfig::sync_token_source`]).
    pub fn sync_token(&self) -> Result<String, String> {
        match self.sync_token_source().load() {
            Ok(Some(t)) => Ok(t.expose().to_string()),
            Ok(None) => Err(
                "no device token: set sync.token_file or EDGEWISE_SYNC_TOKEN (or sync.token)"
                    .to_string(),
            ),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The broker user name and password, if a user name is configured. The password comes from
    /// `mqtt.password`, else `mqtt.password_file` (mode 600), else `EDGEWISE_MQTT_PASSWORD`.
    pub fn mqtt_credentials(&self) -> Result<Option<(String, Secret)>, SecretError> {
        let Some(user) = &self.mqtt.username else {
            return Ok(None);
        };
        let password = SecretSource {
            key: "mqtt.password_file",
            inline: self.mqtt.password.as_deref(),
            file: self.mqtt.password_file.as_deref(),
            env: "EDGEWISE_MQTT_PASSWORD",
        }
        .load()?;
        Ok(Some((
            user.clone(),
            password.unwrap_or_else(|| Secret::from(String::new())),
        )))
    }

    /// Settings that work but weaken security, with their key paths: `check` prints them and
    /// `run` logs them at start. (Secrets written in the config file, credentials or tokens sent
    /// in plaintext over the network.)
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut warn = |key: &str, message: &str| {
            out.push(Problem {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.sync.token.is_some() {
            warn(
                "sync.token",
                "the device token is written in the config file; move it to sync.token_file \
                 (mode 600) or EDGEWISE_SYNC_TOKEN",
            );
        }
        if self.mqtt.password.is_some() {
            warn(
                "mqtt.password",
                "the broker password is written in the config file; move it to \
                 mqtt.password_file (mode 600) or EDGEWISE_MQTT_PASSWORD",
            );
        }
        if self.sync.url.starts_with("http://") && !is_loopback_host(http_host(&self.sync.url)) {
            warn(
                "sync.url",
                "plaintext http:// to another machine: the device token and the data cross \
                 the network unencrypted; use https://",
            );
        }
        if let Ok(u) = BrokerUrl::parse(&self.mqtt.url)
            && !u.tls
            && !is_loopback_host(&u.host)
        {
            let what = if self.mqtt.username.is_some() {
                "the broker password and the readings cross the network unencrypted"
            } else {
                "the readings cross the network unencrypted and unauthenticated"
            };
            warn(
                "mqtt.url",
                &format!("plaintext mqtt:// to another machine: {what}; use mqtts://"),
            );
        }
        out
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.ingest.commit_interval_ms)
    }
}

/// Problems with the files the configuration names (TLS certificates and keys, the token and
/// password files and their permissions), found by reading them as `run` will. A missing token
/// is not one of them (it may come from the environment at run time).
pub fn file_problems(cfg: &AgentConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key: &str, message: String| {
        out.push(Problem {
            key: key.to_string(),
            message,
        })
    };
    if cfg.mqtt.url.starts_with("mqtts://")
        && let Err(e) = cfg.mqtt.tls.client_config("mqtt.tls", &[])
    {
        bad("mqtt.tls", e.to_string());
    }
    if cfg.sync.url.starts_with("https://")
        && let Err(e) = cfg.sync.tls.client_config("sync.tls", &[])
    {
        bad("sync.tls", e.to_string());
    }
    // A secret file that does not exist yet may be provisioned later (`check` then warns about
    // the missing token); one that exists must be private and readable.
    for (key, file) in [
        ("sync.token_file", &cfg.sync.token_file),
        ("mqtt.password_file", &cfg.mqtt.password_file),
    ] {
        if let Some(path) = file
            && path.exists()
            && let Err(e) = crate::secret::read_secret_file(key, path)
        {
            bad(key, e.to_string());
        }
    }
    out
}

/// A commented example configuration; `edgewise-agent check` accepts it as is.
pub const EXAMPLE: &str = include_str!("../agent.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_working_defaults() {
        let cfg = AgentConfig::parse("agent_id = \"gw-1\"").unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        assert_eq!(cfg.mqtt.topics, vec!["sensors/#"]);
        assert_eq!(cfg.client_id(), "edgewise-gw-1");
        assert_eq!(cfg.window_ms(), 60_000);
    }

    #[test]
    fn several_connections_share_one_subscription_group_under_their_own_client_ids() {
        let one = AgentConfig::parse("agent_id = \"gw-1\"").unwrap();
        assert_eq!(one.subscription_filters(), vec!["sensors/#"]);
        assert_eq!(one.connection_client_id(0), "edgewise-gw-1");

        let cfg = AgentConfig::parse(
            "agent_id = \"gw-1\"\n[mqtt]\nclient_id = \"plant/gw+1\"\nconnections = 3\n\
             topics = [\"sensors/#\", \"+/status\"]\n",
        )
        .unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        assert_eq!(
            cfg.subscription_filters(),
            vec!["$share/plant_gw_1/sensors/#", "$share/plant_gw_1/+/status"]
        );
        let ids: Vec<String> = (0..3).map(|i| cfg.connection_client_id(i)).collect();
        assert_eq!(ids, ["plant/gw+1", "plant/gw+1-1", "plant/gw+1-2"]);

        for n in ["0", "17"] {
            let cfg = AgentConfig::parse(&format!("agent_id = \"a\"\n[mqtt]\nconnections = {n}\n"))
                .unwrap();
            let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
            assert_eq!(keys, ["mqtt.connections"]);
        }
    }

    #[test]
    fn the_in_flight_limit_follows_the_protocol_and_the_receive_maximum() {
        let limit = |mqtt: &str| {
            let cfg = AgentConfig::parse(&format!("agent_id = \"a\"\n[mqtt]\n{mqtt}\n")).unwrap();
            assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
            cfg.in_flight_limit()
        };
        assert_eq!(limit(""), 100);
        assert_eq!(limit("broker_max_inflight = 20"), 20);
        assert_eq!(limit("protocol = \"3.1.1\"\nbroker_max_inflight = 0"), 0);
        assert_eq!(limit("protocol = \"5\""), 5000);
        assert_eq!(limit("protocol = \"5\"\nreceive_maximum = 2000"), 2000);
        // A broker that sends fewer than we allow (rumqttd: 100) still ends the batch.
        assert_eq!(limit("protocol = \"5\"\nbroker_max_inflight = 100"), 100);

        let cfg =
            AgentConfig::parse("agent_id = \"a\"\n[mqtt]\nprotocol = \"5\"\nreceive_maximum = 0\n")
                .unwrap();
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["mqtt.receive_maximum"]);
        let err = AgentConfig::parse("agent_id = \"a\"\n[mqtt]\nprotocol = \"4\"\n");
        assert!(err.is_err_and(|e| e.to_string().contains("3.1.1")));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let cfg = AgentConfig::parse(EXAMPLE).unwrap();
        assert_eq!(cfg.problems(), vec![]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = AgentConfig::parse("agent_id = \"a\"\n[window]\nwindow_secs = 10\n").unwrap_err();
        assert!(err.contains("window_secs"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let cfg = AgentConfig::parse(
            r#"
            agent_id = ""
            [mqtt]
            url = "tcp://x"
            [window]
            window_seconds = 0
            [[filter]]
            stream = "a/#/b"
            min = 5.0
            max = 1.0
            [sync]
            url = "ftp://x"
            "#,
        )
        .unwrap();
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        for k in [
            "agent_id",
            "mqtt.url",
            "window.window_seconds",
            "contract[0].stream",
            "contract[0].max",
            "sync.url",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn durability_buffer_and_drain_settings_parse_and_are_checked() {
        let cfg = AgentConfig::parse(
            "agent_id = \"a\"\n[store]\nsync = \"full\"\njournal = false\nmax_buffer_bytes = 1000\n\
             [sync]\norder = \"newest-first\"\nmax_bytes_per_second = 0\n",
        )
        .unwrap();
        assert_eq!(cfg.store.sync, SyncMode::Full);
        assert!(!cfg.store.journal);
        assert_eq!(cfg.sync.order, DrainOrder::NewestFirst);
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec!["store.max_buffer_bytes", "sync.max_bytes_per_second"]
        );
        let err = AgentConfig::parse("agent_id = \"a\"\n[store]\nsync = \"off\"\n").unwrap_err();
        assert!(err.contains("normal"), "{err}");
        let d = AgentConfig::parse("agent_id = \"a\"").unwrap();
        assert_eq!(d.store.sync, SyncMode::Normal);
        assert!(d.store.journal);
        assert_eq!(d.sync.order, DrainOrder::OldestFirst);
    }

    #[test]
    fn window_options_parse_and_are_checked() {
        let cfg = AgentConfig::parse(
            "agent_id = \"a\"\n[window]\nwindow_seconds = 60\nslide_seconds = 15\n\
             late_policy = \"revise\"\nrevise_horizon_ms = 600000\nmax_streams = 5\n\
             quantiles = true\nquantile_relative_error = 0.02\n",
        )
        .unwrap();
        assert_eq!(cfg.problems(), vec![]);
        let spec = crate::window::WindowSpec::from(&cfg.window);
        assert_eq!((spec.size_ms, spec.slide_ms), (60_000, 15_000));
        assert_eq!(spec.late_policy, LatePolicy::Revise);
        assert_eq!(spec.revise_horizon_ms, 600_000);
        assert_eq!(spec.max_streams, 5);
        assert_eq!(spec.quantile_relative_error, Some(0.02));
        let d = AgentConfig::parse("agent_id = \"a\"").unwrap();
        let spec = crate::window::WindowSpec::from(&d.window);
        assert_eq!(spec.slide_ms, spec.size_ms);
        assert_eq!(spec.late_policy, LatePolicy::Drop);
        assert_eq!(spec.quantile_relative_error, None);

        let cfg = AgentConfig::parse(
            "agent_id = \"a\"\n[store]\njournal = false\n[window]\nwindow_seconds = 60\n\
             slide_seconds = 7\nallowed_lateness_ms = 0\nlate_policy = \"revise\"\n\
             max_streams = 0\nquantile_relative_error = 0\n",
        )
        .unwrap();
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec![
                "window.slide_seconds",
                "window.revise_horizon_ms",
                "window.late_policy",
                "window.max_streams",
                "window.quantile_relative_error",
            ]
        );
        let err =
            AgentConfig::parse("agent_id = \"a\"\n[window]\nlate_policy = \"keep\"\n").unwrap_err();
        assert!(err.contains("revise"), "{err}");
    }

    #[test]
    fn contracts_and_topic_formats_parse_and_old_filter_rules_still_work() {
        let old = AgentConfig::parse(
            "agent_id = \"a\"\n[[filter]]\nstream = \"+/t\"\nmin = 0.0\nmax = 1.0\n",
        )
        .unwrap();
        assert_eq!(old.problems(), vec![]);
        assert_eq!(old.filters[0].max, Some(1.0));
        let err = AgentConfig::parse(
            "agent_id = \"a\"\n[[contract]]\nstream = \"#\"\nrequired = [\"colour\"]\n",
        )
        .unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let cfg = AgentConfig::parse(
            r#"
            agent_id = "a"
            [[ingest.topic_format]]
            topic = "bad/#/x"
            format = "senml-cbor"
            [[contract]]
            stream = "+/temperature"
            unit = "Cel"
            convert.K = { offset = -273.15 }
            convert.degF = { scale = 0.5555555555555556, offset = -17.77777777777778 }
            deadband = 0.1
            max_rate_per_second = 5
            required = ["unit", "time"]
            [[contract]]
            stream = "+/humidity"
            deadband = -1
            "#,
        )
        .unwrap();
        assert_eq!(cfg.filters[0].convert["K"].scale, 1.0);
        let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec!["ingest.topic_format[0].topic", "contract[1].deadband"]
        );
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".to_string(), 1884)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker").unwrap(),
            ("broker".to_string(), 1883)
        );
        assert!(parse_mqtt_url("mqtt://:1").is_err());
        assert!(parse_mqtt_url("mqtt://h:99999").is_err());
    }
}
