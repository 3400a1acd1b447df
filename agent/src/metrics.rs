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
    /// One up (`true`) or one down, not below zero: for gauges that count things.
    pub fn step(&self, up: bool) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(if up { v + 1 } else { v.saturating_sub(1) })
            });
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

/// Rejections by contract (its pattern as written, or `none`) and reason. Bounded: contracts
/// come from the config and reasons are `&'static str`.
#[derive(Debug, Default)]
pub struct ContractCounter(Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>);

impl ContractCounter {
    pub fn add(&self, contract: &str, reason: &'static str, n: u64) {
        if let Ok(mut m) = self.0.lock() {
            let reasons = match m.get_mut(contract) {
                Some(r) => r,
                None => m.entry(contract.to_string()).or_default(),
            };
            *reasons.entry(reason).or_default() += n;
        }
    }
    pub fn get(&self, contract: &str, reason: &str) -> u64 {
        self.0
            .lock()
            .map(|m| m.get(contract).and_then(|r| r.get(reason)).copied())
            .ok()
            .flatten()
            .unwrap_or(0)
    }
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64)> {
        self.0
            .lock()
            .map(|m| {
                m.iter()
                    .flat_map(|(c, r)| r.iter().map(move |(reason, v)| (c.clone(), *reason, *v)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The streams with the most rejections, per reason: the Space-Saving algorithm (Metwally et
/// al., 2005) over at most [`TopStreams::CAPACITY`] (stream, reason) pairs. Every pair rejected
/// more than total/CAPACITY times is in the table; a count overestimates the true count by at
/// most its `error` (the count of the entry it replaced).
#[derive(Debug, Default)]
pub struct TopStreams(Mutex<Vec<TopEntry>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    pub stream: String,
    pub reason: &'static str,
    pub count: u64,
    pub error: u64,
}

impl TopStreams {
    pub const CAPACITY: usize = 20;

    pub fn add(&self, stream: &str, reason: &'static str) {
        let Ok(mut entries) = self.0.lock() else {
            return;
        };
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.reason == reason && e.stream == stream)
        {
            e.count += 1;
        } else if entries.len() < Self::CAPACITY {
            entries.push(TopEntry {
                stream: stream.to_string(),
                reason,
                count: 1,
                error: 0,
            });
        } else if let Some(min) = entries.iter_mut().min_by_key(|e| e.count) {
            min.stream.clear();
            min.stream.push_str(stream);
            min.reason = reason;
            min.error = min.count;
            min.count += 1;
        }
    }

    /// Entries by descending count.
    pub fn snapshot(&self) -> Vec<TopEntry> {
        let mut v = self.0.lock().map(|e| e.clone()).unwrap_or_default();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.stream.cmp(&b.stream)));
        v
    }
}

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    /// Readings with a text, boolean or data value or only a sum: checked by their contract,
    /// counted, not windowed.
    pub records_skipped_non_numeric: Counter,
    /// Text, boolean or data values kept as their stream's latest value (newer than the one kept).
    pub latest_values_stored: Counter,
    /// Latest values acknowledged by the cloud.
    pub latest_values_synced: Counter,
    /// Streams with a latest value kept, and of those not yet acknowledged by the cloud.
    pub latest_value_streams: Gauge,
    pub latest_values_pending: Gauge,
    /// Contract rejections by contract and reason.
    pub contract_rejections: ContractCounter,
    /// The most rejected streams, by reason.
    pub top_rejected_streams: TopStreams,
    /// Streams whose contract state (deadband, rate) was forgotten to bound memory.
    pub contract_state_evictions: Gauge,
    pub journal_commits: Counter,
    /// Microseconds the ingest loop spent in its steps (decode, contracts, the journal's
    /// transaction, windows, closes), which run one batch at a time: its increase per second
    /// is how busy that chain is (1,000,000: always).
    pub ingest_busy_us: Counter,
    pub store_errors: Counter,
    pub acks_sent: Counter,
    pub windows_closed: Counter,
    /// Summaries emitted again with a higher revision after late readings (`late_policy = "revise"`).
    pub windows_revised: Counter,
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
    /// Streams holding open windows, counted against `window.max_streams`.
    pub active_streams: Gauge,
    pub mqtt_connected: Gauge,
    /// Connections whose subscriptions the broker acknowledged (1 with a single connection).
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
            "Readings with a text, boolean or data value or only a sum (not windowed).",
            self.records_skipped_non_numeric.get(),
        );
        counter(
            "latest_values_stored_total",
            "Text, boolean or data readings kept as their stream's newest value, to be synced.",
            self.latest_values_stored.get(),
        );
        counter(
            "latest_values_synced_total",
            "Latest values acknowledged by the cloud.",
            self.latest_values_synced.get(),
        );
        counter(
            "journal_commits_total",
            "Journal transactions committed.",
            self.journal_commits.get(),
        );
        counter(
            "ingest_busy_microseconds_total",
            "Time the ingest loop spent in its steps (decode, contracts, journal, windows), which run one batch at a time.",
            self.ingest_busy_us.get(),
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
            "windows_revised_total",
            "Revisions of closed windows emitted after late readings.",
            self.windows_revised.get(),
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
        let _ = writeln!(
            out,
            "# HELP edgewise_agent_contract_rejections_total Readings refused by a data contract, by contract pattern (`none`: no contract) and reason.\n# TYPE edgewise_agent_contract_rejections_total counter"
        );
        for (contract, reason, v) in self.contract_rejections.snapshot() {
            let _ = writeln!(
                out,
                "edgewise_agent_contract_rejections_total{{contract=\"{}\",reason=\"{reason}\"}} {v}",
                label_value(&contract)
            );
        }
        let top = self.top_rejected_streams.snapshot();
        let estimate = format!(
            "Rejections of the {} most rejected (stream, reason) pairs (Space-Saving estimate: overestimates by at most the _error series).",
            TopStreams::CAPACITY
        );
        type Series<'s> = (&'s str, &'s str, fn(&TopEntry) -> u64);
        let series: [Series<'_>; 2] = [
            ("stream_rejections", &estimate, |e| e.count),
            (
                "stream_rejections_error",
                "Upper bound of the overestimate in edgewise_agent_stream_rejections.",
                |e| e.error,
            ),
        ];
        for (name, help, value) in series {
            let _ = writeln!(
                out,
                "# HELP edgewise_agent_{name} {help}\n# TYPE edgewise_agent_{name} gauge"
            );
            for e in &top {
                let _ = writeln!(
                    out,
                    "edgewise_agent_{name}{{stream=\"{}\",reason=\"{}\"}} {}",
                    label_value(&e.stream),
                    e.reason,
                    value(e)
                );
            }
        }
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP edgewise_agent_{name} {help}\n# TYPE edgewise_agent_{name} gauge\nedgewise_agent_{name} {v}"
            );
        };
        gauge(
            "latest_value_streams",
            "Streams whose newest text, boolean or data value is kept.",
            self.latest_value_streams.get(),
        );
        gauge(
            "latest_values_pending",
            "Latest values the cloud does not have yet.",
            self.latest_values_pending.get(),
        );
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
            "Window panes held (open windows, and closed ones still revisable).",
            self.open_windows.get(),
        );
        gauge("streams", "Streams tracked.", self.streams.get());
        gauge(
            "active_streams",
            "Streams holding open windows, counted against window.max_streams.",
            self.active_streams.get(),
        );
        gauge(
            "contract_state_evictions",
            "Streams whose contract state (deadband, rate) was forgotten to bound memory.",
            self.contract_state_evictions.get(),
        );
        gauge(
            "mqtt_connected",
            "MQTT connections to the broker that are up (mqtt.connections when all are).",
            self.mqtt_connected.get(),
        );
        gauge(
            "mqtt_subscribed",
            "MQTT connections whose subscriptions are acknowledged.",
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

    #[test]
    fn contract_rejections_and_top_streams_are_rendered_with_escaped_labels() {
        let m = Metrics::default();
        m.contract_rejections
            .add("+/temperature", "out_of_range", 2);
        m.contract_rejections.add("none", "wrong_unit", 1);
        m.top_rejected_streams.add("n1/temperature", "out_of_range");
        m.top_rejected_streams.add("we\"ird", "deadband");
        let text = m.render();
        assert!(text.contains(
            "edgewise_agent_contract_rejections_total{contract=\"+/temperature\",reason=\"out_of_range\"} 2\n"
        ));
        assert!(text.contains(
            "edgewise_agent_stream_rejections{stream=\"n1/temperature\",reason=\"out_of_range\"} 1\n"
        ));
        assert!(text.contains("stream=\"we\\\"ird\""), "{text}");
        assert_eq!(m.contract_rejections.get("none", "wrong_unit"), 1);
    }

    #[test]
    fn top_streams_keep_the_heavy_hitters_within_the_error_bound() {
        let top = TopStreams::default();
        // Two heavy streams among many light ones.
        for i in 0..2000u32 {
            top.add(&format!("light/{i}"), "deadband");
            if i % 2 == 0 {
                top.add("heavy/a", "deadband");
            }
            if i % 4 == 0 {
                top.add("heavy/b", "out_of_range");
            }
        }
        let snap = top.snapshot();
        assert_eq!(snap.len(), TopStreams::CAPACITY);
        let a = snap.iter().find(|e| e.stream == "heavy/a").unwrap();
        let b = snap.iter().find(|e| e.stream == "heavy/b").unwrap();
        assert!(a.count >= 1000 && a.count - a.error <= 1000, "{a:?}");
        assert!(b.count >= 500 && b.count - b.error <= 500, "{b:?}");
        assert_eq!(snap[0].stream, "heavy/a");
    }
}
