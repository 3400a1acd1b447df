//! Edge inference: closed windows -> model features -> anomaly score, flag and model version.
//!
//! # Layout
//! - [`config`]: [`InferenceConfig`] (the `[inference]` TOML table): model file, which window
//!   features feed the model in which order and how they are normalised, which output column is
//!   the score, the alert threshold, batch size and max wait, how often the model file is watched.
//! - [`features`]: pure: a [`WindowSummary`] -> one row of normalised `f32` features.
//! - [`model`]: [`Scorer`]: one ONNX model loaded with tract (optimized twice: with the batch
//!   dimension fixed to `batch_size` for full batches, and symbolic for any other count),
//!   validated against the configured inputs, scoring summaries in batches.
//! - [`swap`]: [`SwappableScorer`]: a `Scorer` whose model can be replaced without a restart, by
//!   an atomic rename of the model file (watched) or a reload command ([`ReloadHandle`]).
//! - [`worker`]: [`InferenceWorker`]: a dedicated scoring thread that batches requests from async
//!   code (size and max wait from the config), so inference never runs on the runtime's core
//!   threads.
//!
//! # Invariants
//! - A summary gets `score: Some(..)` only from a model that passed validation; the score's
//!   `model` is `name@version`, the version being the first 8 hex digits of the SHA-256 of the
//!   exact bytes that were loaded.
//! - A summary whose features are not finite, or whose stream no pattern matches, keeps
//!   `score: None` (counted in [`ScoreReport`]); one bad summary never fails the others.
//! - A model file that fails to load or validate never replaces the active model: the old one
//!   keeps scoring and the rejection is logged with the reason.
//!
//! # Tests
//! `agent/tests/infer.rs` checks tract against the onnxruntime reference vectors checked in under
//! `models/*/reference.json` (both models, from raw summaries through feature mapping), the errors
//! for missing files, wrong shapes, wrong input names and NaN features, and model swaps (good swap,
//! bad file keeps the old model). The feature mapping has unit tests in [`features`].

pub mod config;
pub mod features;
#[cfg(target_arch = "x86_64")]
mod kernel;
pub mod model;
pub mod swap;
pub mod worker;

use std::path::PathBuf;

pub use config::{Feature, FeatureInput, InferenceConfig, ScoreFrom};
pub use model::{ScoreReport, Scorer};
pub use swap::{ReloadHandle, SwappableScorer};
pub use worker::InferenceWorker;

#[allow(unused_imports)] // for the docs above
use edgewise_protocol::WindowSummary;

/// Everything that can go wrong loading a model or scoring with it.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("reading the model file {path}: {source}")]
    ReadModel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a model tract can load: {reason}")]
    ParseModel { path: PathBuf, reason: String },
    #[error("{path} has {found} inputs; the agent feeds exactly one (a batch of feature rows)")]
    InputCount { path: PathBuf, found: usize },
    #[error("{path}: the model's input is named `{found}`, the config expects `{expected}`")]
    InputName {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "{path}: input `{name}` is declared as {found}; the {features} configured features need [batch, {features}] of f32"
    )]
    InputShape {
        path: PathBuf,
        name: String,
        found: String,
        features: usize,
    },
    #[error("{path}: the model's output is named `{found}`, the config expects `{expected}`")]
    OutputName {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: output `{name}` is {found}; the score needs [batch, K] with K > {column}")]
    OutputShape {
        path: PathBuf,
        name: String,
        found: String,
        column: usize,
    },
    #[error("{path}: {what}: {reason}")]
    Tract {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: a validation batch gave a non-finite output ({value})")]
    NonFiniteOutput { path: PathBuf, value: f32 },
    #[error("feature `{feature}` of {stream} is not finite ({value})")]
    NonFiniteFeature {
        stream: String,
        feature: &'static str,
        value: f64,
    },
    #[error("{len} input values are not whole rows of {width} features")]
    InputLength { len: usize, width: usize },
    #[error("invalid inference config: {0}")]
    Config(String),
    #[error("the inference thread has stopped")]
    Stopped,
}

impl InferenceError {
    pub(crate) fn tract(
        path: &std::path::Path,
        what: &'static str,
        e: impl std::fmt::Display,
    ) -> Self {
        InferenceError::Tract {
            path: path.to_path_buf(),
            what,
            reason: format!("{e:#}"),
        }
    }
}
