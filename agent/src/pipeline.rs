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

use edgewise_protocol::{LatestValue, ReadingView, StateValue};

use crate::arena::ReadingArena;
use crate::config::AgentConfig;
use crate::decode::{DecodeLimits, PayloadDecoder, TopicFormats, Value};
use crate::filter::{DeadLetterSampler, Filter};
use crate::metrics::Metrics;
use crate::store::{DeadLetter, Store, StoreError, StoreOptions};
use crate::window::{Admission, ClosedWindow, StreamSet, WindowSpec, Windows};

/// Most windows one [`Pipeline::close_due`] closes (and scores, and writes to the outbox): with
/// 10,000 streams a window boundary closes 20,000 windows, about 0.2 s of work that would hold up
/// the next batch while the broker queues (and, past its queue limit, drops) what arrives. The
/// rest close in the calls that follow, one per batch.
pub const MAX_WINDOWS_PER_CLOSE: usize = 1024;

/// One MQTT message, as the pipeline sees it.
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
}

pub struct Pipeline {
    store: Store,
    windows: Windows,
    filter: Filter,
    formats: TopicFormats,
    decoder: PayloadDecoder,
    sampler: DeadLetterSampler,
    metrics: Arc<Metrics>,
    // Scratch buffers reused across batches.
    /// The readings `prepare` keeps: their names are copied into the arena, which allocates
    /// only while it grows to the size of a batch.
    accepted: ReadingArena,
    inserted: Vec<bool>,
    /// Streams of the batch in hand that will become active, counted against `max_streams`.
    new_streams: StreamSet,
    /// Journal-less mode only: closed windows whose outbox commit failed, retried first.
    pending_closed: Vec<ClosedWindow>,
    journal_enabled: bool,
    /// Scores closed windows before they enter the outbox (`[inference]` in the config).
    scorer: Option<crate::infer::SwappableScorer>,
}

/// What `prepare` decided about a batch, applied only once it is committed.
#[derive(Default)]
struct Verdicts {
    dead: Vec<DeadLetter>,
    undecodable: Vec<&'static str>,
    rejected: Vec<&'static str>,
    non_numeric: u64,
    /// Text, boolean and data values, each to become its stream's latest value if newer.
    latest: Vec<LatestValue>,
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

/// How often the background checkpoint copies the WAL into the database file (see
/// [`Store::checkpoint_in_background`]): at 200,000 journaled readings/s about 2 MiB of WAL each.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl Pipeline {
    /// Opens the store (moving a corrupt file aside, see [`Store::open_or_recover`]) and
    /// rebuilds the open windows from the journal.
    pub fn open(cfg: &AgentConfig, metrics: Arc<Metrics>) -> Result<Pipeline, PipelineError> {
        let (mut store, recovered) =
            Store::open_or_recover(&cfg.store.path, &StoreOptions::from_config(cfg))?;
        // Checkpoints (and their fsyncs) off the ingest thread.
        store.checkpoint_in_background(CHECKPOINT_INTERVAL)?;
        if recovered.is_some() {
            metrics.store_recovered_corrupt.inc();
            metrics.gaps_recorded.inc();
        }
        let (windows, journal_rows) =
            rebuild_windows(&store, &cfg.agent_id, WindowSpec::from(&cfg.window))?;
        if journal_rows > 0 {
            tracing::info!(
                readings = journal_rows,
                windows = windows.open_windows(),
                "rebuilt open windows from the journal"
            );
        }
        let filter = Filter::build(&cfg.filters, contract_state_streams(cfg))
            .map_err(PipelineError::Filter)?;
        let formats = TopicFormats::build(&cfg.ingest.topic_format, cfg.ingest.format)
            .map_err(PipelineError::Filter)?;
        let p = Pipeline {
            store,
            windows,
            filter,
            formats,
            decoder: PayloadDecoder::new(DecodeLimits {
                max_payload_bytes: cfg.mqtt.max_packet_bytes,
                ..DecodeLimits::default()
            }),
            sampler: DeadLetterSampler::new(cfg.ingest.dead_letter_sample_ms),
            metrics,
            accepted: ReadingArena::default(),
            inserted: Vec::new(),
            new_streams: Default::default(),
            pending_closed: Vec::new(),
            journal_enabled: cfg.store.journal,
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
        let committed = self.store.commit_ingest(
            self.accepted.iter(),
            &verdicts.dead,
            &verdicts.latest,
            &mut self.inserted,
        );
        self.note_store_result(&committed);
        if committed.is_err() {
            self.filter.rollback();
        }
        let latest = committed?;
        let m = &self.metrics;
        self.filter.commit(|c| {
            m.contract_rejections
                .add(c.contract, c.rejection.reason(), 1);
            m.top_rejected_streams.add(c.stream, c.rejection.reason());
        });
        m.contract_state_evictions
            .set(self.filter.state_evictions());
        m.journal_commits.inc();
        m.messages_received.add(batch.len() as u64);
        for reason in &verdicts.undecodable {
            m.messages_rejected.add(reason, 1);
        }
        for reason in &verdicts.rejected {
            m.readings_rejected.add(reason, 1);
        }
        m.records_skipped_non_numeric.add(verdicts.non_numeric);
        m.latest_values_stored.add(latest.stored);
        if latest.refused > 0 {
            m.readings_rejected.add("stream_limit", latest.refused);
        }
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
        self.new_streams.clear();
        for msg in batch {
            let mark = self.filter.mark();
            let (accepted, dead, rejected, non_numeric, latest) = (
                self.accepted.len(),
                v.dead.len(),
                v.rejected.len(),
                v.non_numeric,
                v.latest.len(),
            );
            let (filter, windows, sampler) = (&mut self.filter, &self.windows, &mut self.sampler);
            let (out, verdicts, new_streams) = (&mut self.accepted, &mut v, &mut self.new_streams);
            // Streams this message added to `new_streams`, forgotten if it turns out undecodable.
            let mut activated: Vec<String> = Vec::new();
            let format = self.formats.format_for(msg.topic);
            let decoded = self
                .decoder
                .decode_each(msg.topic, msg.payload, format, wall_ms, |r| {
                    let before = filter.mark();
                    let kept = match filter.check(&r) {
                        Ok(kept) => kept,
                        Err(rejected) => {
                            let reason = rejected.rejection.reason();
                            verdicts.rejected.push(reason);
                            if sampler.sample(rejected, wall_ms) {
                                let why = format!("{reason}: {}", r.stream);
                                verdicts.dead.push(DeadLetter::new(
                                    wall_ms,
                                    msg.topic,
                                    &why,
                                    msg.payload,
                                ));
                            }
                            return;
                        }
                    };
                    let value = match kept.value {
                        Some(Value::Number(x)) => x,
                        other => {
                            verdicts.non_numeric += 1;
                            if let Some(value) = other.and_then(state_value) {
                                verdicts.latest.push(LatestValue {
                                    stream: r.stream.to_owned(),
                                    time_ms: r.time_ms,
                                    value,
                                });
                            }
                            return;
                        }
                    };
                    let reading = ReadingView {
                        stream: r.stream,
                        time_ms: r.time_ms,
                        value,
                        unit: kept.unit,
                    };
                    let (admission, active) = windows.admit_and_activity(reading);
                    let refused = match admission {
                        Admission::Late => Some("late"),
                        Admission::StreamLimit => Some("stream_limit"),
                        Admission::Open | Admission::Revision => {
                            // The cap counts the streams this batch would activate too.
                            if active || new_streams.contains(reading.stream) {
                                None
                            } else if windows.active_streams() + new_streams.len()
                                >= windows.spec().max_streams
                            {
                                Some("stream_limit")
                            } else {
                                new_streams.insert(reading.stream.to_owned());
                                activated.push(reading.stream.to_owned());
                                None
                            }
                        }
                    };
                    match refused {
                        Some(reason) => {
                            // Not kept after all: the contract's state forgets it.
                            filter.rollback_to(before);
                            verdicts.rejected.push(reason);
                        }
                        None => out.push(reading),
                    }
                });
            if let Err(e) = decoded {
                // The readings before the bad record are not kept either.
                self.filter.rollback_to(mark);
                self.accepted.truncate(accepted);
                for s in &activated {
                    self.new_streams.remove(s);
                }
                v.dead.truncate(dead);
                v.rejected.truncate(rejected);
                v.non_numeric = non_numeric;
                v.latest.truncate(latest);
                tracing::debug!(topic = msg.topic, error = %e, "undecodable message");
                v.undecodable.push(e.reason());
                v.dead
                    .push(DeadLetter::new(wall_ms, msg.topic, e.reason(), msg.payload));
            }
        }
        v
    }

    /// Moves every window that is due (watermark or idle timeout) to the outbox. Returns how
    /// many closed. On `Err` the windows stay open and the next call retries.
    pub fn close_due(&mut self, proc_ms: i64) -> Result<usize, StoreError> {
        // The journal rows the last closes released, a chunk per call (see `store`), up to the
        // current horizon: computed only while there is something left to delete.
        if self.store.released_journal_left() {
            let deleted = self
                .store
                .delete_released_journal(self.windows.journal_horizon());
            self.note_store_result(&deleted);
            deleted?;
        }
        let mut closed = std::mem::take(&mut self.pending_closed);
        closed.extend(self.windows.advance(proc_ms, MAX_WINDOWS_PER_CLOSE));
        if closed.is_empty() {
            return Ok(0);
        }
        self.score(&mut closed);
        let horizon = self.windows.journal_horizon();
        let committed = self
            .store
            .commit_closed(&closed, horizon, crate::ingest::wall_ms());
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
        let revised = closed.iter().filter(|c| c.summary.revision > 0).count() as u64;
        m.windows_closed.add(closed.len() as u64 - revised);
        m.windows_revised.add(revised);
        if outcome.evicted > 0 {
            m.buffer_evictions.add(outcome.evicted);
            m.gaps_recorded.inc();
        }
        self.update_gauges();
        Ok(closed.len())
    }

    /// Whether windows are due that the last [`Pipeline::close_due`] left for the next call.
    pub fn closing_pending(&self) -> bool {
        self.windows.closing_pending()
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
        if let Ok((fresh, _)) = rebuild_windows(
            &self.store,
            &closed[0].summary.agent_id,
            *self.windows.spec(),
        ) {
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
        m.active_streams.set(self.windows.active_streams() as u64);
        m.journal_rows.set(self.store.journal_rows());
        if let Ok(u) = self.store.buffer_usage() {
            m.outbox_rows.set(u.summaries);
            m.outbox_bytes.set(u.bytes);
            m.buffer_gap_rows.set(u.gaps);
        }
    }
}

/// How many streams' contract state (deadband, rate) is kept: twice the streams the windows may
/// hold, at least [`Filter::DEFAULT_MAX_STREAMS`]. A table smaller than the active streams
/// forgets and rebuilds a stream's state on nearly every reading (with 20,000 streams and the
/// old fixed 16,384 slots that was a fifth of the agent's time, and deadbands forgotten); the
/// slack leaves room for streams refused by the window cap. Slots are allocated as streams
/// appear.
fn contract_state_streams(cfg: &AgentConfig) -> usize {
    Filter::DEFAULT_MAX_STREAMS.max(cfg.window.max_streams.saturating_mul(2))
}

/// The windows as the store left them: closed_until per stream, the revisions still revisable,
/// then the journal replayed in arrival order (which restores the panes exactly, including
/// Welford's rounding; a window whose readings outnumber its last emission is re-emitted). Also
/// returns the number of journal rows.
fn rebuild_windows(
    store: &Store,
    agent_id: &str,
    spec: WindowSpec,
) -> Result<(Windows, u64), StoreError> {
    let mut windows = Windows::new(agent_id, spec);
    for (stream, closed_until) in store.closed_streams()? {
        windows.restore_closed(&stream, closed_until);
    }
    for (stream, start, revision, count) in store.window_revisions()? {
        windows.restore_revision(&stream, start, revision, count);
    }
    let journal = store.journal_readings()?;
    for r in &journal {
        windows.add(r.as_view(), 0);
    }
    Ok((windows, journal.len() as u64))
}

/// A text, boolean or data value as it is passed on to the cloud; `None` for a number.
fn state_value(v: Value<'_>) -> Option<StateValue> {
    match v {
        Value::Number(_) => None,
        Value::Text(t) => Some(StateValue::Text(t.to_owned())),
        Value::Bool(b) => Some(StateValue::Bool(b)),
        Value::Data(d) => Some(StateValue::Data(d.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewise_protocol::senml::{Record, encode_pack};

    /// A config from TOML, with its database in `dir`.
    fn config_in(dir: &std::path::Path, toml: &str) -> AgentConfig {
        let mut cfg = AgentConfig::parse(toml).unwrap();
        cfg.store.path = dir.join("agent.db");
        cfg
    }

    fn config(dir: &std::path::Path) -> AgentConfig {
        config_in(
            dir,
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
    fn contract_state_is_kept_for_every_stream_the_windows_may_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.window.max_streams = 20_000;
        assert_eq!(contract_state_streams(&cfg), 40_000);
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
        let payloads: Vec<(String, Vec<u8>)> = (0..20_000)
            .map(|i| {
                let node = format!("n{i}");
                let pack = pack(&node, 1.0, 20.0);
                (format!("sensors/{node}"), pack)
            })
            .collect();
        for round in 0..2 {
            let batch: Vec<Message<'_>> = payloads
                .iter()
                .map(|(topic, payload)| Message { topic, payload })
                .collect();
            p.ingest(&batch, 0, round).unwrap();
        }
        // 20,000 streams over the old fixed table of 16,384: every reading evicted another.
        assert_eq!(metrics.contract_state_evictions.get(), 0);
        assert_eq!(metrics.readings_accepted.get(), 20_000);
        assert_eq!(metrics.readings_rejected.get("duplicate"), 20_000);
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
        assert_eq!(
            metrics
                .contract_rejections
                .get("+/temperature", "out_of_range"),
            1
        );
        // The undecodable message, and a sample of the contract rejection.
        let dead: Vec<String> = p
            .store()
            .dead_letters(10)
            .unwrap()
            .into_iter()
            .map(|d| d.reason)
            .collect();
        assert_eq!(dead, ["unknown_format", "out_of_range: n1/temperature"]);
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

    #[test]
    fn rows_of_closed_windows_kept_behind_an_open_one_are_not_counted_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (a1, a2, b1) = (
            pack("a", 1.0, 10.0),
            pack("a", 12.0, 30.0),
            pack("b", 3.0, 50.0),
        );
        {
            let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
            p.ingest(&msgs(&[a1, b1, a2]), 0, 0).unwrap();
            // a's watermark (12 s) closes its [0, 10 s) window; b's stays open (no idle yet).
            assert_eq!(p.close_due(500).unwrap(), 1);
            // b's open window starts at 0, so a's closed reading at 1 s stays in the journal.
            assert_eq!(p.store().journal_len().unwrap(), 3);
        } // a crash
        let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
        assert_eq!(
            p.close_due(5000).unwrap(),
            2,
            "a [10 s, 20 s) and b [0, 10 s)"
        );
        let rows = p.store().outbox_peek(10).unwrap();
        let counts: Vec<(String, i64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.summary.stream.clone(),
                    r.summary.window_start_ms,
                    r.summary.count,
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![
                ("a/temperature".to_string(), 0, 1),
                ("a/temperature".to_string(), 10_000, 1),
                ("b/temperature".to_string(), 0, 1),
            ]
        );
        // Nothing is open any more: the whole journal is gone.
        assert_eq!(p.store().journal_len().unwrap(), 0);
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
        // The failed attempt's rows were not counted (the store keeps a commit's counts only
        // once it committed).
        assert_eq!(metrics.journal_rows.get(), 3001);
        // Idle: all close, at most MAX_WINDOWS_PER_CLOSE a call.
        let mut closed = vec![p.close_due(10_000).unwrap()];
        while p.closing_pending() {
            closed.push(p.close_due(10_000).unwrap());
        }
        assert_eq!(closed, [1024, 1024, 953]);
        assert_eq!(p.store().outbox_size().unwrap().0, 3001);
        assert_eq!(metrics.journal_rows.get(), 0);
    }

    fn contract_config(dir: &std::path::Path) -> AgentConfig {
        config_in(
            dir,
            r#"
            agent_id = "gw"
            [ingest]
            dead_letter_sample_ms = 60000
            [[ingest.topic_format]]
            topic = "plain/#"
            format = "plain-json"
            [window]
            window_seconds = 10
            idle_timeout_ms = 1000
            [[contract]]
            stream = "+/temperature"
            unit = "Cel"
            convert.K = { offset = -273.15 }
            min = -40.0
            max = 85.0
            deadband = 0.5
            "#,
        )
    }

    fn json(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn text_boolean_and_data_readings_are_counted_and_passed_on_as_latest_values() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&config(dir.path()), metrics.clone()).unwrap();
        let payloads = [
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"door","vs":"open"},{"n":"temperature","v":21}]"#),
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"door","vs":"closed","t":-1}]"#),
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"alarm","vb":true},{"n":"fw","vd":"AQID"}]"#),
            // Undecodable after a text value: nothing of it is kept.
            json(r#"[{"bn":"n2/","bt":1.7e9,"n":"door","vs":"open"},{"n":"x","v":"oops"}]"#),
        ];
        let batch: Vec<Message<'_>> = payloads
            .iter()
            .map(|payload| Message {
                topic: "s/1",
                payload,
            })
            .collect();
        p.ingest(&batch, 0, 0).unwrap();
        assert_eq!(metrics.readings_accepted.get(), 1);
        assert_eq!(metrics.records_skipped_non_numeric.get(), 4);
        // The older door value lost to the newer one already kept.
        assert_eq!(metrics.latest_values_stored.get(), 3);
        let d = p
            .store()
            .outbox_drain(crate::config::DrainOrder::OldestFirst, 10, u64::MAX)
            .unwrap();
        let t = 1_700_000_000_000;
        assert_eq!(
            d.latest,
            vec![
                LatestValue {
                    stream: "n1/alarm".into(),
                    time_ms: t,
                    value: StateValue::Bool(true)
                },
                LatestValue {
                    stream: "n1/door".into(),
                    time_ms: t,
                    value: StateValue::Text("open".into())
                },
                LatestValue {
                    stream: "n1/fw".into(),
                    time_ms: t,
                    value: StateValue::Data(vec![1, 2, 3])
                },
            ]
        );
    }

    #[test]
    fn contracts_convert_drop_count_and_sample_through_the_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&contract_config(dir.path()), metrics.clone()).unwrap();
        let payloads = [
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"temperature","u":"K","v":293.15}]"#),
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"temperature","u":"Cel","v":20.2,"t":1}]"#),
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"temperature","u":"%RH","v":50,"t":2}]"#),
            json(r#"[{"bn":"n2/","bt":1.7e9,"n":"temperature","u":"%RH","v":50,"t":2}]"#),
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"door","vb":true}]"#),
            // Plain JSON by topic, not by sniffing (a SenML-looking payload would be refused).
            json(r#"{"value": 30, "ts": 1700000003000, "unit": "Cel"}"#),
        ];
        let topics = ["s/1", "s/1", "s/1", "s/2", "s/1", "plain/n3/temperature"];
        let batch: Vec<Message<'_>> = payloads
            .iter()
            .zip(topics)
            .map(|(payload, topic)| Message { topic, payload })
            .collect();
        p.ingest(&batch, 0, 0).unwrap();
        // 293.15 K = 20 Cel kept (stored in Cel); 20.2 within the deadband; %RH refused twice.
        assert_eq!(metrics.readings_accepted.get(), 2);
        assert_eq!(metrics.readings_rejected.get("deadband"), 1);
        assert_eq!(metrics.readings_rejected.get("wrong_unit"), 2);
        assert_eq!(
            metrics
                .contract_rejections
                .get("+/temperature", "wrong_unit"),
            2
        );
        assert_eq!(metrics.records_skipped_non_numeric.get(), 1);
        let top = metrics.top_rejected_streams.snapshot();
        assert_eq!(top.len(), 3, "{top:?}");
        // One dead letter per (contract, reason) within the sampling interval.
        let mut dead: Vec<String> = p
            .store()
            .dead_letters(10)
            .unwrap()
            .into_iter()
            .map(|d| d.reason)
            .collect();
        dead.sort();
        assert_eq!(
            dead,
            ["deadband: n1/temperature", "wrong_unit: n1/temperature"]
        );
        let text = metrics.render();
        assert!(text.contains(
            "edgewise_agent_contract_rejections_total{contract=\"+/temperature\",reason=\"deadband\"} 1"
        ));
        p.close_due(10_000).unwrap();
        let rows = p.store().outbox_peek(10).unwrap();
        let n1 = rows
            .iter()
            .find(|r| r.summary.stream == "n1/temperature")
            .unwrap();
        assert!((n1.summary.mean - 20.0).abs() < 1e-9);
        assert_eq!(n1.summary.unit.as_deref(), Some("Cel"));
        assert!(rows.iter().any(|r| r.summary.stream == "n3/temperature"));
    }

    #[test]
    fn a_message_that_fails_half_way_leaves_no_contract_state() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&contract_config(dir.path()), metrics.clone()).unwrap();
        // The first record would set the deadband's last value; the second is refused.
        let broken =
            json(r#"[{"bn":"n1/","bt":1.7e9,"n":"temperature","v":20},{"n":"x y","v":1}]"#);
        let good = json(r#"[{"bn":"n1/","bt":1.7e9,"n":"temperature","v":20.1,"t":1}]"#);
        let batch = [
            Message {
                topic: "s",
                payload: &broken,
            },
            Message {
                topic: "s",
                payload: &good,
            },
        ];
        p.ingest(&batch, 0, 0).unwrap();
        assert_eq!(metrics.messages_rejected.get("bad_name"), 1);
        // 20.1 is judged against no earlier value, not against the undecodable 20.
        assert_eq!(metrics.readings_accepted.get(), 1);
        assert_eq!(metrics.readings_rejected.total(), 0);
    }

    #[test]
    fn a_failed_commit_rolls_the_contracts_back_so_the_retry_is_judged_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&contract_config(dir.path()), metrics.clone()).unwrap();
        p.store_mut().set_max_db_bytes(Some(1)).unwrap();
        // Enough readings to need new pages; each stream's first reading sets its deadband.
        let big: Vec<Vec<u8>> = (0..3000)
            .map(|i| pack(&format!("node-{i}"), 2.0, 21.0))
            .collect();
        let retry = msgs(&big);
        assert!(p.ingest(&retry, 0, 0).unwrap_err().is_disk_full());
        p.store_mut().set_max_db_bytes(None).unwrap();
        p.ingest(&retry, 0, 0).unwrap();
        // Without the rollback each retried reading would fall in its own deadband.
        assert_eq!(metrics.readings_accepted.get(), 3000);
        assert_eq!(metrics.readings_rejected.get("deadband"), 0);
    }

    fn revise_config(dir: &std::path::Path) -> AgentConfig {
        let mut cfg = config(dir);
        cfg.window.late_policy = crate::config::LatePolicy::Revise;
        cfg.window.revise_horizon_ms = Some(60_000);
        cfg.window.idle_timeout_ms = 1_000_000;
        cfg
    }

    #[test]
    fn a_late_reading_revises_its_window_and_a_restart_neither_loses_nor_repeats_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = revise_config(dir.path());
        let metrics = Arc::new(Metrics::default());
        {
            let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
            let a = [pack("n1", 1.0, 10.0), pack("n1", 12.0, 30.0)];
            p.ingest(&msgs(&a), 0, 0).unwrap();
            assert_eq!(p.close_due(0).unwrap(), 1);
            // Revisable: the window's reading stays in the journal.
            assert_eq!(p.store().journal_len().unwrap(), 2);
            let late = [pack("n1", 5.0, 20.0)];
            p.ingest(&msgs(&late), 0, 0).unwrap();
            assert_eq!(metrics.readings_accepted.get(), 3);
            assert_eq!(p.close_due(0).unwrap(), 1);
            assert_eq!(metrics.windows_revised.get(), 1);
            // Another late reading, journaled, then a crash before its window is re-emitted.
            let late = [pack("n1", 6.0, 60.0)];
            p.ingest(&msgs(&late), 0, 0).unwrap();
        }
        let mut p = Pipeline::open(&cfg, Arc::default()).unwrap();
        assert_eq!(p.close_due(0).unwrap(), 1);
        assert_eq!(p.close_due(0).unwrap(), 0);
        let rows = p.store().outbox_peek(10).unwrap();
        let got: Vec<(i64, u32, u64, f64)> = rows
            .iter()
            .map(|r| {
                let s = &r.summary;
                (s.window_start_ms, s.revision, s.count, s.mean)
            })
            .collect();
        assert_eq!(got, vec![(0, 0, 1, 10.0), (0, 1, 2, 15.0), (0, 2, 3, 30.0)]);
        // closed_until 80 s: windows ending by 80 s - 60 s are final, their readings late.
        let far = [pack("n1", 80.0, 1.0)];
        p.ingest(&msgs(&far), 0, 0).unwrap();
        p.close_due(0).unwrap();
        drop(p);
        let late = [pack("n1", 7.0, 1.0)];
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
        p.ingest(&msgs(&late), 0, 0).unwrap();
        assert_eq!(metrics.readings_rejected.get("late"), 1);
        assert_eq!(p.close_due(0).unwrap(), 0);
        let journal: Vec<i64> = p
            .store()
            .journal_readings()
            .unwrap()
            .iter()
            .map(|r| r.time_ms)
            .collect();
        // Everything before 20 s is final now, so only the newest reading stays journaled.
        assert_eq!(journal, vec![80_000]);
    }

    #[test]
    fn streams_past_max_streams_are_refused_within_one_batch_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.window.max_streams = 2;
        let metrics = Arc::new(Metrics::default());
        let mut p = Pipeline::open(&cfg, metrics.clone()).unwrap();
        let a = [
            pack("n1", 1.0, 1.0),
            pack("n2", 1.0, 1.0),
            pack("n3", 1.0, 1.0),
            pack("n1", 2.0, 1.0),
        ];
        p.ingest(&msgs(&a), 0, 0).unwrap();
        assert_eq!(metrics.readings_accepted.get(), 3);
        assert_eq!(metrics.readings_rejected.get("stream_limit"), 1);
        assert_eq!(metrics.active_streams.get(), 2);
        // Once their windows close the slots are free again.
        assert_eq!(p.close_due(1000).unwrap(), 2);
        p.ingest(&msgs(&[pack("n3", 3.0, 1.0)]), 0, 1000).unwrap();
        assert_eq!(metrics.readings_accepted.get(), 4);
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
