//! tract in the agent, on the shipped models, at batch 1, 16, 64 and 256: latency per batch and
//! summaries per second. `models/bench.sh` runs this and the same measurement with onnxruntime
//! (`models/tools/bench_ort.py`) on the same inputs, and prints the ratio.
//!
//! Inputs: each model's `reference.json` input rows, repeated to the batch size (the same rows
//! the Python side uses). Timing: after a warm-up, repeated runs for about `--seconds` per case;
//! the figure is the median of 5 rounds of mean time per batch.
//!
//! `cargo bench -p edgewise-agent --bench infer -- [--seconds S] [--only MODEL:BATCH[:WHAT]]` prints
//! one line per case (`--only`: that case alone, for a profiler; WHAT: `tract`, `tract-sym` or
//! `tract-score`, default all three):
//! `tract <model> <batch> <microseconds per batch>` (a full batch: the scorer's fixed-batch
//! plan), `tract-sym ...` (the same rows through the symbolic-batch plan, which partial batches
//! use) and `tract-score ...` (`score()`: features + model + writing the scores into the
//! summaries).

use std::path::Path;
use std::time::{Duration, Instant};

use edgewise_agent::infer::{FeatureInput, InferenceConfig, ScoreFrom, Scorer};
use edgewise_protocol::WindowSummary;
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let only: Option<&str> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    for model in ["anomaly", "fault"] {
        let (cfg, rows, summaries) = setup(&models, model)?;
        for batch in BATCHES {
            let case = format!("{model}:{batch}");
            let runs = |what: &str| only.is_none_or(|o| o == case || o == format!("{case}:{what}"));
            if !["tract", "tract-sym", "tract-score"].into_iter().any(runs) {
                continue;
            }
            let mut scorer = Scorer::load(&InferenceConfig {
                batch_size: batch,
                ..cfg.clone()
            })?;
            let width = scorer.input_width();
            let input: Vec<f32> = rows.iter().cycle().take(batch).flatten().copied().collect();
            assert_eq!(input.len(), batch * width);
            if runs("tract") {
                let us = measure(seconds, || {
                    let out = scorer.run(&input).map(|o| o.len());
                    std::hint::black_box(out).ok();
                });
                println!("tract {model} {batch} {us:.3}");
            }
            // The same rows through the symbolic-batch plan (what a batch of any other size
            // uses, and what every batch used before the fixed-batch plan): a scorer configured
            // for one more row than it is given.
            let mut symbolic = Scorer::load(&InferenceConfig {
                batch_size: batch + 1,
                ..cfg.clone()
            })?;
            if runs("tract-sym") {
                let us = measure(seconds, || {
                    let out = symbolic.run(&input).map(|o| o.len());
                    std::hint::black_box(out).ok();
                });
                println!("tract-sym {model} {batch} {us:.3}");
            }
            let mut batch_of: Vec<WindowSummary> =
                summaries.iter().cycle().take(batch).cloned().collect();
            if runs("tract-score") {
                let us = measure(seconds, || {
                    let r = scorer.score(&mut batch_of);
                    std::hint::black_box(r.scored);
                });
                println!("tract-score {model} {batch} {us:.3}");
            }
        }
    }
    Ok(())
}

/// Median over 5 rounds of the mean microseconds per call.
fn measure(seconds: f64, mut f: impl FnMut()) -> f64 {
    let round = Duration::from_secs_f64(seconds / 5.0);
    let warm = Instant::now();
    while warm.elapsed() < round / 2 {
        f();
    }
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < round {
                for _ in 0..16 {
                    f();
                }
                n += 16;
            }
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

/// The batch sizes measured here and by `models/tools/bench_ort.py`.
const BATCHES: [usize; 4] = [1, 16, 64, 256];

type Setup = (InferenceConfig, Vec<Vec<f32>>, Vec<WindowSummary>);

fn setup(models: &Path, model: &str) -> Result<Setup, Box<dyn std::error::Error>> {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(
        models.join(model).join("reference.json"),
    )?)?;
    let nums = |v: &Value| -> Vec<f64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (offset, scale) = (nums(&r["offset"]), nums(&r["scale"]));
    let mut features = Vec::new();
    for (i, name) in r["features"].as_array().into_iter().flatten().enumerate() {
        features.push(FeatureInput {
            feature: serde_json::from_value(name.clone())?,
            offset: offset[i],
            scale: scale[i],
        });
    }
    let cfg = InferenceConfig {
        model_path: models.join(model).join(r["model"].as_str().unwrap_or("")),
        features,
        score: if model == "fault" {
            ScoreFrom::OneMinusColumn(0)
        } else {
            ScoreFrom::Column(0)
        },
        watch_interval_ms: 0,
        ..InferenceConfig::default()
    };
    let rows = r["inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| nums(row).into_iter().map(|x| x as f32).collect())
        .collect();
    let summaries = r["summaries"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, s)| {
            let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
            let start = i as i64 * 60_000;
            let end = start + s["window_ms"].as_i64().unwrap_or(1000);
            WindowSummary {
                agent_id: "bench".into(),
                stream: format!("n{i}/temperature"),
                window_start_ms: start,
                window_end_ms: end,
                revision: 0,
                count: s["count"].as_u64().unwrap_or(1),
                min: f("min"),
                max: f("max"),
                mean: f("mean"),
                stddev: f("stddev"),
                first_value: f("first_value"),
                first_time_ms: start,
                last_value: f("last_value"),
                last_time_ms: end - 1,
                unit: None,
                score: None,
                quantiles: None,
            }
        })
        .collect();
    Ok((cfg, rows, summaries))
}
