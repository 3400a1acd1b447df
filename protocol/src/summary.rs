//! Readings and window summaries.
//!
//! A [`WindowSummary`] is identified by `(agent id, stream, window start, revision)`; its
//! [`SummaryId`] is a hash of exactly those fields, so the agent and the receiver compute the same
//! id for the same window without coordination, and a retried upload can be recognised.

use alloc::string::String;
use minicbor::{Decode, Encode};
use sha2::{Digest, Sha256};

/// One numeric measurement of one stream at one event time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The stream: device and metric, e.g. `node-7/temperature`.
    pub stream: String,
    /// Event time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub value: f64,
    /// SenML unit symbol, when the sender gave one.
    pub unit: Option<String>,
}

impl Reading {
    /// The same reading, borrowed.
    pub fn as_view(&self) -> ReadingView<'_> {
        ReadingView {
            stream: &self.stream,
            time_ms: self.time_ms,
            value: self.value,
            unit: self.unit.as_deref(),
        }
    }
}

/// A [`Reading`] that borrows its stream and unit, for code that only looks at readings (the
/// agent's windows and journal): a hot path can hand them out without a `String` per reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingView<'a> {
    pub stream: &'a str,
    /// Event time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub value: f64,
    pub unit: Option<&'a str>,
}

/// Statistics of one stream over one event-time window `[window_start_ms, window_end_ms)`.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct WindowSummary {
    #[n(0)]
    pub agent_id: String,
    #[n(1)]
    pub stream: String,
    #[n(2)]
    pub window_start_ms: i64,
    #[n(3)]
    pub window_end_ms: i64,
    /// 0 for the first emission of a window; later revisions replace earlier ones.
    #[n(4)]
    pub revision: u32,
    #[n(5)]
    pub count: u64,
    #[n(6)]
    pub min: f64,
    #[n(7)]
    pub max: f64,
    #[n(8)]
    pub mean: f64,
    /// Population standard deviation.
    #[n(9)]
    pub stddev: f64,
    /// Value and time of the reading with the earliest event time.
    #[n(10)]
    pub first_value: f64,
    #[n(11)]
    pub first_time_ms: i64,
    /// Value and time of the reading with the latest event time.
    #[n(12)]
    pub last_value: f64,
    #[n(13)]
    pub last_time_ms: i64,
    #[n(14)]
    pub unit: Option<String>,
    /// The agent's anomaly score for this window, when a model scored it.
    #[n(15)]
    pub score: Option<Score>,
    /// Estimated quantiles of the window's values, when the agent is configured to compute them.
    /// Absent in summaries from agents that do not (older batches decode with `None`).
    #[n(16)]
    pub quantiles: Option<Quantiles>,
}

/// Quantiles of one window's values from a mergeable sketch (DDSketch): each estimate `e` of the
/// true quantile value `x` satisfies `|e - x| <= relative_error * |x|` (values within `1e-9` of
/// zero count as zero). The true quantile is the value at rank `floor(q * (count - 1))` of the
/// sorted values (0-based).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct Quantiles {
    #[n(0)]
    pub p50: f64,
    #[n(1)]
    pub p90: f64,
    #[n(2)]
    pub p99: f64,
    /// The sketch's relative error bound, e.g. `0.01` for 1%.
    #[n(3)]
    pub relative_error: f64,
}

/// An anomaly score from the agent's model.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct Score {
    #[n(0)]
    pub value: f64,
    /// `value` reached the model's threshold: the summary is an alert (kept longest in the
    /// agent's buffer, sent first).
    #[n(1)]
    pub alert: bool,
    /// Model name and version (content hash), e.g. `anomaly@3f2a9c1d`.
    #[n(2)]
    pub model: String,
}

/// Deterministic identity of a summary: SHA-256 (truncated to 128 bits) over the length-prefixed
/// agent id and stream, the window start and the revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SummaryId(pub [u8; 16]);

impl SummaryId {
    pub fn new(agent_id: &str, stream: &str, window_start_ms: i64, revision: u32) -> Self {
        let mut h = Sha256::new();
        h.update((agent_id.len() as u64).to_be_bytes());
        h.update(agent_id.as_bytes());
        h.update((stream.len() as u64).to_be_bytes());
        h.update(stream.as_bytes());
        h.update(window_start_ms.to_be_bytes());
        h.update(revision.to_be_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        SummaryId(id)
    }
}

impl core::fmt::Display for SummaryId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a summary is not acceptable to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidSummary {
    EmptyAgentId,
    EmptyStream,
    /// A name longer than [`WindowSummary::MAX_NAME_BYTES`].
    NameTooLong,
    EmptyWindow,
    ZeroCount,
    NotFinite(&'static str),
    /// `min <= first, last, mean <= max` does not hold.
    Inconsistent,
    /// First or last time lies outside the window.
    TimeOutsideWindow,
}

impl core::fmt::Display for InvalidSummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::EmptyAgentId => f.write_str("agent_id is empty"),
            Self::EmptyStream => f.write_str("stream is empty"),
            Self::NameTooLong => {
                f.write_str("agent_id, stream, unit or model is longer than 256 bytes")
            }
            Self::EmptyWindow => f.write_str("window_end_ms is not after window_start_ms"),
            Self::ZeroCount => f.write_str("count is 0"),
            Self::NotFinite(field) => write!(f, "{field} is not a finite number"),
            Self::Inconsistent => f.write_str(
                "statistics are inconsistent (min <= mean, first, last, p50 <= p90 <= p99 <= max)",
            ),
            Self::TimeOutsideWindow => f.write_str("first or last time is outside the window"),
        }
    }
}

impl WindowSummary {
    /// Longest accepted agent id, stream name or unit, in bytes.
    pub const MAX_NAME_BYTES: usize = 256;

    pub fn id(&self) -> SummaryId {
        SummaryId::new(
            &self.agent_id,
            &self.stream,
            self.window_start_ms,
            self.revision,
        )
    }

    /// Whether the agent flagged this window as an anomaly.
    pub fn is_alert(&self) -> bool {
        self.score.as_ref().is_some_and(|s| s.alert)
    }

    /// Checks what every receiver must check before storing a summary.
    pub fn validate(&self) -> Result<(), InvalidSummary> {
        if self.agent_id.is_empty() {
            return Err(InvalidSummary::EmptyAgentId);
        }
        if self.stream.is_empty() {
            return Err(InvalidSummary::EmptyStream);
        }
        let unit_len = self.unit.as_ref().map_or(0, |u| u.len());
        let model_len = self.score.as_ref().map_or(0, |s| s.model.len());
        if self
            .agent_id
            .len()
            .max(self.stream.len())
            .max(unit_len)
            .max(model_len)
            > Self::MAX_NAME_BYTES
        {
            return Err(InvalidSummary::NameTooLong);
        }
        if self.window_end_ms <= self.window_start_ms {
            return Err(InvalidSummary::EmptyWindow);
        }
        if self.count == 0 {
            return Err(InvalidSummary::ZeroCount);
        }
        for (name, v) in [
            ("min", self.min),
            ("max", self.max),
            ("mean", self.mean),
            ("stddev", self.stddev),
            ("first_value", self.first_value),
            ("last_value", self.last_value),
            ("score", self.score.as_ref().map_or(0.0, |s| s.value)),
            ("p50", self.quantiles.as_ref().map_or(0.0, |q| q.p50)),
            ("p90", self.quantiles.as_ref().map_or(0.0, |q| q.p90)),
            ("p99", self.quantiles.as_ref().map_or(0.0, |q| q.p99)),
            (
                "relative_error",
                self.quantiles.as_ref().map_or(0.0, |q| q.relative_error),
            ),
        ] {
            if !v.is_finite() {
                return Err(InvalidSummary::NotFinite(name));
            }
        }
        // The mean of finite values can round a hair outside [min, max]; allow that much.
        let slack = (self.max - self.min).abs() * 1e-9 + f64::EPSILON * self.max.abs().max(1.0);
        let within = |v: f64| v >= self.min - slack && v <= self.max + slack;
        if self.min > self.max
            || !within(self.mean)
            || !within(self.first_value)
            || !within(self.last_value)
            || self.stddev < 0.0
        {
            return Err(InvalidSummary::Inconsistent);
        }
        if let Some(q) = &self.quantiles
            && !(q.p50 <= q.p90
                && q.p90 <= q.p99
                && within(q.p50)
                && within(q.p99)
                && (0.0..1.0).contains(&q.relative_error))
        {
            return Err(InvalidSummary::Inconsistent);
        }
        let in_window = |t: i64| t >= self.window_start_ms && t < self.window_end_ms;
        if !in_window(self.first_time_ms) || !in_window(self.last_time_ms) {
            return Err(InvalidSummary::TimeOutsideWindow);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::string::ToString;

    pub(crate) fn sample() -> WindowSummary {
        WindowSummary {
            agent_id: "gw-1".to_string(),
            stream: "node-1/temperature".to_string(),
            window_start_ms: 1_700_000_000_000,
            window_end_ms: 1_700_000_010_000,
            revision: 0,
            count: 3,
            min: 20.0,
            max: 22.0,
            mean: 21.0,
            stddev: 0.816,
            first_value: 20.0,
            first_time_ms: 1_700_000_000_500,
            last_value: 22.0,
            last_time_ms: 1_700_000_009_500,
            unit: Some("Cel".to_string()),
            score: None,
            quantiles: None,
        }
    }

    #[test]
    fn id_depends_on_exactly_the_identity_fields() {
        let a = sample();
        let mut b = a.clone();
        b.mean = 21.5;
        assert_eq!(a.id(), b.id());
        b.revision = 1;
        assert_ne!(a.id(), b.id());
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            SummaryId::new("ab", "c", 0, 0),
            SummaryId::new("a", "bc", 0, 0)
        );
        assert_eq!(a.id().to_string().len(), 32);
    }

    #[test]
    fn validate_accepts_a_good_summary_and_names_each_fault() {
        assert_eq!(sample().validate(), Ok(()));
        let mut s = sample();
        s.count = 0;
        assert_eq!(s.validate(), Err(InvalidSummary::ZeroCount));
        let mut s = sample();
        s.mean = f64::NAN;
        assert_eq!(s.validate(), Err(InvalidSummary::NotFinite("mean")));
        let mut s = sample();
        s.max = 10.0;
        assert_eq!(s.validate(), Err(InvalidSummary::Inconsistent));
        let mut s = sample();
        s.window_end_ms = s.window_start_ms;
        assert_eq!(s.validate(), Err(InvalidSummary::EmptyWindow));
        let mut s = sample();
        s.last_time_ms = s.window_end_ms;
        assert_eq!(s.validate(), Err(InvalidSummary::TimeOutsideWindow));
        let mut s = sample();
        s.stream = "x".repeat(300);
        assert_eq!(s.validate(), Err(InvalidSummary::NameTooLong));
        let mut s = sample();
        s.score = Some(Score {
            value: f64::INFINITY,
            alert: true,
            model: "m@1".to_string(),
        });
        assert_eq!(s.validate(), Err(InvalidSummary::NotFinite("score")));
        let good = Quantiles {
            p50: 21.0,
            p90: 21.8,
            p99: 22.0,
            relative_error: 0.01,
        };
        let mut s = sample();
        s.quantiles = Some(good.clone());
        assert_eq!(s.validate(), Ok(()));
        s.quantiles = Some(Quantiles {
            p90: 20.5,
            ..good.clone()
        });
        assert_eq!(s.validate(), Err(InvalidSummary::Inconsistent));
        s.quantiles = Some(Quantiles {
            p99: 30.0,
            ..good.clone()
        });
        assert_eq!(s.validate(), Err(InvalidSummary::Inconsistent));
        s.quantiles = Some(Quantiles {
            p50: f64::NAN,
            ..good
        });
        assert_eq!(s.validate(), Err(InvalidSummary::NotFinite("p50")));
    }

    #[test]
    fn quantiles_are_optional_on_the_wire() {
        let mut s = sample();
        let without = minicbor::to_vec(&s).unwrap();
        // An older encoder's summary (no field 16) decodes with no quantiles.
        let old: WindowSummary = minicbor::decode(&without).unwrap();
        assert_eq!(old.quantiles, None);
        s.quantiles = Some(Quantiles {
            p50: 21.0,
            p90: 21.5,
            p99: 22.0,
            relative_error: 0.01,
        });
        let with = minicbor::to_vec(&s).unwrap();
        assert!(with.len() > without.len());
        assert_eq!(minicbor::decode::<WindowSummary>(&with).unwrap(), s);
    }
}
