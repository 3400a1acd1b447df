//! The `[inference]` table of the agent's TOML file.
//!
//! Every key has a default, and the defaults are the shipped anomaly model
//! (`models/anomaly/README.md`): its five features with their normalisation, its output column
//! and its threshold. Pointing `model_path` at another model means setting `features`, `score`
//! and `threshold` from that model's card too. [`InferenceConfig::problems`] reports what the
//! types cannot express; loading the model ([`super::Scorer::load`]) validates the rest.

use std::path::PathBuf;

use serde::Deserialize;

use crate::filter::RulePattern;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// The ONNX file. Replace it by an atomic rename (write next to it, then `mv`) to swap models.
    /// Default `/var/lib/edgewise/models/anomaly.onnx`.
    pub model_path: PathBuf,
    /// Name recorded in every score (`name@version`). Default: the file name without extension.
    pub model_name: Option<String>,
    /// When set, the model's single input must have this name. Default: any name.
    pub input_name: Option<String>,
    /// When set, the output that holds the score; default the model's first output.
    pub output_name: Option<String>,
    /// Streams this model scores (MQTT-style patterns, `+` one level, `#` the rest). Default `["#"]`.
    pub streams: Vec<String>,
    /// The model's input row, in order: a window feature and its normalisation
    /// `(x - offset) / scale`. Default: the anomaly model's five features.
    pub features: Vec<FeatureInput>,
    /// Which output column is the score. Default `{ column = 0 }`.
    pub score: ScoreFrom,
    /// A score `>=` this is an alert. Default 0.11 (the anomaly model's card).
    pub threshold: f64,
    /// Most summaries per model run. Default 64.
    pub batch_size: usize,
    /// Longest a summary waits in the inference worker for its batch to fill. Default 50.
    pub max_wait_ms: u64,
    /// How often the model file is checked for replacement; 0 turns watching off (reload by
    /// command only). Default 2000.
    pub watch_interval_ms: u64,
}

/// One model input column: a window feature and its normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureInput {
    pub feature: Feature,
    #[serde(default)]
    pub offset: f64,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

/// A number computed from a [`edgewise_protocol::WindowSummary`]. The same definitions are in
/// `models/tools/ewmodels.py` (`feature`), which the models were trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Count,
    Min,
    Max,
    Mean,
    Stddev,
    /// First value by event time.
    First,
    /// Last value by event time.
    Last,
    /// `max - min`.
    Range,
    /// `last - first`.
    Delta,
    /// `max(max - mean, mean - min)`: the largest distance of a reading from the mean.
    MaxDeviation,
    /// Readings per second of window: `count / window_seconds`.
    RateHz,
    /// Window length in seconds.
    WindowSeconds,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Count => "count",
            Feature::Min => "min",
            Feature::Max => "max",
            Feature::Mean => "mean",
            Feature::Stddev => "stddev",
            Feature::First => "first",
            Feature::Last => "last",
            Feature::Range => "range",
            Feature::Delta => "delta",
            Feature::MaxDeviation => "max_deviation",
            Feature::RateHz => "rate_hz",
            Feature::WindowSeconds => "window_seconds",
        }
    }
}

/// How the score is read from the model's `[batch, K]` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScoreFrom {
    /// `score = output[:, column]`, e.g. a sigmoid anomaly probability.
    Column(usize),
    /// `score = 1 - output[:, column]`, e.g. 1 - P(normal) of a softmax classifier.
    OneMinusColumn(usize),
}

impl ScoreFrom {
    pub fn column(self) -> usize {
        match self {
            ScoreFrom::Column(c) | ScoreFrom::OneMinusColumn(c) => c,
        }
    }

    pub fn apply(self, out: f32) -> f32 {
        match self {
            ScoreFrom::Column(_) => out,
            ScoreFrom::OneMinusColumn(_) => 1.0 - out,
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        // models/anomaly/metrics.json: offset and scale fitted on the training split.
        let f = |feature, offset, scale| FeatureInput {
            feature,
            offset,
            scale,
        };
        InferenceConfig {
            model_path: PathBuf::from("/var/lib/edgewise/models/anomaly.onnx"),
            model_name: None,
            input_name: None,
            output_name: None,
            streams: vec!["#".into()],
            features: vec![
                f(Feature::Mean, 22.66, 7.652),
                f(Feature::Stddev, 0.4519, 1.757),
                f(Feature::Range, 1.69, 8.523),
                f(Feature::Delta, 0.004904, 4.003),
                f(Feature::MaxDeviation, 0.9013, 6.798),
            ],
            score: ScoreFrom::Column(0),
            threshold: 0.11,
            batch_size: 64,
            max_wait_ms: 50,
            watch_interval_ms: 2000,
        }
    }
}

impl InferenceConfig {
    /// Problems the types cannot express, as `(key under [inference], message)`. The model file
    /// itself is checked by [`super::Scorer::load`] (which `check` should call too).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.features.is_empty() {
            out.push(("features".into(), "at least one feature is needed".into()));
        }
        for (i, f) in self.features.iter().enumerate() {
            if !f.offset.is_finite() {
                out.push((format!("features[{i}].offset"), "must be finite".into()));
            }
            if !f.scale.is_finite() || f.scale == 0.0 {
                out.push((
                    format!("features[{i}].scale"),
                    "must be finite and not 0".into(),
                ));
            }
        }
        if self.streams.is_empty() {
            out.push((
                "streams".into(),
                "at least one pattern is needed (`#` for all)".into(),
            ));
        }
        for (i, s) in self.streams.iter().enumerate() {
            if let Err(e) = RulePattern::parse(s) {
                out.push((format!("streams[{i}]"), e));
            }
        }
        if !self.threshold.is_finite() {
            out.push(("threshold".into(), "must be finite".into()));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            out.push(("batch_size".into(), "must be between 1 and 65536".into()));
        }
        if self.max_wait_ms > 60_000 {
            out.push(("max_wait_ms".into(), "must be at most 60000".into()));
        }
        let bad_name = |n: &String| n.is_empty() || n.len() > 200 || n.contains('@');
        if self.model_name.as_ref().is_some_and(bad_name) {
            out.push((
                "model_name".into(),
                "must be 1..=200 bytes without `@`".into(),
            ));
        }
        out
    }

    /// The name recorded in scores: `model_name`, or the file name without its extension.
    pub fn effective_model_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_table_and_rejects_unknown_keys() {
        let cfg: InferenceConfig = toml::from_str(
            r#"
            model_path = "models/fault/fault.onnx"
            streams = ["+/temperature"]
            features = [
              { feature = "mean", offset = 22.5, scale = 8.0 },
              { feature = "rate_hz" },
            ]
            score = { one_minus_column = 0 }
            threshold = 0.08
            batch_size = 256
            "#,
        )
        .unwrap();
        assert_eq!(cfg.features[1].scale, 1.0);
        assert_eq!(cfg.score, ScoreFrom::OneMinusColumn(0));
        assert_eq!(cfg.effective_model_name(), "fault");
        assert!(cfg.problems().is_empty());
        assert!(toml::from_str::<InferenceConfig>("modle_path = \"x\"").is_err());
        assert!(
            toml::from_str::<InferenceConfig>("features = [{ feature = \"median\" }]").is_err()
        );
    }

    #[test]
    fn problems_name_their_keys() {
        let cfg = InferenceConfig {
            features: vec![FeatureInput {
                feature: Feature::Mean,
                offset: f64::NAN,
                scale: 0.0,
            }],
            streams: vec!["a/#/b".into()],
            batch_size: 0,
            ..InferenceConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "features[0].offset",
                "features[0].scale",
                "streams[0]",
                "batch_size"
            ]
        );
        assert!(InferenceConfig::default().problems().is_empty());
    }
}
