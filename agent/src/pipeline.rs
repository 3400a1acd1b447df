//! decode -> filter -> journal -> window -> outbox, for one batch of messages at a time.
//!
//! [`Pipeline::ingest`] handles a batch in three steps so that a failed commit changes nothing:
//! 1. prepare (pure): decode every message, check every reading against its contract and its
//!    window's state;
//! 2. commit: one SQLite transaction journals the accepted readings and the dead letters;
//! 3. apply: only after the commit, readings enter their windows and the counters move.
//!
//! The caller acks the batch's MQTT messages only after `ingest` returned `Ok`, so an
//! acknowledged reading is always durable. [`Pipeline::close_due`] then moves closed windows to
//! the outbox. On [`Pipeline::open`], the windows are rebuilt from the journal.
//!
//! A failed commit is retried by the caller with the same batch. With the journal disabled, a
//! closed window whose outbox commit failed is kept in memory ([`Pipeline::close_due`] retries
//! it first), since there are no journal rows to rebuild it from.
//!
//! No network I/O here; the async driver lives in [`crate::ingest`]. Tested end to end in
//! `tests/` and by the unit tests below on real SQLite files.

use std::sync::Arc;

use edgewise_protocol::Reading;

use crate::config::AgentConfig;
use crate::decode::{DecodeLimits, PayloadFormat, decode};
use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::store::{DeadLetter, Store, StoreError, StoreOptions};
use crate::window::{Admission, ClosedWindow, WindowSpec, Windows};

/// One MQTT message, as the pipeline sees it.
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
}

pub struct Pipeline {
    store: Store,
    windows: Windows,
    filter: Filter,
    format: PayloadFormat,
    limits: DecodeLimits,
    metrics: Arc<Metrics>,
    // Scratch buffers reused across batches.
    decoded: Vec<Reading>,
    accepted: Vec<Reading>,
    inserted: Vec<bool>,
    /// Journal-less mode only: closed windows whose outbox commit failed, retried first.
    pending_closed: Vec<ClosedWindow>,
    journal_enabled: bool,
    /// Readings in the journal, tracked without a COUNT(*) per batch.
    journal_rows: u64,
    /// Scores closed windows before they enter the outbox (`[inference]` in the config).
    scorer: Option<crate::infer::SwappableScorer>,
}

/// What `prepare` decided about a batch, applied only once it is committed.
#[derive(Default)]
struct Verdicts {
    dead: Vec<DeadLetter>,
    undecodable: Vec<&'static str>,
    rejected: Vec<&'static str>,
    skipped_non_numeric: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("invalid filter: {0}")]
    Filter(String),
    #[error("loading the model: {0}")]
    Inference(#[from] crate::infer::InferenceError),
}

impl Pipeline {
    /// Opens the store (moving a corrupt file aside, see [`Store::open_or_recover`]) and
    /// rebuilds the open windows from the journal.
    pub fn open(cfg: &AgentConfig, metrics: Arc<Metrics>) -> Result<Pipeline, PipelineError> {
        let (store, recovered) =
            Store::open_or_recover(&cfg.store.path, &StoreOptions::from_config(cfg))?;
        if recovered.is_some() {
            metrics.store_recovered_corrupt.inc();
            metrics.gaps_recorded.inc();
        }
        let mut windows = Windows::new(&cfg.agent_id, WindowSpec::from(&cfg.window));
        for (stream, closed_until) in store.closed_streams()? {
            windows.restore_closed(&stream, closed_until);
        }
        let journal = store.journal_readings()?;
        for r in &journal {
            // Journal rows are all admitted already; replaying in arrival order restores the
            // windows exactly (including Welford's rounding).
            windows.add(r, 0);
        }
        if !journal.is_empty() {
            tracing::info!(
                readings = journal.len(),
                windows = windows.open_windows(),
                "rebuilt open windows from the journal"
            );
        }
        let filter = Filter::build(&cfg.filters).map_err(PipelineError::Filter)?;
        let p = Pipeline {
            store,
            windows,
            filter,
            format: cfg.ingest.format,
            limits: DecodeLimits {
                max_payload_bytes: cfg.mqtt.max_packet_bytes,
                ..DecodeLimits::default()
            },
            metrics,
            decoded: Vec::new(),
            accepted: Vec::new(),
            inserted: Vec::new(),
            pending_closed: Vec::new(),
            journal_enabled: cfg.store.journal,
            journal_rows: journal.len() as u64,
            scorer: cfg
                .inference
                .clone()
                .map(crate::infer::SwappableScorer::start)
                .transpose()?,
        };
        p.update_gauges();
        Ok(p)
    }

    /// Decodes, checks and journals a batch in one transaction. On `Err` nothing changed and
    /// the same batch may be retried.
    pub fn ingest(
        &mut self,
        batch: &[Message<'_>],
        wall_ms: i64,
        proc_ms: i64,
    ) -> Result<(), StoreError> {
        let verdicts = self.prepare(batch, wall_ms);
        let committed =
            self.store
                .commit_ingest(&self.accepted, &verdicts.dead, &mut self.inserted);
        self.note_store_result(&committed);
        committed?;
        let m = &self.metrics;
        m.journal_commits.inc();
        m.messages_received.add(batch.len() as u64);
        for reason in &verdicts.undecodable {
            m.messages_rejected.add(reason, 1);
        }
        for reason in &verdicts.rejected {
            m.readings_rejected.add(reason, 1);
        }
        m.records_skipped_non_numeric
            .add(verdicts.skipped_non_numeric);
        for (r, &new) in self.accepted.iter().zip(&self.inserted) {
            if new {
                self.windows.add(r, proc_ms);
                m.readings_accepted.inc();
                if self.journal_enabled {
                    self.journal_rows += 1;
                }
            } else {
                m.readings_rejected.add("duplicate", 1);
            }
        }
        self.update_gauges();
        Ok(())
    }

    fn prepare(&mut self, batch: &[Message<'_>], wall_ms: i64) -> Verdicts {
        let mut v = Verdicts::default();
        self.accepted.clear();
        for msg in batch {
            self.decoded.clear();
            match decode(
                msg.topic,
                msg.payload,
                self.format,
                &self.limits,
                wall_ms,
                &mut self.decoded,
            ) {
                Ok(d) => v.skipped_non_numeric += d.skipped_non_numeric as u64,
                Err(e) => {
                    tracing::debug!(topic = msg.topic, error = %e, "undecodable message");
                    v.undecodable.push(e.reason());
                    v.dead
                        .push(DeadLetter::new(wall_ms, msg.topic, e.reason(), msg.payload));
                    continue;
                }
            }
            for r in self.decoded.drain(..) {
                if let Err(rej) = self.filter.check(&r) {
                    v.rejected.push(rej.reason());
                } else if self.windows.admit(&r) == Admission::Late {
                    v.rejected.push("late");
                } else {
                    self.accepted.push(r);
                }
            }
        }
        v
    }

    /// Moves every window that is due (watermark or idle timeout) to the outbox. Returns how
    /// many closed. On `Err` the windows stay open and the next call retries.
    pub fn close_due(&mut self, proc_ms: i64) -> Result<usize, StoreError> {
        let mut closed = std::mem::take(&mut self.pending_closed);
        closed.extend(self.windows.advance(proc_ms));
        if closed.is_empty() {
            return Ok(0);
        }
        self.score(&mut closed);
        let committed = self.store.commit_closed(&closed, crate::ingest::wall_ms());
        self.note_store_result(&committed);
        let outcome = match committed {
            Ok(outcome) => outcome,
            Err(e) => {
                if self.journal_enabled {
                    // Put them back: the windows' readings are still in the journal, so
                    // rebuilding the accumulators from it is exact.
                    self.reopen(&closed);
                } else {
                    self.pending_closed = closed;
                }
                return Err(e);
            }
        };
        let m = &self.metrics;
        m.windows_closed.add(closed.len() as u64);
        if outcome.evicted > 0 {
            m.buffer_evictions.add(outcome.evicted);
            m.gaps_recorded.inc();
        }
        if self.journal_enabled {
            let rows: u64 = closed.iter().map(|c| c.summary.count).sum();
            self.journal_rows = self.journal_rows.saturating_sub(rows);
        }
        self.update_gauges();
        Ok(closed.len())
    }

    /// Scores the windows not scored yet (a retried commit keeps its scores). Runs on the
    /// blocking thread that runs the pipeline, never on the async core threads. A window the
    /// model cannot score is shipped unscored and counted, never held back.
    fn score(&mut self, closed: &mut [ClosedWindow]) {
        let Some(scorer) = &mut self.scorer else {
            return;
        };
        let report = scorer.score_each(
            closed
                .iter_mut()
                .map(|c| &mut c.summary)
                .filter(|s| s.score.is_none()),
        );
        let m = &self.metrics;
        m.windows_scored.add(report.scored as u64);
        m.windows_alerted.add(report.alerts as u64);
        m.windows_score_failed
            .add((report.invalid_features + report.failed) as u64);
        if let Some(e) = &report.first_error {
            tracing::warn!(error = %e, unscored = report.invalid_features + report.failed, "some windows could not be scored");
        }
    }

    fn note_store_result<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.metrics.store_disk_full.set(0),
            Err(e) if e.is_disk_full() => {
                self.metrics.store_disk_full.set(1);
                self.metrics.store_disk_full_errors.inc();
            }
            Err(_) => {}
        }
    }

    fn reopen(&mut self, closed: &[ClosedWindow]) {
        let mut fresh = Windows::new(&closed[0].summary.agent_id, *self.windows.spec());
        if let (Ok(streams), Ok(journal)) =
            (self.store.closed_streams(), self.store.journal_readings())
        {
            for (s, c) in streams {
                fresh.restore_closed(&s, c);
            }
            for r in &journal {
                fresh.add(r, 0);
            }
            self.windows = fresh;
        }
    }

    /// Read access to the store (tests, `/healthz`).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Write access to the store (tests: simulating a full disk with `set_max_db_bytes`).
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.open_windows.set(self.windows.open_windows() as u64);
        m.streams.set(self.windows.streams() as u64);
        m.journal_rows.set(self.journal_rows);
        if let Ok(u) = self.store.buffer_usage() {
            m.outbox_rows.set(u.summaries);
            m.outbox_bytes.set(u.bytes);
            m.buffer_gap_rows.set(u.gaps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewise_protocol::senml::{Record, encode_pack};

    fn config(dir: &std::path::Path) -> AgentConfig {
        let mut cfg = AgentConfig::parse(
            r#"
            agent_id = "gw"
            [window]
            window_seconds = 10
            allowed_lateness_ms = 0
            idle_timeout_ms = 1000
            [[filter]]
            stream = "+/temperature"
            min = -40.0
            max = 85.0
            "#,
        )
        .unwrap();
        cfg.store.path = dir.join("agent.db");
        cfg
    }

    fn pack(node: &str, t_s: f64, v: f64) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let rec = [Record {
            name: "temperature",
            unit: Some("Cel"),
            value: v,
            time_offset_s: 0.0,
        }];
        let n = encode_pack(&format!("{node}/"), t_s, &rec, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_batch_is_decoded_filtered_journaled_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
        let payloads = [
            pack("n1", 1.0, 20.0),
            pack("n1", 2.0, 22.0),
            pack("n1", 3.0, 500.0), // out of range
            b"not senml".to_vec(),
            pack("n1", 2.0, 22.0), // duplicate event time
        ];
        let batch: Vec<Message<'_>> = payloads
            .iter()
            .map(|p| Message {
                topic: "sensors/n1",
                payload: p,
            })
            .collect();
        p.ingest(&batch, 0, 0).unwrap();
        assert_eq!(metrics.readings_accepted.get(), 2);
        assert_eq!(metrics.readings_rejected.get("out_of_range"), 1);
        assert_eq!(metrics.readings_rejected.get("duplicate"), 1);
        assert_eq!(metrics.messages_rejected.total(), 1);
        assert_eq!(p.store().dead_letters(10).unwrap().len(), 1);
        assert_eq!(p.close_due(999).unwrap(), 0);
        assert_eq!(p.close_due(1000).unwrap(), 1);
        let rows = p.store().outbox_peek(10).unwrap();
        assert_eq!(rows[0].summary.count, 2);
        assert_eq!(rows[0].summary.mean, 21.0);
        assert_eq!(p.store().journal_len().unwrap(), 0);
        // The window is closed for good: a late reading for it is refused.
        let late = pack("n1", 4.0, 21.0);
        p.ingest(
            &[Message {
                topic: "t",
                payload: &late,
            }],
            0,
            2000,
        )
        .unwrap();
        assert_eq!(metrics.readings_rejected.get("late"), 1);
    }

    #[test]
    fn reopening_rebuilds_open_windows_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        {
            let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
            let a = pack("n1", 1.0, 10.0);
            let b = pack("n1", 2.0, 30.0);
            p.ingest(
                &[
                    Message {
                        topic: "t",
                        payload: &a,
                    },
                    Message {
                        topic: "t",
                        payload: &b,
                    },
                ],
                0,
                0,
            )
            .unwrap();
        } // dropped mid-window, as a crash would
        let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
        let c = pack("n1", 3.0, 20.0);
        p.ingest(
            &[Message {
                topic: "t",
                payload: &c,
            }],
            0,
            0,
        )
        .unwrap();
        assert_eq!(p.close_due(5000).unwrap(), 1);
        let s = &p.store().outbox_peek(10).unwrap()[0].summary;
        assert_eq!((s.count, s.min, s.max, s.mean), (3, 10.0, 30.0, 20.0));
    }

    fn msgs(payloads: &[Vec<u8>]) -> Vec<Message<'_>> {
        payloads
            .iter()
            .map(|p| Message {
                topic: "t",
                payload: p,
            })
            .collect()
    }

    #[test]
    fn a_full_disk_fails_the_batch_without_applying_it_and_it_goes_through_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
        let first = [pack("n1", 1.0, 20.0)];
        p.ingest(&msgs(&first), 0, 0).unwrap();
        p.store_mut().set_max_db_bytes(Some(1)).unwrap();
        // Enough distinct readings to need new pages.
        let big: Vec<Vec<u8>> = (0..3000)
            .map(|i| pack(&format!("node-{i}"), 2.0, 21.0))
            .collect();
        let err = p.ingest(&msgs(&big), 0, 0).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert_eq!(metrics.store_disk_full.get(), 1);
        assert_eq!(metrics.store_disk_full_errors.get(), 1);
        // Nothing of the failed batch counted or entered a window.
        assert_eq!(metrics.readings_accepted.get(), 1);
        assert_eq!(p.windows.open_windows(), 1);
        // Space returns: the same batch is retried and goes through, nothing lost.
        p.store_mut().set_max_db_bytes(None).unwrap();
        p.ingest(&msgs(&big), 0, 0).unwrap();
        assert_eq!(metrics.store_disk_full.get(), 0);
        assert_eq!(metrics.readings_accepted.get(), 3001);
        assert_eq!(p.store().journal_len().unwrap(), 3001);
        assert_eq!(p.close_due(10_000).unwrap(), 3001);
        assert_eq!(p.store().outbox_size().unwrap().0, 3001);
        assert_eq!(metrics.journal_rows.get(), 0);
    }

    #[test]
    fn without_the_journal_a_restart_loses_open_windows_but_closed_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.store.journal = false;
        {
            let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
            let a = [pack("n1", 1.0, 10.0), pack("n2", 1.0, 30.0)];
            p.ingest(&msgs(&a), 0, 0).unwrap();
            assert_eq!(p.store().journal_len().unwrap(), 0);
            // n2's window closes (idle), n1 gets a fresh reading and stays open.
            let b = [pack("n1", 2.0, 12.0)];
            p.ingest(&msgs(&b), 0, 900).unwrap();
            assert_eq!(p.close_due(1000).unwrap(), 1);
        } // crash
        let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
        let rows = p.store().outbox_peek(10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].summary.stream, "n2/temperature");
        // n1's open window (two readings) is gone: only what arrives now is counted.
        let c = [pack("n1", 3.0, 14.0)];
        p.ingest(&msgs(&c), 0, 0).unwrap();
        assert_eq!(p.close_due(5000).unwrap(), 1);
        let rows = p.store().outbox_peek(10).unwrap();
        assert_eq!((rows[1].summary.count, rows[1].summary.mean), (1, 14.0));
    }
}
