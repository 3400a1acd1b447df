//! Where a node's metric values come from: the [`ValueSource`] trait and the synthetic
//! [`Waveform`] source.
//!
//! A hardware driver (an I2C sensor) implements [`ValueSource`] with its bus error as
//! `Self::Error`; the simulator and the host tests use [`Waveform`], a deterministic signal:
//! baseline + sine + uniform noise from a per-source [`SplitMix64`]. Invariants: the same config,
//! seed and sequence of `now_ms` give the same values on every target; a waveform never leaves
//! `baseline ± (amplitude + noise)`.
//!
//! `core` has no `sin` without `std`, so this module carries its own (Taylor series after range
//! reduction, error below 1e-7). Tested below: sine accuracy, determinism, bounds.

use crate::prng::{SplitMix64, mix};

/// Something that can be sampled for one metric value (a sensor, or a synthetic signal).
pub trait ValueSource {
    type Error: core::fmt::Debug + core::fmt::Display;

    /// Read the metric at `now_ms` (milliseconds since the Unix epoch, event time).
    fn sample(&mut self, now_ms: i64) -> Result<f64, Self::Error>;
}

/// Shape of a synthetic signal, in the metric's unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WaveformConfig {
    pub baseline: f64,
    pub amplitude: f64,
    /// Period of the sine; at least 1.
    pub period_ms: i64,
    /// Half-width of the uniform noise added to each sample.
    pub noise: f64,
}

impl WaveformConfig {
    /// Air temperature in `Cel`: 22.5 ± 6 (sine, 10 minute period) ± 0.5 noise, inside 15..30.
    pub const TEMPERATURE: Self = Self {
        baseline: 22.5,
        amplitude: 6.0,
        period_ms: 600_000,
        noise: 0.5,
    };
    /// Relative humidity in `%RH`: 50 ± 15 (sine, 15 minute period) ± 2 noise, inside 30..70.
    pub const HUMIDITY: Self = Self {
        baseline: 50.0,
        amplitude: 15.0,
        period_ms: 900_000,
        noise: 2.0,
    };

    /// The interval every sample of this waveform falls in.
    pub fn bounds(&self) -> (f64, f64) {
        let spread = self.amplitude.abs() + self.noise.abs();
        (self.baseline - spread, self.baseline + spread)
    }
}

/// A deterministic synthetic signal: `baseline + amplitude * sin(phase(t)) + noise`.
///
/// The seed picks both the phase offset (so nodes are not in lockstep) and the noise sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Waveform {
    config: WaveformConfig,
    phase_ms: i64,
    rng: SplitMix64,
}

impl Waveform {
    pub fn new(config: WaveformConfig, seed: u64) -> Self {
        let period_ms = config.period_ms.max(1);
        let phase_ms = (mix(seed) % period_ms as u64) as i64;
        Self {
            config: WaveformConfig {
                period_ms,
                ..config
            },
            phase_ms,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn config(&self) -> &WaveformConfig {
        &self.config
    }
}

impl ValueSource for Waveform {
    type Error = core::convert::Infallible;

    fn sample(&mut self, now_ms: i64) -> Result<f64, Self::Error> {
        let c = &self.config;
        let t = now_ms.wrapping_add(self.phase_ms).rem_euclid(c.period_ms);
        let angle = core::f64::consts::TAU * (t as f64 / c.period_ms as f64);
        Ok(c.baseline + c.amplitude * sin(angle) + self.rng.symmetric(c.noise))
    }
}

/// `sin(x)` for `x` in `[0, 2π]` (other finite `x` are accepted with reduced accuracy).
fn sin(x: f64) -> f64 {
    use core::f64::consts::{FRAC_PI_2, PI, TAU};
    // Reduce to [-π, π], then fold into [-π/2, π/2] where the series converges fast.
    let mut x = x - TAU * ((x / TAU) as i64 as f64);
    if x > PI {
        x -= TAU;
    } else if x < -PI {
        x += TAU;
    }
    if x > FRAC_PI_2 {
        x = PI - x;
    } else if x < -FRAC_PI_2 {
        x = -PI - x;
    }
    let x2 = x * x;
    // Horner form of x - x^3/3! + x^5/5! - ... - x^11/11!.
    x * (1.0
        - x2 / 6.0
            * (1.0
                - x2 / 20.0
                    * (1.0
                        - x2 / 42.0 * (1.0 - x2 / 72.0 * (1.0 - x2 / 110.0 * (1.0 - x2 / 156.0))))))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn sine_matches_std_within_1e_7() {
        for i in -2_000..=4_000 {
            let x = i as f64 * 0.003_14;
            assert!((sin(x) - x.sin()).abs() < 1e-7, "x = {x}");
        }
    }

    #[test]
    fn same_seed_same_values_different_seed_different_values() {
        let run = |seed| {
            let mut w = Waveform::new(WaveformConfig::TEMPERATURE, seed);
            let mut out = [0.0; 32];
            for (i, v) in out.iter_mut().enumerate() {
                *v = w
                    .sample(1_700_000_000_000 + i as i64 * 1_000)
                    .unwrap_or_else(|e| match e {});
            }
            out
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn samples_stay_within_the_advertised_bounds_and_the_sine_moves_them() {
        for cfg in [WaveformConfig::TEMPERATURE, WaveformConfig::HUMIDITY] {
            let (lo, hi) = cfg.bounds();
            let mut w = Waveform::new(cfg, 9);
            let (mut min, mut max) = (f64::MAX, f64::MIN);
            for i in 0..2_000 {
                let v = w.sample(i * 1_000).unwrap_or_else(|e| match e {});
                assert!((lo..=hi).contains(&v), "{v} outside {lo}..{hi}");
                min = min.min(v);
                max = max.max(v);
            }
            // Over a full period the sine spans nearly twice its amplitude.
            assert!(max - min > 1.8 * cfg.amplitude, "span {}", max - min);
        }
        assert!(WaveformConfig::TEMPERATURE.bounds().0 >= 15.0);
        assert!(WaveformConfig::TEMPERATURE.bounds().1 <= 30.0);
        assert!(WaveformConfig::HUMIDITY.bounds().0 >= 30.0);
        assert!(WaveformConfig::HUMIDITY.bounds().1 <= 70.0);
    }
}
