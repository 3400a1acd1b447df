//! The inference stage against real models: tract's outputs vs the onnxruntime reference vectors
//! in `models/*/reference.json`, clear errors for bad models and bad inputs, and model swaps.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgewise_agent::infer::{
    Feature, FeatureInput, InferenceConfig, InferenceError, InferenceWorker, ScoreFrom, Scorer,
    SwappableScorer, features,
};
use edgewise_protocol::WindowSummary;
use serde_json::Value;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn reference(model: &str) -> Value {
    let path = models_dir().join(model).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn feature(name: &str) -> Feature {
    serde_json::from_value(Value::String(name.into())).unwrap()
}

/// The config the model card prescribes, read from the reference file.
fn config_for(model: &str) -> InferenceConfig {
    let r = reference(model);
    let names = r["features"].as_array().unwrap();
    let (offset, scale) = (floats(&r["offset"]), floats(&r["scale"]));
    InferenceConfig {
        model_path: models_dir().join(model).join(r["model"].as_str().unwrap()),
        features: names
            .iter()
            .enumerate()
            .map(|(i, n)| FeatureInput {
                feature: feature(n.as_str().unwrap()),
                offset: offset[i],
                scale: scale[i],
            })
            .collect(),
        score: if model == "fault" {
            ScoreFrom::OneMinusColumn(0)
        } else {
            ScoreFrom::Column(0)
        },
        threshold: 0.5,
        watch_interval_ms: 0,
        ..InferenceConfig::default()
    }
}

fn summary_from(v: &Value, i: usize) -> WindowSummary {
    let f = |k: &str| v[k].as_f64().unwrap();
    let start = 1_700_000_000_000 + i as i64 * 60_000;
    let end = start + v["window_ms"].as_i64().unwrap();
    WindowSummary {
        agent_id: "gw".into(),
        stream: format!("n{i}/temperature"),
        window_start_ms: start,
        window_end_ms: end,
        revision: 0,
        count: v["count"].as_u64().unwrap(),
        min: f("min"),
        max: f("max"),
        mean: f("mean"),
        stddev: f("stddev"),
        first_value: f("first_value"),
        first_time_ms: start,
        last_value: f("last_value"),
        last_time_ms: end - 1,
        unit: Some("Cel".into()),
        score: None,
        quantiles: None,
    }
}

fn reference_summaries(model: &str) -> Vec<WindowSummary> {
    let r = reference(model);
    r["summaries"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, s)| summary_from(s, i))
        .collect()
}

/// Tolerance: 1e-5 absolute, stated in each reference.json (`tolerance_abs`). Both runtimes
/// compute in f32 with different summation orders; outputs are probabilities in [0, 1].
fn check_reference(model: &str) {
    let r = reference(model);
    let tol = r["tolerance_abs"].as_f64().unwrap();
    let cfg = config_for(model);
    let mut scorer = Scorer::load(&cfg).unwrap();
    assert_eq!(
        scorer.model_id(),
        format!("{model}@{}", r["version"].as_str().unwrap()),
        "the version is the SHA-256 prefix of the file onnxruntime ran"
    );

    // 1. The model alone, on the reference inputs. A scorer runs a batch of exactly
    // `batch_size` rows with its fixed-batch plan and any other count with its symbolic-batch
    // plan: check both, for every batch size the agent is configured with here (the rows
    // repeated to fill the batch), the reference batch itself, and one row at a time.
    let inputs: Vec<Vec<f64>> = r["inputs"].as_array().unwrap().iter().map(floats).collect();
    let expected: Vec<Vec<f64>> = r["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let row_f32 = |row: &Vec<f64>| row.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    // Largest difference of `out` (rows `first..`, K per row) from the reference outputs.
    let diff = |out: &[f32], k: usize, first: usize, rows: usize| -> f64 {
        assert_eq!(out.len(), rows * k);
        let mut worst = 0.0f64;
        for row in 0..rows {
            for (c, &w) in expected[(first + row) % expected.len()].iter().enumerate() {
                worst = worst.max((out[row * k + c] as f64 - w).abs());
            }
        }
        worst
    };
    let mut worst = 0.0f64;
    for batch_size in [1, 16, inputs.len(), 64, 256] {
        let mut scorer = Scorer::load(&InferenceConfig {
            batch_size,
            ..cfg.clone()
        })
        .unwrap();
        let k = scorer.output_width();
        let full: Vec<f32> = inputs
            .iter()
            .cycle()
            .take(batch_size)
            .flat_map(row_f32)
            .collect();
        worst = worst.max(diff(&scorer.run(&full).unwrap(), k, 0, batch_size));
        let all: Vec<f32> = inputs.iter().flat_map(row_f32).collect();
        worst = worst.max(diff(&scorer.run(&all).unwrap(), k, 0, inputs.len()));
        for (row, input) in inputs.iter().enumerate() {
            worst = worst.max(diff(&scorer.run(&row_f32(input)).unwrap(), k, row, 1));
        }
    }
    eprintln!("{model}: max |tract - onnxruntime| = {worst:e} (tolerance {tol:e})");
    assert!(
        worst <= tol,
        "{model}: max |tract - onnxruntime| = {worst:e} > {tol:e}"
    );

    // 2. From raw summaries: the agent's feature mapping gives exactly the reference inputs.
    let mut summaries = reference_summaries(model);
    for (s, want) in summaries.iter().zip(&inputs) {
        let mut row = Vec::new();
        features::push_row(&cfg.features, s, &mut row).unwrap();
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_eq!(
            row, want,
            "{model}: feature mapping differs from ewmodels.py"
        );
    }
    let report = scorer.score(&mut summaries);
    assert_eq!(report.scored, summaries.len());
    for (s, want) in summaries.iter().zip(&expected) {
        let score = s.score.as_ref().unwrap();
        let want = match cfg.score {
            ScoreFrom::Column(c) => want[c],
            ScoreFrom::OneMinusColumn(c) => 1.0 - want[c],
        };
        assert!(
            (score.value - want).abs() <= tol,
            "{} vs {want}",
            score.value
        );
        assert_eq!(score.alert, score.value >= cfg.threshold);
        assert_eq!(score.model, scorer.model_id());
    }
}

#[test]
fn anomaly_model_matches_onnxruntime_reference() {
    check_reference("anomaly");
}

#[test]
fn fault_model_matches_onnxruntime_reference() {
    check_reference("fault");
}

#[test]
fn default_config_is_the_anomaly_model_card() {
    // The defaults in InferenceConfig must be the shipped model's normalisation.
    let card = config_for("anomaly");
    let default = InferenceConfig::default();
    assert_eq!(default.features, card.features);
    let metrics: Value = serde_json::from_str(
        &std::fs::read_to_string(models_dir().join("anomaly/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(default.threshold, metrics["threshold"].as_f64().unwrap());
}

#[test]
fn batches_larger_than_batch_size_are_split_and_all_scored() {
    let mut cfg = config_for("anomaly");
    cfg.batch_size = 5;
    let mut scorer = Scorer::load(&cfg).unwrap();
    let mut many: Vec<WindowSummary> = reference_summaries("anomaly");
    let mut single = many.clone();
    let report = scorer.score(&mut many);
    assert_eq!((report.scored, report.failed), (24, 0));
    cfg.batch_size = 256;
    Scorer::load(&cfg).unwrap().score(&mut single);
    for (a, b) in many.iter().zip(&single) {
        let (a, b) = (a.score.as_ref().unwrap(), b.score.as_ref().unwrap());
        assert!((a.value - b.value).abs() < 1e-6);
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let cfg = InferenceConfig {
        model_path: "/nonexistent/anomaly.onnx".into(),
        ..config_for("anomaly")
    };
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(matches!(err, InferenceError::ReadModel { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/anomaly.onnx"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_onnx_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    for junk in [
        &b""[..],
        b"definitely not protobuf \xff\xff\xff",
        &[0x0a; 64],
    ] {
        std::fs::write(&path, junk).unwrap();
        let cfg = InferenceConfig {
            model_path: path.clone(),
            ..config_for("anomaly")
        };
        let err = Scorer::load(&cfg).err().unwrap();
        assert!(
            matches!(
                err,
                InferenceError::ParseModel { .. }
                    | InferenceError::InputCount { .. }
                    | InferenceError::Tract { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("m.onnx"), "{err}");
    }
}

#[test]
fn wrong_feature_count_is_refused_with_both_shapes_named() {
    let mut cfg = config_for("anomaly");
    cfg.features.push(FeatureInput {
        feature: Feature::Count,
        offset: 0.0,
        scale: 1.0,
    });
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(matches!(err, InferenceError::InputShape { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("features") && text.contains("[batch, 6]"),
        "{text}"
    );
    // The fault model (7 features) under the anomaly model's 5-feature config.
    let cfg = InferenceConfig {
        model_path: config_for("fault").model_path,
        ..config_for("anomaly")
    };
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(matches!(err, InferenceError::InputShape { .. }), "{err}");
}

#[test]
fn wrong_input_or_output_names_and_columns_are_refused() {
    let mut cfg = config_for("anomaly");
    cfg.input_name = Some("window_features".into());
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(
        err.to_string().contains("named `features`")
            && err.to_string().contains("`window_features`"),
        "{err}"
    );
    cfg.input_name = Some("features".into());
    cfg.output_name = Some("probs".into());
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(matches!(err, InferenceError::OutputName { .. }), "{err}");
    cfg.output_name = Some("anomaly_score".into());
    Scorer::load(&cfg).unwrap();
    cfg.score = ScoreFrom::Column(1); // the output is [batch, 1]
    let err = Scorer::load(&cfg).err().unwrap();
    assert!(matches!(err, InferenceError::OutputShape { .. }), "{err}");
}

#[test]
fn non_finite_features_leave_that_summary_unscored_and_are_reported() {
    let mut scorer = Scorer::load(&config_for("anomaly")).unwrap();
    let mut summaries = reference_summaries("anomaly");
    summaries[3].stddev = f64::NAN;
    summaries[7].mean = f64::INFINITY;
    let report = scorer.score(&mut summaries);
    assert_eq!(report.scored, 22);
    assert_eq!(report.invalid_features, 2);
    assert!(summaries[3].score.is_none() && summaries[7].score.is_none());
    assert!(summaries[4].score.is_some());
    let err = report.first_error.unwrap().to_string();
    assert!(
        err.contains("`stddev` of n3/temperature is not finite"),
        "{err}"
    );
    // Raw runs refuse NaN and ragged input instead of passing them to the model.
    let err = scorer.run(&[0.0, 0.0, f32::NAN, 0.0, 0.0]).unwrap_err();
    assert!(
        matches!(err, InferenceError::NonFiniteFeature { .. }),
        "{err}"
    );
    let err = scorer.run(&[0.0; 7]).unwrap_err();
    assert!(
        matches!(err, InferenceError::InputLength { len: 7, width: 5 }),
        "{err}"
    );
    assert!(scorer.run(&[]).is_err());
}

#[test]
fn streams_outside_the_patterns_are_left_alone() {
    let mut cfg = config_for("anomaly");
    cfg.streams = vec!["+/temperature".into()];
    let mut scorer = Scorer::load(&cfg).unwrap();
    let mut summaries = reference_summaries("anomaly");
    summaries[0].stream = "n0/humidity".into();
    let report = scorer.score(&mut summaries);
    assert_eq!((report.scored, report.not_matched), (23, 1));
    assert!(summaries[0].score.is_none());
}

/// The same model with one extra unknown protobuf field appended (field 1000, varint 1):
/// identical weights, different bytes, so a different version.
fn new_version_of(model: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(model).unwrap();
    bytes.extend_from_slice(&[0xc0, 0x3e, 0x01]);
    bytes
}

/// Writes `bytes` next to `target`, then renames it over `target` (how operators deploy).
fn install(target: &Path, bytes: &[u8]) {
    let tmp = target.with_extension("onnx.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, target).unwrap();
}

fn wait_for_model(scorer: &mut SwappableScorer, not: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while scorer.model_id() == not && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    scorer.model_id().to_string()
}

#[test]
fn a_renamed_in_model_is_swapped_in_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("anomaly.onnx");
    let original = config_for("anomaly").model_path;
    std::fs::copy(&original, &live).unwrap();
    let cfg = InferenceConfig {
        model_path: live.clone(),
        watch_interval_ms: 20,
        ..config_for("anomaly")
    };
    let mut scorer = SwappableScorer::start(cfg).unwrap();
    let v1 = scorer.model_id().to_string();
    let mut before = reference_summaries("anomaly");
    scorer.score(&mut before);

    // A good model, renamed into place, is picked up by the watcher.
    install(&live, &new_version_of(&original));
    let v2 = wait_for_model(&mut scorer, &v1);
    assert_ne!(v2, v1);
    assert!(v2.starts_with("anomaly@"));
    let mut after = reference_summaries("anomaly");
    scorer.score(&mut after);
    for (a, b) in before.iter().zip(&after) {
        let (a, b) = (a.score.as_ref().unwrap(), b.score.as_ref().unwrap());
        assert_eq!(a.value, b.value, "same weights, same scores");
        assert_eq!(
            (a.model.as_str(), b.model.as_str()),
            (v1.as_str(), v2.as_str())
        );
    }

    // A broken file and a model with the wrong input shape are refused; v2 keeps scoring.
    install(&live, b"half-written junk");
    std::thread::sleep(Duration::from_millis(300));
    let reload = scorer.reload_handle();
    let err = reload.reload().unwrap_err();
    assert!(err.to_string().contains("anomaly.onnx"), "{err}");
    install(
        &live,
        &std::fs::read(config_for("fault").model_path).unwrap(),
    );
    let err = reload.reload().unwrap_err();
    assert!(matches!(err, InferenceError::InputShape { .. }), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(scorer.model_id(), v2);
    let mut still = reference_summaries("anomaly");
    assert_eq!(scorer.score(&mut still).scored, 24);
    assert_eq!(still[0].score.as_ref().unwrap().model, v2);

    // A deleted file is not a reason to stop scoring either.
    std::fs::remove_file(&live).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(scorer.model_id(), v2);

    // The reload command installs a good model without waiting for the watcher.
    std::fs::copy(&original, &live).unwrap();
    assert_eq!(reload.reload().unwrap(), v1);
    assert_eq!(scorer.model_id(), v1);
}

#[test]
fn the_reload_command_works_with_watching_off() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("anomaly.onnx");
    let original = config_for("anomaly").model_path;
    std::fs::copy(&original, &live).unwrap();
    let cfg = InferenceConfig {
        model_path: live.clone(),
        watch_interval_ms: 0,
        ..config_for("anomaly")
    };
    let mut scorer = SwappableScorer::start(cfg).unwrap();
    let v1 = scorer.model_id().to_string();
    install(&live, &new_version_of(&original));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        scorer.model_id(),
        v1,
        "no watching: nothing changes by itself"
    );
    let v2 = scorer.reload_handle().reload().unwrap();
    assert_eq!(scorer.model_id(), v2);
    assert_ne!(v1, v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_batches_requests_from_async_callers() {
    let cfg = InferenceConfig {
        batch_size: 48,
        max_wait_ms: 200,
        ..config_for("anomaly")
    };
    let scorer = SwappableScorer::start(cfg).unwrap();
    let worker = std::sync::Arc::new(
        InferenceWorker::spawn(scorer, 48, Duration::from_millis(200)).unwrap(),
    );
    let a = reference_summaries("anomaly");
    let mut b = reference_summaries("anomaly");
    b.reverse();
    let (ra, rb) = tokio::join!(worker.score(a.clone()), worker.score(b.clone()));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.len(), 24);
    assert_eq!(rb.len(), 24);
    // Each caller gets its own summaries back, in its order, scored.
    for (got, sent) in ra.iter().zip(&a).chain(rb.iter().zip(&b)) {
        assert_eq!(got.stream, sent.stream);
        assert!(got.score.is_some());
    }
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(worker.stats().scored.load(Relaxed), 48);
    assert_eq!(
        worker.stats().model_runs.load(Relaxed),
        1,
        "both requests fit one batch within max_wait"
    );
}

#[test]
fn closed_windows_are_scored_in_place_as_the_pipeline_does() {
    use edgewise_agent::window::ClosedWindow;
    let mut closed: Vec<ClosedWindow> = reference_summaries("anomaly")
        .into_iter()
        .map(ClosedWindow::final_window)
        .collect();
    let mut scorer = SwappableScorer::start(config_for("anomaly")).unwrap();
    let report = scorer.score_each(closed.iter_mut().map(|c| &mut c.summary));
    assert_eq!((report.scored, report.failed), (24, 0));
    let alerts = closed.iter().filter(|c| c.summary.is_alert()).count();
    assert_eq!(alerts, report.alerts);
    assert!(
        alerts > 0 && alerts < 24,
        "the reference windows hold both kinds"
    );
}
