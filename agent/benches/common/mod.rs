// Each bench binary uses a part of this module.
#![allow(dead_code)]

//! Shared by the `streams` and `memory` benches: generated messages per payload format, and a
//! decode -> contract -> window loop over them.
//!
//! Each message is one sensor's pack of 10 readings 1 ms apart (SenML JSON, SenML CBOR) or one
//! reading (plain JSON), for the stream `node-<i>/temperature`, `i` cycling over the streams.
//! Times are relative (SenML `t` without `bt`; plain JSON without `ts`), resolved against the
//! `now_ms` handed to the decoder, which advances so every stream gets one message per second of
//! event time: the same payload bytes keep producing new readings, windows (10 s, tumbling,
//! 1 s lateness) keep closing. Messages go in batches of 1,000, as the pipeline's do: the readings
//! kept are collected in a `ReadingArena`, enter their windows at the end of the batch, and then
//! `Windows::advance` runs.

use std::hint::black_box;

pub mod cpu_time;

use edgewise_agent::arena::ReadingArena;
use edgewise_agent::decode::{DecodeLimits, PayloadDecoder, PayloadFormat, Value};
use edgewise_agent::filter::{Filter, FilterConfig};
use edgewise_agent::window::{Admission, WindowSpec, Windows};
use edgewise_protocol::ReadingView;
use edgewise_protocol::senml::{Record, encode_pack};

/// Readings per SenML pack.
pub const PACK: usize = 10;
/// Messages between two `Windows::advance` calls.
pub const BATCH: usize = 1000;

#[derive(Clone, Copy)]
pub enum Format {
    SenmlJson,
    SenmlCbor,
    PlainJson,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::SenmlJson => "senml-json",
            Format::SenmlCbor => "senml-cbor",
            Format::PlainJson => "plain-json",
        }
    }

    fn payload_format(self) -> PayloadFormat {
        match self {
            Format::SenmlJson => PayloadFormat::SenmlJson,
            Format::SenmlCbor => PayloadFormat::SenmlCbor,
            Format::PlainJson => PayloadFormat::PlainJson,
        }
    }

    pub fn readings_per_message(self) -> usize {
        match self {
            Format::PlainJson => 1,
            _ => PACK,
        }
    }
}

/// The message of stream `i`, written into `topic` and `payload` (cleared first; once they have
/// grown to fit, nothing is allocated).
fn write_message(format: Format, i: usize, topic: &mut String, payload: &mut Vec<u8>) {
    use std::fmt::Write as _;
    use std::io::Write as _;
    topic.clear();
    payload.clear();
    let value = |k: usize| 20.0 + ((i * 7 + k * 3) % 50) as f64 / 10.0;
    let _ = write!(topic, "sensors/node-{i}/temperature");
    match format {
        Format::SenmlJson => {
            payload.push(b'[');
            for k in 0..PACK {
                let t = -((PACK - 1 - k) as f64) / 1000.0;
                if k > 0 {
                    payload.push(b',');
                }
                payload.push(b'{');
                if k == 0 {
                    let _ = write!(payload, r#""bn":"node-{i}/","#);
                }
                let _ = write!(
                    payload,
                    r#""n":"temperature","u":"Cel","v":{},"t":{t}}}"#,
                    value(k)
                );
            }
            payload.push(b']');
        }
        Format::SenmlCbor => {
            let records: [Record<'_>; PACK] = std::array::from_fn(|k| Record {
                name: "temperature",
                unit: Some("Cel"),
                value: value(k),
                time_offset_s: -((PACK - 1 - k) as f64) / 1000.0,
            });
            // The base name on the stack: generating a message allocates nothing (the memory
            // bench counts allocations).
            let mut name = [0u8; 32];
            let mut cursor = std::io::Cursor::new(&mut name[..]);
            let _ = write!(cursor, "node-{i}/");
            let len = cursor.position() as usize;
            let base = std::str::from_utf8(&name[..len]).expect("ASCII");
            let mut buf = [0u8; 1024];
            let n = encode_pack(base, 0.0, &records, &mut buf).expect("a pack fits in 1 KiB");
            payload.extend_from_slice(&buf[..n]);
        }
        Format::PlainJson => {
            let _ = write!(payload, r#"{{"value":{},"unit":"Cel"}}"#, value(0));
        }
    }
}

/// One message per stream: `(topic, payload)`.
fn messages(format: Format, streams: usize) -> Vec<(String, Vec<u8>)> {
    (0..streams)
        .map(|i| {
            let (mut topic, mut payload) = (String::new(), Vec::new());
            write_message(format, i, &mut topic, &mut payload);
            (topic, payload)
        })
        .collect()
}

/// Where a run's messages come from.
enum Source {
    /// Encoded once, up front (the throughput benches: encoding is not what they time).
    Stored(Vec<(String, Vec<u8>)>),
    /// Encoded when sent, into one reused buffer (the memory bench: an agent holds the message
    /// it is decoding, not one per stream).
    Generated {
        format: Format,
        topic: String,
        payload: Vec<u8>,
    },
}

/// Decodes, checks and windows messages, cycling over the streams, with event time advancing
/// one second per round of streams.
pub struct Run {
    source: Source,
    streams: usize,
    format: PayloadFormat,
    decoder: PayloadDecoder,
    filter: Filter,
    pub windows: Windows,
    /// The readings of the batch in hand, admitted but not in their windows yet.
    kept: ReadingArena,
    /// Readings that entered their window (all of them, in this workload).
    pub accepted: u64,
    next: usize,
    sent: u64,
    base_ms: i64,
}

impl Run {
    pub fn new(format: Format, streams: usize) -> Run {
        Run::with_quantiles(format, streams, false)
    }

    /// Like [`Run::with_quantiles`], but each message is encoded when it is sent instead of
    /// all of them up front, so the process holds one message, as an agent does.
    pub fn generated(format: Format, streams: usize, quantiles: bool) -> Run {
        let source = Source::Generated {
            format,
            topic: String::new(),
            payload: Vec::new(),
        };
        Run::build(format, streams, quantiles, source)
    }

    /// With `quantiles`, every window also keeps a DDSketch (1% error bound).
    pub fn with_quantiles(format: Format, streams: usize, quantiles: bool) -> Run {
        Run::build(
            format,
            streams,
            quantiles,
            Source::Stored(messages(format, streams)),
        )
    }

    fn build(format: Format, streams: usize, quantiles: bool, source: Source) -> Run {
        let filter = Filter::build(
            &[FilterConfig {
                stream: "+/temperature".into(),
                min: Some(-40.0),
                max: Some(85.0),
                ..FilterConfig::default()
            }],
            Filter::DEFAULT_MAX_STREAMS,
        )
        .expect("valid rule");
        let spec = WindowSpec {
            max_streams: streams,
            quantile_relative_error: quantiles.then_some(0.01),
            ..WindowSpec::tumbling(10_000, 1_000, 600_000)
        };
        Run {
            source,
            streams,
            format: format.payload_format(),
            decoder: PayloadDecoder::new(DecodeLimits::default()),
            filter,
            windows: Windows::new("bench", spec),
            kept: ReadingArena::default(),
            accepted: 0,
            next: 0,
            sent: 0,
            base_ms: 1_700_000_000_000,
        }
    }

    fn now_ms(&self) -> i64 {
        self.base_ms + (self.sent * 1000 / self.streams as u64) as i64
    }

    /// Processes `n` messages as the pipeline does: per message as `Pipeline::prepare` (the
    /// zero-copy decoder, the contract on the borrowed reading, the admission, the readings kept
    /// copied into the arena), per batch as `Pipeline::ingest` after its commit (`Windows::add`)
    /// and `Pipeline::close_due` (`Windows::advance`). The readings of a batch that `n` cuts short
    /// enter their windows at the end of the call. With `window` false only decodes them (the
    /// baseline).
    pub fn process(&mut self, n: usize, window: bool) -> usize {
        let mut readings = 0;
        for i in 0..n {
            let now = self.now_ms();
            let (topic, payload) = match &mut self.source {
                Source::Stored(messages) => {
                    let (topic, payload) = &messages[self.next];
                    (topic.as_str(), payload.as_slice())
                }
                Source::Generated {
                    format,
                    topic,
                    payload,
                } => {
                    write_message(*format, self.next, topic, payload);
                    (topic.as_str(), payload.as_slice())
                }
            };
            let (filter, windows, kept) = (&mut self.filter, &self.windows, &mut self.kept);
            let decoded = self
                .decoder
                .decode_each(topic, payload, self.format, now, |r| {
                    if !window {
                        black_box(&r);
                        return;
                    }
                    let Ok(checked) = filter.check(&r) else {
                        return;
                    };
                    let Some(Value::Number(value)) = checked.value else {
                        return;
                    };
                    let reading = ReadingView {
                        stream: r.stream,
                        time_ms: r.time_ms,
                        value,
                        unit: checked.unit,
                    };
                    if windows.admit(reading) == Admission::Open {
                        kept.push(reading);
                    }
                });
            readings += decoded.map_or(0, |d| d.readings);
            self.next = (self.next + 1) % self.streams;
            self.sent += 1;
            let batch_ends = self.sent.is_multiple_of(BATCH as u64);
            if window && (batch_ends || i + 1 == n) {
                self.apply_kept();
            }
            if window && batch_ends {
                self.filter.commit(|_| {});
                black_box(self.windows.advance(0, usize::MAX));
            }
        }
        readings
    }

    /// The kept readings enter their windows.
    fn apply_kept(&mut self) {
        for r in self.kept.iter() {
            self.windows.add(r, 0);
        }
        self.accepted += self.kept.len() as u64;
        self.kept.clear();
    }
}
