//! Tumbling and hopping event-time windows per stream, with late revisions and quantiles.
//!
//! # Geometry
//!
//! Windows are `[s, s + size)` for every `s` that is a multiple of `slide` (`slide == size`:
//! tumbling; `slide < size`, dividing it: hopping, each reading in `size / slide` windows). A
//! stream keeps one accumulator per *pane* `[p, p + slide)` that holds readings; a window's
//! statistics are its panes merged when it is emitted (Welford's mean and M2 combined with Chan's
//! formula, DDSketches merged), so a reading costs one accumulator update however much the
//! windows overlap. For tumbling windows a window is exactly one pane.
//!
//! # Closing and lateness
//!
//! Each stream has a watermark, its newest event time minus `allowed_lateness_ms`; a window
//! closes (revision 0 of its summary is emitted) when the watermark reaches its end, or when its
//! stream has been silent (processing time) for `idle_timeout_ms`. `closed_until` of a stream
//! only grows: windows ending at or before it are closed. A reading for a closed window follows
//! the late policy:
//! - `drop`: refused ([`Admission::Late`]) once no window containing it is open;
//! - `revise`: accepted ([`Admission::Revision`]) while its window ended less than
//!   `revise_horizon_ms` before `closed_until`; the window is re-emitted with `revision + 1` and
//!   the merged statistics of everything it holds. Older readings are refused as late.
//!
//! Only windows that hold at least one reading are emitted. A pane is dropped once every window
//! containing it is closed and past the horizon; [`ClosedWindow::release_ms`] is that boundary,
//! and it is also the boundary below which the journal may forget the stream's readings.
//!
//! # Durability (what a restart needs)
//!
//! - `closed_until` per stream (persisted with every closed window), so a restart never
//!   re-opens a shipped window as a second revision 0.
//! - The journal rows of every pane still held (readings at or after
//!   [`ClosedWindow::release_ms`]): replaying them in arrival order rebuilds the panes exactly.
//! - With `revise`: the last emitted revision and count of each closed window still within the
//!   horizon ([`ClosedWindow::keep_revision`]). After a replay, a closed window whose panes hold
//!   more readings than its last emission got a late reading that was journaled but not yet
//!   emitted (a crash in between): it is emitted again with the next revision. Equal counts mean
//!   nothing new, since readings are only ever added. Revisions therefore need the journal: the
//!   config refuses `revise` with `store.journal = false`.
//!
//! # Bounded memory
//!
//! At most `max_streams` streams hold panes at a time; a reading that would make one more
//! stream active is refused ([`Admission::StreamLimit`]). Per active stream the panes held are
//! bounded by `(size + allowed lateness + horizon) / slide`. Adding a reading allocates only when
//! it starts a new pane (or a new stream); the DDSketch of a pane grows with the spread of its
//! values (bounded at 2048 bins per sign).
//!
//! Pure: no I/O, time is passed in. Tested by the unit tests below and by property tests against
//! a sort-then-aggregate reference with random interleavings, lateness, hopping and revisions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use edgewise_protocol::{Quantiles, ReadingView, WindowSummary};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use crate::config::{LatePolicy, WindowConfig};

/// Largest number of bins per sign in a quantile sketch (the sketch collapses its lowest bins
/// beyond it; with a 1% error bound 2048 bins span 18 orders of magnitude).
const SKETCH_MAX_BINS: u32 = 2048;
/// Values closer to zero than this count as zero in the quantile sketch.
const SKETCH_MIN_VALUE: f64 = 1e-9;

/// Window geometry, closing and late rules, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSpec {
    pub size_ms: i64,
    /// Distance between window starts; divides `size_ms` (equal to it: tumbling).
    pub slide_ms: i64,
    pub allowed_lateness_ms: i64,
    pub idle_timeout_ms: i64,
    pub late_policy: LatePolicy,
    /// With [`LatePolicy::Revise`]: how long after `closed_until` passed a window's end a late
    /// reading still revises it.
    pub revise_horizon_ms: i64,
    /// Most streams holding open windows at once.
    pub max_streams: usize,
    /// Relative error bound of the quantile sketch; `None`: no quantiles.
    pub quantile_relative_error: Option<f64>,
}

impl From<&WindowConfig> for WindowSpec {
    fn from(c: &WindowConfig) -> Self {
        let size_ms = c.window_seconds as i64 * 1000;
        WindowSpec {
            size_ms,
            slide_ms: c.slide_seconds.map_or(size_ms, |s| s as i64 * 1000),
            allowed_lateness_ms: c.allowed_lateness_ms as i64,
            idle_timeout_ms: c.idle_timeout_ms as i64,
            late_policy: c.late_policy,
            revise_horizon_ms: c.revise_horizon_ms() as i64,
            max_streams: c.max_streams,
            quantile_relative_error: c.quantiles.then_some(c.quantile_relative_error),
        }
    }
}

impl WindowSpec {
    /// Tumbling windows, late readings dropped, no stream cap, no quantiles.
    pub const fn tumbling(size_ms: i64, allowed_lateness_ms: i64, idle_timeout_ms: i64) -> Self {
        WindowSpec {
            size_ms,
            slide_ms: size_ms,
            allowed_lateness_ms,
            idle_timeout_ms,
            late_policy: LatePolicy::Drop,
            revise_horizon_ms: 0,
            max_streams: usize::MAX,
            quantile_relative_error: None,
        }
    }

    /// Start of the pane (and of the newest window) holding event time `time_ms`.
    pub fn pane_of(&self, time_ms: i64) -> i64 {
        time_ms
            .div_euclid(self.slide_ms)
            .saturating_mul(self.slide_ms)
    }

    /// How long a closed window stays revisable.
    fn horizon_ms(&self) -> i64 {
        match self.late_policy {
            LatePolicy::Drop => 0,
            LatePolicy::Revise => self.revise_horizon_ms,
        }
    }

    /// The first window start whose window ends after `time_ms` (`i64::MIN` stays unbounded).
    fn first_start_after(&self, time_ms: i64) -> i64 {
        if time_ms == i64::MIN {
            return i64::MIN;
        }
        self.pane_of(time_ms.saturating_sub(self.size_ms))
            .saturating_add(self.slide_ms)
    }
}

/// A DDSketch (sketches-ddsketch) of a pane's or window's values.
#[derive(Clone)]
struct Sketch(Box<DDSketch>);

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sketch({} values)", self.0.count())
    }
}

/// Running statistics of one pane or window (Welford's algorithm for mean and variance).
#[derive(Debug, Clone)]
struct Accumulator {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
    /// Shared with the stream while its unit does not change: a new pane allocates nothing for it.
    unit: Option<Arc<str>>,
    sketch: Option<Sketch>,
}

impl Accumulator {
    fn new(r: ReadingView<'_>, unit: Option<Arc<str>>, sketch: Option<&SketchConfig>) -> Self {
        Accumulator {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: (r.time_ms, r.value),
            last: (r.time_ms, r.value),
            unit,
            sketch: sketch.map(|c| Sketch(Box::new(DDSketch::new(*c)))),
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
        if let Some(s) = &mut self.sketch {
            s.0.add(value);
        }
    }

    /// Adds the readings of `o`, a pane later in event time than every pane merged so far
    /// (so `first`/`last` ties keep their arrival rule: panes never share an event time).
    fn merge(&mut self, o: &Accumulator) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = o.clone();
            return;
        }
        let n = self.count + o.count;
        let delta = o.mean - self.mean;
        let share = o.count as f64 / n as f64;
        self.mean += delta * share;
        self.m2 += o.m2 + delta * delta * self.count as f64 * share;
        self.count = n;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.first.0 < self.first.0 {
            self.first = o.first;
        }
        if o.last.0 >= self.last.0 {
            self.last = o.last;
        }
        if let (Some(a), Some(b)) = (&mut self.sketch, &o.sketch) {
            // Both come from the one spec's config, so they always merge.
            let _ = a.0.merge(&b.0);
        }
    }

    fn quantiles(&self, relative_error: f64) -> Option<Quantiles> {
        let sketch = &self.sketch.as_ref()?.0;
        // The true quantile lies in [min, max]; clamping can only bring an estimate closer.
        let q = |q: f64| {
            sketch
                .quantile(q)
                .ok()
                .flatten()
                .map(|v| v.clamp(self.min, self.max))
        };
        Some(Quantiles {
            p50: q(0.5)?,
            p90: q(0.9)?,
            p99: q(0.99)?,
            relative_error,
        })
    }

    fn summary(
        &self,
        agent_id: &str,
        stream: &str,
        start: i64,
        revision: u32,
        spec: &WindowSpec,
    ) -> WindowSummary {
        WindowSummary {
            agent_id: agent_id.to_string(),
            stream: stream.to_string(),
            window_start_ms: start,
            window_end_ms: start.saturating_add(spec.size_ms),
            revision,
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.mean,
            stddev: (self.m2 / self.count as f64).max(0.0).sqrt(),
            first_value: self.first.1,
            first_time_ms: self.first.0,
            last_value: self.last.1,
            last_time_ms: self.last.0,
            unit: self.unit.as_deref().map(str::to_string),
            score: None,
            quantiles: spec.quantile_relative_error.and_then(|e| self.quantiles(e)),
        }
    }
}

/// What was last emitted for a closed window still within the revise horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Emitted {
    revision: u32,
    count: u64,
}

#[derive(Debug)]
struct StreamWindows {
    /// Windows ending at or before this are closed.
    closed_until: i64,
    /// Revise only: windows ending at or before this are final although within the horizon
    /// (the stream went idle for the horizon in processing time). Memory only: after a restart
    /// the replayed panes become final again the same way.
    final_until: i64,
    max_event_ms: i64,
    /// Processing time of the last reading added.
    last_seen_ms: i64,
    /// Pane start -> statistics, sorted by start. A short vector: a stream holds few panes.
    panes: Vec<(i64, Accumulator)>,
    /// The unit of the stream's latest reading.
    unit: Option<Arc<str>>,
    /// Revise only, and only while the stream has revisable windows (boxed: most streams
    /// never need it, and 10,000 streams would carry two empty maps each).
    revisions: Option<Box<Revisions>>,
    /// In [`Windows::due`]: its watermark passed the end of a window it holds, or a closed
    /// window got a late reading.
    due: bool,
}

#[derive(Debug, Default)]
struct Revisions {
    /// Closed windows within the horizon, by start.
    emitted: BTreeMap<i64, Emitted>,
    /// Closed windows (starts) that got a reading since their last emission.
    dirty: BTreeSet<i64>,
}

impl StreamWindows {
    fn new(closed_until: i64) -> Self {
        StreamWindows {
            closed_until,
            final_until: i64::MIN,
            max_event_ms: i64::MIN,
            last_seen_ms: i64::MIN,
            panes: Vec::new(),
            unit: None,
            revisions: None,
            due: false,
        }
    }

    fn is_active(&self) -> bool {
        !self.panes.is_empty()
    }

    /// Whether [`Windows::advance`] has something to emit for this stream now, idleness aside:
    /// its watermark has passed the end of the earliest window that is not closed and holds a
    /// pane, or a closed window is waiting for its revision.
    fn needs_close(&self, spec: &WindowSpec) -> bool {
        if self.revisions.as_ref().is_some_and(|r| !r.dirty.is_empty()) {
            return true;
        }
        let Some((first_pane, _)) = self.panes.first() else {
            return false;
        };
        let watermark = self.max_event_ms.saturating_sub(spec.allowed_lateness_ms);
        let last = spec.pane_of(watermark.saturating_sub(spec.size_ms));
        let earliest = spec.first_start_after(self.closed_until).max(
            first_pane
                .saturating_sub(spec.size_ms)
                .saturating_add(spec.slide_ms),
        );
        last >= earliest
    }

    /// The processing time at which this active stream next changes by idleness alone: its
    /// idle timeout, or once idle, the end of its horizon (when its windows become final).
    fn idle_deadline(&self, now_ms: i64, spec: &WindowSpec) -> i64 {
        let idle_at = self.last_seen_ms.saturating_add(spec.idle_timeout_ms);
        if now_ms < idle_at {
            idle_at
        } else {
            idle_at.saturating_add(spec.horizon_ms())
        }
    }

    /// Readings before this time can enter no window any more (they are late), windows
    /// starting before it are final, and the journal may forget the stream's readings before it.
    fn release_ms(&self, spec: &WindowSpec) -> i64 {
        let final_until = if self.closed_until == i64::MIN {
            i64::MIN
        } else {
            self.closed_until.saturating_sub(spec.horizon_ms())
        };
        spec.first_start_after(final_until.max(self.final_until))
    }

    /// The window starting at `start`, merged from its panes; `None` when it holds nothing.
    fn window(&self, start: i64, spec: &WindowSpec) -> Option<Accumulator> {
        let end = start.saturating_add(spec.size_ms);
        let from = self.panes.partition_point(|(p, _)| *p < start);
        let mut panes = self.panes[from..].iter().take_while(|(p, _)| *p < end);
        let mut acc = panes.next()?.1.clone();
        for (_, pane) in panes {
            acc.merge(pane);
        }
        Some(acc)
    }
}

/// Whether a reading may enter its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Its newest window has closed, but it is within the revise horizon: the closed windows
    /// containing it are emitted again with the next revision.
    Revision,
    /// Every window containing it has closed (and, with `revise`, is past the horizon).
    Late,
    /// It would make one more stream active while `max_streams` are.
    StreamLimit,
}

/// A window that has just closed (or been revised), with what to persist alongside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub summary: WindowSummary,
    /// The stream's new `closed_until`.
    pub closed_until_ms: i64,
    /// The stream's readings before this time can enter no window any more (their journal rows
    /// may go), and its windows starting before it are final (their revision records may go).
    pub release_ms: i64,
    /// Late policy `revise`: persist this window's revision and count until it is final.
    pub keep_revision: bool,
}

impl ClosedWindow {
    /// A closed tumbling window whose readings all may leave the journal (tests, benchmarks).
    pub fn final_window(summary: WindowSummary) -> Self {
        let end = summary.window_end_ms;
        ClosedWindow {
            summary,
            closed_until_ms: end,
            release_ms: end,
            keep_revision: false,
        }
    }
}

/// A map keyed by stream name, hashed with foldhash: a name is hashed two or three times per
/// reading, and std's SipHash cost about a tenth of the hot path with 10,000 streams. Each map
/// gets its own random seed (from address randomization), so colliding names cannot be
/// precomputed; the stream cap bounds the map anyway.
pub type StreamMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

/// A set of stream names, hashed as [`StreamMap`].
pub type StreamSet = std::collections::HashSet<String, foldhash::fast::RandomState>;

/// All streams' windows.
pub struct Windows {
    agent_id: String,
    spec: WindowSpec,
    sketch: Option<SketchConfig>,
    streams: StreamMap<StreamWindows>,
    /// Streams holding panes.
    active: usize,
    /// Pane accumulators held over all streams, kept up to date rather than counted: with
    /// 10,000 streams a walk over the map per batch cost more than the batch's readings.
    panes: usize,
    /// Streams with something to emit by event time (see [`StreamWindows::needs_close`]), each
    /// once: `advance` looks at these only, until `next_scan_ms`.
    due: Vec<String>,
    /// No stream goes idle (or final after idling) before this processing time: from then on
    /// `advance` walks every stream, and sets it anew.
    next_scan_ms: i64,
    /// The last walk over every stream stopped at `max_windows`: the next `advance` walks again.
    walk_cut: bool,
    /// [`Windows::journal_horizon`], while nothing changed it.
    horizon: Option<i64>,
    /// Scratch: window starts closing in one stream during `advance`.
    closing: Vec<i64>,
}

impl Windows {
    pub fn new(agent_id: &str, spec: WindowSpec) -> Self {
        Windows {
            agent_id: agent_id.to_string(),
            spec,
            sketch: spec
                .quantile_relative_error
                .map(|e| SketchConfig::new(e, SKETCH_MAX_BINS, SKETCH_MIN_VALUE)),
            streams: StreamMap::default(),
            active: 0,
            panes: 0,
            due: Vec::new(),
            next_scan_ms: i64::MAX,
            walk_cut: false,
            horizon: None,
            closing: Vec::new(),
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
        self.horizon = None;
    }

    /// Restores the last emitted revision and count of a closed window (on start, before the
    /// journal is replayed).
    pub fn restore_revision(
        &mut self,
        stream: &str,
        window_start_ms: i64,
        revision: u32,
        count: u64,
    ) {
        if self.spec.late_policy != LatePolicy::Revise {
            return;
        }
        let s = self
            .streams
            .entry(stream.to_string())
            .or_insert_with(|| StreamWindows::new(i64::MIN));
        s.revisions
            .get_or_insert_default()
            .emitted
            .insert(window_start_ms, Emitted { revision, count });
        self.horizon = None;
    }

    pub fn admit(&self, r: ReadingView<'_>) -> Admission {
        self.admit_and_activity(r).0
    }

    /// [`Windows::admit`], and whether the stream is active ([`Windows::is_active`]), in one
    /// look-up of the stream (the ingest path asks both for every reading).
    pub fn admit_and_activity(&self, r: ReadingView<'_>) -> (Admission, bool) {
        let Some(s) = self.streams.get(r.stream) else {
            return (self.admit_new_stream(), false);
        };
        let active = s.is_active();
        if r.time_ms < s.release_ms(&self.spec) {
            return (Admission::Late, active);
        }
        if self
            .spec
            .pane_of(r.time_ms)
            .saturating_add(self.spec.size_ms)
            <= s.closed_until
        {
            return (Admission::Revision, active);
        }
        if active {
            (Admission::Open, true)
        } else {
            (self.admit_new_stream(), false)
        }
    }

    fn admit_new_stream(&self) -> Admission {
        if self.active >= self.spec.max_streams {
            Admission::StreamLimit
        } else {
            Admission::Open
        }
    }

    /// Whether a reading admitted as open would make its stream active (for callers that admit
    /// a whole batch before adding it, to count the batch's new streams against the cap).
    pub fn is_active(&self, stream: &str) -> bool {
        self.streams
            .get(stream)
            .is_some_and(StreamWindows::is_active)
    }

    /// Streams holding panes.
    pub fn active_streams(&self) -> usize {
        self.active
    }

    /// Adds an admitted reading. `now_ms` is processing time, for the idle timeout. A reading
    /// before the stream's release time is ignored (a journal row not yet deleted).
    pub fn add(&mut self, r: ReadingView<'_>, now_ms: i64) {
        let spec = self.spec;
        let s = match self.streams.get_mut(r.stream) {
            Some(s) => s,
            None => self
                .streams
                .entry(r.stream.to_owned())
                .or_insert_with(|| StreamWindows::new(i64::MIN)),
        };
        let release = s.release_ms(&spec);
        if r.time_ms < release {
            return;
        }
        if !s.is_active() {
            self.active += 1;
            if let Some(h) = &mut self.horizon {
                *h = (*h).min(release);
            }
        }
        self.next_scan_ms = self
            .next_scan_ms
            .min(now_ms.saturating_add(spec.idle_timeout_ms));
        s.max_event_ms = s.max_event_ms.max(r.time_ms);
        s.last_seen_ms = now_ms;
        let pane = spec.pane_of(r.time_ms);
        let i = match s.panes.binary_search_by_key(&pane, |(p, _)| *p) {
            Ok(i) => i,
            Err(i) => {
                if s.panes.len() == s.panes.capacity() {
                    // Grow by one: most streams hold one or two panes for their whole life.
                    s.panes.reserve_exact(1);
                }
                if s.unit.as_deref() != r.unit {
                    s.unit = r.unit.map(Arc::from);
                }
                let acc = Accumulator::new(r, s.unit.clone(), self.sketch.as_ref());
                s.panes.insert(i, (pane, acc));
                self.panes += 1;
                i
            }
        };
        s.panes[i].1.push(r.time_ms, r.value);
        if spec.late_policy == LatePolicy::Revise
            && pane.saturating_add(spec.slide_ms) <= s.closed_until
        {
            // The oldest window containing the reading has closed: every closed window
            // containing it that is not final yet is emitted again (with hopping windows the
            // newest may still be open, and the reading was admitted as `Open`).
            let first = s.release_ms(&spec);
            let mut start = pane;
            while start > pane.saturating_sub(spec.size_ms) && start >= first {
                if start.saturating_add(spec.size_ms) <= s.closed_until {
                    s.revisions.get_or_insert_default().dirty.insert(start);
                }
                start = start.saturating_sub(spec.slide_ms);
            }
        }
        if !s.due && s.needs_close(&spec) {
            s.due = true;
            self.due.push(r.stream.to_owned());
        }
    }

    /// Closes every window whose stream watermark has passed its end, and every open window of a
    /// stream idle for the timeout, and re-emits revised windows. Returned in stream order, then
    /// window order.
    ///
    /// Only the streams marked due by [`Windows::add`] are looked at, except from `next_scan_ms`
    /// on, when every stream is (idleness is a matter of processing time, which no reading
    /// marks); the result is the same as walking every stream on every call, which the tests
    /// check against `force_full_scan`.
    ///
    /// Due streams are taken until `max_windows` windows closed (at least one stream per call):
    /// the others stay due for the next call ([`Windows::closing_pending`]), so one call never
    /// holds the caller for a whole boundary of 10,000 streams. Their windows stay open in the
    /// meantime and take readings as open windows do. A walk over every stream stops closing
    /// at `max_windows` the same way, and the next call walks again.
    pub fn advance(&mut self, now_ms: i64, max_windows: usize) -> Vec<ClosedWindow> {
        let mut out = Vec::new();
        let mut closer = Closer {
            spec: self.spec,
            agent_id: &self.agent_id,
            now_ms,
            closing: &mut self.closing,
            out: &mut out,
        };
        // Each stream's change moves the counters at once (fields apart from the ones borrowed).
        let (panes, active, horizon) = (&mut self.panes, &mut self.active, &mut self.horizon);
        let mut note = |c: StreamChange| {
            *panes -= c.panes_dropped;
            if c.deactivated {
                *active -= 1;
            }
            if c.released {
                *horizon = None;
            }
        };
        if now_ms >= self.next_scan_ms {
            let mut next_scan = i64::MAX;
            self.walk_cut = false;
            for (name, s) in self.streams.iter_mut() {
                s.due = false;
                if closer.out.len() >= max_windows {
                    // This call's share is closed: the next call walks every stream again
                    // (the ones closed here have nothing left to close).
                    self.walk_cut = true;
                    next_scan = now_ms;
                    continue;
                }
                if s.is_active() {
                    note(closer.close(name, s));
                }
                if s.is_active() {
                    next_scan = next_scan.min(s.idle_deadline(now_ms, &self.spec));
                }
            }
            self.due.clear();
            self.next_scan_ms = next_scan;
        } else {
            let mut taken = 0;
            for name in &self.due {
                if closer.out.len() >= max_windows {
                    break;
                }
                taken += 1;
                let Some(s) = self.streams.get_mut(name) else {
                    continue;
                };
                s.due = false;
                if s.is_active() {
                    note(closer.close(name, s));
                }
            }
            self.due.drain(..taken);
        }
        out.sort_by(|a, b| {
            (
                &a.summary.stream,
                a.summary.window_start_ms,
                a.summary.revision,
            )
                .cmp(&(
                    &b.summary.stream,
                    b.summary.window_start_ms,
                    b.summary.revision,
                ))
        });
        out
    }

    /// Whether streams are still due after an [`Windows::advance`] that stopped at its
    /// `max_windows`.
    pub fn closing_pending(&self) -> bool {
        !self.due.is_empty() || self.walk_cut
    }

    /// Makes the next [`Windows::advance`] walk every stream (tests: the reference behaviour).
    #[cfg(test)]
    fn force_full_scan(&mut self) {
        self.next_scan_ms = i64::MIN;
    }

    /// The earliest event time any stream still needs from the journal: the minimum over active
    /// streams of their release time (readings before a stream's release time can enter no window
    /// of it any more, see [`ClosedWindow::release_ms`]). An inactive stream holds no pane and so
    /// needs no row. The store deletes journal rows before it in the transaction that closes
    /// windows; `i64::MAX` when no stream is active. Computed again only after a close changed
    /// a stream's release time or made it inactive.
    pub fn journal_horizon(&mut self) -> i64 {
        if let Some(h) = self.horizon {
            return h;
        }
        let spec = self.spec;
        let h = self
            .streams
            .values()
            .filter(|s| s.is_active())
            .map(|s| s.release_ms(&spec))
            .min()
            .unwrap_or(i64::MAX);
        self.horizon = Some(h);
        h
    }

    /// Pane accumulators held, over all streams (for tumbling windows without revisions: the
    /// open windows).
    pub fn open_windows(&self) -> usize {
        self.panes
    }

    /// Number of streams tracked (active or not).
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

/// What closing one stream's due windows changed, for the counters of [`Windows`].
#[derive(Default)]
struct StreamChange {
    panes_dropped: usize,
    deactivated: bool,
    /// Its release time moved, or it stopped counting for the journal horizon.
    released: bool,
}

/// Closes one stream's due windows into `out` (the body of [`Windows::advance`]).
struct Closer<'a> {
    spec: WindowSpec,
    agent_id: &'a str,
    now_ms: i64,
    /// Scratch: window starts closing in the stream at hand.
    closing: &'a mut Vec<i64>,
    out: &'a mut Vec<ClosedWindow>,
}

impl Closer<'_> {
    fn close(&mut self, name: &str, s: &mut StreamWindows) -> StreamChange {
        let mut change = StreamChange::default();
        let idle = self.now_ms.saturating_sub(s.last_seen_ms) >= self.spec.idle_timeout_ms;
        let watermark = s.max_event_ms.saturating_sub(self.spec.allowed_lateness_ms);
        // Window starts are multiples of the slide; the first not closed yet:
        let first_open = self.spec.first_start_after(s.closed_until);
        // ...and the last that may close now.
        let last = if idle {
            s.panes.last().map_or(i64::MIN, |(p, _)| *p)
        } else {
            self.spec
                .pane_of(watermark.saturating_sub(self.spec.size_ms))
        };
        self.closing.clear();
        let mut next = first_open;
        for (p, _) in &s.panes {
            let lo = next.max(
                p.saturating_sub(self.spec.size_ms)
                    .saturating_add(self.spec.slide_ms),
            );
            let hi = (*p).min(last);
            if lo > last {
                break;
            }
            let mut w = lo;
            while w <= hi {
                self.closing.push(w);
                w = w.saturating_add(self.spec.slide_ms);
                if w == i64::MAX {
                    break;
                }
            }
            next = next.max(hi.saturating_add(self.spec.slide_ms));
        }
        let revised: Vec<i64> = s
            .revisions
            .as_mut()
            .map(|r| std::mem::take(&mut r.dirty).into_iter().collect())
            .unwrap_or_default();
        if self.closing.is_empty() && revised.is_empty() {
            let quiet_ms = self.now_ms.saturating_sub(s.last_seen_ms);
            if idle
                && quiet_ms
                    >= self
                        .spec
                        .idle_timeout_ms
                        .saturating_add(self.spec.horizon_ms())
            {
                // Idle for the horizon too: its closed windows become final.
                s.final_until = s.closed_until;
                change.panes_dropped = s.panes.len();
                change.deactivated = true;
                change.released = true;
                s.panes = Vec::new();
                s.revisions = None;
            }
            return change;
        }
        if let Some(&w) = self.closing.last() {
            let last_end = w.saturating_add(self.spec.size_ms);
            s.closed_until = s.closed_until.max(watermark).max(last_end);
            change.released = true;
        }
        let release = s.release_ms(&self.spec);
        let keep_revision = self.spec.late_policy == LatePolicy::Revise;
        for &w in revised.iter().chain(self.closing.iter()) {
            let Some(acc) = s.window(w, &self.spec) else {
                continue;
            };
            let revision = match s.revisions.as_ref().and_then(|r| r.emitted.get(&w)) {
                // Nothing new since the last emission (a journal replay after a restart).
                Some(e) if e.count >= acc.count => continue,
                Some(e) => e.revision.saturating_add(1),
                None => 0,
            };
            if keep_revision && w >= release {
                s.revisions.get_or_insert_default().emitted.insert(
                    w,
                    Emitted {
                        revision,
                        count: acc.count,
                    },
                );
            }
            self.out.push(ClosedWindow {
                summary: acc.summary(self.agent_id, name, w, revision, &self.spec),
                closed_until_ms: s.closed_until,
                release_ms: release,
                keep_revision,
            });
        }
        let kept_from = s.panes.partition_point(|(p, _)| *p < release);
        s.panes.drain(..kept_from);
        change.panes_dropped = kept_from;
        if let Some(r) = &mut s.revisions {
            r.emitted = r.emitted.split_off(&release);
            if r.emitted.is_empty() && r.dirty.is_empty() {
                s.revisions = None;
            }
        }
        if !s.is_active() {
            change.deactivated = true;
            change.released = true;
            s.panes = Vec::new();
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewise_protocol::Reading;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const SPEC: WindowSpec = WindowSpec::tumbling(10_000, 2_000, 60_000);

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
                let a = w.admit(x.as_view());
                if matches!(a, Admission::Open | Admission::Revision) {
                    w.add(x.as_view(), now);
                }
                a
            })
            .collect()
    }

    fn revise(spec: WindowSpec, horizon_ms: i64) -> WindowSpec {
        WindowSpec {
            late_policy: LatePolicy::Revise,
            revise_horizon_ms: horizon_ms,
            ..spec
        }
    }

    fn starts(closed: &[ClosedWindow]) -> Vec<(i64, u32, u64)> {
        closed
            .iter()
            .map(|c| {
                (
                    c.summary.window_start_ms,
                    c.summary.revision,
                    c.summary.count,
                )
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
        assert!(w.advance(0, usize::MAX).is_empty());
        // 11_999 - 2_000 lateness < 10_000: still open.
        feed(&mut w, &[r("s", 11_999, 7.0)], 0);
        assert!(w.advance(0, usize::MAX).is_empty());
        feed(&mut w, &[r("s", 12_000, 8.0)], 0);
        let closed = w.advance(0, usize::MAX);
        assert_eq!(closed.len(), 1);
        let s = &closed[0].summary;
        assert_eq!((s.window_start_ms, s.window_end_ms), (0, 10_000));
        assert_eq!(s.count, 3);
        assert_eq!((s.min, s.max, s.mean), (1.0, 3.0, 2.0));
        assert!((s.stddev - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.first_time_ms, s.first_value), (1_000, 1.0));
        assert_eq!((s.last_time_ms, s.last_value), (9_999, 2.0));
        assert_eq!(s.unit.as_deref(), Some("Cel"));
        assert_eq!(s.quantiles, None);
        assert_eq!(closed[0].closed_until_ms, 10_000);
        assert_eq!(closed[0].release_ms, 10_000);
        assert!(!closed[0].keep_revision);
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
        assert_eq!(w.advance(0, usize::MAX).len(), 2);
        assert_eq!(w.admit(r("s", 9_500, 1.0).as_view()), Admission::Late);
        assert_eq!(w.admit(r("s", 19_999, 1.0).as_view()), Admission::Late);
        assert_eq!(w.admit(r("s", 20_000, 1.0).as_view()), Admission::Open);
        // Other streams are unaffected.
        assert_eq!(w.admit(r("t", 0, 1.0).as_view()), Admission::Open);
    }

    #[test]
    fn idle_streams_close_by_processing_time() {
        let mut w = Windows::new("gw", SPEC);
        // Watermark 9_000: neither window is due by event time.
        feed(&mut w, &[r("s", 1_000, 1.0), r("s", 11_000, 2.0)], 100);
        assert!(w.advance(100 + 59_999, usize::MAX).is_empty());
        let closed = w.advance(100 + 60_000, usize::MAX);
        assert_eq!(closed.len(), 2);
        assert_eq!(w.open_windows(), 0);
        assert_eq!(w.active_streams(), 0);
        assert_eq!(w.admit(r("s", 19_000, 1.0).as_view()), Admission::Late);
    }

    #[test]
    fn restored_closed_until_refuses_already_shipped_windows() {
        let mut w = Windows::new("gw", SPEC);
        w.restore_closed("s", 20_000);
        assert_eq!(w.admit(r("s", 15_000, 1.0).as_view()), Admission::Late);
        assert_eq!(w.admit(r("s", 20_000, 1.0).as_view()), Admission::Open);
    }

    #[test]
    fn negative_times_floor_to_the_right_pane() {
        assert_eq!(SPEC.pane_of(-1), -10_000);
        assert_eq!(SPEC.pane_of(-10_000), -10_000);
        assert_eq!(SPEC.pane_of(0), 0);
        // Extreme times saturate instead of overflowing.
        assert_eq!(SPEC.pane_of(i64::MIN), i64::MIN);
    }

    #[test]
    fn hopping_windows_hold_each_reading_in_size_over_slide_windows() {
        let spec = WindowSpec {
            slide_ms: 5_000,
            ..WindowSpec::tumbling(10_000, 0, 60_000)
        };
        let mut w = Windows::new("gw", spec);
        feed(
            &mut w,
            &[r("s", 1_000, 1.0), r("s", 6_000, 2.0), r("s", 11_000, 3.0)],
            0,
        );
        // Watermark 11_000: [-5s, 5s) and [0, 10s) are due.
        let closed = w.advance(0, usize::MAX);
        assert_eq!(starts(&closed), vec![(-5_000, 0, 1), (0, 0, 2)]);
        assert_eq!(closed[1].summary.mean, 1.5);
        assert_eq!(closed[1].summary.window_end_ms, 10_000);
        // Pane [0, 5s) is no longer needed; [5s, 10s) still is, for [5s, 15s).
        assert_eq!(closed[1].release_ms, 5_000);
        assert_eq!(w.admit(r("s", 4_999, 0.0).as_view()), Admission::Late);
        assert_eq!(w.admit(r("s", 5_000, 0.0).as_view()), Admission::Open);
        let closed = w.advance(i64::MAX, usize::MAX);
        assert_eq!(starts(&closed), vec![(5_000, 0, 2), (10_000, 0, 1)]);
        let s = &closed[0].summary;
        assert_eq!((s.min, s.max, s.mean), (2.0, 3.0, 2.5));
        assert_eq!((s.first_time_ms, s.last_time_ms), (6_000, 11_000));
        assert!((s.stddev - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_late_reading_within_the_horizon_emits_the_next_revision() {
        let spec = revise(WindowSpec::tumbling(10_000, 0, 60_000), 20_000);
        let mut w = Windows::new("gw", spec);
        feed(&mut w, &[r("s", 1_000, 1.0), r("s", 12_000, 2.0)], 0);
        let closed = w.advance(0, usize::MAX);
        assert_eq!(starts(&closed), vec![(0, 0, 1)]);
        assert!(closed[0].keep_revision);
        // Still revisable: the journal keeps its readings.
        assert_eq!(closed[0].release_ms, -10_000);
        assert_eq!(
            feed(&mut w, &[r("s", 5_000, 3.0)], 0),
            vec![Admission::Revision]
        );
        let closed = w.advance(0, usize::MAX);
        assert_eq!(starts(&closed), vec![(0, 1, 2)]);
        assert_eq!(closed[0].summary.mean, 2.0);
        assert_eq!(closed[0].summary.last_value, 3.0);
        assert_eq!(closed[0].summary.id(), {
            let mut s = closed[0].summary.clone();
            s.revision = 1;
            s.id()
        });
        // Nothing new, nothing emitted.
        assert!(w.advance(0, usize::MAX).is_empty());
        // closed_until 35_000: windows ending at or before 15_000 are final.
        feed(&mut w, &[r("s", 35_000, 1.0)], 0);
        let closed = w.advance(0, usize::MAX);
        assert_eq!(starts(&closed), vec![(10_000, 0, 1)]);
        assert_eq!(closed[0].release_ms, 10_000);
        assert_eq!(w.admit(r("s", 9_999, 1.0).as_view()), Admission::Late);
        assert_eq!(w.admit(r("s", 10_000, 1.0).as_view()), Admission::Revision);
    }

    #[test]
    fn a_restart_replaying_the_journal_re_emits_only_windows_with_new_readings() {
        let spec = revise(WindowSpec::tumbling(10_000, 0, 60_000), 50_000);
        let mut w = Windows::new("gw", spec);
        feed(
            &mut w,
            &[r("s", 1_000, 1.0), r("s", 11_000, 2.0), r("s", 21_000, 3.0)],
            0,
        );
        let closed = w.advance(0, usize::MAX);
        assert_eq!(starts(&closed), vec![(0, 0, 1), (10_000, 0, 1)]);
        // A late reading for [10s, 20s) is journaled, then the agent crashes before emitting.
        let journal = [
            r("s", 1_000, 1.0),
            r("s", 11_000, 2.0),
            r("s", 21_000, 3.0),
            r("s", 15_000, 4.0),
        ];
        let mut w = Windows::new("gw", spec);
        w.restore_closed("s", closed[1].closed_until_ms);
        for c in &closed {
            let s = &c.summary;
            w.restore_revision("s", s.window_start_ms, s.revision, s.count);
        }
        for x in &journal {
            w.add(x.as_view(), 0);
        }
        assert_eq!(starts(&w.advance(0, usize::MAX)), vec![(10_000, 1, 2)]);
        assert!(w.advance(0, usize::MAX).is_empty());
    }

    #[test]
    fn an_idle_stream_finalises_its_windows_after_the_horizon() {
        let spec = revise(WindowSpec::tumbling(10_000, 0, 1_000), 30_000);
        let mut w = Windows::new("gw", spec);
        feed(&mut w, &[r("s", 1_000, 1.0)], 0);
        assert_eq!(starts(&w.advance(1_000, usize::MAX)), vec![(0, 0, 1)]);
        // Kept for revisions while the horizon lasts (in processing time, as it is idle).
        assert_eq!(w.active_streams(), 1);
        assert!(w.advance(30_999, usize::MAX).is_empty());
        assert_eq!(w.active_streams(), 1);
        assert!(w.advance(31_000, usize::MAX).is_empty());
        assert_eq!((w.active_streams(), w.open_windows()), (0, 0));
        assert_eq!(w.admit(r("s", 5_000, 1.0).as_view()), Admission::Late);
    }

    #[test]
    fn a_boundary_of_many_streams_closes_in_chunks_with_the_same_windows() {
        let readings: Vec<Reading> = (0..3_000)
            .flat_map(|i| {
                let s = format!("n{i}/t");
                [r(&s, 1_000, i as f64), r(&s, 12_000, 0.0)]
            })
            .collect();
        let mut whole = Windows::new("gw", SPEC);
        let mut chunked = Windows::new("gw", SPEC);
        feed(&mut whole, &readings, 0);
        feed(&mut chunked, &readings, 0);
        let all = whole.advance(0, usize::MAX);
        assert_eq!(all.len(), 3_000);
        assert!(!whole.closing_pending());

        let mut sizes = Vec::new();
        let mut parts = Vec::new();
        loop {
            let part = chunked.advance(0, 1_024);
            sizes.push(part.len());
            parts.extend(part);
            if !chunked.closing_pending() {
                break;
            }
            // Left due, still open: the window holds its readings until its turn comes.
            assert_eq!(chunked.open_windows(), 6_000 - parts.len());
        }
        assert_eq!(sizes, [1_024, 1_024, 952]);
        parts.sort_by(|a, b| a.summary.stream.cmp(&b.summary.stream));
        assert_eq!(parts, all);
        assert_eq!(chunked.open_windows(), 3_000);
        assert_eq!(chunked.journal_horizon(), whole.journal_horizon());
    }

    #[test]
    fn streams_going_idle_together_close_in_chunks_with_the_same_windows() {
        // 3,000 streams, one reading each in the first window, then silence: the walk over
        // every stream at the idle timeout closes them, at most 1,024 a call.
        let readings: Vec<Reading> = (0..3_000)
            .map(|i| r(&format!("n{i}/t"), 1_000, i as f64))
            .collect();
        let mut whole = Windows::new("gw", SPEC);
        let mut chunked = Windows::new("gw", SPEC);
        feed(&mut whole, &readings, 0);
        feed(&mut chunked, &readings, 0);
        let idle = SPEC.idle_timeout_ms;
        assert!(whole.advance(idle - 1, usize::MAX).is_empty());
        assert!(chunked.advance(idle - 1, 1_024).is_empty());
        let mut all = whole.advance(idle, usize::MAX);
        assert_eq!(all.len(), 3_000);
        assert!(!whole.closing_pending());

        let mut sizes = Vec::new();
        let mut parts = Vec::new();
        loop {
            let part = chunked.advance(idle, 1_024);
            sizes.push(part.len());
            parts.extend(part);
            if !chunked.closing_pending() {
                break;
            }
        }
        assert_eq!(sizes, [1_024, 1_024, 952]);
        parts.sort_by(|a, b| a.summary.stream.cmp(&b.summary.stream));
        all.sort_by(|a, b| a.summary.stream.cmp(&b.summary.stream));
        assert_eq!(parts, all);
        assert_eq!(chunked.open_windows(), whole.open_windows());
        assert_eq!(chunked.journal_horizon(), whole.journal_horizon());
        assert!(chunked.advance(idle, 1_024).is_empty());
    }

    #[test]
    fn streams_past_the_cap_are_refused_until_one_goes_quiet() {
        let spec = WindowSpec {
            max_streams: 2,
            ..WindowSpec::tumbling(10_000, 0, 1_000)
        };
        let mut w = Windows::new("gw", spec);
        feed(&mut w, &[r("a", 0, 1.0), r("b", 0, 1.0)], 0);
        assert_eq!(w.admit(r("c", 0, 1.0).as_view()), Admission::StreamLimit);
        assert_eq!(w.admit(r("a", 500, 1.0).as_view()), Admission::Open);
        assert!(w.is_active("a") && !w.is_active("c"));
        assert_eq!(
            w.admit_and_activity(r("a", 500, 1.0).as_view()),
            (Admission::Open, true)
        );
        assert_eq!(
            w.admit_and_activity(r("c", 0, 1.0).as_view()),
            (Admission::StreamLimit, false)
        );
        assert_eq!(w.advance(1_000, usize::MAX).len(), 2);
        assert_eq!(w.active_streams(), 0);
        assert_eq!(w.admit(r("c", 0, 1.0).as_view()), Admission::Open);
    }

    #[test]
    fn quantiles_are_within_the_stated_bound() {
        let spec = WindowSpec {
            quantile_relative_error: Some(0.01),
            ..WindowSpec::tumbling(1_000_000, 0, 1_000)
        };
        let mut w = Windows::new("gw", spec);
        let rs: Vec<Reading> = (1..=1000).map(|i| r("s", i, i as f64)).collect();
        feed(&mut w, &rs, 0);
        let closed = w.advance(1_000, usize::MAX);
        let q = closed[0].summary.quantiles.clone().unwrap();
        assert_eq!(q.relative_error, 0.01);
        // Ranks floor(q * 999): 499, 899, 989 -> values 500, 900, 990.
        for (est, exact) in [(q.p50, 500.0), (q.p90, 900.0), (q.p99, 990.0)] {
            assert!((est - exact).abs() <= 0.01 * exact, "{est} vs {exact}");
        }
        assert_eq!(closed[0].summary.validate(), Ok(()));
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
        sorted: Vec<f64>,
    }

    /// Sort-then-aggregate reference for one stream's readings in one window, in arrival order.
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
        let mut sorted: Vec<f64> = rs.iter().map(|x| x.1).collect();
        sorted.sort_by(f64::total_cmp);
        Expected {
            count: rs.len() as u64,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            mean,
            stddev: var.sqrt(),
            first,
            last: last.unwrap_or(first),
            sorted,
        }
    }

    /// Checks one emitted summary against the reference over `vals`.
    fn check(s: &WindowSummary, vals: &[(i64, f64)]) -> Result<(), TestCaseError> {
        prop_assert!(!vals.is_empty(), "emitted an empty window {:?}", s);
        let e = reference(vals);
        prop_assert_eq!(s.count, e.count);
        prop_assert_eq!(s.min, e.min);
        prop_assert_eq!(s.max, e.max);
        let scale = 1.0 + e.max.abs().max(e.min.abs());
        prop_assert!(
            (s.mean - e.mean).abs() <= 1e-9 * scale,
            "mean {} vs {}",
            s.mean,
            e.mean
        );
        prop_assert!(
            (s.stddev - e.stddev).abs() <= 1e-6 * scale,
            "sd {} vs {}",
            s.stddev,
            e.stddev
        );
        prop_assert_eq!((s.first_time_ms, s.first_value), e.first);
        prop_assert_eq!((s.last_time_ms, s.last_value), e.last);
        if let Some(q) = &s.quantiles {
            for (p, est) in [(0.5, q.p50), (0.9, q.p90), (0.99, q.p99)] {
                let exact = e.sorted[(p * (e.count as f64 - 1.0)) as usize];
                let bound = q.relative_error * exact.abs() + SKETCH_MIN_VALUE;
                prop_assert!(
                    (est - exact).abs() <= bound * (1.0 + 1e-9),
                    "p{} {} vs {}",
                    p,
                    est,
                    exact
                );
            }
        }
        prop_assert_eq!(s.validate(), Ok(()));
        Ok(())
    }

    fn arb_spec() -> impl Strategy<Value = WindowSpec> {
        (
            1i64..=3,
            0i64..3_000,
            any::<bool>(),
            1i64..8_000,
            any::<bool>(),
        )
            .prop_map(|(hops, lateness, revise, horizon, quantiles)| WindowSpec {
                size_ms: 2_000 * hops,
                slide_ms: 2_000,
                allowed_lateness_ms: lateness,
                idle_timeout_ms: 1_000_000,
                late_policy: if revise {
                    LatePolicy::Revise
                } else {
                    LatePolicy::Drop
                },
                revise_horizon_ms: horizon,
                max_streams: usize::MAX,
                quantile_relative_error: quantiles.then_some(0.01),
            })
    }

    /// The store's view of what was persisted: closed_until and release per stream, revision
    /// records, and the journal (accepted readings not yet released), as `commit_closed` keeps them.
    #[derive(Default)]
    struct Persisted {
        closed_until: HashMap<String, i64>,
        release: HashMap<String, i64>,
        revisions: BTreeMap<(String, i64), (u32, u64)>,
        journal: Vec<Reading>,
    }

    impl Persisted {
        fn commit(&mut self, closed: &[ClosedWindow]) {
            for c in closed {
                let s = &c.summary;
                let cu = self
                    .closed_until
                    .entry(s.stream.clone())
                    .or_insert(i64::MIN);
                *cu = (*cu).max(c.closed_until_ms);
                self.release.insert(s.stream.clone(), c.release_ms);
                if c.keep_revision {
                    self.revisions
                        .insert((s.stream.clone(), s.window_start_ms), (s.revision, s.count));
                }
                self.revisions
                    .retain(|(st, w), _| st != &s.stream || *w >= c.release_ms);
                self.journal
                    .retain(|x| x.stream != s.stream || x.time_ms >= c.release_ms);
            }
        }

        fn restart(&self, spec: WindowSpec) -> Windows {
            let mut w = Windows::new("gw", spec);
            for (s, c) in &self.closed_until {
                w.restore_closed(s, *c);
            }
            for ((s, start), (rev, count)) in &self.revisions {
                w.restore_revision(s, *start, *rev, *count);
            }
            for x in &self.journal {
                w.add(x.as_view(), 0);
            }
            w
        }
    }

    proptest! {
        /// Every emission equals the sort-then-aggregate reference over the accepted readings of
        /// its window that arrived before it; revisions count up from 0 with growing counts
        /// (drop: one emission per window); every accepted reading reaches an emission of its
        /// newest window; nothing is refused as late that the watermark did not pass. Part way
        /// through, the agent "restarts" from what the store would hold, and the emissions go on
        /// exactly as without the restart.
        #[test]
        fn emissions_match_the_reference(
            spec in arb_spec(),
            events in proptest::collection::vec((0..3usize, 0i64..40_000, -1e3f64..1e3, 0u8..4), 1..200),
            restart_at in 0usize..200,
        ) {
            let mut w = Windows::new("gw", spec);
            let mut persisted = Persisted::default();
            let horizon = spec.horizon_ms();
            let mut accepted: Vec<(usize, Reading)> = Vec::new();
            let mut emitted: Vec<(usize, ClosedWindow)> = Vec::new();
            let mut max_event: HashMap<String, i64> = HashMap::new();
            for (i, (s, t, v, tick)) in events.iter().enumerate() {
                if i == restart_at {
                    // Advance first: a pending revision would be emitted after the restart too,
                    // but into a different emission step than the reference expects.
                    let c = w.advance(0, usize::MAX);
                    persisted.commit(&c);
                    emitted.extend(c.into_iter().map(|c| (i, c)));
                    w = persisted.restart(spec);
                    prop_assert!(w.advance(0, usize::MAX).is_empty(), "a restart re-emitted a window");
                }
                let x = r(&format!("s{s}"), *t, *v);
                let newest = max_event.get(&x.stream).copied();
                prop_assert_eq!(w.admit_and_activity(x.as_view()).1, w.is_active(&x.stream));
                match w.admit(x.as_view()) {
                    Admission::Late => {
                        let m = newest.unwrap_or(i64::MIN);
                        prop_assert!(*t < m.saturating_sub(spec.allowed_lateness_ms + horizon), "{} refused, newest {}", t, m);
                    }
                    Admission::StreamLimit => prop_assert!(false, "no cap set"),
                    a => {
                        if spec.late_policy == LatePolicy::Drop {
                            prop_assert_eq!(a, Admission::Open);
                        }
                        w.add(x.as_view(), 0);
                        max_event.insert(x.stream.clone(), newest.unwrap_or(i64::MIN).max(*t));
                        persisted.journal.push(x.clone());
                        accepted.push((i, x));
                    }
                }
                if *tick == 0 {
                    let c = w.advance(0, usize::MAX);
                    persisted.commit(&c);
                    emitted.extend(c.into_iter().map(|c| (i + 1, c)));
                }
            }
            let c = w.advance(i64::MAX, usize::MAX);
            emitted.extend(c.into_iter().map(|c| (events.len(), c)));

            let mut revisions: BTreeMap<(String, i64), Vec<(u32, u64)>> = BTreeMap::new();
            for (k, c) in &emitted {
                let s = &c.summary;
                let vals: Vec<(i64, f64)> = accepted
                    .iter()
                    .filter(|(i, x)| *i < *k && x.stream == s.stream
                        && x.time_ms >= s.window_start_ms && x.time_ms < s.window_end_ms)
                    .map(|(_, x)| (x.time_ms, x.value))
                    .collect();
                check(s, &vals)?;
                prop_assert_eq!(s.window_end_ms - s.window_start_ms, spec.size_ms);
                prop_assert_eq!(s.window_start_ms.rem_euclid(spec.slide_ms), 0);
                revisions.entry((s.stream.clone(), s.window_start_ms)).or_default().push((s.revision, s.count));
            }
            for revs in revisions.values() {
                for (n, (rev, count)) in revs.iter().enumerate() {
                    prop_assert_eq!(*rev as usize, n);
                    if n > 0 {
                        prop_assert!(*count > revs[n - 1].1);
                    }
                }
                if spec.late_policy == LatePolicy::Drop {
                    prop_assert_eq!(revs.len(), 1);
                }
            }
            for (i, x) in &accepted {
                let newest = spec.pane_of(x.time_ms);
                prop_assert!(
                    emitted.iter().any(|(k, c)| k > i && c.summary.stream == x.stream
                        && c.summary.window_start_ms == newest),
                    "reading {:?} (arrival {}) never reached its window", x, i
                );
            }
        }

        /// `advance` looking only at the streams marked due (and at every stream once one may
        /// have gone idle) emits exactly what walking every stream on every call emits, and
        /// keeps the same counters and journal horizon, with idle timeouts, revisions and
        /// processing time moving at random.
        #[test]
        fn advancing_due_streams_only_equals_walking_every_stream(
            spec in arb_spec(),
            idle_timeout_ms in 0i64..5_000,
            events in proptest::collection::vec((0..4usize, 0i64..40_000, 0i64..3_000, 0u8..3), 1..200),
        ) {
            let spec = WindowSpec { idle_timeout_ms, ..spec };
            let mut fast = Windows::new("gw", spec);
            let mut reference = Windows::new("gw", spec);
            let mut now = 0i64;
            for (s, t, wait_ms, tick) in events {
                now += wait_ms;
                let x = r(&format!("s{s}"), t, t as f64);
                let admitted = fast.admit(x.as_view());
                prop_assert_eq!(admitted, reference.admit(x.as_view()));
                if matches!(admitted, Admission::Open | Admission::Revision) {
                    fast.add(x.as_view(), now);
                    reference.add(x.as_view(), now);
                }
                if tick == 0 {
                    reference.force_full_scan();
                    prop_assert_eq!(fast.advance(now, usize::MAX), reference.advance(now, usize::MAX));
                    prop_assert_eq!(fast.active_streams(), reference.active_streams());
                    let panes: usize = reference.streams.values().map(|s| s.panes.len()).sum();
                    prop_assert_eq!(fast.open_windows(), panes);
                    reference.horizon = None;
                    prop_assert_eq!(fast.journal_horizon(), reference.journal_horizon());
                }
            }
            // Idle: every window closes; idle for the horizon too (the next call): all final.
            let end = now + idle_timeout_ms + spec.horizon_ms();
            for _ in 0..2 {
                reference.force_full_scan();
                prop_assert_eq!(fast.advance(end, usize::MAX), reference.advance(end, usize::MAX));
            }
            prop_assert_eq!(fast.open_windows(), 0);
            prop_assert_eq!(fast.active_streams(), 0);
        }
    }
}
