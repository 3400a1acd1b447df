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

use crate::decode::PayloadFormat;
use crate::filter::{FilterConfig, RulePattern};

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
    /// Data-contract rules, checked in order; the first whose pattern matches a stream applies.
    #[serde(default, rename = "filter")]
    pub filters: Vec<FilterConfig>,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// Local anomaly scoring of closed windows with an ONNX model; off when absent.
    #[serde(default)]
    pub inference: Option<crate::infer::InferenceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port`.
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// `auto`, `senml-json`, `senml-cbor` or `plain-json`.
    pub format: PayloadFormat,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Tumbling window length in event time.
    pub window_seconds: u64,
    /// How far behind the newest event time of a stream a reading may arrive and still count.
    pub allowed_lateness_ms: u64,
    /// A stream silent for this long (processing time) has its open windows closed.
    pub idle_timeout_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            window_seconds: 60,
            allowed_lateness_ms: 5_000,
            idle_timeout_ms: 120_000,
        }
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

/// Host and port of an `mqtt://host:port` URL.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("`{url}` does not start with mqtt://"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok((host.to_string(), port))
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
        if let Err(e) = parse_mqtt_url(&self.mqtt.url) {
            bad("mqtt.url", e);
        }
        if self.mqtt.topics.is_empty() {
            bad("mqtt.topics", "at least one topic filter is needed".into());
        }
        for (i, t) in self.mqtt.topics.iter().enumerate() {
            if let Err(e) = RulePattern::parse(t) {
                bad(&format!("mqtt.topics[{i}]"), e);
            }
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
        if self.window.window_seconds == 0 || self.window.window_seconds > 86_400 {
            bad(
                "window.window_seconds",
                "must be between 1 and 86400".into(),
            );
        }
        if self.window.idle_timeout_ms == 0 {
            bad("window.idle_timeout_ms", "must be at least 1".into());
        }
        for (i, f) in self.filters.iter().enumerate() {
            for (field, msg) in f.problems() {
                bad(&format!("filter[{i}].{field}"), msg);
            }
        }
        if let Some(inference) = &self.inference {
            for (field, msg) in inference.problems() {
                bad(&format!("inference.{field}"), msg);
            }
        }
        if !(self.sync.url.starts_with("http://") || self.sync.url.starts_with("https://")) {
            bad("sync.url", "must start with http:// or https://".into());
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

    pub fn window_ms(&self) -> i64 {
        self.window.window_seconds as i64 * 1000
    }

    /// The device token: `sync.token`, else `sync.token_file`, else `EDGEWISE_SYNC_TOKEN`.
    pub fn sync_token(&self) -> Result<String, String> {
        if let Some(t) = &self.sync.token {
            return Ok(t.clone());
        }
        if let Some(path) = &self.sync.token_file {
            return std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read sync.token_file {}: {e}", path.display()));
        }
        std::env::var("EDGEWISE_SYNC_TOKEN").map_err(|_| {
            "no device token: set sync.token_file, sync.token or EDGEWISE_SYNC_TOKEN".to_string()
        })
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.ingest.commit_interval_ms)
    }
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
            "filter[0].stream",
            "filter[0].max",
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
