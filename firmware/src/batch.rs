//! [`Batch`]: several samples of a node's metrics collected into one SenML-CBOR pack (RFC 8428).
//!
//! Wire format (what the agent's decoder reads): a CBOR array of records; the first record
//! carries the base name `bn` (-2, `"{node_id}/"`), the base time `bt` (-3, seconds since the
//! Unix epoch of the first sample) and the message's sequence number under the extension label
//! `"seq"` (a text label the agent ignores; a gap in `seq` at the gateway means messages were
//! lost, for instance dropped from a full offline queue). Then, sample by sample and metric by
//! metric, each record has `n` (0), `u` (1), `v` (2) and `t` (6, seconds relative to `bt`).
//! Numbers are written in the shortest CBOR form that is exact (integer, f32, else f64), so a
//! pack of six samples of three metrics takes about 350 bytes.
//!
//! Invariants: no allocation (samples are held inline, the pack is written into the caller's
//! buffer); a pack that does not fit the buffer is an error, never a truncated pack. Tested below
//! by decoding with minicbor and by byte-exact comparison.

use edgewise_protocol::senml::{BufferTooSmall, label};
use minicbor::Encoder;
use minicbor::encode::write::{Cursor, EndOfSlice};

/// The SenML extension label carrying the message sequence number.
pub const SEQ_LABEL: &str = "seq";

/// A metric's SenML name (appended to the base name) and unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    pub name: &'static str,
    pub unit: &'static str,
}

/// Up to `S` samples of `M` metrics each.
#[derive(Debug, Clone)]
pub struct Batch<const M: usize, const S: usize> {
    times_ms: [i64; S],
    values: [[f64; M]; S],
    len: usize,
}

impl<const M: usize, const S: usize> Default for Batch<M, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const M: usize, const S: usize> Batch<M, S> {
    pub const fn new() -> Self {
        Self {
            times_ms: [0; S],
            values: [[0.0; M]; S],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == S
    }

    /// Add one sample; returns `false` (and keeps nothing) when the batch is full.
    pub fn push(&mut self, time_ms: i64, values: [f64; M]) -> bool {
        if self.len == S {
            return false;
        }
        self.times_ms[self.len] = time_ms;
        self.values[self.len] = values;
        self.len += 1;
        true
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Encode the samples as one pack into `buf`; returns its length.
    pub fn encode(
        &self,
        base_name: &str,
        seq: u32,
        metrics: &[MetricInfo; M],
        buf: &mut [u8],
    ) -> Result<usize, BufferTooSmall> {
        let mut enc = Encoder::new(Cursor::new(buf));
        self.write(&mut enc, base_name, seq, metrics)
            .map_err(|_| BufferTooSmall)?;
        Ok(enc.into_writer().position())
    }

    fn write(
        &self,
        enc: &mut Encoder<Cursor<&mut [u8]>>,
        base_name: &str,
        seq: u32,
        metrics: &[MetricInfo; M],
    ) -> Result<(), minicbor::encode::Error<EndOfSlice>> {
        let base_ms = self.times_ms.first().copied().unwrap_or(0);
        enc.array((self.len * M) as u64)?;
        for s in 0..self.len {
            let offset_ms = self.times_ms[s] - base_ms;
            for (m, info) in metrics.iter().enumerate() {
                let first = s == 0 && m == 0;
                enc.map(if first { 7 } else { 4 })?;
                if first {
                    enc.i64(label::BASE_NAME)?.str(base_name)?;
                    enc.i64(label::BASE_TIME)?;
                    millis_as_seconds(enc, base_ms)?;
                    enc.str(SEQ_LABEL)?.u32(seq)?;
                }
                enc.i64(label::NAME)?.str(info.name)?;
                enc.i64(label::UNIT)?.str(info.unit)?;
                enc.i64(label::VALUE)?;
                number(enc, self.values[s][m])?;
                enc.i64(label::TIME)?;
                millis_as_seconds(enc, offset_ms)?;
            }
        }
        Ok(())
    }
}

/// Milliseconds as seconds: an integer when whole, else a double.
fn millis_as_seconds(
    enc: &mut Encoder<Cursor<&mut [u8]>>,
    ms: i64,
) -> Result<(), minicbor::encode::Error<EndOfSlice>> {
    if ms % 1_000 == 0 {
        enc.i64(ms / 1_000)?;
    } else {
        enc.f64(ms as f64 / 1_000.0)?;
    }
    Ok(())
}

/// The shortest exact CBOR number: integer, single or double float.
fn number(
    enc: &mut Encoder<Cursor<&mut [u8]>>,
    v: f64,
) -> Result<(), minicbor::encode::Error<EndOfSlice>> {
    const EXACT_INT: f64 = (1u64 << 53) as f64;
    if (-EXACT_INT..=EXACT_INT).contains(&v) && (v as i64) as f64 == v {
        enc.i64(v as i64)?;
    } else if f64::from(v as f32) == v {
        enc.f32(v as f32)?;
    } else {
        enc.f64(v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::String;
    use std::vec::Vec;

    use minicbor::Decoder;
    use minicbor::data::Type;

    use super::*;

    const METRICS: [MetricInfo; 2] = [
        MetricInfo {
            name: "temperature",
            unit: "Cel",
        },
        MetricInfo {
            name: "pressure",
            unit: "Pa",
        },
    ];

    fn num(d: &mut Decoder<'_>) -> f64 {
        match d.datatype().unwrap() {
            Type::U8
            | Type::U16
            | Type::U32
            | Type::U64
            | Type::I8
            | Type::I16
            | Type::I32
            | Type::I64 => d.i64().unwrap() as f64,
            Type::F32 => f64::from(d.f32().unwrap()),
            _ => d.f64().unwrap(),
        }
    }

    /// (bn, bt, seq, [(name, unit, v, t)])
    type Decoded = (String, f64, u32, Vec<(String, String, f64, f64)>);

    fn decode(bytes: &[u8]) -> Decoded {
        let mut d = Decoder::new(bytes);
        let n = d.array().unwrap().unwrap();
        let (mut bn, mut bt, mut seq, mut recs) = (String::new(), f64::NAN, u32::MAX, Vec::new());
        for _ in 0..n {
            let (mut name, mut unit, mut v, mut t) = (String::new(), String::new(), f64::NAN, 0.0);
            for _ in 0..d.map().unwrap().unwrap() {
                if d.datatype().unwrap() == Type::String {
                    assert_eq!(d.str().unwrap(), SEQ_LABEL);
                    seq = d.u32().unwrap();
                    continue;
                }
                match d.i64().unwrap() {
                    label::BASE_NAME => bn = d.str().unwrap().into(),
                    label::BASE_TIME => bt = num(&mut d),
                    label::NAME => name = d.str().unwrap().into(),
                    label::UNIT => unit = d.str().unwrap().into(),
                    label::VALUE => v = num(&mut d),
                    label::TIME => t = num(&mut d),
                    other => panic!("label {other}"),
                }
            }
            recs.push((name, unit, v, t));
        }
        assert_eq!(d.position(), bytes.len());
        (bn, bt, seq, recs)
    }

    #[test]
    fn a_batch_encodes_every_sample_relative_to_the_first() {
        let mut b = Batch::<2, 3>::new();
        assert!(b.push(1_700_000_000_000, [21.5, 100_653.27]));
        assert!(b.push(1_700_000_010_000, [21.75, 100_650.0]));
        assert!(b.push(1_700_000_020_500, [-3.0, 0.1]));
        assert!(b.is_full() && !b.push(0, [0.0, 0.0]));
        let mut buf = [0u8; 512];
        let n = b.encode("node-7/", 42, &METRICS, &mut buf).unwrap();
        let (bn, bt, seq, recs) = decode(&buf[..n]);
        assert_eq!((bn.as_str(), bt, seq), ("node-7/", 1_700_000_000.0, 42));
        let expected = [
            ("temperature", "Cel", 21.5, 0.0),
            ("pressure", "Pa", 100_653.27, 0.0),
            ("temperature", "Cel", 21.75, 10.0),
            ("pressure", "Pa", 100_650.0, 10.0),
            ("temperature", "Cel", -3.0, 20.5),
            ("pressure", "Pa", 0.1, 20.5),
        ];
        assert_eq!(recs.len(), expected.len());
        for (r, e) in recs.iter().zip(expected) {
            assert_eq!((r.0.as_str(), r.1.as_str(), r.2, r.3), e);
        }
    }

    #[test]
    fn numbers_take_the_shortest_exact_form() {
        let mut b = Batch::<1, 1>::new();
        b.push(1_500, [21.5]);
        let mut buf = [0u8; 64];
        let n = b.encode("a/", 0, &[METRICS[0]], &mut buf).unwrap();
        // bt 1.5 s as f64 (0xfb ...), v 21.5 as f32 (0xfa 41 ac 00 00), t 0 as integer 0.
        let bytes = &buf[..n];
        assert!(
            bytes
                .windows(5)
                .any(|w| w == [0x02, 0xFA, 0x41, 0xAC, 0x00])
        );
        assert!(
            bytes
                .windows(9)
                .any(|w| w == [0xFB, 0x3F, 0xF8, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(&bytes[n - 2..], &[0x06, 0x00]);
    }

    #[test]
    fn an_empty_batch_is_an_empty_array_and_short_buffers_fail() {
        let b = Batch::<2, 4>::new();
        let mut buf = [0u8; 8];
        assert_eq!(b.encode("x/", 1, &METRICS, &mut buf), Ok(1));
        assert_eq!(buf[0], 0x80);
        let mut b = Batch::<2, 4>::new();
        b.push(0, [1.0, 2.0]);
        let mut big = [0u8; 128];
        let full = b.encode("x/", 1, &METRICS, &mut big).unwrap();
        for len in 0..full {
            assert_eq!(
                b.encode("x/", 1, &METRICS, &mut big[..len]),
                Err(BufferTooSmall)
            );
        }
    }
}
