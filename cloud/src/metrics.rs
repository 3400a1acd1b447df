//! The receiver's counters, rendered by hand in the Prometheus text format 0.0.4.
//!
//! Each [`crate::Receiver`] owns one [`Metrics`] (no global recorder), so many receivers can run
//! in one process, as the tests do. Counters only go up; relaxed atomics are enough because each
//! counter is independent. Rejections are counted once per refused batch, by reason; a refused
//! batch stores nothing.
//!
//! Tested by the unit test below (exact text) and by `tests/api.rs` (values after real requests).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;

use crate::store::IngestOutcome;

/// The `Content-Type` of [`Metrics::render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why an ingest request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No, a wrong, or a revoked token (401).
    Unauthorized,
    /// A device writing another device's data (403).
    Forbidden,
    /// The body is not a CBOR batch of a known version (400).
    Malformed,
    /// A summary failed validation, or the batch holds too many (400).
    Invalid,
    /// The body is over the size limit (413).
    TooLarge,
    /// The device is over its rate limit (429).
    RateLimited,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::Unauthorized,
        RejectReason::Forbidden,
        RejectReason::Malformed,
        RejectReason::Invalid,
        RejectReason::TooLarge,
        RejectReason::RateLimited,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Forbidden => "forbidden",
            RejectReason::Malformed => "malformed",
            RejectReason::Invalid => "invalid",
            RejectReason::TooLarge => "too_large",
            RejectReason::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters of one receiver.
#[derive(Debug, Default)]
pub struct Metrics {
    ingest_2xx: AtomicU64,
    ingest_4xx: AtomicU64,
    ingest_5xx: AtomicU64,
    inserted: AtomicU64,
    duplicates: AtomicU64,
    revised: AtomicU64,
    latest_stored: AtomicU64,
    latest_ignored: AtomicU64,
    rejected: [AtomicU64; 6],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub ingest_requests_2xx: u64,
    pub ingest_requests_4xx: u64,
    pub ingest_requests_5xx: u64,
    pub summaries_inserted: u64,
    pub summaries_duplicate: u64,
    pub summaries_revised: u64,
    pub latest_stored: u64,
    pub latest_ignored: u64,
    pub rejected_unauthorized: u64,
    pub rejected_forbidden: u64,
    pub rejected_malformed: u64,
    pub rejected_invalid: u64,
    pub rejected_too_large: u64,
    pub rejected_rate_limited: u64,
}

impl Metrics {
    /// Counts one answered ingest request by its status class (1xx and 3xx are not counted).
    pub fn record_ingest_status(&self, status: StatusCode) {
        let counter = match status.as_u16() / 100 {
            2 => &self.ingest_2xx,
            4 => &self.ingest_4xx,
            5 => &self.ingest_5xx,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_outcome(&self, outcome: &IngestOutcome) {
        self.inserted.fetch_add(outcome.inserted, Ordering::Relaxed);
        self.duplicates
            .fetch_add(outcome.duplicates, Ordering::Relaxed);
        self.revised.fetch_add(outcome.revised, Ordering::Relaxed);
        self.latest_stored
            .fetch_add(outcome.latest_stored, Ordering::Relaxed);
        self.latest_ignored
            .fetch_add(outcome.latest_ignored, Ordering::Relaxed);
    }

    pub fn record_rejection(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            ingest_requests_2xx: get(&self.ingest_2xx),
            ingest_requests_4xx: get(&self.ingest_4xx),
            ingest_requests_5xx: get(&self.ingest_5xx),
            summaries_inserted: get(&self.inserted),
            summaries_duplicate: get(&self.duplicates),
            summaries_revised: get(&self.revised),
            latest_stored: get(&self.latest_stored),
            latest_ignored: get(&self.latest_ignored),
            rejected_unauthorized: self.rejected(RejectReason::Unauthorized),
            rejected_forbidden: self.rejected(RejectReason::Forbidden),
            rejected_malformed: self.rejected(RejectReason::Malformed),
            rejected_invalid: self.rejected(RejectReason::Invalid),
            rejected_too_large: self.rejected(RejectReason::TooLarge),
            rejected_rate_limited: self.rejected(RejectReason::RateLimited),
        }
    }

    /// The counters in the Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::with_capacity(1024);
        family(
            &mut out,
            "edgewise_ingest_requests_total",
            "Ingest requests answered, by HTTP status class.",
            "class",
            &[
                ("2xx", s.ingest_requests_2xx),
                ("4xx", s.ingest_requests_4xx),
                ("5xx", s.ingest_requests_5xx),
            ],
        );
        family(
            &mut out,
            "edgewise_summaries_total",
            "Summaries in accepted batches, by what storing them did.",
            "outcome",
            &[
                ("inserted", s.summaries_inserted),
                ("duplicate", s.summaries_duplicate),
                ("revised", s.summaries_revised),
            ],
        );
        family(
            &mut out,
            "edgewise_latest_values_total",
            "Latest (text, boolean, data) values in accepted batches: stored, or ignored as not newer.",
            "outcome",
            &[("stored", s.latest_stored), ("ignored", s.latest_ignored)],
        );
        let rejected: Vec<(&str, u64)> = RejectReason::ALL
            .iter()
            .map(|r| (r.label(), self.rejected(*r)))
            .collect();
        family(
            &mut out,
            "edgewise_ingest_rejected_batches_total",
            "Ingest requests refused (nothing stored), by reason.",
            "reason",
            &rejected,
        );
        out
    }
}

fn family(out: &mut String, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
    // Writing into a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (value, count) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_with_its_value() {
        let m = Metrics::default();
        m.record_ingest_status(StatusCode::OK);
        m.record_ingest_status(StatusCode::UNAUTHORIZED);
        m.record_ingest_status(StatusCode::PAYLOAD_TOO_LARGE);
        m.record_ingest_status(StatusCode::INTERNAL_SERVER_ERROR);
        m.record_outcome(&IngestOutcome {
            inserted: 5,
            duplicates: 2,
            revised: 1,
            latest_stored: 3,
            latest_ignored: 4,
            ..IngestOutcome::default()
        });
        m.record_rejection(RejectReason::Unauthorized);
        m.record_rejection(RejectReason::TooLarge);
        let text = m.render_prometheus();
        for line in [
            "# TYPE edgewise_ingest_requests_total counter",
            "edgewise_ingest_requests_total{class=\"2xx\"} 1",
            "edgewise_ingest_requests_total{class=\"4xx\"} 2",
            "edgewise_ingest_requests_total{class=\"5xx\"} 1",
            "edgewise_summaries_total{outcome=\"inserted\"} 5",
            "edgewise_summaries_total{outcome=\"duplicate\"} 2",
            "edgewise_summaries_total{outcome=\"revised\"} 1",
            "edgewise_latest_values_total{outcome=\"stored\"} 3",
            "edgewise_latest_values_total{outcome=\"ignored\"} 4",
            "edgewise_ingest_rejected_batches_total{reason=\"unauthorized\"} 1",
            "edgewise_ingest_rejected_batches_total{reason=\"forbidden\"} 0",
            "edgewise_ingest_rejected_batches_total{reason=\"malformed\"} 0",
            "edgewise_ingest_rejected_batches_total{reason=\"invalid\"} 0",
            "edgewise_ingest_rejected_batches_total{reason=\"too_large\"} 1",
            "edgewise_ingest_rejected_batches_total{reason=\"rate_limited\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
        assert_eq!(m.snapshot().rejected_too_large, 1);
    }
}
