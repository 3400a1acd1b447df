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
//! No network I/O here; the async driver lives in [`crate::ingest`]. Tested end to end in
//! `tests/` and by the unit tests below on real SQLite files.

use std::sync::Arc;

use edgewise_protocol::Reading;

use crate::config::AgentConfig;
use crate::decode::{DecodeLimits, PayloadFormat, decode};
use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::store::{DeadLetter, Store, StoreError};
use crate::window::{Admission, WindowSpec, Windows};

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
}

impl Pipeline {
    /// Opens the store and rebuilds the open windows from the journal.
    pub fn open(cfg: &AgentConfig, metrics: Arc<Metrics>) -> Result<Pipeline, PipelineError> {
        let store = Store::open(&cfg.store.path, cfg.store.dead_letter_max_rows)?;
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
        self.store
            .commit_ingest(&self.accepted, &verdicts.dead, &mut self.inserted)?;
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
        let closed = self.windows.advance(proc_ms);
        if closed.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.store.commit_closed(&closed) {
            // Put them back: the windows' readings are still in the journal, so rebuilding the
            // accumulators from it is exact.
            self.reopen(&closed);
            return Err(e);
        }
        self.metrics.windows_closed.add(closed.len() as u64);
        self.update_gauges();
        Ok(closed.len())
    }

    fn reopen(&mut self, closed: &[crate::window::ClosedWindow]) {
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

    fn update_gauges(&self) {
        self.metrics
            .open_windows
            .set(self.windows.open_windows() as u64);
        self.metrics.streams.set(self.windows.streams() as u64);
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
}
