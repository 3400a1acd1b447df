//! Stream processing throughput: decode + contract + window, per payload format, with 10 and
//! 10,000 active streams. One thread, so the reported readings/s are per core.
//!
//! `cargo bench -p edgewise-agent --bench streams` (criterion; `thrpt` is readings/s, the
//! "elements" being readings). The workload is described in `common/mod.rs`. Baseline in the
//! same run: the decoder alone on the same messages (`<format>-decode-only`); what the contract
//! and the windows cost is the difference.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use common::{BATCH, Format, Run};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_filter_window");
    for streams in [10usize, 10_000] {
        for format in [Format::SenmlJson, Format::SenmlCbor, Format::PlainJson] {
            let per_iter = BATCH;
            group.throughput(Throughput::Elements(
                (per_iter * format.readings_per_message()) as u64,
            ));
            let mut run = Run::new(format, streams);
            // Warm every stream up so the windows are in their steady state.
            run.process(streams.max(BATCH) * 2, true);
            assert_eq!(run.windows.active_streams(), streams);
            assert_eq!(
                run.accepted as usize,
                streams.max(BATCH) * 2 * format.readings_per_message(),
                "every reading enters its window"
            );
            group.bench_function(BenchmarkId::new(format.name(), streams), |b| {
                b.iter(|| run.process(per_iter, true))
            });
            let mut base = Run::new(format, streams);
            group.bench_function(
                BenchmarkId::new(format!("{}-decode-only", format.name()), streams),
                |b| b.iter(|| base.process(per_iter, false)),
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
