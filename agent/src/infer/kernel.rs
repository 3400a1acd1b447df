//! An f32 matrix-multiply kernel for tract-linalg, written for the agent's models: small MLPs
//! run over a full batch of window rows.
//!
//! tract multiplies a batch of `m` rows (the windows) by a `k x n` weight matrix tile by tile.
//! Its x86_64 kernels hold a tile with the SIMD lanes running down `m` (16 rows of one output
//! column per AVX-512 register), so storing a tile into the row-major `[batch, n]` output takes
//! one scalar store per value; for the 16- to 64-wide layers of these models that costs about as
//! much as the multiply. The kernels here hold a tile with the lanes running along `n`: each
//! register is 16 consecutive outputs of one row, a bias is one vector load, and a row of the
//! tile is stored with whole-vector stores.
//!
//! `Tile<MR, NV>` computes `MR` rows by `16 * NV` columns. The weights come in tract's standard
//! packed panels (`f32::packing(16 * NV)`: for each `k`, `16 * NV` weights, packed once when the
//! model is optimized). The rows come as they are ([`RowPanels`]): `MR` consecutive rows of `k`
//! values, so that preparing a layer's input is a copy rather than tract's transposing pack
//! (which cost about as much as the first two layers' arithmetic). The kernel interprets
//! tract's fused operation list (clear, multiply-add, per-row / per-column / scalar operations,
//! store) as tract's own portable kernel does (`tract_linalg::generic::mmm`). The kernels are registered with
//! tract-linalg (an `MmmRoutine`) with a preference below tract's own, so tract never picks
//! them by itself; [`super::model`]'s kernel choice names them for the layers they are for.
//! They need AVX-512F (declared, so tract never runs them elsewhere).

use std::arch::x86_64::*;
use std::fmt;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{DimLike, TensorView, ensure};
use tract_onnx::tract_hir::tract_core::tract_linalg::WeightType;
use tract_onnx::tract_hir::tract_core::tract_linalg::isa::{Arch, Isa, IsaReq};
use tract_onnx::tract_hir::tract_core::tract_linalg::mmm::{
    DynKernel, EagerPackedInput, FusedKerSpec, MMMInputFormat, MMMInputValue, MatMatMul,
    OutputStoreKer, PackedExoticFact, PackedMatrixStorage,
};
use tract_onnx::tract_hir::tract_core::tract_linalg::mmm_routines::MmmRoutine;
use tract_onnx::tract_hir::tract_core::tract_linalg::pack::Packing;

/// 8 rows by 32 columns: for layers whose width is a multiple of 32 (32, 64).
pub(crate) const KERNEL_8X32: &str = "edgewise_avx512_f32_8x32";
/// 16 rows by 16 columns: for layers 16 wide (and any multiple of 16 that is not one of 32).
pub(crate) const KERNEL_16X16: &str = "edgewise_avx512_f32_16x16";

/// SIMD lanes of one AVX-512 register of f32.
const LANES: usize = 16;

/// What the kernel returns to tract for an operation it does not implement (tract turns a
/// non-zero return into an error naming the kernel). Only integer and quantized operations are
/// refused; tract never sends them to an f32 kernel.
const UNSUPPORTED: isize = 1;

fn make<const MR: usize, const NR: usize, const NV: usize>(name: &str) -> Box<dyn MatMatMul> {
    const { assert!(NR == NV * LANES) };
    // `new` takes tract's packed formats; the rows' one is replaced by `RowPanels` below.
    let mut kernel =
        DynKernel::<MR, NR, f32>::new(name, run::<MR, NV>, f32::packing(MR), f32::packing(NR))
            .with_isa(IsaReq::ANY.needing(&[Isa::X86_64Avx512f]))
            // Below every kernel of tract's: only a tier naming it (ours) makes tract use it.
            .with_boost(|| -1_000_000);
    // The only packing: rows as they are, weights in tract's panels (index 0 in `AddMatMul`).
    kernel.packings = vec![(Box::new(RowPanels { r: MR }), Box::new(f32::packing(NR)))];
    kernel.arch = Some(Arch::X86_64);
    kernel.mmm()
}

inventory::submit! {
    MmmRoutine { make: || make::<8, 32, 2>(KERNEL_8X32) }
}

inventory::submit! {
    MmmRoutine { make: || make::<16, 16, 1>(KERNEL_16X16) }
}

/// The kernel as tract calls it (a plain `unsafe fn` pointer).
///
/// # Safety
/// tract's contract for every kernel: the operation list ends with `Done`, and its pointers
/// (packed panels of `k` steps, per-row / per-column vectors, output tiles with their strides)
/// are valid for this tile. tract runs the kernel only where its declared ISA (AVX-512F) is
/// present.
unsafe fn run<const MR: usize, const NV: usize>(ops: &[FusedKerSpec<f32>]) -> isize {
    // SAFETY: as above; the AVX-512F requirement is declared to tract, which checks it.
    unsafe { Tile::<MR, NV>::run(ops) }
}

/// The accumulator tile: `MR` rows of `NV` registers of 16 columns.
struct Tile<const MR: usize, const NV: usize> {
    acc: [[__m512; NV]; MR],
}

impl<const MR: usize, const NV: usize> Tile<MR, NV> {
    const NR: usize = NV * LANES;

    #[target_feature(enable = "avx512f")]
    unsafe fn run(ops: &[FusedKerSpec<f32>]) -> isize {
        let mut t = Tile::<MR, NV> {
            acc: [[_mm512_setzero_ps(); NV]; MR],
        };
        for op in ops {
            // SAFETY (every arm): the pointers are tract's, valid as the kernel contract says.
            unsafe {
                match *op {
                    FusedKerSpec::Done => break,
                    FusedKerSpec::Clear => t.acc = [[_mm512_setzero_ps(); NV]; MR],
                    FusedKerSpec::AddMatMul {
                        k,
                        pa,
                        pb,
                        packing: 0,
                    } => t.add_mat_mul(k, pa as *const f32, pb as *const f32),
                    FusedKerSpec::AddMatMul { .. } => return UNSUPPORTED,
                    FusedKerSpec::ScalarAdd(s) => t.scalar(s, |s, x| _mm512_add_ps(s, x)),
                    FusedKerSpec::ScalarMul(s) => t.scalar(s, |s, x| _mm512_mul_ps(s, x)),
                    FusedKerSpec::ScalarSub(s) => t.scalar(s, |s, x| _mm512_sub_ps(s, x)),
                    FusedKerSpec::ScalarSubF(s) => t.scalar(s, |s, x| _mm512_sub_ps(x, s)),
                    FusedKerSpec::ScalarMin(s) => t.scalar(s, |s, x| min(s, x)),
                    FusedKerSpec::ScalarMax(s) => t.scalar(s, |s, x| max(s, x)),
                    FusedKerSpec::LeakyRelu(alpha) => t.scalar(alpha, |s, x| leaky_relu(s, x)),
                    FusedKerSpec::PerRowAdd(p) => t.per_row(p, |s, x| _mm512_add_ps(s, x)),
                    FusedKerSpec::PerRowMul(p) => t.per_row(p, |s, x| _mm512_mul_ps(s, x)),
                    FusedKerSpec::PerRowSub(p) => t.per_row(p, |s, x| _mm512_sub_ps(s, x)),
                    FusedKerSpec::PerRowSubF(p) => t.per_row(p, |s, x| _mm512_sub_ps(x, s)),
                    FusedKerSpec::PerRowMin(p) => t.per_row(p, |s, x| min(s, x)),
                    FusedKerSpec::PerRowMax(p) => t.per_row(p, |s, x| max(s, x)),
                    FusedKerSpec::PerColAdd(p) => t.per_col(p, |s, x| _mm512_add_ps(s, x)),
                    FusedKerSpec::PerColMul(p) => t.per_col(p, |s, x| _mm512_mul_ps(s, x)),
                    FusedKerSpec::PerColSub(p) => t.per_col(p, |s, x| _mm512_sub_ps(s, x)),
                    FusedKerSpec::PerColSubF(p) => t.per_col(p, |s, x| _mm512_sub_ps(x, s)),
                    FusedKerSpec::PerColMin(p) => t.per_col(p, |s, x| min(s, x)),
                    FusedKerSpec::PerColMax(p) => t.per_col(p, |s, x| max(s, x)),
                    FusedKerSpec::AddRowColProducts(rows, cols) => {
                        t.add_row_col_products(rows, cols)
                    }
                    FusedKerSpec::LoadTile(col_major, _) => t.load_col_major(col_major),
                    FusedKerSpec::AddUnicast(other) => {
                        if !t.add_unicast(&other) {
                            return UNSUPPORTED;
                        }
                    }
                    FusedKerSpec::Store(tile) => {
                        if !t.store(&tile) {
                            return UNSUPPORTED;
                        }
                    }
                    FusedKerSpec::QScale(..)
                    | FusedKerSpec::RoundingShiftRight(..)
                    | FusedKerSpec::ShiftLeft(..) => return UNSUPPORTED,
                }
            }
        }
        0
    }

    /// For each of the `k` steps: `NV` weight vectors, then every row's value broadcast and
    /// multiplied into that row's registers. `a` is `MR` rows of `k` values ([`RowPanels`]),
    /// `b` is `k` steps of `NR` weights.
    #[target_feature(enable = "avx512f")]
    unsafe fn add_mat_mul(&mut self, k: usize, a: *const f32, b: *const f32) {
        // A local copy, so that the compiler keeps the tile in registers across the loop
        // (through `self` it stored every register back to memory at every step).
        let mut tile = self.acc;
        for ik in 0..k {
            // SAFETY: the panels hold MR rows of k values (a) and k steps of NR values (b).
            unsafe {
                let b_step = b.add(ik * Self::NR);
                let bv: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_loadu_ps(b_step.add(v * LANES)));
                for (r, row) in tile.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * k + ik));
                    for (acc, b) in row.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(av, *b, *acc);
                    }
                }
            }
        }
        self.acc = tile;
    }

    #[target_feature(enable = "avx512f")]
    fn scalar(&mut self, s: f32, f: impl Fn(__m512, __m512) -> __m512) {
        let s = _mm512_set1_ps(s);
        for acc in self.acc.iter_mut().flatten() {
            *acc = f(s, *acc);
        }
    }

    /// `p` holds one value per row of the tile.
    #[target_feature(enable = "avx512f")]
    unsafe fn per_row(&mut self, p: *const f32, f: impl Fn(__m512, __m512) -> __m512) {
        for (r, row) in self.acc.iter_mut().enumerate() {
            // SAFETY: tract passes MR values.
            let s = _mm512_set1_ps(unsafe { *p.add(r) });
            for acc in row.iter_mut() {
                *acc = f(s, *acc);
            }
        }
    }

    /// `p` holds one value per column of the tile.
    #[target_feature(enable = "avx512f")]
    unsafe fn per_col(&mut self, p: *const f32, f: impl Fn(__m512, __m512) -> __m512) {
        // SAFETY: tract passes NR values.
        let cols: [__m512; NV] =
            std::array::from_fn(|v| unsafe { _mm512_loadu_ps(p.add(v * LANES)) });
        for row in self.acc.iter_mut() {
            for (acc, c) in row.iter_mut().zip(&cols) {
                *acc = f(*c, *acc);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn add_row_col_products(&mut self, rows: *const f32, cols: *const f32) {
        // SAFETY: tract passes MR row values and NR column values.
        unsafe {
            let cols: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(cols.add(v * LANES)));
            for (r, row) in self.acc.iter_mut().enumerate() {
                let rv = _mm512_set1_ps(*rows.add(r));
                for (acc, c) in row.iter_mut().zip(&cols) {
                    *acc = _mm512_fmadd_ps(rv, *c, *acc);
                }
            }
        }
    }

    /// A whole tile, column-major (`MR` values per column).
    #[target_feature(enable = "avx512f")]
    unsafe fn load_col_major(&mut self, p: *const f32) {
        let mut values = [[0f32; LANES]; NV];
        for r in 0..MR {
            for (v, lanes) in values.iter_mut().enumerate() {
                for (l, x) in lanes.iter_mut().enumerate() {
                    // SAFETY: tract passes MR x NR values.
                    *x = unsafe { *p.add((v * LANES + l) * MR + r) };
                }
            }
            for (acc, lanes) in self.acc[r].iter_mut().zip(&values) {
                // SAFETY: `lanes` is 16 f32.
                *acc = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
            }
        }
    }

    /// Adds a tile of the same shape read through `other`'s strides (f32 only).
    #[target_feature(enable = "avx512f")]
    unsafe fn add_unicast(&mut self, other: &OutputStoreKer) -> bool {
        if other.item_size != size_of::<f32>() {
            return false;
        }
        for (r, row) in self.acc.iter_mut().enumerate() {
            // SAFETY: tract's tile pointer and strides cover MR x NR f32 values.
            unsafe {
                let base = other.ptr.offset(other.row_byte_stride * r as isize);
                for (v, acc) in row.iter_mut().enumerate() {
                    let x = if other.col_byte_stride == size_of::<f32>() as isize {
                        _mm512_loadu_ps(base.add(v * LANES * size_of::<f32>()) as *const f32)
                    } else {
                        let lanes: [f32; LANES] = std::array::from_fn(|l| {
                            let c = (v * LANES + l) as isize;
                            *(base.offset(c * other.col_byte_stride) as *const f32)
                        });
                        _mm512_loadu_ps(lanes.as_ptr())
                    };
                    *acc = _mm512_add_ps(*acc, x);
                }
            }
        }
        true
    }

    /// Stores the tile: whole vectors when a row's columns are contiguous (the output itself),
    /// value by value otherwise (tract's scratch tile at the matrix's right and bottom edges).
    /// f32 and f16 outputs; anything else is refused.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(&self, tile: &OutputStoreKer) -> bool {
        let whole_vectors =
            tile.item_size == size_of::<f32>() && tile.col_byte_stride == size_of::<f32>() as isize;
        for (r, row) in self.acc.iter().enumerate() {
            // SAFETY: tract's tile pointer and strides cover MR x NR values of item_size bytes.
            unsafe {
                let base = tile.ptr.offset(tile.row_byte_stride * r as isize);
                for (v, acc) in row.iter().enumerate() {
                    if whole_vectors {
                        _mm512_storeu_ps(base.add(v * LANES * size_of::<f32>()) as *mut f32, *acc);
                        continue;
                    }
                    let mut lanes = [0f32; LANES];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
                    for (l, x) in lanes.iter().enumerate() {
                        let at = base.offset((v * LANES + l) as isize * tile.col_byte_stride);
                        match tile.item_size {
                            4 => *(at as *mut f32) = *x,
                            2 => *(at as *mut f16) = f16::from_f32(*x),
                            _ => return false,
                        }
                    }
                }
            }
        }
        true
    }
}

/// tract's portable kernel: `if a < b { a } else { b }` with `a` the operand.
#[inline]
#[target_feature(enable = "avx512f")]
fn min(s: __m512, x: __m512) -> __m512 {
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, x), x, s)
}

/// tract's portable kernel: `if a > b { a } else { b }` with `a` the operand.
#[inline]
#[target_feature(enable = "avx512f")]
fn max(s: __m512, x: __m512) -> __m512 {
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, x), x, s)
}

/// `x` where positive, `alpha * x` elsewhere.
#[inline]
#[target_feature(enable = "avx512f")]
fn leaky_relu(alpha: __m512, x: __m512) -> __m512 {
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
    _mm512_mask_blend_ps(positive, _mm512_mul_ps(alpha, x), x)
}

/// The rows' side of the kernels: `r` consecutive rows of `k` values each, every row as it is
/// in a row-major `[rows, k]` matrix (the last panel padded with zero rows). For a layer's
/// input that is a plain copy, where tract's own packing transposes each panel to `k` steps of
/// `r` values.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct RowPanels {
    r: usize,
}

impl fmt::Display for RowPanels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RowPanels[f32]@{}", self.r)
    }
}

impl RowPanels {
    fn pack(&self, t: &TensorView, k_axis: usize, mn_axis: usize) -> TractResult<EagerPackedInput> {
        ensure!(
            t.datum_type() == f32::datum_type(),
            "{self} packs f32, not {:?}",
            t.datum_type()
        );
        ensure!(k_axis != mn_axis && k_axis < t.rank() && mn_axis < t.rank());
        let (k, mn) = (t.shape()[k_axis], t.shape()[mn_axis]);
        let (k_stride, mn_stride) = (t.strides()[k_axis], t.strides()[mn_axis]);
        let len = mn.div_ceil(self.r) * self.r * k;
        // SAFETY: size and alignment valid (at least one value, a power of two).
        let mut blob = unsafe { Blob::new_for_size_and_align(len.max(1) * size_of::<f32>(), 64) };
        // SAFETY: the blob holds `len` f32, aligned.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(blob.as_bytes_mut().as_mut_ptr() as *mut f32, len)
        };
        // SAFETY: the view's pointer and strides address its `mn x k` values.
        unsafe {
            let src = t.as_ptr_unchecked::<f32>();
            if k_stride == 1 && mn_stride == k as isize {
                // Row-major and contiguous (a layer's input): one copy.
                dst[..mn * k].copy_from_slice(std::slice::from_raw_parts(src, mn * k));
            } else {
                Self::gather(dst, src, k, mn, k_stride, mn_stride);
            }
        }
        dst[mn * k..].fill(0.0);
        Ok(EagerPackedInput {
            fact: PackedExoticFact {
                format: Box::new(*self),
                mn: mn.to_dim(),
                k,
            },
            packed: Arc::new(blob),
            panel_bytes: self.r * k * size_of::<f32>(),
            mn,
        })
    }

    /// Copies `mn` rows of `k` values read through strides into `dst`, row after row.
    ///
    /// # Safety
    /// `src` with the strides addresses `mn x k` f32 values; `dst` holds at least `mn * k`.
    unsafe fn gather(
        dst: &mut [f32],
        src: *const f32,
        k: usize,
        mn: usize,
        k_stride: isize,
        mn_stride: isize,
    ) {
        for (row, out) in dst.chunks_exact_mut(k.max(1)).take(mn).enumerate() {
            // SAFETY: as the function's contract says.
            unsafe {
                let first = src.offset(row as isize * mn_stride);
                if k_stride == 1 {
                    out.copy_from_slice(std::slice::from_raw_parts(first, k));
                } else {
                    for (i, x) in out.iter_mut().enumerate() {
                        *x = *first.offset(i as isize * k_stride);
                    }
                }
            }
        }
    }

    /// Row `mn` of `data`, which this format packed.
    fn row<'d>(&self, data: &'d EagerPackedInput, mn: usize) -> TractResult<&'d [f32]> {
        ensure!(
            data.format().dyn_eq(self),
            "{} is not {self}",
            data.format()
        );
        let k = data.k();
        let bytes = data.packed.as_bytes();
        ensure!(mn < data.mn() && bytes.len() >= (mn + 1) * k * size_of::<f32>());
        // SAFETY: the blob is 64-byte aligned and holds at least (mn + 1) * k f32.
        let all = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, (mn + 1) * k) };
        Ok(&all[mn * k..])
    }
}

impl MMMInputFormat for RowPanels {
    fn prepare_tensor(&self, t: &Tensor, k_axis: usize, mn_axis: usize) -> TractResult<Tensor> {
        let packed = self.pack(&t.view(), k_axis, mn_axis)?;
        Ok(PackedMatrixStorage::new(Box::new(packed)).into_tensor(t.datum_type()))
    }

    fn prepare_one_view(
        &self,
        t: &TensorView,
        k_axis: usize,
        mn_axis: usize,
    ) -> TractResult<Box<dyn MMMInputValue>> {
        Ok(Box::new(self.pack(t, k_axis, mn_axis)?))
    }

    fn precursor(&self) -> WeightType {
        WeightType::Plain(DatumType::F32)
    }

    fn r(&self) -> usize {
        self.r
    }

    fn k_alignment(&self) -> usize {
        1
    }

    fn mem_size(&self, k: TDim, mn: TDim) -> TDim {
        mn.divceil(self.r) * self.r * k * size_of::<f32>()
    }

    fn extract_at_mn_f16(
        &self,
        data: &EagerPackedInput,
        mn: usize,
        slice: &mut [f16],
    ) -> TractResult<()> {
        for (out, x) in slice.iter_mut().zip(self.row(data, mn)?) {
            *out = f16::from_f32(*x);
        }
        Ok(())
    }

    fn extract_at_mn_f32(
        &self,
        data: &EagerPackedInput,
        mn: usize,
        slice: &mut [f32],
    ) -> TractResult<()> {
        let row = self.row(data, mn)?;
        ensure!(slice.len() == row.len());
        slice.copy_from_slice(row);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tile's worth of inputs and the straightforward result to compare with.
    struct Case<const MR: usize, const NR: usize> {
        k: usize,
        /// Row panel: MR rows of k values.
        a: Vec<f32>,
        /// Packed weights: for each k, NR values.
        b: Vec<f32>,
    }

    impl<const MR: usize, const NR: usize> Case<MR, NR> {
        fn new(k: usize) -> Self {
            // Small integers and halves: every sum below is exact in f32, so the comparison
            // with the reference can be exact.
            let a = (0..k * MR)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 2.0)
                .collect();
            let b = (0..k * NR).map(|i| (i * 5 % 13) as f32 - 6.0).collect();
            Case { k, a, b }
        }

        /// `sum_k a[r] * b[c]`, as `[row][col]`.
        fn product(&self) -> Vec<Vec<f32>> {
            (0..MR)
                .map(|r| {
                    (0..NR)
                        .map(|c| {
                            (0..self.k)
                                .map(|ik| self.a[r * self.k + ik] * self.b[ik * NR + c])
                                .sum()
                        })
                        .collect()
                })
                .collect()
        }

        fn mat_mul(&self) -> FusedKerSpec<f32> {
            FusedKerSpec::AddMatMul {
                k: self.k,
                pa: self.a.as_ptr() as *const u8,
                pb: self.b.as_ptr() as *const u8,
                packing: 0,
            }
        }
    }

    fn row_major<const MR: usize, const NR: usize>(out: &mut [f32]) -> OutputStoreKer {
        assert_eq!(out.len(), MR * NR);
        OutputStoreKer {
            ptr: out.as_mut_ptr() as *mut u8,
            row_byte_stride: (NR * 4) as isize,
            col_byte_stride: 4,
            item_size: 4,
        }
    }

    fn col_major<const MR: usize, const NR: usize>(out: &mut [f32]) -> OutputStoreKer {
        assert_eq!(out.len(), MR * NR);
        OutputStoreKer {
            ptr: out.as_mut_ptr() as *mut u8,
            row_byte_stride: 4,
            col_byte_stride: (MR * 4) as isize,
            item_size: 4,
        }
    }

    fn has_avx512() -> bool {
        let yes = is_x86_feature_detected!("avx512f");
        if !yes {
            eprintln!("this machine has no AVX-512F: the kernel cannot run here, nothing checked");
        }
        yes
    }

    /// Runs `ops` (with `Done` appended) and returns the kernel's status.
    fn run_ops<const MR: usize, const NV: usize>(mut ops: Vec<FusedKerSpec<f32>>) -> isize {
        ops.push(FusedKerSpec::Done);
        // SAFETY: AVX-512F checked by the caller; every pointer in `ops` outlives the call.
        unsafe { run::<MR, NV>(&ops) }
    }

    /// Multiply, bias per column, ReLU, store: what a dense layer sends. Row-major (the
    /// output) and column-major (tract's edge scratch) stores give the same values.
    fn dense_layer<const MR: usize, const NR: usize, const NV: usize>() {
        for k in [1, 5, 7, 64] {
            let case = Case::<MR, NR>::new(k);
            let bias: Vec<f32> = (0..NR).map(|c| c as f32 - 10.0).collect();
            let want: Vec<Vec<f32>> = case
                .product()
                .iter()
                .map(|row| {
                    row.iter()
                        .zip(&bias)
                        .map(|(x, b)| (x + b).max(0.0))
                        .collect()
                })
                .collect();
            let (mut rm, mut cm) = (vec![f32::NAN; MR * NR], vec![f32::NAN; MR * NR]);
            for store in [row_major::<MR, NR>(&mut rm), col_major::<MR, NR>(&mut cm)] {
                let ops = vec![
                    FusedKerSpec::Clear,
                    case.mat_mul(),
                    FusedKerSpec::PerColAdd(bias.as_ptr()),
                    FusedKerSpec::ScalarMax(0.0),
                    FusedKerSpec::Store(store),
                ];
                assert_eq!(run_ops::<MR, NV>(ops), 0);
            }
            for r in 0..MR {
                for c in 0..NR {
                    assert_eq!(rm[r * NR + c], want[r][c], "row-major k {k} ({r}, {c})");
                    assert_eq!(cm[c * MR + r], want[r][c], "col-major k {k} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn dense_layers_match_the_definition() {
        if has_avx512() {
            dense_layer::<8, 32, 2>();
            dense_layer::<16, 16, 1>();
        }
    }

    /// Every element-wise operation against tract's portable kernel's definition of it.
    fn element_wise<const MR: usize, const NR: usize, const NV: usize>() {
        let case = Case::<MR, NR>::new(3);
        let base = case.product();
        let rows: Vec<f32> = (0..MR).map(|r| r as f32 * 1.5 - 4.0).collect();
        let cols: Vec<f32> = (0..NR).map(|c| 3.0 - c as f32 * 0.5).collect();
        type Op = fn(f32, f32) -> f32;
        let ops: [(&str, Op); 6] = [
            ("add", |a, b| a + b),
            ("mul", |a, b| a * b),
            ("sub", |a, b| a - b),
            ("subf", |a, b| b - a),
            ("min", |a, b| if a < b { a } else { b }),
            ("max", |a, b| if a > b { a } else { b }),
        ];
        for (i, (name, f)) in ops.iter().enumerate() {
            let s = 2.5;
            type Want<'w> = Box<dyn Fn(usize, usize, f32) -> f32 + 'w>;
            let specs: [(FusedKerSpec<f32>, Want); 3] = [
                (
                    [
                        FusedKerSpec::ScalarAdd(s),
                        FusedKerSpec::ScalarMul(s),
                        FusedKerSpec::ScalarSub(s),
                        FusedKerSpec::ScalarSubF(s),
                        FusedKerSpec::ScalarMin(s),
                        FusedKerSpec::ScalarMax(s),
                    ][i],
                    Box::new(move |_, _, x| f(s, x)),
                ),
                (
                    [
                        FusedKerSpec::PerRowAdd(rows.as_ptr()),
                        FusedKerSpec::PerRowMul(rows.as_ptr()),
                        FusedKerSpec::PerRowSub(rows.as_ptr()),
                        FusedKerSpec::PerRowSubF(rows.as_ptr()),
                        FusedKerSpec::PerRowMin(rows.as_ptr()),
                        FusedKerSpec::PerRowMax(rows.as_ptr()),
                    ][i],
                    Box::new(|r, _, x| f(rows[r], x)),
                ),
                (
                    [
                        FusedKerSpec::PerColAdd(cols.as_ptr()),
                        FusedKerSpec::PerColMul(cols.as_ptr()),
                        FusedKerSpec::PerColSub(cols.as_ptr()),
                        FusedKerSpec::PerColSubF(cols.as_ptr()),
                        FusedKerSpec::PerColMin(cols.as_ptr()),
                        FusedKerSpec::PerColMax(cols.as_ptr()),
                    ][i],
                    Box::new(|_, c, x| f(cols[c], x)),
                ),
            ];
            for (spec, want) in specs {
                let mut out = vec![f32::NAN; MR * NR];
                let ops = vec![
                    FusedKerSpec::Clear,
                    case.mat_mul(),
                    spec,
                    FusedKerSpec::Store(row_major::<MR, NR>(&mut out)),
                ];
                assert_eq!(run_ops::<MR, NV>(ops), 0);
                for r in 0..MR {
                    for c in 0..NR {
                        assert_eq!(out[r * NR + c], want(r, c, base[r][c]), "{spec:?} {name}");
                    }
                }
            }
        }
    }

    #[test]
    fn element_wise_operations_match_tracts_definitions() {
        if has_avx512() {
            element_wise::<8, 32, 2>();
            element_wise::<16, 16, 1>();
        }
    }

    /// Loading a tile, adding one through strides, leaky ReLU and row-by-column products.
    fn tile_operations<const MR: usize, const NR: usize, const NV: usize>() {
        let tile: Vec<f32> = (0..MR * NR).map(|i| i as f32 - 40.0).collect(); // column-major
        let rows: Vec<f32> = (0..MR).map(|r| r as f32 - 2.0).collect();
        let cols: Vec<f32> = (0..NR).map(|c| c as f32 * 0.5).collect();
        let mut other = vec![0f32; MR * NR]; // row-major
        for (i, x) in other.iter_mut().enumerate() {
            *x = (i % 9) as f32;
        }
        let mut out = vec![f32::NAN; MR * NR];
        let ops = vec![
            FusedKerSpec::LoadTile(tile.as_ptr(), std::ptr::null()),
            FusedKerSpec::AddUnicast(row_major::<MR, NR>(&mut other)),
            FusedKerSpec::AddUnicast(col_major::<MR, NR>(&mut other)),
            FusedKerSpec::AddRowColProducts(rows.as_ptr(), cols.as_ptr()),
            FusedKerSpec::LeakyRelu(0.25),
            FusedKerSpec::Store(row_major::<MR, NR>(&mut out)),
        ];
        assert_eq!(run_ops::<MR, NV>(ops), 0);
        for r in 0..MR {
            for c in 0..NR {
                let x =
                    tile[c * MR + r] + other[r * NR + c] + other[c * MR + r] + rows[r] * cols[c];
                let want = if x > 0.0 { x } else { 0.25 * x };
                assert_eq!(out[r * NR + c], want, "({r}, {c})");
            }
        }
    }

    #[test]
    fn tile_operations_match_tracts_definitions() {
        if has_avx512() {
            tile_operations::<8, 32, 2>();
            tile_operations::<16, 16, 1>();
        }
    }

    #[test]
    fn row_panels_copy_rows_and_pad_the_last_panel() {
        // A [5, 3] matrix, rows 0..5 with values row * 10 + column; and its transpose as a
        // strided view of a [3, 5] tensor (k on axis 0).
        let rows = Tensor::from_shape(
            &[5, 3],
            &(0..15)
                .map(|i| ((i / 3) * 10 + i % 3) as f32)
                .collect::<Vec<_>>(),
        )
        .expect("shape");
        let transposed = rows.clone().permute_axes(&[1, 0]).expect("permute");
        let format = RowPanels { r: 4 };
        for (tensor, k_axis, mn_axis) in [(&rows, 1, 0), (&transposed, 0, 1)] {
            let packed = format.pack(&tensor.view(), k_axis, mn_axis).expect("packs");
            assert_eq!(
                (packed.k(), packed.mn(), packed.panel_bytes),
                (3, 5, 4 * 3 * 4)
            );
            let bytes = packed.packed.as_bytes();
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .take(8 * 3)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let want: Vec<f32> = (0..8)
                .flat_map(|r| (0..3).map(move |c| if r < 5 { (r * 10 + c) as f32 } else { 0.0 }))
                .collect();
            assert_eq!(values, want);
            let mut row = [0f32; 3];
            packed.extract_at_mn_f32(4, &mut row).expect("row 4");
            assert_eq!(row, [40.0, 41.0, 42.0]);
            assert!(
                packed.extract_at_mn_f32(5, &mut row).is_err(),
                "past the rows"
            );
        }
        let ints = Tensor::from_shape(&[2, 2], &[1i32, 2, 3, 4]).expect("shape");
        assert!(format.pack(&ints.view(), 1, 0).is_err(), "f32 only");
        assert_eq!(
            format.mem_size(3.to_dim(), 5.to_dim()),
            (8 * 3 * 4).to_dim()
        );
    }

    #[test]
    fn integer_and_quantized_operations_are_refused() {
        if !has_avx512() {
            return;
        }
        let case = Case::<8, 32>::new(2);
        let quantized = FusedKerSpec::AddMatMul {
            k: 2,
            pa: case.a.as_ptr() as *const u8,
            pb: case.b.as_ptr() as *const u8,
            packing: 1,
        };
        assert_eq!(
            run_ops::<8, 2>(vec![FusedKerSpec::Clear, quantized]),
            UNSUPPORTED
        );
        assert_eq!(
            run_ops::<8, 2>(vec![FusedKerSpec::ShiftLeft(1)]),
            UNSUPPORTED
        );
        let mut out = vec![0u8; 8 * 32];
        let bytes = OutputStoreKer {
            ptr: out.as_mut_ptr(),
            row_byte_stride: 32,
            col_byte_stride: 1,
            item_size: 1,
        };
        assert_eq!(
            run_ops::<8, 2>(vec![FusedKerSpec::Store(bytes)]),
            UNSUPPORTED
        );
    }

    #[test]
    fn tract_finds_the_kernels_the_tier_names() {
        use tract_onnx::prelude::DatumType;
        use tract_onnx::tract_hir::tract_core::tract_linalg::MmmDispatch;
        if !has_avx512() || !is_x86_feature_detected!("fma") {
            return;
        }
        let dispatch = MmmDispatch::native();
        for (k, n, name) in [
            (7, 64, KERNEL_8X32),
            (32, 16, KERNEL_16X16),
            (5, 32, KERNEL_8X32),
        ] {
            let kernel = dispatch
                .preferred_kernel(DatumType::F32, Some(256), Some(k), Some(n))
                .expect("the tier answers");
            assert_eq!(kernel.name(), name, "k {k} n {n}");
        }
        // Nowhere else. tract's generic rules rank kernels by preference: ours is below every
        // x86_64 kernel of tract's, so those rules never pick it over one of them.
        let ours = |k: &dyn MatMatMul| k.name().starts_with("edgewise");
        let runnable = dispatch.runnable().iter().map(|k| &**k);
        let our_best = runnable
            .clone()
            .filter(|k| ours(*k))
            .map(|k| k.preference())
            .max();
        let tracts_worst = runnable
            .filter(|k| !ours(*k) && k.arch() == Some(Arch::X86_64))
            .map(|k| k.preference())
            .min();
        assert!(our_best.expect("registered") < tracts_worst.expect("tract's x86_64 kernels"));
        // And tract's whole selection (its tiers answer first on x86_64) picks one of its own
        // for a large square product, a narrow layer with a long k, and the symbolic-batch
        // plan's shapes.
        use tract_onnx::tract_hir::tract_core::tract_linalg::mmm::Query;
        for (m, k, n) in [
            (Some(512), Some(512), Some(512)),
            (Some(256), Some(128), Some(32)),
            (None, Some(5), Some(32)),
            (None, Some(32), Some(16)),
            (Some(256), None, Some(32)),
        ] {
            let picked = dispatch
                .pick(&Query::plain(DatumType::F32, m, k, n))
                .expect("tract has a kernel for every f32 product");
            assert!(
                !picked.0.name().starts_with("edgewise"),
                "m {m:?} k {k:?} n {n:?}: {}",
                picked.0.name()
            );
        }
    }
}
