//! [`InferenceWorker`]: a dedicated thread that scores for async callers.
//!
//! Callers send their closed windows and await the scored summaries. The thread takes the first
//! waiting request, then gathers more until `batch_size` summaries are waiting or `max_wait_ms`
//! has passed since the first one, scores them in one model run, and answers each caller with
//! its own summaries in their order. Inference therefore never runs on the async runtime's
//! threads. The queue holds at most one request per awaiting caller, so it is bounded by the
//! number of concurrent callers. With a single caller (the pipeline), set `max_wait_ms = 0`:
//! waiting could only add latency.
//!
//! Tested in `agent/tests/infer.rs` (`worker_batches_requests_from_async_callers`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgewise_protocol::WindowSummary;
use tokio::sync::oneshot;

use super::InferenceError;
use super::swap::{ReloadHandle, SwappableScorer};

struct Job {
    summaries: Vec<WindowSummary>,
    reply: oneshot::Sender<Vec<WindowSummary>>,
}

/// Totals since the worker started (for metrics).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub model_runs: AtomicU64,
    pub scored: AtomicU64,
    pub alerts: AtomicU64,
    /// Left unscored: bad features, or the model run failed.
    pub unscored: AtomicU64,
}

pub struct InferenceWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    reload: ReloadHandle,
    stats: Arc<WorkerStats>,
}

impl InferenceWorker {
    pub fn spawn(
        scorer: SwappableScorer,
        batch_size: usize,
        max_wait: Duration,
    ) -> Result<InferenceWorker, InferenceError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let reload = scorer.reload_handle();
        let stats = Arc::new(WorkerStats::default());
        let s = stats.clone();
        let thread = std::thread::Builder::new()
            .name("edgewise-infer".into())
            .spawn(move || run(scorer, rx, batch_size.max(1), max_wait, s))
            .map_err(|e| InferenceError::Config(format!("starting the inference thread: {e}")))?;
        Ok(InferenceWorker {
            jobs: Some(tx),
            thread: Some(thread),
            reload,
            stats,
        })
    }

    /// Scores `summaries` (see [`super::Scorer::score`]) and returns them, in order.
    pub async fn score(
        &self,
        summaries: Vec<WindowSummary>,
    ) -> Result<Vec<WindowSummary>, InferenceError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or(InferenceError::Stopped)?
            .send(Job { summaries, reply })
            .map_err(|_| InferenceError::Stopped)?;
        answer.await.map_err(|_| InferenceError::Stopped)
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }
}

impl Drop for InferenceWorker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut scorer: SwappableScorer,
    jobs: mpsc::Receiver<Job>,
    batch_size: usize,
    max_wait: Duration,
    stats: Arc<WorkerStats>,
) {
    let mut batch: Vec<Job> = Vec::new();
    let mut all: Vec<WindowSummary> = Vec::new();
    let mut lens: Vec<usize> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let deadline = Instant::now() + max_wait;
        let mut waiting = first.summaries.len();
        batch.push(first);
        while waiting < batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() {
                jobs.try_recv().ok()
            } else {
                jobs.recv_timeout(left).ok()
            };
            let Some(job) = next else { break };
            waiting += job.summaries.len();
            batch.push(job);
        }
        for job in &mut batch {
            lens.push(job.summaries.len());
            all.append(&mut job.summaries);
        }
        let report = scorer.score(&mut all);
        stats.model_runs.fetch_add(1, Ordering::Relaxed);
        stats
            .scored
            .fetch_add(report.scored as u64, Ordering::Relaxed);
        stats
            .alerts
            .fetch_add(report.alerts as u64, Ordering::Relaxed);
        let unscored = report.invalid_features + report.failed;
        stats.unscored.fetch_add(unscored as u64, Ordering::Relaxed);
        if let Some(e) = &report.first_error {
            tracing::warn!(unscored, error = %e, "windows left unscored");
        }
        // Hand each caller back its own summaries, in order.
        let mut rest = all.drain(..);
        for (job, n) in batch.drain(..).zip(lens.drain(..)) {
            let mine: Vec<WindowSummary> = rest.by_ref().take(n).collect();
            let _ = job.reply.send(mine);
        }
    }
}
