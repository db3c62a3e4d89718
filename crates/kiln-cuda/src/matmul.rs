//! Matrix products through cuBLASLt, whose epilogues fuse what follows a product into it: the bias, GELU (saving
//! its input for the backward pass), GELU's derivative, and bias gradients (of B, or of GELU's input with its
//! derivative).
//!
//! cuBLASLt is column-major, and its epilogues require a column-major output, so products are stated in those
//! terms: a row-major `(r × c)` matrix is a column-major `(c × r)` one with leading dimension `c`.
//!
//! Products accumulate in fp32 (`CUBLAS_COMPUTE_32F`, never the TF32 fast path: the fp32 precision exists for
//! parity checks), and a split-K product sums its partial results in fp32 too, not in the output's type.
//!
//! Each distinct problem is planned once: its descriptors and the algorithm `cublasLtMatmulAlgoGetHeuristic`
//! chose are kept, so after the first step a product sets at most two pointers and calls `cublasLtMatmul`. The
//! heuristic chooses among algorithms by the alignment of every pointer (the bias and auxiliary pointers it reads
//! from the descriptor), so the alignments are part of a problem: a plan made for 16-byte-aligned operands is
//! never run on less aligned ones.

use crate::backend::DType;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result::{self, CublasError};
use cudarc::cublaslt::sys::{
    self, cublasLtEpilogue_t as EpilogueKind, cublasLtMatmulDescAttributes_t as DescAttr,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// cuBLASLt's working memory: NVIDIA recommends 32 MiB on Hopper (4 MiB suffices before it).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// The auxiliary matrix of the GELU epilogues (GELU's input) needs a leading dimension divisible by this
/// (`CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD`); it has D's layout, so D's rows must be too.
pub const GELU_AUX_LD_MULTIPLE: usize = 8;

/// One operand, as stored: its device address, leading dimension, and whether the product uses its transpose.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub transposed: bool,
}

/// What happens to a product on its way to D. The bias and the auxiliary matrix have D's element type, as
/// cuBLASLt requires for every input and output type used here (bf16 in and out, bf16 in and fp32 out, fp32); bias
/// gradients are fp32 whatever D's type (`CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE`).
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// `D = product`.
    None,
    /// `D = product + bias`, with one bias per row of D.
    Bias { bias: u64 },
    /// `pre = product (+ bias)`, `D = gelu(pre)` (tanh approximation); `pre` has D's layout.
    Gelu { bias: Option<u64>, pre: u64 },
    /// `D = product · gelu'(pre)`; `pre` has D's layout.
    GeluBackward { pre: u64 },
    /// As `GeluBackward`, and `bias_grad` (one per row of D) is overwritten with the sums of D's rows over n.
    GeluBackwardBiasGradient { pre: u64, bias_grad: u64 },
    /// `D = product`, and `bias_grad` (one per column of D) is overwritten with the sums of `op(B)`'s columns
    /// over k.
    BiasGradient { bias_grad: u64 },
}

impl Epilogue {
    fn kind(&self) -> EpilogueKind {
        match self {
            Epilogue::None => EpilogueKind::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias { .. } => EpilogueKind::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::Gelu { bias: Some(_), .. } => EpilogueKind::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            Epilogue::Gelu { bias: None, .. } => EpilogueKind::CUBLASLT_EPILOGUE_GELU_AUX,
            Epilogue::GeluBackward { .. } => EpilogueKind::CUBLASLT_EPILOGUE_DGELU,
            Epilogue::GeluBackwardBiasGradient { .. } => EpilogueKind::CUBLASLT_EPILOGUE_DGELU_BGRAD,
            Epilogue::BiasGradient { .. } => EpilogueKind::CUBLASLT_EPILOGUE_BGRADB,
        }
    }

    /// The bias (or bias gradient) vector, if the epilogue has one.
    fn bias(&self) -> Option<u64> {
        match *self {
            Epilogue::Bias { bias } | Epilogue::Gelu { bias: Some(bias), .. } => Some(bias),
            Epilogue::BiasGradient { bias_grad } | Epilogue::GeluBackwardBiasGradient { bias_grad, .. } => {
                Some(bias_grad)
            }
            _ => None,
        }
    }

    /// The auxiliary matrix (GELU's input), if the epilogue has one.
    fn aux(&self) -> Option<u64> {
        match *self {
            Epilogue::Gelu { pre, .. }
            | Epilogue::GeluBackward { pre }
            | Epilogue::GeluBackwardBiasGradient { pre, .. } => Some(pre),
            _ => None,
        }
    }
}

/// One column-major product `D (m × n) = op(A) · op(B)`, added to D's values when `accumulate`, then the
/// epilogue. D is packed: its leading dimension is m.
#[derive(Clone, Copy, Debug)]
pub struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub d: u64,
    /// Type of A and B.
    pub inputs: DType,
    /// Type of D, and of the epilogue's vectors and auxiliary matrix.
    pub output: DType,
    pub accumulate: bool,
    pub epilogue: Epilogue,
}

/// What a plan depends on: everything about a product but its addresses, which enter only through their
/// alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    a: (usize, bool),
    b: (usize, bool),
    inputs: DType,
    output: DType,
    epilogue: EpilogueKind,
    /// Alignment in bytes (at most 256, cuBLASLt's default assumption) of A, B, D, the bias and the auxiliary
    /// matrix.
    alignments: [u32; 5],
}

/// The largest power of two (at most 256) that divides an address; an absent pointer constrains nothing.
fn alignment(ptr: Option<u64>) -> u32 {
    1 << ptr.map_or(8, |p| p.trailing_zeros().min(8))
}

impl Problem {
    fn of(p: &Product) -> Self {
        let e = &p.epilogue;
        Problem {
            m: p.m,
            n: p.n,
            k: p.k,
            a: (p.a.ld, p.a.transposed),
            b: (p.b.ld, p.b.transposed),
            inputs: p.inputs,
            output: p.output,
            epilogue: e.kind(),
            alignments: [Some(p.a.ptr), Some(p.b.ptr), Some(p.d), e.bias(), e.aux()].map(alignment),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = |(ld, t): (usize, bool)| format!("{}, ld {ld}", if t { "transposed" } else { "as stored" });
        let Problem { m, n, k, inputs, output, epilogue, alignments, .. } = self;
        write!(f, "the {m}×{n}×{k} product (m×n×k; A {}, B {}; {inputs:?} to {output:?}; ", op(self.a), op(self.b))?;
        write!(f, "{epilogue:?}; alignments of A, B, D, bias, aux: {alignments:?} bytes)")
    }
}

/// A cuBLASLt descriptor, destroyed when dropped.
struct Owned<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> Result<(), CublasError>,
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by cuBLASLt and is destroyed only here; a failure leaves nothing to undo.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

fn cuda_type(t: DType) -> sys::cudaDataType {
    match t {
        DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::U32 => sys::cudaDataType::CUDA_R_32U,
    }
}

/// Sets a matmul descriptor's attribute; `T` is the type cuBLASLt documents for it (it checks the size).
fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: DescAttr, value: &T) -> Result<(), CublasError> {
    // SAFETY: the descriptor is live; cuBLASLt copies `size_of::<T>()` bytes from `value`.
    unsafe { result::set_matmul_desc_attribute(desc, attr, (value as *const T).cast(), size_of::<T>()) }
}

fn set_pref<T>(pref: sys::cublasLtMatmulPreference_t, attr: PrefAttr, value: &T) -> Result<(), CublasError> {
    // SAFETY: as in `set_desc`.
    unsafe { result::set_matmul_pref_attribute(pref, attr, (value as *const T).cast(), size_of::<T>()) }
}

/// A problem's descriptors and the algorithm chosen for it.
struct Plan {
    desc: Owned<sys::cublasLtMatmulDesc_t>,
    a: Owned<sys::cublasLtMatrixLayout_t>,
    b: Owned<sys::cublasLtMatrixLayout_t>,
    d: Owned<sys::cublasLtMatrixLayout_t>,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, problem: &Problem, product: &Product) -> Result<Self, String> {
        let failed = |what: &'static str| move |e: CublasError| format!("{what} for {problem}: {e:?}");
        let desc = Owned {
            raw: result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(failed("cublasLtMatmulDescCreate"))?,
            destroy: result::destroy_matmul_desc,
        };
        let op = |t| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let describe = || -> Result<(), CublasError> {
            set_desc(desc.raw, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &op(product.a.transposed))?;
            set_desc(desc.raw, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &op(product.b.transposed))?;
            set_desc(desc.raw, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &problem.epilogue)?;
            if product.epilogue.aux().is_some() {
                set_desc(desc.raw, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(product.m as i64))?;
            }
            // GELU's gradient (D) has the activations' type, bf16 in a bf16 run; its bias gradient is fp32. (The
            // other bias gradient's D, a weight gradient, is fp32 already.)
            if let Epilogue::GeluBackwardBiasGradient { .. } = product.epilogue {
                let fp32 = cuda_type(DType::F32) as i32;
                set_desc(desc.raw, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &fp32)?;
            }
            Ok(())
        };
        describe().map_err(failed("describing"))?;
        // The heuristic reads the bias and auxiliary pointers for their alignment.
        set_pointers(desc.raw, &product.epilogue).map_err(failed("describing"))?;

        let layout = |t: DType, rows: usize, cols: usize, ld: usize| {
            result::create_matrix_layout(cuda_type(t), rows as u64, cols as u64, ld as i64)
                .map(|raw| Owned { raw, destroy: result::destroy_matrix_layout })
                .map_err(failed("cublasLtMatrixLayoutCreate"))
        };
        let (m, n, k) = (product.m, product.n, product.k);
        let stored = |o: Operand, rows, cols| if o.transposed { (cols, rows) } else { (rows, cols) };
        let ((ar, ac), (br, bc)) = (stored(product.a, m, k), stored(product.b, k, n));
        let a = layout(product.inputs, ar, ac, product.a.ld)?;
        let b = layout(product.inputs, br, bc, product.b.ld)?;
        let d = layout(product.output, m, n, m)?;

        let pref = Owned {
            raw: result::create_matmul_pref().map_err(failed("cublasLtMatmulPreferenceCreate"))?,
            destroy: result::destroy_matmul_pref,
        };
        let [align_a, align_b, align_d, ..] = problem.alignments;
        let prefer = || -> Result<(), CublasError> {
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(WORKSPACE_BYTES as u64))?;
            // Split-K partial sums are reduced in fp32 by a separate step over the workspace, in a fixed order:
            // an in-place reduction adds them into D one by one, rounding each sum to D's type (bf16), and a
            // reduction in the output's type rounds them too. Unsplit algorithms remain allowed.
            let reductions = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions)?;
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a)?;
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b)?;
            // C is D (accumulation reads D).
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d)?;
            set_pref(pref.raw, PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d)
        };
        prefer().map_err(failed("setting search preferences"))?;
        // SAFETY: every descriptor is live and describes this product.
        let heuristic =
            unsafe { result::get_matmul_algo_heuristic(handle, desc.raw, a.raw, b.raw, d.raw, d.raw, pref.raw) }
                .map_err(|e| format!("cuBLASLt has no algorithm for {problem}: {e:?}"))?;
        Ok(Plan { desc, a, b, d, algo: heuristic.algo })
    }
}

/// Points the descriptor at this product's bias and auxiliary matrix (the plan is shared by every product of its
/// problem).
fn set_pointers(desc: sys::cublasLtMatmulDesc_t, epilogue: &Epilogue) -> Result<(), CublasError> {
    if let Some(bias) = epilogue.bias() {
        set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
    }
    if let Some(aux) = epilogue.aux() {
        set_desc(desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?;
    }
    Ok(())
}

/// The most plans a [`CublasLt`] keeps: a dense model's products make a few dozen problems.
const MAX_PLANS: usize = 4096;

/// A cuBLASLt handle with its workspace and the plans made so far.
pub struct CublasLt {
    handle: sys::cublasLtHandle_t,
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    plans: HashMap<Problem, Plan>,
    /// Problems that could not be planned, asked through [`CublasLt::supports`].
    unsupported: HashSet<Problem>,
}

impl CublasLt {
    /// Starts cuBLASLt and allocates its workspace (cudaMalloc's alignment meets its 256-byte requirement).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self, String> {
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| format!("allocating cuBLASLt's workspace of {} MiB: {e:?}", WORKSPACE_BYTES >> 20))?;
        let workspace_ptr = workspace.device_ptr(stream).0;
        let handle = result::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        Ok(CublasLt {
            handle,
            _workspace: workspace,
            workspace_ptr,
            plans: HashMap::new(),
            unsupported: HashSet::new(),
        })
    }

    /// Whether `product` can be run: its problem is planned if it is new, and one that cannot be (no algorithm for
    /// an epilogue with these types, say) is remembered and reported once, for a caller with another way to do it.
    pub fn supports(&mut self, product: &Product) -> bool {
        let problem = Problem::of(product);
        if self.unsupported.contains(&problem) {
            return false;
        }
        if let Err(why) = self.plan(problem, product) {
            tracing::warn!("{why}; doing without that epilogue");
            self.unsupported.insert(problem);
            return false;
        }
        true
    }

    /// The plan of `problem`, made from `product` if it is new.
    fn plan(&mut self, problem: Problem, product: &Product) -> Result<&Plan, String> {
        // A mixture of experts' products take their rows from the routing, so their problems change from step to
        // step: past MAX_PLANS the plans start again (a plan's descriptors are read only when a product is queued).
        if self.plans.len() >= MAX_PLANS && !self.plans.contains_key(&problem) {
            self.plans.clear();
        }
        Ok(match self.plans.entry(problem) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(self.handle, &problem, product)?),
        })
    }

    /// Queues `product` on `stream`, planning it first if its problem is new.
    ///
    /// # Safety
    /// Every address in `product` must hold the matrix or vector its role describes, and stay valid until the
    /// stream has run the product.
    pub unsafe fn run(&mut self, product: &Product, stream: &CudaStream) -> Result<(), String> {
        let problem = Problem::of(product);
        let (handle, workspace) = (self.handle, self.workspace_ptr);
        let plan = self.plan(problem, product)?;
        set_pointers(plan.desc.raw, &product.epilogue).map_err(|e| format!("describing {problem}: {e:?}"))?;
        let (alpha, beta) = (1.0f32, if product.accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: the plan describes this product and the caller vouches for its addresses; alpha and beta are
        // host scalars of the fp32 scale type; C is D, which cuBLASLt allows with the same layout.
        unsafe {
            result::matmul(
                handle,
                plan.desc.raw,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                product.a.ptr as *const _,
                plan.a.raw,
                product.b.ptr as *const _,
                plan.b.raw,
                product.d as *const _,
                plan.d.raw,
                product.d as *mut _,
                plan.d.raw,
                &plan.algo,
                workspace as *mut _,
                WORKSPACE_BYTES,
                stream.cu_stream() as _,
            )
        }
        .map_err(|e| format!("cublasLtMatmul, {problem}: {e:?}"))
    }
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignments_are_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(Some(0x7f00_0000_0000)), 256);
        assert_eq!(alignment(Some(0x7f00_0000_0010)), 16);
        assert_eq!(alignment(Some(0x7f00_0000_0086)), 2);
        assert_eq!(alignment(None), 256);
    }

    #[test]
    fn problems_differ_by_alignment_but_not_by_address() {
        let product = |base: u64| Product {
            m: 64,
            n: 100,
            k: 48,
            a: Operand { ptr: base, ld: 48, transposed: true },
            b: Operand { ptr: base + 4096, ld: 48, transposed: false },
            d: base + 8192,
            inputs: DType::Bf16,
            output: DType::Bf16,
            accumulate: false,
            epilogue: Epilogue::Bias { bias: base + 12288 },
        };
        assert_eq!(Problem::of(&product(0x1000_0000)), Problem::of(&product(0x2000_0000)));
        assert_ne!(Problem::of(&product(0x1000_0000)), Problem::of(&product(0x1000_0002)));
    }
}
