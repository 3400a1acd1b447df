//! Stream processing throughput: decode + contract + window, per payload format, with 10 and
//! 10,000 active streams. One thread, measured in that thread's CPU time, so the figures are
//! readings/s per core even on a machine shared with other work (see `common/cpu_time.rs`).
//!
//! `cargo bench -p edgewise-agent --bench streams` (criterion; `thrpt` is Melem/cpu-s, the
//! elements being readings). The workload is described in `common/mod.rs`. Baseline in the
//! same run: the decoder alone on the same messages (`<format>-decode-only`); what the contract
//! and the windows cost is the difference. After criterion, a table prints each case's
//! readings/s per core against issue #4's targets with 10,000 streams (1,000,000/s for JSON,
//! 3,000,000/s for CBOR) and against its baseline.

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};

use common::cpu_time::{ThreadCpu, thread_cpu_time};
use common::{BATCH, Format, Run};

const FORMATS: [Format; 3] = [Format::SenmlJson, Format::SenmlCbor, Format::PlainJson];
const STREAMS: [usize; 2] = [10, 10_000];

/// A run with every stream warmed up, so the windows are in their steady state.
fn warm_run(format: Format, streams: usize) -> Run {
    let mut run = Run::new(format, streams);
    run.process(streams.max(BATCH) * 2, true);
    assert_eq!(run.windows.active_streams(), streams);
    assert_eq!(
        run.accepted as usize,
        streams.max(BATCH) * 2 * format.readings_per_message(),
        "every reading enters its window"
    );
    run
}

fn bench(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("decode_filter_window");
    for streams in STREAMS {
        for format in FORMATS {
            group.throughput(Throughput::Elements(
                (BATCH * format.readings_per_message()) as u64,
            ));
            let mut run = warm_run(format, streams);
            group.bench_function(BenchmarkId::new(format.name(), streams), |b| {
                b.iter(|| run.process(BATCH, true))
            });
            let mut base = Run::new(format, streams);
            group.bench_function(
                BenchmarkId::new(format!("{}-decode-only", format.name()), streams),
                |b| b.iter(|| base.process(BATCH, false)),
            );
        }
    }
    group.finish();
}

/// Readings per CPU second and per wall second of `run` for about `for_cpu` of CPU time.
fn rate(run: &mut Run, window: bool, for_cpu: Duration) -> (f64, f64) {
    let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
    let mut readings = 0;
    while thread_cpu_time() - cpu0 < for_cpu {
        readings += run.process(BATCH, window);
    }
    let cpu = (thread_cpu_time() - cpu0).as_secs_f64();
    let wall = wall0.elapsed().as_secs_f64();
    (readings as f64 / cpu, readings as f64 / wall)
}

fn summary(for_cpu: Duration) {
    println!(
        "\nreadings/s per core (thread CPU time; wall-clock rate in brackets), {} s of CPU per case",
        for_cpu.as_secs_f64()
    );
    println!(
        "{:<11} {:>7} | {:>24} | {:>12} {:>7} | {:>24} {:>6}",
        "format", "streams", "decode+contract+window", "target", "ratio", "decode only", "vs dec"
    );
    for streams in STREAMS {
        for format in FORMATS {
            let mut run = warm_run(format, streams);
            let (cpu, wall) = rate(&mut run, true, for_cpu);
            let (base_cpu, base_wall) = rate(&mut Run::new(format, streams), false, for_cpu);
            let target = match format {
                Format::SenmlCbor => 3_000_000.0,
                _ => 1_000_000.0,
            };
            let (target_text, ratio_text) = if streams == 10_000 {
                (format!("{target:.0}"), format!("{:.2}x", cpu / target))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "{:<11} {:>7} | {:>11.0} ({:>10.0}) | {:>12} {:>7} | {:>11.0} ({:>10.0}) {:>5.0}%",
                format.name(),
                streams,
                cpu,
                wall,
                target_text,
                ratio_text,
                base_cpu,
                base_wall,
                // The whole path's rate as a share of the decoder's alone.
                100.0 * cpu / base_cpu
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .with_measurement(ThreadCpu)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --bench streams` does not, and criterion
    // then runs each case once as a test. The table is for real runs only.
    if std::env::args().any(|a| a == "--bench") {
        summary(Duration::from_secs(2));
    }
}
