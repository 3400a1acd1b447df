//! [`SwappableScorer`]: a [`Scorer`] whose model is replaced without a restart.
//!
//! A watcher thread checks the model file's identity (size, modification time, inode) every
//! `watch_interval_ms`, and loads it on a change or on a [`ReloadHandle::reload`] command. A
//! model that loads and validates is handed to the scoring side over a channel and takes over at
//! the start of the next [`SwappableScorer::score`] call, so a batch is always scored by one
//! model. A model that fails is logged (`warn`, with the reason) and dropped: the active model
//! keeps scoring. A failed file is not retried until it changes again.
//!
//! Replace the file atomically (write `anomaly.onnx.tmp` in the same directory, then rename it
//! over `anomaly.onnx`); a file written in place could be read half-written, which then fails
//! validation and is retried once it changes again.
//!
//! Tested in `agent/tests/infer.rs` (swap by rename, swap by command, bad file keeps the old
//! model).

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use edgewise_protocol::WindowSummary;

use super::InferenceError;
use super::config::InferenceConfig;
use super::model::{ScoreReport, Scorer};

enum Command {
    Reload(mpsc::Sender<Result<String, InferenceError>>),
    Stop,
}

/// Asks the watcher thread to load the model file now. Cloneable; usable from any thread.
#[derive(Clone)]
pub struct ReloadHandle {
    tx: mpsc::Sender<Command>,
}

impl ReloadHandle {
    /// Loads and validates the configured model file now; blocks until that is done. `Ok` is
    /// the new `name@version`, active from the next scoring call; on `Err` the old model stays.
    pub fn reload(&self) -> Result<String, InferenceError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Reload(tx))
            .map_err(|_| InferenceError::Stopped)?;
        rx.recv().map_err(|_| InferenceError::Stopped)?
    }
}

pub struct SwappableScorer {
    active: Scorer,
    incoming: mpsc::Receiver<Scorer>,
    commands: mpsc::Sender<Command>,
    watcher: Option<JoinHandle<()>>,
}

impl SwappableScorer {
    /// Loads the configured model (an error here means no model: the caller decides whether the
    /// agent may start without one) and starts the watcher thread.
    pub fn start(cfg: InferenceConfig) -> Result<SwappableScorer, InferenceError> {
        let seen = fingerprint(&cfg.model_path);
        let active = Scorer::load(&cfg)?;
        let (scorer_tx, incoming) = mpsc::channel();
        let (commands, rx) = mpsc::channel();
        let current = active.model_id().to_string();
        let watcher = std::thread::Builder::new()
            .name("edgewise-model-watch".into())
            .spawn(move || watch(cfg, rx, scorer_tx, current, seen))
            .map_err(|e| InferenceError::Config(format!("starting the model watcher: {e}")))?;
        Ok(SwappableScorer {
            active,
            incoming,
            commands,
            watcher: Some(watcher),
        })
    }

    /// Scores with the newest validated model; see [`Scorer::score`].
    pub fn score(&mut self, summaries: &mut [WindowSummary]) -> ScoreReport {
        self.take_new_model();
        self.active.score(summaries)
    }

    /// [`Scorer::score_each`] with the newest validated model.
    pub fn score_each<'a>(
        &mut self,
        summaries: impl IntoIterator<Item = &'a mut WindowSummary>,
    ) -> ScoreReport {
        self.take_new_model();
        self.active.score_each(summaries)
    }

    /// The model that will score the next batch (`name@version`).
    pub fn model_id(&mut self) -> &str {
        self.take_new_model();
        self.active.model_id()
    }

    /// The active scorer, for raw runs (benchmarks, tests).
    pub fn scorer(&mut self) -> &mut Scorer {
        self.take_new_model();
        &mut self.active
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            tx: self.commands.clone(),
        }
    }

    fn take_new_model(&mut self) {
        while let Ok(next) = self.incoming.try_recv() {
            tracing::info!(
                from = self.active.model_id(),
                to = next.model_id(),
                "model swapped in"
            );
            self.active = next;
        }
    }
}

impl Drop for SwappableScorer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// Identity of the file at `path`: changes when it is rewritten or another file is renamed over
/// it. `None` while it does not exist.
fn fingerprint(path: &Path) -> Option<(u64, Option<SystemTime>, u64)> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some((m.len(), m.modified().ok(), inode))
}

fn watch(
    cfg: InferenceConfig,
    commands: mpsc::Receiver<Command>,
    scorers: mpsc::Sender<Scorer>,
    mut current: String,
    mut seen: Option<(u64, Option<SystemTime>, u64)>,
) {
    let interval = Duration::from_millis(cfg.watch_interval_ms);
    let load = |current: &mut String| -> Result<String, InferenceError> {
        match Scorer::load(&cfg) {
            Ok(scorer) => {
                let id = scorer.model_id().to_string();
                tracing::info!(path = %cfg.model_path.display(), model = %id, "new model validated");
                *current = id.clone();
                scorers.send(scorer).map_err(|_| InferenceError::Stopped)?;
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(path = %cfg.model_path.display(), error = %e, keeping = %current, "rejected the new model file; the old model keeps scoring");
                Err(e)
            }
        }
    };
    loop {
        let command = if cfg.watch_interval_ms == 0 {
            commands
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            commands.recv_timeout(interval)
        };
        match command {
            Ok(Command::Reload(reply)) => {
                seen = fingerprint(&cfg.model_path);
                let _ = reply.send(load(&mut current));
            }
            Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = fingerprint(&cfg.model_path);
                if now == seen {
                    continue;
                }
                seen = now;
                if now.is_none() {
                    tracing::warn!(path = %cfg.model_path.display(), keeping = %current, "the model file is gone; the old model keeps scoring");
                    continue;
                }
                let _ = load(&mut current);
            }
        }
    }
}
