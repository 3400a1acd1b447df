//! The search for the highest sustained rate: short probe steps that double until one fails,
//! then narrow between the best pass and the lowest failure (geometric midpoint) until they are
//! within `precision` of each other or the probe budget is spent. Pure; tested below.
//!
//! The runner confirms the result with a full-length step afterwards (see `trial`), because a
//! rate that holds for a few seconds may not hold for thirty.

use edgewise_firmware::sim::MIN_INTERVAL_US;

/// Lowest rate the search tries, in messages per second.
pub const MIN_RATE: f64 = 10.0;

/// The simulator's publish interval for `rate` messages per second from `nodes` nodes, in
/// microseconds, and the rate it really gives (whole microseconds, at least
/// [`MIN_INTERVAL_US`]: one message per sensor per millisecond at most).
pub fn sim_interval(nodes: usize, rate: f64) -> (u64, f64) {
    let per_node_us = nodes as f64 * 1e6 / rate.max(f64::MIN_POSITIVE);
    let interval_us = (per_node_us.round() as u64).max(MIN_INTERVAL_US);
    (interval_us, nodes as f64 * 1e6 / interval_us as f64)
}

/// One line for each `(sensors, rate)` pair the simulator cannot publish within 1%, naming the
/// rate it runs instead (see [`sim_interval`]).
pub fn unreachable_rates(sensors: &[usize], rates: &[f64]) -> Vec<String> {
    let mut notes = Vec::new();
    for &nodes in sensors {
        for &rate in rates {
            let (_, runs_at) = sim_interval(nodes, rate);
            if (runs_at - rate).abs() > 0.01 * rate {
                notes.push(format!(
                    "--rates {rate:.0}: {nodes} sensors publish at most one message per sensor per millisecond; the nearest rate is {runs_at:.0}/s"
                ));
            }
        }
    }
    notes
}

/// The next rate the simulator can produce below `rate` by about `factor` (at least one
/// microsecond of interval lower), or `None` below [`MIN_RATE`].
pub fn step_down(nodes: usize, rate: f64, factor: f64) -> Option<f64> {
    let (interval_us, rate) = sim_interval(nodes, rate);
    let (_, mut lower) = sim_interval(nodes, rate * factor);
    if lower >= rate {
        lower = nodes as f64 * 1e6 / (interval_us + 1) as f64;
    }
    (lower >= MIN_RATE).then_some(lower)
}

#[derive(Debug, Clone)]
pub struct Search {
    start: f64,
    max_rate: f64,
    max_probes: usize,
    precision: f64,
    best_pass: Option<f64>,
    lowest_fail: Option<f64>,
    tried: Vec<f64>,
}

impl Search {
    /// Starts at `start`, never goes above `max_rate`, stops after `max_probes` probes or once
    /// pass and failure are within a factor `1 + precision`.
    pub fn new(start: f64, max_rate: f64, max_probes: usize, precision: f64) -> Search {
        Search {
            start: start.min(max_rate),
            max_rate,
            max_probes,
            precision,
            best_pass: None,
            lowest_fail: None,
            tried: Vec::new(),
        }
    }

    /// The next rate to probe, after `quantize` (the rate the publisher can really produce);
    /// `None` when the search is over.
    pub fn next_rate(&self, quantize: impl Fn(f64) -> f64) -> Option<f64> {
        if self.tried.len() >= self.max_probes {
            return None;
        }
        let wanted = match (self.best_pass, self.lowest_fail) {
            (None, None) => self.start,
            (Some(lo), None) if lo >= self.max_rate => return None,
            (Some(lo), None) => (lo * 2.0).min(self.max_rate),
            (None, Some(hi)) => hi / 2.0,
            (Some(lo), Some(hi)) if hi <= lo * (1.0 + self.precision) => return None,
            (Some(lo), Some(hi)) => (lo * hi).sqrt(),
        };
        let rate = quantize(wanted);
        let seen = self.tried.iter().any(|t| (t - rate).abs() < 1e-6);
        (rate >= MIN_RATE && !seen).then_some(rate)
    }

    /// Records the outcome of a step at `rate`.
    pub fn record(&mut self, rate: f64, sustained: bool) {
        self.tried.push(rate);
        if sustained {
            self.best_pass = Some(self.best_pass.map_or(rate, |b| b.max(rate)));
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(rate, |f| f.min(rate)));
        }
    }

    /// The highest rate that passed so far.
    pub fn best(&self) -> Option<f64> {
        self.best_pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_the_simulator_cannot_publish_are_named_with_the_rate_it_runs() {
        let notes = unreachable_rates(&[100, 10_000], &[150_000.0, 75_000.0, 50_000.0]);
        assert_eq!(
            notes,
            [
                "--rates 150000: 100 sensors publish at most one message per sensor per millisecond; the nearest rate is 100000/s"
            ]
        );
        assert!(unreachable_rates(&[100], &[]).is_empty());
    }

    /// Runs the search against a consumer that sustains everything up to `ceiling`.
    fn run(
        mut s: Search,
        ceiling: f64,
        quantize: impl Fn(f64) -> f64 + Copy,
    ) -> (Option<f64>, usize) {
        let mut probes = 0;
        while let Some(rate) = s.next_rate(quantize) {
            s.record(rate, rate <= ceiling);
            probes += 1;
        }
        (s.best(), probes)
    }

    #[test]
    fn it_doubles_then_narrows_to_within_the_precision() {
        let (best, probes) = run(Search::new(1_000.0, 1e6, 20, 0.1), 23_000.0, |r| r);
        let best = best.unwrap();
        assert!(best <= 23_000.0 && best > 23_000.0 / 1.1, "{best}");
        assert!(probes <= 12, "{probes}");
    }

    #[test]
    fn it_goes_down_when_the_start_fails_and_stops_at_the_cap_when_all_pass() {
        let (best, _) = run(Search::new(50_000.0, 1e6, 20, 0.1), 3_000.0, |r| r);
        assert!(best.unwrap() > 3_000.0 / 1.1 && best.unwrap() <= 3_000.0);
        let (best, probes) = run(Search::new(40_000.0, 50_000.0, 20, 0.1), 1e9, |r| r);
        assert_eq!((best, probes), (Some(50_000.0), 2));
        // Nothing passes: the search ends at the minimum rate with no result.
        assert_eq!(run(Search::new(100.0, 1e6, 20, 0.1), 1.0, |r| r).0, None);
    }

    #[test]
    fn the_probe_budget_and_quantized_repeats_end_the_search() {
        let (_, probes) = run(Search::new(1_000.0, 1e6, 3, 0.01), 23_000.0, |r| r);
        assert_eq!(probes, 3);
        // 3 nodes: rates are 3,000,000 / whole microseconds, so the search stops when the
        // midpoint maps to a rate already tried.
        let q = |r| sim_interval(3, r).1;
        let (best, probes) = run(Search::new(10.0, 1e6, 50, 0.0), 2_000.0, q);
        assert_eq!(best, Some(2_000.0));
        assert!(probes < 30, "{probes}");
    }

    #[test]
    fn intervals_are_whole_microseconds_of_at_least_a_millisecond() {
        assert_eq!(sim_interval(100, 20_000.0), (5_000, 20_000.0));
        assert_eq!(sim_interval(100, 1e9), (1_000, 100_000.0));
        assert_eq!(sim_interval(100, 95_000.0), (1_053, 1e8 / 1_053.0));
        assert_eq!(sim_interval(10_000, 25_000.0), (400_000, 25_000.0));
        assert_eq!(sim_interval(3, 7.0).0, 428_571);
        // 100 nodes at 1 ms: 15% lower is 1.176 ms.
        assert_eq!(step_down(100, 100_000.0, 0.85), Some(1e8 / 1_176.0));
        assert_eq!(step_down(10_000, 100_000.0, 0.85), Some(1e10 / 117_647.0));
        assert_eq!(step_down(1, 10.0, 0.85), None);
        // A factor too close to 1 for the quantization still steps down: one microsecond.
        assert_eq!(step_down(1, 500.0, 0.9999999), Some(1e6 / 2_001.0));
    }
}
