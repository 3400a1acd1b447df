//! Tumbling event-time windows per stream.
//!
//! A reading at event time `t` belongs to the window `[s, s + size)` with `s = floor(t / size) * size`.
//! Each stream has a watermark, the newest event time seen minus the allowed lateness; a window
//! closes when the watermark reaches its end, or when its stream has been silent (processing time)
//! for the idle timeout. Closed windows become [`WindowSummary`]s (revision 0).
//!
//! Invariants:
//! - `closed_until` of a stream only grows; a reading whose window ends at or before it is late and
//!   refused by [`Windows::admit`]. The store persists `closed_until` with each closed summary, and
//!   [`Windows::restore_closed`] puts it back on start, so a restart can never re-open (and emit a
//!   second, different summary for) a window that was already shipped.
//! - Statistics depend only on the readings and their arrival order, so replaying the journal in
//!   arrival order after a restart rebuilds exactly the state that was lost.
//!
//! Pure: no I/O, time is passed in. Tested by unit tests and by property tests against a
//! sort-then-aggregate reference.

use std::collections::{BTreeMap, HashMap};

use edgewise_protocol::{Reading, WindowSummary};

use crate::config::WindowConfig;

/// Window geometry and closing rules, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size_ms: i64,
    pub allowed_lateness_ms: i64,
    pub idle_timeout_ms: i64,
}

impl From<&WindowConfig> for WindowSpec {
    fn from(c: &WindowConfig) -> Self {
        WindowSpec {
            size_ms: c.window_seconds as i64 * 1000,
            allowed_lateness_ms: c.allowed_lateness_ms as i64,
            idle_timeout_ms: c.idle_timeout_ms as i64,
        }
    }
}

impl WindowSpec {
    pub fn start_of(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.size_ms) * self.size_ms
    }
}

/// Running statistics of one window (Welford's algorithm for mean and variance).
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
    unit: Option<String>,
}

impl Accumulator {
    fn new(r: &Reading) -> Self {
        Accumulator {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: (r.time_ms, r.value),
            last: (r.time_ms, r.value),
            unit: r.unit.clone(),
        }
    }

    fn push(&mut self, time_ms: i64, value: f64) {
        self.count += 1;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Earliest event time wins `first` (ties: earliest arrival); latest wins `last` (ties: latest arrival).
        if time_ms < self.first.0 {
            self.first = (time_ms, value);
        }
        if time_ms >= self.last.0 {
            self.last = (time_ms, value);
        }
    }

    fn summary(
        &self,
        agent_id: &str,
        stream: &str,
        start: i64,
        spec: &WindowSpec,
    ) -> WindowSummary {
        WindowSummary {
            agent_id: agent_id.to_string(),
            stream: stream.to_string(),
            window_start_ms: start,
            window_end_ms: start.saturating_add(spec.size_ms),
            revision: 0,
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.mean,
            stddev: (self.m2 / self.count as f64).max(0.0).sqrt(),
            first_value: self.first.1,
            first_time_ms: self.first.0,
            last_value: self.last.1,
            last_time_ms: self.last.0,
            unit: self.unit.clone(),
            score: None,
        }
    }
}

#[derive(Debug)]
struct StreamWindows {
    /// Windows ending at or before this are closed for good.
    closed_until: i64,
    max_event_ms: i64,
    /// Processing time of the last reading added.
    last_seen_ms: i64,
    open: BTreeMap<i64, Accumulator>,
}

impl StreamWindows {
    fn new(closed_until: i64) -> Self {
        StreamWindows {
            closed_until,
            max_event_ms: i64::MIN,
            last_seen_ms: i64::MIN,
            open: BTreeMap::new(),
        }
    }
}

/// Whether a reading may enter its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Its window has already closed.
    Late,
}

/// A window that has just closed, with the stream's new `closed_until` to persist alongside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub summary: WindowSummary,
    pub closed_until_ms: i64,
}

/// All streams' open windows.
pub struct Windows {
    agent_id: String,
    spec: WindowSpec,
    streams: HashMap<String, StreamWindows>,
}

impl Windows {
    pub fn new(agent_id: &str, spec: WindowSpec) -> Self {
        Windows {
            agent_id: agent_id.to_string(),
            spec,
            streams: HashMap::new(),
        }
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    /// Restores a stream's persisted `closed_until` (on start, before the journal is replayed).
    pub fn restore_closed(&mut self, stream: &str, closed_until_ms: i64) {
        let s = self
            .streams
            .entry(stream.to_string())
            .or_insert_with(|| StreamWindows::new(closed_until_ms));
        s.closed_until = s.closed_until.max(closed_until_ms);
    }

    pub fn admit(&self, r: &Reading) -> Admission {
        let end = self
            .spec
            .start_of(r.time_ms)
            .saturating_add(self.spec.size_ms);
        match self.streams.get(&r.stream) {
            Some(s) if end <= s.closed_until => Admission::Late,
            _ => Admission::Open,
        }
    }

    /// Adds an admitted reading. `now_ms` is processing time, for the idle timeout.
    pub fn add(&mut self, r: &Reading, now_ms: i64) {
        let start = self.spec.start_of(r.time_ms);
        let s = match self.streams.get_mut(&r.stream) {
            Some(s) => s,
            None => self
                .streams
                .entry(r.stream.clone())
                .or_insert_with(|| StreamWindows::new(i64::MIN)),
        };
        s.max_event_ms = s.max_event_ms.max(r.time_ms);
        s.last_seen_ms = now_ms;
        s.open
            .entry(start)
            .or_insert_with(|| Accumulator::new(r))
            .push(r.time_ms, r.value);
    }

    /// Closes every window whose stream watermark has passed its end, and every open window of a
    /// stream idle for the timeout. Returned in stream order, then window order.
    pub fn advance(&mut self, now_ms: i64) -> Vec<ClosedWindow> {
        let mut out = Vec::new();
        for (name, s) in self.streams.iter_mut() {
            if s.open.is_empty() {
                continue;
            }
            let idle = now_ms.saturating_sub(s.last_seen_ms) >= self.spec.idle_timeout_ms;
            let watermark = s.max_event_ms.saturating_sub(self.spec.allowed_lateness_ms);
            let closing: Vec<i64> = s
                .open
                .keys()
                .copied()
                .filter(|&start| idle || start.saturating_add(self.spec.size_ms) <= watermark)
                .collect();
            if closing.is_empty() {
                continue;
            }
            let last_end = closing[closing.len() - 1].saturating_add(self.spec.size_ms);
            s.closed_until = s.closed_until.max(watermark).max(last_end);
            for start in closing {
                if let Some(acc) = s.open.remove(&start) {
                    out.push(ClosedWindow {
                        summary: acc.summary(&self.agent_id, name, start, &self.spec),
                        closed_until_ms: s.closed_until,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            (&a.summary.stream, a.summary.window_start_ms)
                .cmp(&(&b.summary.stream, b.summary.window_start_ms))
        });
        out
    }

    /// Number of windows currently open, over all streams.
    pub fn open_windows(&self) -> usize {
        self.streams.values().map(|s| s.open.len()).sum()
    }

    /// Number of streams tracked.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC: WindowSpec = WindowSpec {
        size_ms: 10_000,
        allowed_lateness_ms: 2_000,
        idle_timeout_ms: 60_000,
    };

    fn r(stream: &str, time_ms: i64, value: f64) -> Reading {
        Reading {
            stream: stream.into(),
            time_ms,
            value,
            unit: Some("Cel".into()),
        }
    }

    fn feed(w: &mut Windows, readings: &[Reading], now: i64) -> Vec<Admission> {
        readings
            .iter()
            .map(|x| {
                let a = w.admit(x);
                if a == Admission::Open {
                    w.add(x, now);
                }
                a
            })
            .collect()
    }

    #[test]
    fn a_window_closes_when_the_watermark_passes_its_end() {
        let mut w = Windows::new("gw", SPEC);
        feed(
            &mut w,
            &[r("s", 1_000, 1.0), r("s", 5_000, 3.0), r("s", 9_999, 2.0)],
            0,
        );
        assert!(w.advance(0).is_empty());
        // 11_999 - 2_000 lateness < 10_000: still open.
        feed(&mut w, &[r("s", 11_999, 7.0)], 0);
        assert!(w.advance(0).is_empty());
        feed(&mut w, &[r("s", 12_000, 8.0)], 0);
        let closed = w.advance(0);
        assert_eq!(closed.len(), 1);
        let s = &closed[0].summary;
        assert_eq!((s.window_start_ms, s.window_end_ms), (0, 10_000));
        assert_eq!(s.count, 3);
        assert_eq!((s.min, s.max, s.mean), (1.0, 3.0, 2.0));
        assert!((s.stddev - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.first_time_ms, s.first_value), (1_000, 1.0));
        assert_eq!((s.last_time_ms, s.last_value), (9_999, 2.0));
        assert_eq!(s.unit.as_deref(), Some("Cel"));
        assert_eq!(closed[0].closed_until_ms, 10_000);
        assert_eq!(w.open_windows(), 1);
    }

    #[test]
    fn readings_for_a_closed_window_are_late_within_lateness_are_not() {
        let mut w = Windows::new("gw", SPEC);
        feed(&mut w, &[r("s", 1_000, 1.0), r("s", 11_000, 1.0)], 0);
        // Within allowed lateness: window [0, 10s) is still open.
        assert_eq!(
            feed(&mut w, &[r("s", 9_000, 1.0)], 0),
            vec![Admission::Open]
        );
        feed(&mut w, &[r("s", 25_000, 1.0)], 0);
        assert_eq!(w.advance(0).len(), 2);
        assert_eq!(w.admit(&r("s", 9_500, 1.0)), Admission::Late);
        assert_eq!(w.admit(&r("s", 19_999, 1.0)), Admission::Late);
        assert_eq!(w.admit(&r("s", 20_000, 1.0)), Admission::Open);
        // Other streams are unaffected.
        assert_eq!(w.admit(&r("t", 0, 1.0)), Admission::Open);
    }

    #[test]
    fn idle_streams_close_by_processing_time() {
        let mut w = Windows::new("gw", SPEC);
        // Watermark 9_000: neither window is due by event time.
        feed(&mut w, &[r("s", 1_000, 1.0), r("s", 11_000, 2.0)], 100);
        assert!(w.advance(100 + 59_999).is_empty());
        let closed = w.advance(100 + 60_000);
        assert_eq!(closed.len(), 2);
        assert_eq!(w.open_windows(), 0);
        assert_eq!(w.admit(&r("s", 19_000, 1.0)), Admission::Late);
    }

    #[test]
    fn restored_closed_until_refuses_already_shipped_windows() {
        let mut w = Windows::new("gw", SPEC);
        w.restore_closed("s", 20_000);
        assert_eq!(w.admit(&r("s", 15_000, 1.0)), Admission::Late);
        assert_eq!(w.admit(&r("s", 20_000, 1.0)), Admission::Open);
    }

    #[test]
    fn negative_times_floor_to_the_right_window() {
        assert_eq!(SPEC.start_of(-1), -10_000);
        assert_eq!(SPEC.start_of(-10_000), -10_000);
        assert_eq!(SPEC.start_of(0), 0);
    }

    /// What the reference model expects of one window.
    struct Expected {
        count: u64,
        min: f64,
        max: f64,
        mean: f64,
        stddev: f64,
        first: (i64, f64),
        last: (i64, f64),
    }

    /// Sort-then-aggregate reference for one stream's readings in one window.
    fn reference(rs: &[(i64, f64)]) -> Expected {
        let n = rs.len() as f64;
        let mean = rs.iter().map(|x| x.1).sum::<f64>() / n;
        let var = rs.iter().map(|x| (x.1 - mean).powi(2)).sum::<f64>() / n;
        let mut by_time: Vec<(usize, (i64, f64))> = rs.iter().copied().enumerate().collect();
        by_time.sort_by_key(|(i, (t, _))| (*t, *i));
        let first = by_time[0].1;
        let last_t = by_time[by_time.len() - 1].1.0;
        let last = by_time
            .iter()
            .rev()
            .find(|(_, (t, _))| *t == last_t)
            .map(|x| x.1);
        Expected {
            count: rs.len() as u64,
            min: rs.iter().map(|x| x.1).fold(f64::INFINITY, f64::min),
            max: rs.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max),
            mean,
            stddev: var.sqrt(),
            first,
            last: last.unwrap_or(first),
        }
    }

    proptest! {
        /// With lateness large enough that nothing is late, the closed summaries equal the
        /// reference aggregation of each (stream, window), whatever the arrival order.
        #[test]
        fn summaries_match_the_reference(
            readings in proptest::collection::vec((0..3usize, -50_000i64..50_000, -1e6f64..1e6), 1..200)
        ) {
            let spec = WindowSpec { size_ms: 7_000, allowed_lateness_ms: 1_000_000, idle_timeout_ms: 10 };
            let mut w = Windows::new("gw", spec);
            let rs: Vec<Reading> = readings.iter().map(|(s, t, v)| r(&format!("s{s}"), *t, *v)).collect();
            let adm = feed(&mut w, &rs, 0);
            prop_assert!(adm.iter().all(|a| *a == Admission::Open));
            let closed = w.advance(10);
            let mut groups: BTreeMap<(String, i64), Vec<(i64, f64)>> = BTreeMap::new();
            for x in &rs {
                groups.entry((x.stream.clone(), spec.start_of(x.time_ms))).or_default().push((x.time_ms, x.value));
            }
            prop_assert_eq!(closed.len(), groups.len());
            for (c, ((stream, start), vals)) in closed.iter().zip(groups.iter()) {
                let s = &c.summary;
                prop_assert_eq!(&s.stream, stream);
                prop_assert_eq!(s.window_start_ms, *start);
                let Expected { count: n, min, max, mean, stddev: sd, first, last } = reference(vals);
                prop_assert_eq!(s.count, n);
                prop_assert_eq!(s.min, min);
                prop_assert_eq!(s.max, max);
                prop_assert!((s.mean - mean).abs() <= 1e-9 * (1.0 + mean.abs().max(max.abs())));
                prop_assert!((s.stddev - sd).abs() <= 1e-6 * (1.0 + sd + max.abs()));
                prop_assert_eq!((s.first_time_ms, s.first_value), first);
                prop_assert_eq!((s.last_time_ms, s.last_value), last);
                prop_assert_eq!(s.validate(), Ok(()));
            }
        }

        /// Interleaving closes with arrivals: every reading is either late or in exactly one
        /// summary, and no window is emitted twice.
        #[test]
        fn every_reading_is_counted_once_or_late(
            readings in proptest::collection::vec((0..3usize, 0i64..100_000, 0f64..100.0, any::<bool>()), 1..300)
        ) {
            let spec = WindowSpec { size_ms: 5_000, allowed_lateness_ms: 3_000, idle_timeout_ms: 1_000_000 };
            let mut w = Windows::new("gw", spec);
            let mut late = 0u64;
            let mut closed = Vec::new();
            for (s, t, v, tick) in &readings {
                let x = r(&format!("s{s}"), *t, *v);
                if feed(&mut w, std::slice::from_ref(&x), 0)[0] == Admission::Late {
                    late += 1;
                }
                if *tick {
                    closed.extend(w.advance(0));
                }
            }
            closed.extend(w.advance(i64::MAX));
            let counted: u64 = closed.iter().map(|c| c.summary.count).sum();
            prop_assert_eq!(counted + late, readings.len() as u64);
            let mut ids: Vec<_> = closed.iter().map(|c| c.summary.id()).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), closed.len());
        }
    }
}
