//! The simulated fleet without I/O: a [`VirtualNode`] wraps the no_std [`Node`] core, decides
//! each message's faults with its own [`SplitMix64`], and reports exactly what the message holds
//! in a [`Tally`]. [`VirtualNode::next_messages`] adds the traffic faults: a burst of several
//! messages, a dropped message (returned, marked, never to be published), or a message held
//! back and released after the node's next one (out of order).
//!
//! Every node has the two [`SIM_METRICS`]. Invariants: a malformed payload is never valid SenML
//! (random bytes start with `0xff`, a CBOR break code that cannot open an item and is not UTF-8;
//! a truncated pack stops inside its array; truncated JSON is not JSON); a well-formed pack holds
//! one numeric reading per metric. The same seed gives the same messages for the same `now_ms`
//! sequence. Tested below by decoding the payloads with minicbor.

use crate::node::{Metric, Node, NodeId};
use crate::prng::{SplitMix64, mix};
use crate::sim::config::{SimConfig, TrafficFaults};
use crate::source::{Waveform, WaveformConfig};
use edgewise_protocol::senml::BufferTooSmall;

/// A simulated metric: SenML name and unit, its signal, and the value an out-of-range fault uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimMetric {
    pub name: &'static str,
    pub unit: &'static str,
    pub waveform: WaveformConfig,
    pub out_of_range_value: f64,
}

/// The metrics of every simulated node, in pack order.
pub const SIM_METRICS: [SimMetric; 2] = [
    SimMetric {
        name: "temperature",
        unit: "Cel",
        waveform: WaveformConfig::TEMPERATURE,
        out_of_range_value: 1_000.0,
    },
    SimMetric {
        name: "humidity",
        unit: "%RH",
        waveform: WaveformConfig::HUMIDITY,
        out_of_range_value: 500.0,
    },
];

const METRICS: usize = SIM_METRICS.len();

/// A pack of two records with a 32-byte node id takes about 110 bytes.
const PACK_BUFFER_BYTES: usize = 256;

/// The three shapes of malformed payload, used in turn at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedKind {
    RandomBytes,
    TruncatedCbor,
    TruncatedJson,
}

/// What one message carries, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub readings: u64,
    pub malformed: bool,
    pub out_of_range_readings: u64,
    pub late_readings: u64,
    pub payload_bytes: u64,
    /// Lost on the way: must not be published.
    pub dropped: bool,
    /// One of several messages a node sent back to back.
    pub burst: bool,
    /// Held back and sent after a newer message of the same node.
    pub out_of_order: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub payload: Vec<u8>,
    pub tally: Tally,
    pub malformed: Option<MalformedKind>,
}

/// One simulated node: the firmware core plus fault injection and its publish schedule.
#[derive(Debug, Clone)]
pub struct VirtualNode {
    node: Node<Waveform, METRICS>,
    topic: String,
    offset_us: u64,
    faults: crate::sim::Faults,
    rng: SplitMix64,
    traffic: TrafficFaults,
    /// Draws for the traffic faults, apart from `rng` so a seed gives the same payloads with or
    /// without traffic faults.
    traffic_rng: SplitMix64,
    interval_us: u64,
    held: Option<Message>,
}

impl VirtualNode {
    /// Node `index` of a validated config: its id, topic, seeds and its offset in the interval.
    pub fn new(index: usize, cfg: &SimConfig) -> Result<Self, crate::node::InvalidNodeId> {
        let id = cfg.node_id(index)?;
        let node_seed = mix(cfg.seed ^ mix(index as u64));
        let metrics: [Metric<Waveform>; METRICS] = core::array::from_fn(|m| Metric {
            name: SIM_METRICS[m].name,
            unit: SIM_METRICS[m].unit,
            source: Waveform::new(
                SIM_METRICS[m].waveform,
                mix(node_seed.wrapping_add(m as u64)),
            ),
        });
        let offset_us = (index as u128 * u128::from(cfg.interval_us) / cfg.nodes.max(1) as u128)
            .try_into()
            .unwrap_or(0);
        Ok(Self {
            node: Node::new(id, metrics),
            topic: format!("{}/{}", cfg.topic_prefix, id),
            offset_us,
            faults: cfg.faults,
            rng: SplitMix64::new(mix(node_seed ^ 0xFA17_FA17_FA17_FA17)),
            traffic: cfg.traffic,
            traffic_rng: SplitMix64::new(mix(node_seed ^ 0x7AFF_1C00_7AFF_1C00)),
            interval_us: cfg.interval_us,
            held: None,
        })
    }

    pub fn id(&self) -> &NodeId {
        self.node.id()
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// When in each interval this node publishes, in microseconds.
    pub fn offset_us(&self) -> u64 {
        self.offset_us
    }

    fn sample(&mut self, now_ms: i64) -> [f64; METRICS] {
        match self.node.sample(now_ms) {
            Ok(values) => values,
            Err(e) => match e.error {},
        }
    }

    /// This interval's messages at event time `now_ms`, in publish order, with the traffic
    /// faults drawn: usually one; a burst of `burst_size` (base times one interval apart, the
    /// last at `now_ms`); dropped ones are included, marked [`Tally::dropped`]; a held-back one
    /// comes after the next message that is sent.
    pub fn next_messages(
        &mut self,
        now_ms: i64,
        out: &mut Vec<Message>,
    ) -> Result<(), BufferTooSmall> {
        let t = self.traffic;
        let count = if self.traffic_rng.chance(t.burst) {
            t.burst_size.max(1)
        } else {
            1
        };
        let interval_us = i64::try_from(self.interval_us).unwrap_or(i64::MAX);
        for k in 0..count {
            // Whole milliseconds, distinct for each k as the interval is at least 1 ms.
            let back = i64::from(count - 1 - k).saturating_mul(interval_us) / 1_000;
            let mut m = self.next_message(now_ms.saturating_sub(back))?;
            m.tally.burst = count > 1;
            if self.traffic_rng.chance(t.drop) {
                m.tally.dropped = true;
                out.push(m);
                continue;
            }
            if self.held.is_none() && self.traffic_rng.chance(t.out_of_order) {
                m.tally.out_of_order = true;
                self.held = Some(m);
                continue;
            }
            out.push(m);
            if let Some(held) = self.held.take() {
                out.push(held);
            }
        }
        Ok(())
    }

    /// The next message at event time `now_ms`, with its payload faults drawn.
    pub fn next_message(&mut self, now_ms: i64) -> Result<Message, BufferTooSmall> {
        let mut buf = [0u8; PACK_BUFFER_BYTES];
        let f = self.faults;
        if self.rng.chance(f.malformed) {
            let kind = match self.rng.below(3) {
                0 => MalformedKind::RandomBytes,
                1 => MalformedKind::TruncatedCbor,
                _ => MalformedKind::TruncatedJson,
            };
            let payload = match kind {
                MalformedKind::RandomBytes => {
                    let len = 1 + self.rng.below(32) as usize;
                    let mut bytes: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
                    bytes[0] = 0xff;
                    bytes
                }
                MalformedKind::TruncatedCbor => {
                    let values = self.sample(now_ms);
                    let n = self.node.encode(now_ms, &values, &mut buf)?;
                    buf[..n / 2].to_vec()
                }
                MalformedKind::TruncatedJson => format!(
                    r#"[{{"bn":"{}/","bt":{},"n":"temperature","u":"Cel","v":2"#,
                    self.id(),
                    now_ms as f64 / 1_000.0
                )
                .into_bytes(),
            };
            let tally = Tally {
                malformed: true,
                payload_bytes: payload.len() as u64,
                ..Tally::default()
            };
            return Ok(Message {
                payload,
                tally,
                malformed: Some(kind),
            });
        }

        let mut values = self.sample(now_ms);
        let mut out_of_range = 0;
        for (v, m) in values.iter_mut().zip(SIM_METRICS.iter()) {
            if self.rng.chance(f.out_of_range) {
                *v = m.out_of_range_value;
                out_of_range += 1;
            }
        }
        let late = self.rng.chance(f.late);
        let base_time_ms = if late {
            now_ms.saturating_sub(f.late_by_ms)
        } else {
            now_ms
        };
        let n = self.node.encode(base_time_ms, &values, &mut buf)?;
        let payload = buf[..n].to_vec();
        let tally = Tally {
            readings: METRICS as u64,
            malformed: false,
            out_of_range_readings: out_of_range,
            late_readings: if late { METRICS as u64 } else { 0 },
            payload_bytes: n as u64,
            ..Tally::default()
        };
        Ok(Message {
            payload,
            tally,
            malformed: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Faults;
    use edgewise_protocol::senml::label;

    /// Base time (ms) and values of a SenML-CBOR pack, or `None` if the payload is not one.
    fn decode(bytes: &[u8]) -> Option<(i64, Vec<f64>)> {
        let mut d = minicbor::Decoder::new(bytes);
        let (mut bt, mut values) = (None, Vec::new());
        for _ in 0..d.array().ok()?? {
            for _ in 0..d.map().ok()?? {
                match d.i64().ok()? {
                    label::BASE_TIME => bt = Some((d.f64().ok()? * 1_000.0).round() as i64),
                    label::VALUE => values.push(d.f64().ok()?),
                    label::BASE_NAME | label::NAME | label::UNIT => drop(d.str().ok()?),
                    _ => d.skip().ok()?,
                }
            }
        }
        (d.position() == bytes.len()).then_some((bt?, values))
    }

    fn cfg(faults: Faults) -> SimConfig {
        SimConfig {
            nodes: 4,
            interval_us: 1_000_000,
            seed: 7,
            faults,
            ..SimConfig::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn a_clean_node_sends_in_range_packs_on_its_topic() {
        let cfg = cfg(Faults::default());
        let mut n = VirtualNode::new(2, &cfg).unwrap();
        assert_eq!(n.topic(), "sensors/node-00002");
        assert_eq!(n.offset_us(), 500_000);
        for i in 0..50 {
            let now = 1_700_000_000_000 + i * 1_000;
            let m = n.next_message(now).unwrap();
            let (bt, values) = decode(&m.payload).expect("well-formed pack");
            assert_eq!(bt, now);
            assert!((15.0..=30.0).contains(&values[0]) && (30.0..=70.0).contains(&values[1]));
            assert_eq!(
                m.tally,
                Tally {
                    readings: 2,
                    payload_bytes: m.payload.len() as u64,
                    ..Tally::default()
                }
            );
        }
    }

    #[test]
    fn malformed_payloads_never_decode_and_carry_no_readings() {
        let cfg = cfg(Faults {
            malformed: 1.0,
            ..Faults::default()
        });
        let mut n = VirtualNode::new(0, &cfg).unwrap();
        let mut kinds = std::collections::HashSet::new();
        for i in 0..300 {
            let m = n.next_message(i * 1_000).unwrap();
            assert_eq!(
                decode(&m.payload),
                None,
                "{:?}: {:02x?}",
                m.malformed,
                m.payload
            );
            assert!(!m.payload.is_empty());
            assert!(m.tally.malformed && m.tally.readings == 0);
            assert!(serde_json::from_slice::<serde_json::Value>(&m.payload).is_err());
            kinds.insert(format!("{:?}", m.malformed));
        }
        assert_eq!(kinds.len(), 3);
    }

    #[test]
    fn out_of_range_and_late_faults_are_counted_per_reading() {
        let faults = Faults {
            out_of_range: 0.3,
            late: 0.2,
            late_by_ms: 3_600_000,
            malformed: 0.0,
        };
        let mut n = VirtualNode::new(1, &cfg(faults)).unwrap();
        let (mut oor, mut late, mut counted_oor, mut counted_late) = (0, 0, 0, 0);
        for i in 0..1_000 {
            let now = 1_700_000_000_000 + i * 1_000;
            let m = n.next_message(now).unwrap();
            let (bt, values) = decode(&m.payload).unwrap();
            oor += values
                .iter()
                .filter(|&&v| v == 1_000.0 || v == 500.0)
                .count() as u64;
            if bt == now - 3_600_000 {
                late += values.len() as u64;
            } else {
                assert_eq!(bt, now);
            }
            counted_oor += m.tally.out_of_range_readings;
            counted_late += m.tally.late_readings;
        }
        assert_eq!((oor, late), (counted_oor, counted_late));
        assert!(
            (500..700).contains(&oor),
            "out of range {oor} of 2000 readings at 0.3"
        );
        assert!(
            (300..500).contains(&late),
            "late {late} of 2000 readings at 0.2"
        );
    }

    fn traffic_cfg(traffic: TrafficFaults) -> SimConfig {
        SimConfig {
            traffic,
            ..cfg(Faults::default())
        }
    }

    #[test]
    fn bursts_send_several_packs_one_interval_apart_ending_now() {
        let cfg = traffic_cfg(TrafficFaults {
            burst: 1.0,
            burst_size: 3,
            ..TrafficFaults::default()
        });
        let mut n = VirtualNode::new(0, &cfg).unwrap();
        let mut out = Vec::new();
        n.next_messages(10_000_000, &mut out).unwrap();
        let times: Vec<i64> = out.iter().map(|m| decode(&m.payload).unwrap().0).collect();
        assert_eq!(times, [9_998_000, 9_999_000, 10_000_000]);
        assert!(out.iter().all(|m| m.tally.burst && !m.tally.dropped));
    }

    #[test]
    fn drops_are_marked_and_counted_and_reordering_swaps_with_the_next_message() {
        let cfg = traffic_cfg(TrafficFaults {
            drop: 0.25,
            ..TrafficFaults::default()
        });
        let mut n = VirtualNode::new(1, &cfg).unwrap();
        let mut out = Vec::new();
        for i in 0..2_000 {
            n.next_messages(i * 1_000, &mut out).unwrap();
        }
        assert_eq!(out.len(), 2_000);
        let dropped = out.iter().filter(|m| m.tally.dropped).count();
        assert!((400..600).contains(&dropped), "{dropped} of 2000 at 0.25");

        let cfg = traffic_cfg(TrafficFaults {
            out_of_order: 0.3,
            ..TrafficFaults::default()
        });
        let mut n = VirtualNode::new(2, &cfg).unwrap();
        let mut out = Vec::new();
        for i in 0..1_000 {
            n.next_messages(i * 1_000, &mut out).unwrap();
        }
        let times: Vec<i64> = out.iter().map(|m| decode(&m.payload).unwrap().0).collect();
        let inversions = times.windows(2).filter(|w| w[1] < w[0]).count();
        let held = out.iter().filter(|m| m.tally.out_of_order).count();
        // Every held message arrives right after a newer one: one inversion each.
        assert_eq!(inversions, held);
        assert!((150..350).contains(&held), "{held}");
        for (w, m) in times.windows(2).zip(&out[1..]) {
            if w[1] < w[0] {
                assert!(m.tally.out_of_order);
                assert_eq!(w[0] - w[1], 1_000, "held for exactly one interval");
            }
        }
        // Nothing is lost: every interval's message is there once (the last may still be held).
        let mut sorted = times.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(sorted.len() >= 999 && sorted.len() == times.len());
    }

    #[test]
    fn traffic_faults_leave_the_payload_sequence_of_a_seed_unchanged() {
        let plain = cfg(Faults::default());
        let bursty = traffic_cfg(TrafficFaults {
            drop: 0.5,
            ..TrafficFaults::default()
        });
        let mut a = VirtualNode::new(3, &plain).unwrap();
        let mut b = VirtualNode::new(3, &bursty).unwrap();
        let mut out = Vec::new();
        for i in 0..50 {
            out.clear();
            b.next_messages(i * 1_000, &mut out).unwrap();
            assert_eq!(out[0].payload, a.next_message(i * 1_000).unwrap().payload);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_messages() {
        let faults = Faults {
            out_of_range: 0.1,
            malformed: 0.1,
            late: 0.1,
            late_by_ms: 5_000,
        };
        let run = |seed| {
            let cfg = SimConfig {
                seed,
                ..cfg(faults)
            };
            let mut n = VirtualNode::new(3, &cfg).unwrap();
            (0..100)
                .map(|i| n.next_message(i * 100).unwrap().payload)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
