//! Decode + data-contract throughput per payload format, with 10 and 10,000 streams:
//! `cargo bench -p edgewise-agent --bench decode_filter`.
//!
//! Each case runs the agent's hot path on pre-built messages: [`PayloadDecoder::decode_each`]
//! (borrowed names, no per-reading allocation) and [`Filter::check`] against realistic contracts
//! (expected unit with a conversion, range, deadband, rate limit), with [`Filter::commit`] once
//! per 1,000 messages as the pipeline does per batch. Single-threaded, so criterion's `thrpt`
//! (elements = readings) is readings/s per core. The baseline measured in the same run is the
//! owned [`decode`] (a `String` per stream name and unit per reading, no contracts): the ratio
//! shows what the borrowed path and the contracts cost or save on this machine.
//!
//! After the criterion groups, a summary line per case prints readings/s per core and the ratio
//! to the baseline.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edgewise_agent::decode::{DecodeLimits, PayloadDecoder, PayloadFormat, decode};
use edgewise_agent::filter::{Filter, FilterConfig};
use edgewise_protocol::Reading;
use edgewise_protocol::senml::{Record, encode_pack};

/// Readings per SenML message (the firmware sends 6 samples per message).
const PER_PACK: usize = 6;
const MESSAGES: usize = 10_000;
const BATCH: usize = 1_000;
const T0_S: f64 = 1_700_000_000.0;

#[derive(Clone, Copy, Debug)]
enum Format {
    SenmlJson,
    SenmlCbor,
    PlainJson,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::SenmlJson => "senml_json",
            Format::SenmlCbor => "senml_cbor",
            Format::PlainJson => "plain_json",
        }
    }

    fn setting(self) -> PayloadFormat {
        match self {
            Format::SenmlJson => PayloadFormat::SenmlJson,
            Format::SenmlCbor => PayloadFormat::SenmlCbor,
            Format::PlainJson => PayloadFormat::PlainJson,
        }
    }
}

struct Message {
    topic: String,
    payload: Vec<u8>,
}

/// `MESSAGES` messages round-robin over `streams` streams `node-<i>/temperature`; every fifth
/// stream reports in kelvin (converted by the contract).
fn messages(format: Format, streams: usize) -> (Vec<Message>, usize) {
    let mut out = Vec::with_capacity(MESSAGES);
    let mut readings = 0;
    for m in 0..MESSAGES {
        let node = m % streams;
        let round = (m / streams) as f64;
        let kelvin = node.is_multiple_of(5);
        let value = |k: usize| {
            let c = 20.0 + ((m * PER_PACK + k) % 11) as f64 * 0.37;
            if kelvin { c + 273.15 } else { c }
        };
        let unit = if kelvin { "K" } else { "Cel" };
        let topic = format!("sensors/node-{node}/temperature");
        let payload = match format {
            Format::PlainJson => {
                readings += 1;
                let ts = ((T0_S + round) * 1000.0) as i64;
                format!(r#"{{"value":{:.2},"ts":{ts},"unit":"{unit}"}}"#, value(0)).into_bytes()
            }
            Format::SenmlCbor => {
                readings += PER_PACK;
                let values: Vec<f64> = (0..PER_PACK).map(value).collect();
                let records: Vec<Record<'_>> = values
                    .iter()
                    .enumerate()
                    .map(|(k, v)| Record {
                        name: "temperature",
                        unit: Some(unit),
                        value: *v,
                        time_offset_s: k as f64 * 0.1,
                    })
                    .collect();
                let mut buf = vec![0u8; 1024];
                let n = encode_pack(&format!("node-{node}/"), T0_S + round, &records, &mut buf)
                    .expect("a pack fits in 1 KiB");
                buf.truncate(n);
                buf
            }
            Format::SenmlJson => {
                readings += PER_PACK;
                let mut s = format!(
                    r#"[{{"bn":"node-{node}/","bt":{:.1},"bu":"{unit}","n":"temperature","v":{:.2}}}"#,
                    T0_S + round,
                    value(0)
                );
                for k in 1..PER_PACK {
                    s.push_str(&format!(
                        r#",{{"n":"temperature","t":{:.1},"v":{:.2}}}"#,
                        k as f64 * 0.1,
                        value(k)
                    ));
                }
                s.push(']');
                s.into_bytes()
            }
        };
        out.push(Message { topic, payload });
    }
    (out, readings)
}

fn contracts() -> Vec<FilterConfig> {
    vec![
        FilterConfig {
            stream: "+/humidity".into(),
            min: Some(0.0),
            max: Some(100.0),
            ..FilterConfig::default()
        },
        FilterConfig {
            stream: "+/temperature".into(),
            unit: Some("Cel".into()),
            min: Some(-40.0),
            max: Some(85.0),
            deadband: Some(0.05),
            max_rate_per_second: Some(1e9),
            ..FilterConfig::default()
        }
        .with_conversion("K", 1.0, -273.15),
    ]
}

/// The hot path over all messages; returns readings kept (so nothing is optimised away).
fn decode_and_filter(
    msgs: &[Message],
    format: PayloadFormat,
    decoder: &mut PayloadDecoder,
    filter: &mut Filter,
) -> usize {
    let mut kept = 0;
    let mut rejected = 0;
    for batch in msgs.chunks(BATCH) {
        for m in batch {
            let _ = decoder.decode_each(&m.topic, &m.payload, format, 0, |r| {
                if let Ok(k) = filter.check(&r) {
                    black_box(k);
                    kept += 1;
                }
            });
        }
        filter.commit(|_| rejected += 1);
    }
    black_box(rejected);
    kept
}

fn owned_decode(msgs: &[Message], format: PayloadFormat, out: &mut Vec<Reading>) -> usize {
    let limits = DecodeLimits::default();
    let mut n = 0;
    for m in msgs {
        out.clear();
        let _ = decode(&m.topic, &m.payload, format, &limits, 0, out);
        n += out.len();
    }
    n
}

fn bench(c: &mut Criterion) {
    let mut summary = Vec::new();
    for format in [Format::SenmlJson, Format::SenmlCbor, Format::PlainJson] {
        for streams in [10, 10_000] {
            let (msgs, readings) = messages(format, streams);
            let setting = format.setting();
            let mut group = c.benchmark_group(format!("{}/{streams}_streams", format.name()));
            group.throughput(Throughput::Elements(readings as u64));
            group.sample_size(10);
            let mut decoder = PayloadDecoder::new(DecodeLimits::default());
            let mut filter =
                Filter::build(&contracts(), Filter::DEFAULT_MAX_STREAMS).expect("valid contracts");
            let kept = decode_and_filter(&msgs, setting, &mut decoder, &mut filter);
            assert!(kept > readings / 2, "only {kept} of {readings} kept");
            group.bench_function("decode+filter", |b| {
                b.iter(|| decode_and_filter(&msgs, setting, &mut decoder, &mut filter))
            });
            let mut out = Vec::new();
            group.bench_function("baseline: owned decode", |b| {
                b.iter(|| owned_decode(&msgs, setting, &mut out))
            });
            group.finish();

            // The summary line: best of 5 whole passes each.
            let best = |f: &mut dyn FnMut() -> usize| {
                (0..5)
                    .map(|_| {
                        let t = Instant::now();
                        black_box(f());
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let hot = best(&mut || decode_and_filter(&msgs, setting, &mut decoder, &mut filter));
            let base = best(&mut || owned_decode(&msgs, setting, &mut out));
            summary.push(format!(
                "{:<11} {streams:>6} streams: decode+filter {:>6.2} M readings/s/core, \
                 owned decode (baseline) {:>6.2} M/s, ratio {:.2}",
                format.name(),
                readings as f64 / hot / 1e6,
                readings as f64 / base / 1e6,
                base / hot
            ));
        }
    }
    println!("\nreadings/s per core (single thread, best of 5 passes over {MESSAGES} messages):");
    for line in summary {
        println!("  {line}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
