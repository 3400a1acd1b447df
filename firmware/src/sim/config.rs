//! What a simulation run does: [`SimConfig`] (broker, fleet size, rate, connections, QoS, ids)
//! and the [`Faults`] it injects, with the validation [`crate::sim::Simulator::new`] applies.
//!
//! Invariants after [`SimConfig::validate`]: 1..=10 000 nodes, `1..=nodes` connections, QoS 0
//! or 1, fault fractions finite and in `[0, 1]`, burst sizes in `2..=MAX_BURST`, and every node
//! id / topic it derives is a valid [`NodeId`] / MQTT topic without wildcards. Tested below.
//!
//! Faults come in two groups: [`Faults`] change what a message holds (values, payload, event
//! time); [`TrafficFaults`] change which messages are sent and when (bursts, drops, reordering).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::node::{InvalidNodeId, NodeId};

/// Most virtual nodes one simulator runs.
pub const MAX_NODES: usize = 10_000;

/// Shortest publish interval: 1 ms. A pack's event time is a whole millisecond, and one node's
/// packs must not share one (the agent's journal takes a second reading of a stream at the same
/// time for a redelivery).
pub const MIN_INTERVAL_US: u64 = 1_000;

/// A simulation run. Start from [`SimConfig::default`] and override what matters:
/// `SimConfig { nodes: 50, broker_port: port, ..SimConfig::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub broker_host: String,
    pub broker_port: u16,
    /// Number of virtual nodes, 1..=10 000.
    pub nodes: usize,
    /// Each node publishes one pack every interval, in microseconds (at least
    /// [`MIN_INTERVAL_US`]); nodes are spread evenly over the interval. Microseconds so a fleet's
    /// rate is not limited to whole-millisecond steps (100 nodes: 100,000 or 50,000 msg/s, and
    /// nothing between).
    pub interval_us: u64,
    /// MQTT connections the nodes are spread over (round robin); capped at `nodes`.
    pub connections: usize,
    /// 0 or 1.
    pub qos: u8,
    /// Connection `c` uses client id `"{client_id_prefix}-{c}"`: make it unique per run.
    pub client_id_prefix: String,
    /// Node `i` publishes to `"{topic_prefix}/{node_id}"`.
    pub topic_prefix: String,
    /// Node `i` is `"{node_id_prefix}-{i:05}"` (so the prefix is at most 26 bytes).
    pub node_id_prefix: String,
    /// Seeds every waveform and fault draw: same seed, same values in the same order.
    pub seed: u64,
    pub faults: Faults,
    pub traffic: TrafficFaults,
    /// Event-time origin in ms since the Unix epoch; `None` = the wall clock at `run`. Event time
    /// is this origin plus tokio's elapsed time, so a paused tokio clock gives exact times.
    pub start_time_ms: Option<i64>,
    /// How long `run` waits for every connection's first CONNACK.
    pub connect_timeout_ms: u64,
    /// After `stop`, how long `run` waits for the broker to acknowledge every publish.
    pub drain_timeout_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            nodes: 10,
            interval_us: 1_000_000,
            connections: 4,
            qos: 1,
            client_id_prefix: unique_client_id_prefix(),
            topic_prefix: crate::node::TOPIC_PREFIX.into(),
            node_id_prefix: "node".into(),
            seed: 0,
            faults: Faults::default(),
            traffic: TrafficFaults::default(),
            start_time_ms: None,
            connect_timeout_ms: 10_000,
            drain_timeout_ms: 30_000,
        }
    }
}

/// `edgewise-sim-{pid}-{nanoseconds}`: distinct for concurrent runs on one machine.
pub fn unique_client_id_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "edgewise-sim-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

/// Faults to inject, each a fraction in `[0, 1]` drawn independently per message or reading.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Per reading: the value is replaced by one far outside the physical range
    /// (temperature 1000 Cel, humidity 500 %RH). The pack stays well-formed.
    pub out_of_range: f64,
    /// Per message: the payload is not SenML at all (random bytes, truncated CBOR, truncated
    /// JSON) and carries no countable readings.
    pub malformed: f64,
    /// Per well-formed message: the pack's base time is `late_by_ms` in the past.
    pub late: f64,
    pub late_by_ms: i64,
}

/// Most messages in one burst.
pub const MAX_BURST: u32 = 100;

/// Faults in the traffic itself, each a fraction in `[0, 1]` drawn per node and interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrafficFaults {
    /// A node sends `burst_size` messages back to back instead of one, as a node flushing its
    /// offline backlog does: base times `interval` apart, ending at now.
    pub burst: f64,
    pub burst_size: u32,
    /// The message is lost on the way (never published); counted, so a gap is expected.
    pub drop: f64,
    /// The message is held back and published right after the node's next one, so the broker
    /// sees that node's event times out of order.
    pub out_of_order: f64,
}

impl Default for TrafficFaults {
    fn default() -> Self {
        Self {
            burst: 0.0,
            burst_size: 5,
            drop: 0.0,
            out_of_order: 0.0,
        }
    }
}

/// Why a [`SimConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("broker_host is empty")]
    EmptyHost,
    #[error("broker_port is 0")]
    ZeroPort,
    #[error("nodes is {0}, expected 1..={MAX_NODES}")]
    Nodes(usize),
    #[error("interval_us is {0}, expected at least {MIN_INTERVAL_US} (1 ms)")]
    Interval(u64),
    #[error("connections is 0")]
    ZeroConnections,
    #[error("qos is {0}, expected 0 or 1")]
    Qos(u8),
    #[error("client_id_prefix is empty")]
    EmptyClientIdPrefix,
    #[error("topic_prefix {0:?} is empty, ends with '/' or contains a wildcard ('+', '#')")]
    TopicPrefix(String),
    #[error("node_id_prefix {prefix:?} does not make valid node ids: {reason}")]
    NodeIdPrefix {
        prefix: String,
        reason: InvalidNodeId,
    },
    #[error("{field} is {value}, expected a fraction in [0, 1]")]
    Fraction { field: &'static str, value: f64 },
    #[error("traffic.burst_size is {0}, expected 2..={MAX_BURST} when traffic.burst > 0")]
    BurstSize(u32),
    #[error("faults.late_by_ms is {0}, expected > 0 when faults.late > 0")]
    LateBy(i64),
    #[error("{field} is 0")]
    ZeroTimeout { field: &'static str },
}

impl SimConfig {
    /// Check every field; returns the config with `connections` capped at `nodes`.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if self.broker_host.is_empty() {
            return Err(ConfigError::EmptyHost);
        }
        if self.broker_port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(ConfigError::Nodes(self.nodes));
        }
        if self.interval_us < MIN_INTERVAL_US {
            return Err(ConfigError::Interval(self.interval_us));
        }
        if self.connections == 0 {
            return Err(ConfigError::ZeroConnections);
        }
        if self.qos > 1 {
            return Err(ConfigError::Qos(self.qos));
        }
        if self.client_id_prefix.is_empty() {
            return Err(ConfigError::EmptyClientIdPrefix);
        }
        let t = &self.topic_prefix;
        if t.is_empty() || t.ends_with('/') || t.contains(['+', '#']) {
            return Err(ConfigError::TopicPrefix(t.clone()));
        }
        // The longest id this run makes must parse (ids are zero-padded to at least 5 digits).
        let longest = node_id_string(&self.node_id_prefix, self.nodes - 1);
        if let Err(reason) = NodeId::parse(&longest) {
            let prefix = self.node_id_prefix.clone();
            return Err(ConfigError::NodeIdPrefix { prefix, reason });
        }
        let f = &self.faults;
        for (field, value) in [
            ("faults.out_of_range", f.out_of_range),
            ("faults.malformed", f.malformed),
            ("faults.late", f.late),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::Fraction { field, value });
            }
        }
        if f.late > 0.0 && f.late_by_ms <= 0 {
            return Err(ConfigError::LateBy(f.late_by_ms));
        }
        let t = &self.traffic;
        for (field, value) in [
            ("traffic.burst", t.burst),
            ("traffic.drop", t.drop),
            ("traffic.out_of_order", t.out_of_order),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::Fraction { field, value });
            }
        }
        if t.burst > 0.0 && !(2..=MAX_BURST).contains(&t.burst_size) {
            return Err(ConfigError::BurstSize(t.burst_size));
        }
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::ZeroTimeout {
                field: "connect_timeout_ms",
            });
        }
        if self.drain_timeout_ms == 0 {
            return Err(ConfigError::ZeroTimeout {
                field: "drain_timeout_ms",
            });
        }
        self.connections = self.connections.min(self.nodes);
        Ok(self)
    }

    /// The id of node `index`.
    pub fn node_id(&self, index: usize) -> Result<NodeId, InvalidNodeId> {
        NodeId::parse(&node_id_string(&self.node_id_prefix, index))
    }
}

fn node_id_string(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:05}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_and_connections_are_capped_at_nodes() {
        let cfg = SimConfig {
            nodes: 3,
            connections: 8,
            ..SimConfig::default()
        }
        .validate()
        .unwrap();
        assert_eq!(cfg.connections, 3);
        assert_eq!(cfg.node_id(42).unwrap().as_str(), "node-00042");
        assert_ne!(unique_client_id_prefix(), "");
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = |f: fn(&mut SimConfig)| {
            let mut cfg = SimConfig::default();
            f(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.nodes = 0), ConfigError::Nodes(0));
        assert_eq!(bad(|c| c.nodes = 10_001), ConfigError::Nodes(10_001));
        assert_eq!(bad(|c| c.qos = 2), ConfigError::Qos(2));
        assert_eq!(bad(|c| c.interval_us = 0), ConfigError::Interval(0));
        assert_eq!(bad(|c| c.interval_us = 999), ConfigError::Interval(999));
        assert_eq!(bad(|c| c.connections = 0), ConfigError::ZeroConnections);
        assert_eq!(bad(|c| c.broker_port = 0), ConfigError::ZeroPort);
        assert_eq!(
            bad(|c| c.topic_prefix = "a/#".into()),
            ConfigError::TopicPrefix("a/#".into())
        );
        assert_eq!(
            bad(|c| c.topic_prefix = "a/".into()),
            ConfigError::TopicPrefix("a/".into())
        );
        assert!(matches!(
            bad(|c| c.node_id_prefix = "a/b".into()),
            ConfigError::NodeIdPrefix { .. }
        ));
        assert!(matches!(
            bad(|c| c.node_id_prefix = "x".repeat(27)),
            ConfigError::NodeIdPrefix { .. }
        ));
        assert_eq!(
            bad(|c| c.faults.malformed = 1.5),
            ConfigError::Fraction {
                field: "faults.malformed",
                value: 1.5
            }
        );
        assert!(matches!(
            bad(|c| c.faults.out_of_range = f64::NAN),
            ConfigError::Fraction {
                field: "faults.out_of_range",
                ..
            }
        ));
        assert_eq!(bad(|c| c.faults.late = 0.5), ConfigError::LateBy(0));
        assert_eq!(
            bad(|c| c.traffic.drop = 2.0),
            ConfigError::Fraction {
                field: "traffic.drop",
                value: 2.0
            }
        );
        assert_eq!(
            bad(|c| {
                c.traffic.burst = 0.1;
                c.traffic.burst_size = 1;
            }),
            ConfigError::BurstSize(1)
        );
        let err = bad(|c| c.faults.late = -0.1);
        assert_eq!(
            err.to_string(),
            "faults.late is -0.1, expected a fraction in [0, 1]"
        );
    }
}
