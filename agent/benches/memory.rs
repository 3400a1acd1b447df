//! Resident memory and allocations of decode + contract + window with 10,000 active streams.
//!
//! `cargo bench -p edgewise-agent --bench memory` (a plain binary, no criterion). Runs the
//! `common` workload (SenML CBOR, 10 readings per message) over 10,000 streams for 60 s of event
//! time (each stream's window closes 6 times), each message encoded when it is sent into one
//! reused buffer (an agent holds the message it decodes, not one per stream), then prints the
//! process's peak resident set (`VmHWM` from /proc/self/status) next to the baseline measured in
//! the same run before any stream existed (the binary and its allocator), and the heap
//! allocations per reading in the steady state (a counting global allocator). Target: peak under
//! 16 MiB. `EDGEWISE_BENCH_QUANTILES=1` adds a DDSketch per window. Exit status 1 if the peak is
//! over the target (a debug build, as `cargo test --bench memory` makes in CI, checks the peak
//! above its baseline instead), 2 where /proc is missing.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Format, Run};

const STREAMS: usize = 10_000;
const TARGET_KIB: u64 = 16 * 1024;

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `VmHWM` (peak) and `VmRSS` (now) in KiB.
fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let quantiles = std::env::var("EDGEWISE_BENCH_QUANTILES").is_ok_and(|v| v == "1");
    let mut run = Run::generated(Format::SenmlCbor, STREAMS, quantiles);
    let Some((base_peak, _)) = memory_kib() else {
        eprintln!("no /proc/self/status: cannot measure resident memory here");
        std::process::exit(2);
    };
    // 10 s of event time to reach the steady state, then 50 s counted.
    let mut readings = run.process(STREAMS * 10, true);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let counted = run.process(STREAMS * 50, true);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    readings += counted;
    let Some((peak, now)) = memory_kib() else {
        std::process::exit(2);
    };
    // Baseline (after the memory was read): the decoder alone on the same messages.
    let mut decode_only = Run::generated(Format::SenmlCbor, STREAMS, false);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let decoded = decode_only.process(STREAMS * 5, false);
    let decoder_allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "memory: {STREAMS} active streams, {readings} readings (SenML CBOR, quantiles {}): \
         peak RSS {:.1} MiB (now {:.1} MiB), baseline before any stream {:.1} MiB, target < {} MiB; \
         {:.2} heap allocations per reading in the steady state, of which the decoder alone \
         makes {:.2}",
        if quantiles { "on" } else { "off" },
        peak as f64 / 1024.0,
        now as f64 / 1024.0,
        base_peak as f64 / 1024.0,
        TARGET_KIB / 1024,
        allocations as f64 / counted as f64,
        decoder_allocations as f64 / decoded as f64,
    );
    assert_eq!(run.windows.active_streams(), STREAMS);
    assert_eq!(
        run.accepted, readings as u64,
        "every reading enters its window"
    );
    // A debug build's own pages are most of its resident set: there, what the streams add
    // over the baseline is checked instead.
    let checked = if cfg!(debug_assertions) {
        peak.saturating_sub(base_peak)
    } else {
        peak
    };
    if checked > TARGET_KIB {
        eprintln!(
            "over the target: {:.1} MiB{}",
            checked as f64 / 1024.0,
            if cfg!(debug_assertions) {
                " above the baseline"
            } else {
                ""
            }
        );
        std::process::exit(1);
    }
}
