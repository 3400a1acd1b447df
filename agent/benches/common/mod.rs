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
//! 1 s lateness) keep closing, and `Windows::advance` runs every 1,000 messages, as the
//! pipeline's batches do.

use std::hint::black_box;

pub mod cpu_time;

use edgewise_agent::decode::{DecodeLimits, PayloadDecoder, PayloadFormat, Value};
use edgewise_agent::filter::{Filter, FilterConfig};
use edgewise_agent::window::{Admission, WindowSpec, Windows};
use edgewise_protocol::Reading;
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

/// One message per stream: `(topic, payload)`.
fn messages(format: Format, streams: usize) -> Vec<(String, Vec<u8>)> {
    (0..streams)
        .map(|i| {
            let value = |k: usize| 20.0 + ((i * 7 + k * 3) % 50) as f64 / 10.0;
            let topic = format!("sensors/node-{i}/temperature");
            let payload = match format {
                Format::SenmlJson => {
                    let records: Vec<String> = (0..PACK)
                        .map(|k| {
                            let t = -((PACK - 1 - k) as f64) / 1000.0;
                            if k == 0 {
                                format!(
                                    r#"{{"bn":"node-{i}/","n":"temperature","u":"Cel","v":{},"t":{t}}}"#,
                                    value(k)
                                )
                            } else {
                                format!(r#"{{"n":"temperature","u":"Cel","v":{},"t":{t}}}"#, value(k))
                            }
                        })
                        .collect();
                    format!("[{}]", records.join(",")).into_bytes()
                }
                Format::SenmlCbor => {
                    let records: Vec<Record<'_>> = (0..PACK)
                        .map(|k| Record {
                            name: "temperature",
                            unit: Some("Cel"),
                            value: value(k),
                            time_offset_s: -((PACK - 1 - k) as f64) / 1000.0,
                        })
                        .collect();
                    let mut buf = [0u8; 1024];
                    let n = encode_pack(&format!("node-{i}/"), 0.0, &records, &mut buf)
                        .expect("a pack fits in 1 KiB");
                    buf[..n].to_vec()
                }
                Format::PlainJson => {
                    format!(r#"{{"value":{},"unit":"Cel"}}"#, value(0)).into_bytes()
                }
            };
            (topic, payload)
        })
        .collect()
}

/// Decodes, checks and windows messages, cycling over the streams, with event time advancing
/// one second per round of streams.
pub struct Run {
    messages: Vec<(String, Vec<u8>)>,
    format: PayloadFormat,
    decoder: PayloadDecoder,
    filter: Filter,
    pub windows: Windows,
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

    /// With `quantiles`, every window also keeps a DDSketch (1% error bound).
    pub fn with_quantiles(format: Format, streams: usize, quantiles: bool) -> Run {
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
            messages: messages(format, streams),
            format: format.payload_format(),
            decoder: PayloadDecoder::new(DecodeLimits::default()),
            filter,
            windows: Windows::new("bench", spec),
            accepted: 0,
            next: 0,
            sent: 0,
            base_ms: 1_700_000_000_000,
        }
    }

    fn now_ms(&self) -> i64 {
        self.base_ms + (self.sent * 1000 / self.messages.len() as u64) as i64
    }

    /// Processes `n` messages as the pipeline does (`Pipeline::prepare` and, per accepted
    /// reading, `Windows::add`): the zero-copy decoder, the contract on the borrowed reading, an
    /// owned `Reading` for each reading kept. With `window` false only decodes them (the
    /// baseline).
    pub fn process(&mut self, n: usize, window: bool) -> usize {
        let mut readings = 0;
        for _ in 0..n {
            let now = self.now_ms();
            let (topic, payload) = &self.messages[self.next];
            let (filter, windows, accepted) =
                (&mut self.filter, &mut self.windows, &mut self.accepted);
            let decoded = self
                .decoder
                .decode_each(topic, payload, self.format, now, |r| {
                    if !window {
                        black_box(&r);
                        return;
                    }
                    let Ok(kept) = filter.check(&r) else { return };
                    let Some(Value::Number(value)) = kept.value else {
                        return;
                    };
                    let reading = Reading {
                        stream: r.stream.to_owned(),
                        time_ms: r.time_ms,
                        value,
                        unit: kept.unit.map(str::to_owned),
                    };
                    if windows.admit(&reading) == Admission::Open {
                        windows.add(&reading, 0);
                        *accepted += 1;
                    }
                });
            readings += decoded.map_or(0, |d| d.readings);
            self.next = (self.next + 1) % self.messages.len();
            self.sent += 1;
            if window && self.sent % BATCH as u64 == 0 {
                self.filter.commit(|_| {});
                black_box(self.windows.advance(0));
            }
        }
        readings
    }
}
