//! The agent's counters and gauges, rendered as Prometheus text on `/metrics`.
//!
//! Each running agent owns one [`Metrics`] (no global registry), so tests and the demo can run
//! several agents in one process and read each one's numbers directly.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts keyed by a reason label. Reasons are `&'static str`, so the label set is bounded.
#[derive(Debug, Default)]
pub struct ReasonCounter(Mutex<BTreeMap<&'static str, u64>>);

impl ReasonCounter {
    pub fn add(&self, reason: &'static str, n: u64) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(reason).or_default() += n;
        }
    }
    pub fn get(&self, reason: &str) -> u64 {
        self.0
            .lock()
            .map(|m| m.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_received: Counter,
    /// Undecodable messages, by reason.
    pub messages_rejected: ReasonCounter,
    /// Numeric readings accepted into a window (journaled).
    pub readings_accepted: Counter,
    /// Readings refused, by reason (`out_of_range`, `late`, `duplicate`).
    pub readings_rejected: ReasonCounter,
    /// SenML records without a numeric value (string, bool, data), skipped.
    pub records_skipped_non_numeric: Counter,
    pub journal_commits: Counter,
    pub store_errors: Counter,
    pub acks_sent: Counter,
    pub windows_closed: Counter,
    /// Closed windows the model scored, of which alerts, and those it could not score.
    pub windows_scored: Counter,
    pub windows_alerted: Counter,
    pub windows_score_failed: Counter,
    pub summaries_synced: Counter,
    /// Summaries the receiver refused for good, moved to the dead-letter table.
    pub summaries_rejected: Counter,
    pub sync_requests_ok: Counter,
    pub sync_failures: Counter,
    pub sync_bytes_sent: Counter,
    pub mqtt_connections: Counter,
    pub mqtt_connection_errors: Counter,
    /// Summaries evicted because the buffer reached `max_buffer_bytes`.
    pub buffer_evictions: Counter,
    /// Gap records written (evictions, a corrupt database moved aside).
    pub gaps_recorded: Counter,
    /// Gap records acknowledged by the cloud.
    pub gaps_synced: Counter,
    /// Times a corrupt database was moved aside on start.
    pub store_recovered_corrupt: Counter,
    /// Commits that failed because the disk (or `max_db_bytes`) was full.
    pub store_disk_full_errors: Counter,
    /// 1 while the last write failed because the disk was full.
    pub store_disk_full: Gauge,
    /// Summaries waiting for the cloud.
    pub outbox_rows: Gauge,
    /// Bytes buffered for the cloud (summaries and gap records), as counted against the cap.
    pub outbox_bytes: Gauge,
    /// Gap records waiting for the cloud.
    pub buffer_gap_rows: Gauge,
    /// Readings in the journal (open windows).
    pub journal_rows: Gauge,
    pub open_windows: Gauge,
    pub streams: Gauge,
    pub mqtt_connected: Gauge,
    /// 1 once the broker acknowledged our subscriptions on the current connection.
    pub mqtt_subscribed: Gauge,
}

impl Metrics {
    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP edgewise_agent_{name} {help}\n# TYPE edgewise_agent_{name} counter\nedgewise_agent_{name} {v}"
            );
        };
        counter(
            "messages_received_total",
            "MQTT messages received.",
            self.messages_received.get(),
        );
        counter(
            "readings_accepted_total",
            "Readings journaled into a window.",
            self.readings_accepted.get(),
        );
        counter(
            "records_skipped_non_numeric_total",
            "SenML records without a numeric value.",
            self.records_skipped_non_numeric.get(),
        );
        counter(
            "journal_commits_total",
            "Journal transactions committed.",
            self.journal_commits.get(),
        );
        counter(
            "store_errors_total",
            "Failed SQLite operations.",
            self.store_errors.get(),
        );
        counter(
            "acks_sent_total",
            "MQTT acks sent after a journal commit.",
            self.acks_sent.get(),
        );
        counter(
            "windows_closed_total",
            "Windows closed into summaries.",
            self.windows_closed.get(),
        );
        counter(
            "windows_scored_total",
            "Closed windows scored by the model.",
            self.windows_scored.get(),
        );
        counter(
            "windows_alerted_total",
            "Scored windows at or over the alert threshold.",
            self.windows_alerted.get(),
        );
        counter(
            "windows_score_failed_total",
            "Closed windows the model could not score (shipped unscored).",
            self.windows_score_failed.get(),
        );
        counter(
            "summaries_synced_total",
            "Summaries acknowledged by the cloud.",
            self.summaries_synced.get(),
        );
        counter(
            "summaries_rejected_total",
            "Summaries the cloud refused for good (kept as dead letters).",
            self.summaries_rejected.get(),
        );
        counter(
            "sync_requests_ok_total",
            "Successful uploads.",
            self.sync_requests_ok.get(),
        );
        counter(
            "sync_failures_total",
            "Failed upload attempts.",
            self.sync_failures.get(),
        );
        counter(
            "sync_bytes_sent_total",
            "Request body bytes of successful uploads.",
            self.sync_bytes_sent.get(),
        );
        counter(
            "buffer_evictions_total",
            "Summaries evicted because the buffer reached max_buffer_bytes.",
            self.buffer_evictions.get(),
        );
        counter(
            "gaps_recorded_total",
            "Gap records written (evictions, corrupt database moved aside).",
            self.gaps_recorded.get(),
        );
        counter(
            "gaps_synced_total",
            "Gap records acknowledged by the cloud.",
            self.gaps_synced.get(),
        );
        counter(
            "store_recovered_corrupt_total",
            "Corrupt databases moved aside on start.",
            self.store_recovered_corrupt.get(),
        );
        counter(
            "store_disk_full_errors_total",
            "Writes that failed because the disk or max_db_bytes was full.",
            self.store_disk_full_errors.get(),
        );
        counter(
            "mqtt_connections_total",
            "MQTT connections established.",
            self.mqtt_connections.get(),
        );
        counter(
            "mqtt_connection_errors_total",
            "MQTT connection errors.",
            self.mqtt_connection_errors.get(),
        );
        let mut labelled = |name: &str, help: &str, rc: &ReasonCounter| {
            let _ = writeln!(
                out,
                "# HELP edgewise_agent_{name} {help}\n# TYPE edgewise_agent_{name} counter"
            );
            for (reason, v) in rc.snapshot() {
                let _ = writeln!(out, "edgewise_agent_{name}{{reason=\"{reason}\"}} {v}");
            }
        };
        labelled(
            "messages_rejected_total",
            "Undecodable messages by reason.",
            &self.messages_rejected,
        );
        labelled(
            "readings_rejected_total",
            "Refused readings by reason.",
            &self.readings_rejected,
        );
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP edgewise_agent_{name} {help}\n# TYPE edgewise_agent_{name} gauge\nedgewise_agent_{name} {v}"
            );
        };
        gauge(
            "outbox_rows",
            "Summaries waiting for the cloud.",
            self.outbox_rows.get(),
        );
        gauge(
            "outbox_bytes",
            "Bytes of summaries waiting for the cloud.",
            self.outbox_bytes.get(),
        );
        gauge(
            "buffer_bytes",
            "Bytes buffered for the cloud (summaries and gap records), counted against max_buffer_bytes.",
            self.outbox_bytes.get(),
        );
        gauge(
            "buffer_rows",
            "Rows buffered for the cloud (summaries and gap records).",
            self.outbox_rows.get() + self.buffer_gap_rows.get(),
        );
        gauge(
            "buffer_gap_rows",
            "Gap records waiting for the cloud.",
            self.buffer_gap_rows.get(),
        );
        gauge(
            "journal_rows",
            "Readings journaled for open windows.",
            self.journal_rows.get(),
        );
        gauge(
            "store_disk_full",
            "1 while the last write failed because the disk was full.",
            self.store_disk_full.get(),
        );
        gauge(
            "open_windows",
            "Windows currently open.",
            self.open_windows.get(),
        );
        gauge("streams", "Streams tracked.", self.streams.get());
        gauge(
            "mqtt_connected",
            "1 while connected to the broker.",
            self.mqtt_connected.get(),
        );
        gauge(
            "mqtt_subscribed",
            "1 once subscriptions are acknowledged.",
            self.mqtt_subscribed.get(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_reason_labels() {
        let m = Metrics::default();
        m.readings_accepted.add(5);
        m.readings_rejected.add("late", 2);
        m.readings_rejected.add("out_of_range", 1);
        m.outbox_rows.set(7);
        let text = m.render();
        assert!(text.contains("edgewise_agent_readings_accepted_total 5\n"));
        assert!(text.contains("edgewise_agent_readings_rejected_total{reason=\"late\"} 2\n"));
        assert!(
            text.contains(
                "# TYPE edgewise_agent_outbox_rows gauge\nedgewise_agent_outbox_rows 7\n"
            )
        );
        assert_eq!(m.readings_rejected.total(), 3);
    }
}
