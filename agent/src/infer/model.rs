//! [`Scorer`]: one ONNX model, loaded with tract and validated against the configured inputs.
//!
//! Loading reads the file once, hashes exactly those bytes (the model version), checks the
//! model's declared input (one input, the configured name if any, `[batch, features]` of f32)
//! and output (`[batch, K]` with the score column inside), replaces the batch dimension by a
//! symbol, and optimizes two plans of it: one with the batch fixed to the configured
//! `batch_size`, which runs full batches, and one with the symbolic batch, which runs any other
//! number of rows (a lone window, the rest of a split batch). tract chooses how to pack and
//! multiply matrices from the shapes it knows when optimizing: with the batch symbolic it packs
//! the batch as the narrow side of every matrix product, with the batch fixed as the wide side,
//! which is what makes full batches fast (`models/bench.sh` measures both). Validation runs probe
//! rows through both plans: outputs must be finite and the two plans must agree. Only then is
//! the scorer returned, so a `Scorer` that exists has passed validation.
//!
//! A model whose output is a softmax over each row (the fault classifier's `class_probs`) is
//! planned without that last node, and the scorer applies the softmax to the plan's output itself
//! (see [`SoftmaxHead`]): tract's Softmax op is fast for rows a multiple of the SIMD width, but
//! runs a 7-class row through three padded 64-lane kernels, which cost more than the whole MLP
//! before it at batch 256. The result is the same softmax, with tract's own vectorised exp.
//!
//! Scoring reuses the two tract states and one input buffer across calls (no re-planning per
//! batch).
//!
//! On x86_64 with AVX-512 the full-batch plan's narrow layers run on the agent's own kernels
//! (`super::kernel`), named by a dispatch tier registered with tract-linalg (`kernel_choice`);
//! tract's own cost model picks 40x2 and 24x4 tiles for these layers, which are slower here.
//! The tier changes nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgewise_protocol::{Score, WindowSummary};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_hir::tract_core::tract_linalg::{Func, reduce::MapReduce};

use super::InferenceError;
use super::config::{FeatureInput, InferenceConfig, ScoreFrom};
use super::features;
use crate::filter::RulePattern;

type PlanState = TypedSimpleState;

/// Which of the scorer's two optimized plans runs a batch.
#[derive(Clone, Copy)]
enum Plan {
    /// The batch dimension fixed to `batch_size`: tract plans each matmul for its real shape.
    Full,
    /// The batch dimension symbolic: any number of rows.
    Partial,
}

/// A loaded, validated model with its feature mapping and threshold.
pub struct Scorer {
    path: PathBuf,
    model_id: String,
    inputs: Vec<FeatureInput>,
    streams: Vec<RulePattern>,
    score_from: ScoreFrom,
    threshold: f64,
    batch_size: usize,
    output_width: usize,
    /// Runs batches of exactly `batch_size` rows.
    full: PlanState,
    /// Runs batches of any other size (symbolic batch dimension).
    partial: PlanState,
    /// The model's final softmax, applied by the scorer to the plans' output (which stops
    /// before it), if the model ends with one.
    softmax: Option<SoftmaxHead>,
    // Scratch reused across calls: the input rows and which summary each row belongs to.
    rows: Vec<f32>,
    row_owner: Vec<usize>,
}

/// What one [`Scorer::score`] call did. Counts are summaries.
#[derive(Debug, Default)]
pub struct ScoreReport {
    /// Scored (`score` is now `Some`).
    pub scored: usize,
    /// Scored at or over the threshold.
    pub alerts: usize,
    /// Their stream matches none of the configured patterns: left unscored.
    pub not_matched: usize,
    /// A feature was not finite: left unscored.
    pub invalid_features: usize,
    /// The model run failed or gave a non-finite value: left unscored.
    pub failed: usize,
    /// The first error behind `invalid_features` or `failed`, for the log.
    pub first_error: Option<InferenceError>,
}

impl ScoreReport {
    fn note(&mut self, e: InferenceError) {
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

impl Scorer {
    /// Reads, validates and prepares the model named by `cfg.model_path`.
    pub fn load(cfg: &InferenceConfig) -> Result<Scorer, InferenceError> {
        let bytes = std::fs::read(&cfg.model_path).map_err(|source| InferenceError::ReadModel {
            path: cfg.model_path.clone(),
            source,
        })?;
        Scorer::from_bytes(cfg, &bytes)
    }

    /// Like [`Scorer::load`], from bytes already read (`cfg.model_path` names them in errors).
    pub fn from_bytes(cfg: &InferenceConfig, bytes: &[u8]) -> Result<Scorer, InferenceError> {
        if let Some((key, msg)) = cfg.problems().into_iter().next() {
            return Err(InferenceError::Config(format!("inference.{key}: {msg}")));
        }
        let path = cfg.model_path.as_path();
        let version: String = Sha256::digest(bytes)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let width = cfg.features.len();
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| InferenceError::ParseModel {
                path: path.to_path_buf(),
                reason: format!("{e:#}"),
            })?;

        let inputs = model
            .input_outlets()
            .map_err(|e| InferenceError::tract(path, "reading inputs", e))?
            .to_vec();
        let [input] = inputs[..] else {
            return Err(InferenceError::InputCount {
                path: path.to_path_buf(),
                found: inputs.len(),
            });
        };
        let input_name = model.node(input.node).name.clone();
        if let Some(expected) = cfg.input_name.as_ref().filter(|e| **e != input_name) {
            return Err(InferenceError::InputName {
                path: path.to_path_buf(),
                found: input_name,
                expected: expected.clone(),
            });
        }
        check_declared_input(&model, path, &input_name, width)?;

        let outputs = model
            .output_outlets()
            .map_err(|e| InferenceError::tract(path, "reading outputs", e))?
            .to_vec();
        let label = |o: OutletId| model.outlet_label(o).unwrap_or("").to_string();
        let output = match &cfg.output_name {
            None => outputs.first().copied(),
            Some(want) => outputs.iter().copied().find(|&o| label(o) == *want),
        };
        let Some(output) = output else {
            return Err(InferenceError::OutputName {
                path: path.to_path_buf(),
                found: outputs
                    .iter()
                    .map(|&o| label(o))
                    .collect::<Vec<_>>()
                    .join(", "),
                expected: cfg.output_name.clone().unwrap_or_default(),
            });
        };
        let output_name = label(output);
        model
            .select_output_outlets(&[output])
            .map_err(|e| InferenceError::tract(path, "selecting the output", e))?;

        let batch = model.sym("batch");
        model
            .set_input_fact(0, f32::fact([batch.to_dim(), width.to_dim()]).into())
            .map_err(|e| InferenceError::tract(path, "setting the input shape", e))?;
        let mut typed = model.into_typed().map_err(|e| {
            InferenceError::tract(
                path,
                "the model does not accept [batch, features] of f32",
                e,
            )
        })?;
        let out_fact = typed
            .output_fact(0)
            .map_err(|e| InferenceError::tract(path, "reading the output shape", e))?
            .clone();
        let column = cfg.score.column();
        let output_width = match out_fact.shape.dims() {
            [b, k] if *b == batch.to_dim() => k.to_i64().ok().map(|k| k as usize),
            _ => None,
        };
        let output_width = match output_width {
            Some(k) if column < k && out_fact.datum_type == f32::datum_type() => k,
            _ => {
                return Err(InferenceError::OutputShape {
                    path: path.to_path_buf(),
                    name: output_name,
                    found: format!("{:?}", out_fact),
                    column,
                });
            }
        };
        let softmax = SoftmaxHead::split_off(&mut typed, path)?;
        // Two plans of the same graph: one with the batch dimension fixed to `batch_size`, so
        // tract plans every matmul for its real shape, for full batches; one with the symbolic
        // batch for the partial batches in between (a lone window, the rest of a split batch).
        let full_batch = typed
            .set_symbols(&HashMap::from([(batch.clone(), cfg.batch_size.to_dim())]))
            .map_err(|e| InferenceError::tract(path, "fixing the batch size", e))?;
        let full = plan_state(full_batch, path)?;
        let partial = plan_state(typed, path)?;
        let streams = cfg
            .streams
            .iter()
            .map(|s| RulePattern::parse(s).map_err(InferenceError::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut scorer = Scorer {
            path: path.to_path_buf(),
            model_id: format!("{}@{version}", cfg.effective_model_name()),
            inputs: cfg.features.clone(),
            streams,
            score_from: cfg.score,
            threshold: cfg.threshold,
            batch_size: cfg.batch_size,
            output_width,
            full,
            partial,
            softmax,
            rows: Vec::with_capacity(cfg.batch_size * width),
            row_owner: Vec::with_capacity(cfg.batch_size),
        };
        scorer.validate_run()?;
        Ok(scorer)
    }

    /// Runs typical (normalised zero) and extreme rows through both plans: each must answer
    /// `[rows, K]` with finite values, and the two must agree on the rows they share.
    fn validate_run(&mut self) -> Result<(), InferenceError> {
        let width = self.inputs.len();
        let mut probe = vec![0.0f32; width];
        probe.extend(std::iter::repeat_n(8.0f32, width));
        probe.extend(std::iter::repeat_n(-8.0f32, width));
        let full_rows: Vec<f32> = probe
            .iter()
            .copied()
            .cycle()
            .take(self.batch_size * width)
            .collect();
        let (mut on_full, mut on_partial) = (Vec::new(), Vec::new());
        self.run_plan(Plan::Full, &full_rows, &mut on_full)?;
        self.run_plan(Plan::Partial, &probe, &mut on_partial)?;
        if let Some(&value) = on_full.iter().chain(&on_partial).find(|v| !v.is_finite()) {
            return Err(InferenceError::NonFiniteOutput {
                path: self.path.clone(),
                value,
            });
        }
        let mismatch = on_full
            .iter()
            .zip(&on_partial)
            .find(|(a, b)| (*a - *b).abs() > 1e-4 * b.abs().max(1.0));
        if let Some((a, b)) = mismatch {
            return Err(InferenceError::tract(
                &self.path,
                "validating",
                format!("the full-batch plan gives {a}, the partial-batch plan {b}"),
            ));
        }
        Ok(())
    }

    /// `name@version`, as recorded in every score.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Features per input row.
    pub fn input_width(&self) -> usize {
        self.inputs.len()
    }

    /// Values per output row (`K` of `[batch, K]`).
    pub fn output_width(&self) -> usize {
        self.output_width
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Whether this model scores `stream`.
    pub fn applies_to(&self, stream: &str) -> bool {
        self.streams.iter().any(|p| p.matches(stream))
    }

    /// Runs the model on whole rows of already-normalised features (`rows.len()` a multiple of
    /// [`Scorer::input_width`]) and returns the `[rows, K]` output, row-major.
    pub fn run(&mut self, rows: &[f32]) -> Result<Vec<f32>, InferenceError> {
        let width = self.inputs.len();
        if rows.is_empty() || !rows.len().is_multiple_of(width) {
            return Err(InferenceError::InputLength {
                len: rows.len(),
                width,
            });
        }
        if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
            return Err(InferenceError::NonFiniteFeature {
                stream: format!("input row {}", i / width),
                feature: "input",
                value: rows[i] as f64,
            });
        }
        let mut out = Vec::with_capacity(rows.len() / width * self.output_width);
        self.run_into(rows, &mut out)?;
        Ok(out)
    }

    /// Runs whole rows with the plan for their count (see [`Plan`]), appending the output.
    fn run_into(&mut self, rows: &[f32], out: &mut Vec<f32>) -> Result<(), InferenceError> {
        let plan = if rows.len() == self.batch_size * self.inputs.len() {
            Plan::Full
        } else {
            Plan::Partial
        };
        self.run_plan(plan, rows, out)
    }

    fn run_plan(
        &mut self,
        plan: Plan,
        rows: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let width = self.inputs.len();
        let n = rows.len() / width;
        let input = Tensor::from_shape(&[n, width], rows)
            .map_err(|e| InferenceError::tract(&self.path, "building the input", e))?;
        let state = match plan {
            Plan::Full => &mut self.full,
            Plan::Partial => &mut self.partial,
        };
        let result = state
            .run(tvec!(input.into_tvalue()))
            .map_err(|e| InferenceError::tract(&self.path, "running", e))?;
        let view = result
            .first()
            .ok_or_else(|| InferenceError::tract(&self.path, "running", "no output"))?
            .to_plain_array_view::<f32>()
            .map_err(|e| InferenceError::tract(&self.path, "reading the output", e))?;
        if view.shape() != [n, self.output_width] {
            return Err(InferenceError::tract(
                &self.path,
                "running",
                format!(
                    "output shape {:?}, expected [{n}, {}]",
                    view.shape(),
                    self.output_width
                ),
            ));
        }
        let start = out.len();
        match view.as_slice() {
            Some(contiguous) => out.extend_from_slice(contiguous),
            None => out.extend(view.iter().copied()),
        }
        if let Some(softmax) = &self.softmax {
            softmax.apply(&mut out[start..], self.output_width, &self.path)?;
        }
        Ok(())
    }

    /// Scores every summary this model applies to, in batches of at most `batch_size`, setting
    /// `score`. Summaries it cannot score keep `score: None`; the report says how many and why.
    pub fn score(&mut self, summaries: &mut [WindowSummary]) -> ScoreReport {
        self.score_each(summaries.iter_mut())
    }

    /// [`Scorer::score`] for summaries that live inside other values, e.g.
    /// `scorer.score_each(closed.iter_mut().map(|c| &mut c.summary))`.
    pub fn score_each<'a>(
        &mut self,
        summaries: impl IntoIterator<Item = &'a mut WindowSummary>,
    ) -> ScoreReport {
        let mut summaries: Vec<&mut WindowSummary> = summaries.into_iter().collect();
        let mut report = ScoreReport::default();
        self.rows.clear();
        self.row_owner.clear();
        for i in 0..summaries.len() {
            if !self.applies_to(&summaries[i].stream) {
                report.not_matched += 1;
                continue;
            }
            match features::push_row(&self.inputs, summaries[i], &mut self.rows) {
                Ok(()) => self.row_owner.push(i),
                Err(e) => {
                    report.invalid_features += 1;
                    report.note(e);
                }
            }
            if self.row_owner.len() == self.batch_size {
                self.flush(&mut summaries, &mut report);
            }
        }
        if !self.row_owner.is_empty() {
            self.flush(&mut summaries, &mut report);
        }
        report
    }

    fn flush(&mut self, summaries: &mut [&mut WindowSummary], report: &mut ScoreReport) {
        let rows = std::mem::take(&mut self.rows);
        let mut out = Vec::with_capacity(self.row_owner.len() * self.output_width);
        match self.run_into(&rows, &mut out) {
            Ok(()) => {
                let column = self.score_from.column();
                for (r, &owner) in self.row_owner.iter().enumerate() {
                    let value = self.score_from.apply(out[r * self.output_width + column]);
                    if !value.is_finite() {
                        report.failed += 1;
                        report.note(InferenceError::NonFiniteOutput {
                            path: self.path.clone(),
                            value,
                        });
                        continue;
                    }
                    let value = value as f64;
                    let alert = value >= self.threshold;
                    summaries[owner].score = Some(Score {
                        value,
                        alert,
                        model: self.model_id.clone(),
                    });
                    report.scored += 1;
                    report.alerts += alert as usize;
                }
            }
            Err(e) => {
                report.failed += self.row_owner.len();
                report.note(e);
            }
        }
        self.rows = rows;
        self.rows.clear();
        self.row_owner.clear();
    }
}

/// The lowest logit-minus-maximum [`SoftmaxHead::apply`] exponentiates: exp(-80) is 1.8e-35,
/// which divided by a row's sum (at most its width) stays above the smallest normal f32
/// (1.2e-38) for rows up to 1,500 wide.
const EXP_FLOOR: f32 = -80.0;

/// The softmax over each output row that ends a classifier, computed by the scorer instead of
/// tract's Softmax op (see the module docs). Same arithmetic as that op: subtract the row's max,
/// exponentiate with tract's Softmax2 kernel, multiply by the reciprocal of the row's sum; but
/// the kernel runs once over the whole batch instead of once per row.
struct SoftmaxHead {
    /// exp(x - param) in place over a slice (tract's vectorised kernel for this machine).
    exp: Box<dyn MapReduce<f32, f32>>,
}

impl SoftmaxHead {
    /// If `model`'s output (already checked to be `[batch, K]`) is a float softmax over its `K`
    /// axis, makes the node before it the output (the softmax is left to
    /// [`SoftmaxHead::apply`]) and returns the head.
    fn split_off(
        model: &mut TypedModel,
        path: &Path,
    ) -> Result<Option<SoftmaxHead>, InferenceError> {
        let outputs = model
            .output_outlets()
            .map_err(|e| InferenceError::tract(path, "reading outputs", e))?;
        let Some(node) = outputs.first().map(|o| model.node(o.node)) else {
            return Ok(None);
        };
        let is_row_softmax = node.op_as::<Softmax>().is_some_and(|op| {
            op.kind == SoftmaxKind::Softmax && op.quant_output_dt.is_none() && op.axes[..] == [1]
        });
        if !is_row_softmax {
            return Ok(None);
        }
        let [logits] = node.inputs[..] else {
            return Ok(None);
        };
        let exp = Func::Softmax2
            .map_reduce_f32()
            .map_err(|e| InferenceError::tract(path, "preparing the softmax kernel", e))?;
        model
            .select_output_outlets(&[logits])
            .map_err(|e| InferenceError::tract(path, "selecting the softmax input", e))?;
        Ok(Some(SoftmaxHead { exp }))
    }

    /// Replaces each row of `width` logits in `values` by its softmax.
    ///
    /// A logit more than [`EXP_FLOOR`] below its row's maximum counts as exactly that far
    /// below: its probability (under 2e-35 either way) stays a normal float instead of a
    /// subnormal one, which the processor multiplies and adds through a slow microcode assist
    /// (measured, fault model, 256 rows, same bench binary with and without, alternated twice:
    /// 28.1 / 28.9 us -> 26.7 / 26.4 us per batch). NaN stays NaN.
    fn apply(&self, values: &mut [f32], width: usize, path: &Path) -> Result<(), InferenceError> {
        for row in values.chunks_exact_mut(width) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in row.iter_mut() {
                let d = *x - max;
                *x = if d < EXP_FLOOR { EXP_FLOOR } else { d };
            }
        }
        // Every value is now in [EXP_FLOOR, 0]: one kernel call exponentiates the whole batch.
        self.exp
            .run_with_params(values, 0.0)
            .map_err(|e| InferenceError::tract(path, "softmax", e))?;
        for row in values.chunks_exact_mut(width) {
            let scale = row.iter().sum::<f32>().recip();
            row.iter_mut().for_each(|x| *x *= scale);
        }
        Ok(())
    }
}

/// Optimizes `model` for this machine and prepares the state that runs it (reused across calls).
fn plan_state(model: TypedModel, path: &Path) -> Result<PlanState, InferenceError> {
    let plan: Arc<TypedSimplePlan> = model
        .into_optimized()
        .map_err(|e| InferenceError::tract(path, "optimizing", e))?
        .into_runnable()
        .map_err(|e| InferenceError::tract(path, "planning", e))?;
    plan.spawn()
        .map_err(|e| InferenceError::tract(path, "preparing the run state", e))
}

/// The agent's matmul kernel choice, registered with tract-linalg as a dispatch tier above its
/// own x86_64 tiers: for an f32 product with a full batch of rows (`m` >= 128, known), a narrow
/// layer (`n` a multiple of 8 up to 64) and a short inner dimension (`k` <= 64), one of the
/// agent's row-vector kernels ([`super::kernel`]: 8x32 when `n` is a multiple of 32, 16x16 when
/// of 16) or else tract's AVX-512 16x8. Anything else (the symbolic-batch plan, `n` = 1 or 7,
/// other machines) is left to tract's tiers. Measured with `models/bench.sh` (README, "Edge
/// inference"): tract's cost model picks `fma_mmm_f32_40x2` and `fma_mmm_f32_24x4` for the
/// anomaly model's 32- and 16-wide layers at 256 rows, and 40x2 for the fault model's 64-wide
/// first layer; its 16x8 was faster, and the row-vector kernels are faster again. x86_64 only,
/// like the kernels (the tier would not apply elsewhere).
#[cfg(target_arch = "x86_64")]
mod kernel_choice {
    use tract_onnx::prelude::DatumType;
    use tract_onnx::tract_hir::tract_core::tract_linalg::isa::{Arch, Isa, IsaSet};
    use tract_onnx::tract_hir::tract_core::tract_linalg::mmm::{Query, Suitable};
    use tract_onnx::tract_hir::tract_core::tract_linalg::mmm_tiers::MmmTier;

    pub(super) use super::super::kernel::{KERNEL_8X32, KERNEL_16X16};
    /// tract's own.
    pub(super) const TRACT_16X8: &str = "avx512_mmm_f32_16x8";

    /// Which kernel the tier names for `query`, `None` to leave it to tract.
    pub(super) fn preferred(
        _isa: &IsaSet,
        dt: DatumType,
        query: &Query,
        _suitable: &[Suitable],
    ) -> Option<&'static str> {
        let (Some(m), Some(k), Some(n)) = (query.m, query.k, query.n) else {
            return None;
        };
        if dt != DatumType::F32 || m < 128 || k > 64 || !(8..=64).contains(&n) {
            return None;
        }
        match n {
            n if n % 32 == 0 => Some(KERNEL_8X32),
            n if n % 16 == 0 => Some(KERNEL_16X16),
            n if n % 8 == 0 => Some(TRACT_16X8),
            _ => None,
        }
    }

    inventory::submit! {
        MmmTier {
            arch: Some(Arch::X86_64),
            // Above tract's x86_64 tiers (1 to 8); a name the query cannot reach defers to them.
            precedence: 9,
            name: "edgewise-narrow-layers",
            applies: |isa| isa.has(Isa::X86_64Avx512f) && isa.has(Isa::X86_64Fma),
            preferred,
        }
    }
}

/// Checks what the ONNX file declares about its input before the agent overrides the batch
/// dimension: rank 2, `width` features, f32. Unknown (undeclared) parts pass; tract's typing then
/// checks them against the weights.
fn check_declared_input(
    model: &InferenceModel,
    path: &Path,
    name: &str,
    width: usize,
) -> Result<(), InferenceError> {
    let fact = model
        .input_fact(0)
        .map_err(|e| InferenceError::tract(path, "reading the input", e))?;
    let rank_ok = fact.shape.rank().concretize().is_none_or(|r| r == 2);
    let width_ok = fact
        .shape
        .dim(1)
        .and_then(|d| d.concretize())
        .is_none_or(|d| d.to_i64().ok() == Some(width as i64));
    let type_ok = fact
        .datum_type
        .concretize()
        .is_none_or(|dt| dt == f32::datum_type());
    if rank_ok && width_ok && type_ok {
        Ok(())
    } else {
        Err(InferenceError::InputShape {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: fact.format_dt_shape(),
            features: width,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward softmax in f64, to check the head against.
    fn reference_softmax(row: &[f32]) -> Vec<f64> {
        let max = row
            .iter()
            .map(|&x| x as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernel_choice_names_a_kernel_for_full_batch_narrow_layers_only() {
        use tract_onnx::tract_hir::tract_core::tract_linalg::isa;
        use tract_onnx::tract_hir::tract_core::tract_linalg::mmm::Query;
        let f32_query = |m, k, n| Query::plain(DatumType::F32, m, k, n);
        let pick = |q: &Query| kernel_choice::preferred(&isa::native(), DatumType::F32, q, &[]);
        for (k, n, kernel) in [
            (5, 32, kernel_choice::KERNEL_8X32),
            (7, 64, kernel_choice::KERNEL_8X32),
            (64, 32, kernel_choice::KERNEL_8X32),
            (32, 16, kernel_choice::KERNEL_16X16),
            (32, 48, kernel_choice::KERNEL_16X16),
            (16, 8, kernel_choice::TRACT_16X8),
            (16, 24, kernel_choice::TRACT_16X8),
        ] {
            assert_eq!(pick(&f32_query(Some(256), Some(k), Some(n))), Some(kernel));
        }
        // Left to tract: a symbolic or small batch, n = 1 or 7, a long k, another type.
        assert_eq!(pick(&f32_query(None, Some(5), Some(32))), None);
        assert_eq!(pick(&f32_query(Some(64), Some(5), Some(32))), None);
        assert_eq!(pick(&f32_query(Some(256), Some(16), Some(1))), None);
        assert_eq!(pick(&f32_query(Some(256), Some(32), Some(7))), None);
        assert_eq!(pick(&f32_query(Some(256), Some(128), Some(32))), None);
        let i32_query = Query::plain(DatumType::I32, Some(256), Some(5), Some(32));
        assert_eq!(
            kernel_choice::preferred(&isa::native(), DatumType::I32, &i32_query, &[]),
            None
        );
    }

    #[test]
    fn softmax_head_matches_the_definition_row_by_row() {
        let head = SoftmaxHead {
            exp: Func::Softmax2
                .map_reduce_f32()
                .expect("this machine has a Softmax2 kernel"),
        };
        // 7-wide rows (the fault model), 67 of them so the batch is not a multiple of any
        // SIMD width: ordinary logits, equal logits, and logits whose exp overflows f32.
        let mut rows: Vec<f32> = Vec::new();
        for i in 0..67 {
            let row: [f32; 7] = match i % 3 {
                0 => [0.5, -1.25, 3.0, 0.0, 2.5, -4.0, 1.0].map(|x| x + i as f32 * 0.1),
                1 => [2.0; 7],
                _ => [1000.0, 0.0, -1000.0, 999.0, 10.0, -3.0, 998.0],
            };
            rows.extend(row);
        }
        let expected: Vec<f64> = rows.chunks(7).flat_map(reference_softmax).collect();
        head.apply(&mut rows, 7, Path::new("test.onnx"))
            .expect("softmax runs");
        for (i, (got, want)) in rows.iter().zip(&expected).enumerate() {
            assert!(
                (*got as f64 - want).abs() < 1e-6,
                "value {i}: {got} instead of {want}"
            );
            // Far below the maximum: a normal float near zero, never a subnormal.
            assert!(!got.is_subnormal(), "value {i}: {got} is subnormal");
        }
        // A NaN logit makes its row NaN (the scorer then rejects it); other rows are untouched.
        let mut rows = vec![0.0, f32::NAN, 1.0, 0.0, 0.0, 1.0];
        head.apply(&mut rows, 3, Path::new("test.onnx"))
            .expect("softmax runs");
        assert!(rows[..3].iter().all(|x| x.is_nan()), "{rows:?}");
        assert!(rows[3..].iter().all(|x| x.is_finite()), "{rows:?}");
    }
}
