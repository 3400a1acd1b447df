//! A sensor node: its validated [`NodeId`], its metrics, and one tick = sample every metric and
//! encode one SenML-CBOR pack into the caller's fixed buffer.
//!
//! Invariants: no allocation (names are `&'static str` or fixed arrays, the pack is written into a
//! borrowed `&mut [u8]`); a node id is 1..=32 bytes of `[A-Za-z0-9._-]`, so `"{id}/"` is a safe
//! SenML base name and `"{prefix}/{id}"` a topic without wildcards. The pack's base name is
//! `"{id}/"`, its base time the sample time in seconds, and each record carries the metric name,
//! unit, value and time offset 0.
//!
//! Tested below by decoding what was encoded with minicbor, and by the too-small-buffer errors.

use core::fmt;

use edgewise_protocol::senml::{self, BufferTooSmall, Record};

use crate::source::ValueSource;

/// The topic level nodes publish under: a node publishes to `sensors/{node_id}`.
pub const TOPIC_PREFIX: &str = "sensors";

/// Longest node id, in bytes.
pub const NODE_ID_MAX_LEN: usize = 32;

/// A node's identity: 1..=32 bytes of ASCII letters, digits, `.`, `_` or `-`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    bytes: [u8; NODE_ID_MAX_LEN],
    len: u8,
}

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidNodeId {
    Empty,
    TooLong { len: usize },
    BadByte { byte: u8, at: usize },
}

impl fmt::Display for InvalidNodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("node id is empty"),
            Self::TooLong { len } => {
                write!(
                    f,
                    "node id is {len} bytes, at most {NODE_ID_MAX_LEN} are allowed"
                )
            }
            Self::BadByte { byte, at } => write!(
                f,
                "node id has byte 0x{byte:02x} at {at}; only ASCII letters, digits, '.', '_' and '-' are allowed"
            ),
        }
    }
}

impl NodeId {
    pub fn parse(s: &str) -> Result<Self, InvalidNodeId> {
        let src = s.as_bytes();
        if src.is_empty() {
            return Err(InvalidNodeId::Empty);
        }
        if src.len() > NODE_ID_MAX_LEN {
            return Err(InvalidNodeId::TooLong { len: src.len() });
        }
        if let Some(at) = src
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        {
            return Err(InvalidNodeId::BadByte { byte: src[at], at });
        }
        let mut bytes = [0u8; NODE_ID_MAX_LEN];
        bytes[..src.len()].copy_from_slice(src);
        Ok(Self {
            bytes,
            len: src.len() as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII was accepted by `parse`, so this cannot fail.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// Write `"{prefix}/{id}"` into `buf` and return it.
    pub fn topic<'b>(&self, prefix: &str, buf: &'b mut [u8]) -> Result<&'b str, BufferTooSmall> {
        join(&[prefix, "/", self.as_str()], buf)
    }

    /// Write the SenML base name `"{id}/"` into `buf` and return it.
    pub fn base_name<'b>(&self, buf: &'b mut [u8]) -> Result<&'b str, BufferTooSmall> {
        join(&[self.as_str(), "/"], buf)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:?})", self.as_str())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn join<'b>(parts: &[&str], buf: &'b mut [u8]) -> Result<&'b str, BufferTooSmall> {
    let mut n = 0;
    for p in parts {
        let dst = buf.get_mut(n..n + p.len()).ok_or(BufferTooSmall)?;
        dst.copy_from_slice(p.as_bytes());
        n += p.len();
    }
    // Concatenated `&str`s are valid UTF-8.
    core::str::from_utf8(&buf[..n]).map_err(|_| BufferTooSmall)
}

/// One metric of a node: its SenML name and unit, and where its values come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric<S> {
    /// Record name, appended to the base name: the stream is `"{node_id}/{name}"`.
    pub name: &'static str,
    /// SenML unit symbol, e.g. `Cel`, `%RH`.
    pub unit: &'static str,
    pub source: S,
}

/// A metric's source failed to produce a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorError<E> {
    pub metric: &'static str,
    pub error: E,
}

impl<E: fmt::Display> fmt::Display for SensorError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading metric {} failed: {}", self.metric, self.error)
    }
}

/// A tick failed: a sensor read failed, or the pack did not fit the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeError<E> {
    Sensor(SensorError<E>),
    BufferTooSmall,
}

impl<E: fmt::Display> fmt::Display for NodeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sensor(e) => fmt::Display::fmt(e, f),
            Self::BufferTooSmall => fmt::Display::fmt(&BufferTooSmall, f),
        }
    }
}

impl<E> From<BufferTooSmall> for NodeError<E> {
    fn from(_: BufferTooSmall) -> Self {
        Self::BufferTooSmall
    }
}

impl<E> From<SensorError<E>> for NodeError<E> {
    fn from(e: SensorError<E>) -> Self {
        Self::Sensor(e)
    }
}

/// A sensor node with `N` metrics whose values come from sources of type `S`.
#[derive(Debug, Clone, PartialEq)]
pub struct Node<S, const N: usize> {
    id: NodeId,
    metrics: [Metric<S>; N],
}

impl<S: ValueSource, const N: usize> Node<S, N> {
    pub fn new(id: NodeId, metrics: [Metric<S>; N]) -> Self {
        Self { id, metrics }
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn metrics(&self) -> &[Metric<S>; N] {
        &self.metrics
    }

    /// Sample every metric at `now_ms`, in metric order.
    pub fn sample(&mut self, now_ms: i64) -> Result<[f64; N], SensorError<S::Error>> {
        let mut values = [0.0; N];
        for (v, m) in values.iter_mut().zip(self.metrics.iter_mut()) {
            *v = m.source.sample(now_ms).map_err(|error| SensorError {
                metric: m.name,
                error,
            })?;
        }
        Ok(values)
    }

    /// Encode `values` (in metric order) as one SenML-CBOR pack with base time `base_time_ms`
    /// into `buf`; returns the number of bytes written.
    pub fn encode(
        &self,
        base_time_ms: i64,
        values: &[f64; N],
        buf: &mut [u8],
    ) -> Result<usize, BufferTooSmall> {
        let mut name_buf = [0u8; NODE_ID_MAX_LEN + 1];
        let base_name = self.id.base_name(&mut name_buf)?;
        let records: [Record<'_>; N] = core::array::from_fn(|i| Record {
            name: self.metrics[i].name,
            unit: Some(self.metrics[i].unit),
            value: values[i],
            time_offset_s: 0.0,
        });
        senml::encode_pack(base_name, base_time_ms as f64 / 1_000.0, &records, buf)
    }

    /// One tick: sample every metric at `now_ms` and encode the pack into `buf`.
    pub fn tick(&mut self, now_ms: i64, buf: &mut [u8]) -> Result<usize, NodeError<S::Error>> {
        let values = self.sample(now_ms)?;
        Ok(self.encode(now_ms, &values, buf)?)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::String;
    use std::vec::Vec;

    use edgewise_protocol::senml::label;
    use minicbor::Decoder;

    use super::*;
    use crate::source::{Waveform, WaveformConfig};

    fn node(id: &str, seed: u64) -> Node<Waveform, 2> {
        let id = NodeId::parse(id).unwrap();
        Node::new(
            id,
            [
                Metric {
                    name: "temperature",
                    unit: "Cel",
                    source: Waveform::new(WaveformConfig::TEMPERATURE, seed),
                },
                Metric {
                    name: "humidity",
                    unit: "%RH",
                    source: Waveform::new(WaveformConfig::HUMIDITY, seed + 1),
                },
            ],
        )
    }

    /// (base name, base time, [(name, unit, value, time offset)]) of a pack.
    type Decoded = (String, f64, Vec<(String, String, f64, f64)>);

    fn decode(bytes: &[u8]) -> Decoded {
        let mut d = Decoder::new(bytes);
        let n = d.array().unwrap().unwrap();
        let (mut bn, mut bt, mut recs) = (String::new(), f64::NAN, Vec::new());
        for _ in 0..n {
            let fields = d.map().unwrap().unwrap();
            let (mut name, mut unit, mut v, mut t) = (String::new(), String::new(), f64::NAN, 0.0);
            for _ in 0..fields {
                match d.i64().unwrap() {
                    label::BASE_NAME => bn = d.str().unwrap().into(),
                    label::BASE_TIME => bt = d.f64().unwrap(),
                    label::NAME => name = d.str().unwrap().into(),
                    label::UNIT => unit = d.str().unwrap().into(),
                    label::VALUE => v = d.f64().unwrap(),
                    label::TIME => t = d.f64().unwrap(),
                    other => panic!("unexpected label {other}"),
                }
            }
            recs.push((name, unit, v, t));
        }
        assert_eq!(d.position(), bytes.len(), "trailing bytes after the pack");
        (bn, bt, recs)
    }

    #[test]
    fn a_tick_encodes_one_pack_with_every_metric() {
        let mut n = node("node-7", 1);
        let mut expected = node("node-7", 1);
        let now_ms = 1_700_000_000_250;
        let values = expected.sample(now_ms).unwrap();

        let mut buf = [0u8; 160];
        let len = n.tick(now_ms, &mut buf).unwrap();
        let (bn, bt, recs) = decode(&buf[..len]);
        assert_eq!(bn, "node-7/");
        assert_eq!(bt, 1_700_000_000.25);
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0],
            ("temperature".into(), "Cel".into(), values[0], 0.0)
        );
        assert_eq!(recs[1], ("humidity".into(), "%RH".into(), values[1], 0.0));
        assert!((15.0..=30.0).contains(&recs[0].2));
        assert!((30.0..=70.0).contains(&recs[1].2));
    }

    #[test]
    fn encode_uses_the_given_values_and_base_time() {
        let n = node("a", 1);
        let mut buf = [0u8; 160];
        let len = n.encode(-1_500, &[1000.0, -3.5], &mut buf).unwrap();
        let (_, bt, recs) = decode(&buf[..len]);
        assert_eq!(bt, -1.5);
        assert_eq!((recs[0].2, recs[1].2), (1000.0, -3.5));
    }

    #[test]
    fn a_too_small_buffer_is_an_error_for_every_short_length() {
        let mut n = node("node-7", 1);
        let mut buf = [0u8; 160];
        let full = n.tick(0, &mut buf).unwrap();
        for len in 0..full {
            assert_eq!(
                n.tick(0, &mut buf[..len]),
                Err(NodeError::BufferTooSmall),
                "len {len}"
            );
        }
        assert!(n.tick(0, &mut buf[..full]).is_ok());
    }

    #[test]
    fn sensor_errors_name_the_metric() {
        struct Broken;
        impl ValueSource for Broken {
            type Error = &'static str;
            fn sample(&mut self, _: i64) -> Result<f64, &'static str> {
                Err("i2c nack")
            }
        }
        let mut n = Node::new(
            NodeId::parse("n").unwrap(),
            [Metric {
                name: "pressure",
                unit: "Pa",
                source: Broken,
            }],
        );
        let err = n.tick(0, &mut [0u8; 64]).unwrap_err();
        assert_eq!(
            err,
            NodeError::Sensor(SensorError {
                metric: "pressure",
                error: "i2c nack"
            })
        );
        assert_eq!(
            std::format!("{err}"),
            "reading metric pressure failed: i2c nack"
        );
    }

    #[test]
    fn node_ids_are_validated_and_form_topics() {
        assert_eq!(NodeId::parse(""), Err(InvalidNodeId::Empty));
        assert_eq!(
            NodeId::parse(&"x".repeat(33)),
            Err(InvalidNodeId::TooLong { len: 33 })
        );
        assert_eq!(
            NodeId::parse("a/b"),
            Err(InvalidNodeId::BadByte { byte: b'/', at: 1 })
        );
        assert_eq!(
            NodeId::parse("a#"),
            Err(InvalidNodeId::BadByte { byte: b'#', at: 1 })
        );
        let id = NodeId::parse(&"x".repeat(32)).unwrap();
        assert_eq!(id.as_str().len(), 32);

        let id = NodeId::parse("node-00042").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            id.topic(TOPIC_PREFIX, &mut buf).unwrap(),
            "sensors/node-00042"
        );
        assert_eq!(id.topic(TOPIC_PREFIX, &mut buf[..10]), Err(BufferTooSmall));
    }
}
