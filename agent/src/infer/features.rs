//! Pure: window summaries -> rows of normalised `f32` model inputs.
//!
//! Each value is computed in `f64` from the summary, normalised `(x - offset) / scale` in `f64`,
//! then rounded once to `f32`: exactly what `models/tools/ewmodels.py` did to make the training
//! data and the reference inputs, so the reference tests cover this mapping bit for bit.

use edgewise_protocol::WindowSummary;

use super::InferenceError;
use super::config::{Feature, FeatureInput};

/// The raw (unnormalised) value of one feature.
pub fn raw(feature: Feature, s: &WindowSummary) -> f64 {
    let seconds = (s.window_end_ms - s.window_start_ms) as f64 / 1000.0;
    match feature {
        Feature::Count => s.count as f64,
        Feature::Min => s.min,
        Feature::Max => s.max,
        Feature::Mean => s.mean,
        Feature::Stddev => s.stddev,
        Feature::First => s.first_value,
        Feature::Last => s.last_value,
        Feature::Range => s.max - s.min,
        Feature::Delta => s.last_value - s.first_value,
        Feature::MaxDeviation => (s.max - s.mean).max(s.mean - s.min),
        Feature::RateHz => s.count as f64 / seconds,
        Feature::WindowSeconds => seconds,
    }
}

/// Appends one row of normalised features for `s` to `out`. On a non-finite value nothing is
/// appended and the error names the feature.
pub fn push_row(
    inputs: &[FeatureInput],
    s: &WindowSummary,
    out: &mut Vec<f32>,
) -> Result<(), InferenceError> {
    let start = out.len();
    for input in inputs {
        let x = (raw(input.feature, s) - input.offset) / input.scale;
        let v = x as f32;
        if !v.is_finite() {
            out.truncate(start);
            return Err(InferenceError::NonFiniteFeature {
                stream: s.stream.clone(),
                feature: input.feature.name(),
                value: x,
            });
        }
        out.push(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> WindowSummary {
        WindowSummary {
            agent_id: "gw".into(),
            stream: "n1/temperature".into(),
            window_start_ms: 0,
            window_end_ms: 10_000,
            revision: 0,
            count: 20,
            min: 20.0,
            max: 26.0,
            mean: 21.0,
            stddev: 1.5,
            first_value: 20.5,
            first_time_ms: 100,
            last_value: 22.0,
            last_time_ms: 9_900,
            unit: None,
            score: None,
            quantiles: None,
        }
    }

    #[test]
    fn derived_features_follow_their_definitions() {
        let s = summary();
        assert_eq!(raw(Feature::Range, &s), 6.0);
        assert_eq!(raw(Feature::Delta, &s), 1.5);
        assert_eq!(raw(Feature::MaxDeviation, &s), 5.0);
        assert_eq!(raw(Feature::RateHz, &s), 2.0);
        assert_eq!(raw(Feature::WindowSeconds, &s), 10.0);
        assert_eq!(raw(Feature::Count, &s), 20.0);
    }

    #[test]
    fn rows_are_normalised_and_non_finite_values_are_refused_whole() {
        let inputs = [
            FeatureInput {
                feature: Feature::Mean,
                offset: 20.0,
                scale: 2.0,
            },
            FeatureInput {
                feature: Feature::Stddev,
                offset: 0.0,
                scale: 1.0,
            },
        ];
        let mut out = vec![9.0];
        push_row(&inputs, &summary(), &mut out).unwrap();
        assert_eq!(out, [9.0, 0.5, 1.5]);
        let mut bad = summary();
        bad.stddev = f64::NAN;
        let err = push_row(&inputs, &bad, &mut out).unwrap_err();
        assert!(
            err.to_string().contains("`stddev` of n1/temperature"),
            "{err}"
        );
        assert_eq!(out, [9.0, 0.5, 1.5]);
        // Finite in f64 but not in f32 is refused too.
        let mut huge = summary();
        huge.mean = 1e300;
        assert!(push_row(&inputs, &huge, &mut out).is_err());
    }
}
