//! The interface between the model and an engine.
//!
//! The model's forward and backward passes are written once, layer by layer, as calls on a [`Backend`]. A backend
//! owns all memory; the model only holds [`Tensor`] handles, which name a range of one of the backend's
//! allocations. Handles are plain values, so the model can keep its parameters in one flat allocation (which the
//! optimizer, the gradient norm and a data-parallel all-reduce see as one vector) and still hand each layer a view
//! of its own weights.
//!
//! Every operation states which of its tensors it reads and which it writes. Outputs never overlap inputs or each
//! other; backends check this, and return an error rather than read memory that is being written.
//!
//! Operations with more than a few operands take them as a struct ([`NormForward`], [`MatmulBackward`], ...), so
//! that a call names every tensor it passes.
//!
//! Conventions shared by all operations (they follow GPT-2 and llm.c):
//! - activations are row-major `(rows, channels)`, where `rows = batch × time`;
//! - a linear layer's weight is `(out_channels, in_channels)` and computes `out = inp · Wᵀ + bias`;
//! - "accumulates" means `+=` into the output (gradients of weights, so that micro-batches add up); every other
//!   output is overwritten.

use crate::error::Result;
use crate::experts::{
    ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeGather, MoeRoute, MoeRouteBackward,
};
use crate::memory::MemoryModel;
use std::ops::Range;

/// Identifies a graph of operations a backend captured ([`Backend::begin_capture`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Graph(pub u32);

/// Work of the host's on an engine's tensors, recorded into a graph by [`Backend::capture_host`].
pub type HostWork<B> = Box<dyn Fn(&mut B) -> Result<()> + Send>;

/// Identifies one allocation of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferId(pub u32);

/// A contiguous range of elements inside one backend allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub buffer: BufferId,
    pub offset: usize,
    pub len: usize,
}

impl Tensor {
    /// The sub-range `[offset, offset + len)` of this tensor.
    ///
    /// # Panics
    /// If the range does not lie inside this tensor: views are laid out once, when a model is built, so an
    /// out-of-range view is a bug in that layout, not a condition to recover from.
    pub fn slice(&self, offset: usize, len: usize) -> Tensor {
        assert!(
            offset + len <= self.len,
            "view [{offset}, {}) outside a tensor of {} elements",
            offset + len,
            self.len
        );
        Tensor { buffer: self.buffer, offset: self.offset + offset, len }
    }

    /// Whether two tensors share any element.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.buffer == other.buffer
            && self.len > 0
            && other.len > 0
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}

/// The first output that shares elements with another output or an input, and that other operand: operations
/// may not read memory they are writing. Empty tensors overlap nothing.
pub fn first_overlap<'a>(
    outputs: impl Iterator<Item = &'a Tensor> + Clone,
    inputs: impl Iterator<Item = &'a Tensor> + Clone,
) -> Option<(Tensor, Tensor)> {
    outputs.clone().enumerate().find_map(|(i, out)| {
        let other_outputs = outputs.clone().enumerate().filter(move |&(j, _)| j != i).map(|(_, o)| o);
        other_outputs.chain(inputs.clone()).find(|o| out.overlaps(o)).map(|o| (*out, *o))
    })
}

/// What an allocation holds; a backend chooses its element type from it (the CPU engine stores every real number
/// as its one float type; a mixed-precision engine keeps parameters and activations in bf16 but statistics and
/// optimizer state in fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Model weights, as the forward pass reads them.
    Param,
    /// Gradients of the weights.
    Grad,
    /// Activations and their gradients.
    Activation,
    /// Per-row statistics kept in full precision: layer-norm mean and reciprocal deviation, attention
    /// log-sum-exp, per-position losses.
    Stat,
    /// Optimizer moments, always full precision.
    OptState,
    /// Token ids and targets (`u32`).
    Index,
}

/// Target id that contributes neither loss nor gradient (prompt positions of a synthetic task, padding).
pub const IGNORE_TARGET: u32 = u32::MAX;

/// Shape of a linear layer applied to `rows` vectors: `(rows, c_in) · (c_out, c_in)ᵀ → (rows, c_out)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub rows: usize,
    pub c_in: usize,
    pub c_out: usize,
}

/// Shape of multi-head self-attention over a packed `qkv` activation of `(batch, time, (heads + 2·kv_heads) ·
/// head_dim)`, laid out as the QKV projection writes it: all queries (`heads × head_dim`), then all keys, then all
/// values (`kv_heads × head_dim` each). With fewer key/value heads than query heads (grouped-query attention),
/// query head `h` attends with key/value head `h / (heads / kv_heads)`. Causal attention lets position `t` see
/// positions `0..=t`, or with a sliding `window` of `w` only the last `w` of them, `t + 1 − w..=t` (Mistral's and
/// Qwen2's sliding-window attention, as transformers masks it); otherwise it sees the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub time: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub window: Option<usize>,
}

impl AttentionDims {
    /// Causal attention with as many key/value heads as query heads, as GPT-2 has.
    pub fn causal(batch: usize, time: usize, heads: usize, head_dim: usize) -> Self {
        AttentionDims { batch, time, heads, kv_heads: heads, head_dim, causal: true, window: None }
    }

    /// The keys that query `row` sees.
    pub fn visible_keys(&self, row: usize) -> Range<usize> {
        match (self.causal, self.window) {
            (false, _) => 0..self.time,
            (true, None) => 0..row + 1,
            (true, Some(w)) => (row + 1).saturating_sub(w)..row + 1,
        }
    }

    /// The queries that see key `key`: those of [`AttentionDims::visible_keys`] turned around.
    pub fn visible_queries(&self, key: usize) -> Range<usize> {
        match (self.causal, self.window) {
            (false, _) => 0..self.time,
            (true, None) => key..self.time,
            (true, Some(w)) => key..self.time.min(key.saturating_add(w)),
        }
    }

    /// Width of the attention's output: `heads · head_dim`.
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The key/value head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// Column of key head `g` in a `qkv` row; the value head is `kv_heads · head_dim` further.
    pub fn key_offset(&self, g: usize) -> usize {
        (self.heads + g) * self.head_dim
    }

    /// Why these dimensions cannot be used, if they cannot.
    pub fn problem(&self) -> Option<String> {
        match self.window {
            Some(0) => return Some("a sliding window of 0 keys".into()),
            Some(_) if !self.causal => return Some("a sliding window over attention that is not causal".into()),
            _ => {}
        }
        if self.head_dim == 0 {
            return Some("heads of 0 channels".into());
        }
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Some(format!(
                "{} query heads do not divide into groups of {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        None
    }
}

/// Which normalisation a norm layer applies to each row `x` of `c` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Layer normalisation (GPT-2's): `y = (x − μ)·σ⁻¹·w + b`, `μ = mean(x)`, `σ⁻¹ = 1/√(mean((x − μ)²) + ε)`.
    /// Saves `μ` and `σ⁻¹`; has a bias.
    Layer,
    /// Root-mean-square normalisation (Llama's): `y = x·r·w`, `r = 1/√(mean(x²) + ε)`. Saves `r`; no mean, no bias.
    Rms,
}

/// Shape of a normalisation: `rows` rows of `c` channels, and its ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormDims {
    pub rows: usize,
    pub c: usize,
    pub kind: NormKind,
    pub eps: f32,
}

impl NormDims {
    /// Why a norm of this kind cannot take these optional operands (a mean and a bias go with layer normalisation
    /// and with nothing else), if it cannot.
    pub fn operand_problem(&self, mean: Option<Tensor>, bias: Option<Tensor>) -> Option<String> {
        let layer = self.kind == NormKind::Layer;
        (mean.is_some() != layer || bias.is_some() != layer).then(|| {
            format!("{:?} normalisation takes a mean and a bias exactly when it is layer normalisation", self.kind)
        })
    }
}

/// A residual add fused in front of a norm: `sum = inp + other` is written, then normalised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResidualAdd {
    pub other: Tensor,
    pub sum: Tensor,
}

/// Operands of [`Backend::norm_forward`]: writes `out` (`(rows, c)`), `rstd` and, for layer normalisation, `mean`
/// (`rows` each, in full precision).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormForward {
    pub out: Tensor,
    pub mean: Option<Tensor>,
    pub rstd: Tensor,
    /// The rows to normalise, or with `residual` the first summand.
    pub inp: Tensor,
    pub residual: Option<ResidualAdd>,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub d: NormDims,
}

/// Operands of [`Backend::norm_backward`]: `inp` is the row the forward pass normalised (the residual sum, where
/// there was one), `mean` and `rstd` what it saved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormBackward {
    pub dinp: Tensor,
    pub dweight: Tensor,
    pub dbias: Option<Tensor>,
    pub dout: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub mean: Option<Tensor>,
    pub rstd: Tensor,
    /// Overwritten (fp32, `c` elements) with the column sums of `dinp` once this pass's gradient is added in. `dinp`
    /// is the residual stream's gradient, which is also the gradient of the projection whose output the residual
    /// add took: these sums are that projection's bias gradient, taken here from values the pass holds anyway
    /// rather than by reading `dinp` again.
    pub dinp_sums: Option<Tensor>,
    pub d: NormDims,
}

/// Operands of [`Backend::attention_backward`], which recomputes the probabilities from `qkv` and `lse` (the
/// forward's) and writes `dqkv` (overwritten; a key/value head shared by a group of query heads gets the sum of their
/// gradients) from `dout` and the forward's `out`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionBackward {
    pub dqkv: Tensor,
    pub dout: Tensor,
    pub qkv: Tensor,
    pub out: Tensor,
    pub lse: Tensor,
    /// `dbias += Σ_rows dqkv` (fp32, `qkv_width` elements): the bias gradient of the product that wrote `qkv`,
    /// which the GPU's fused kernels sum as they write `dqkv`.
    pub dbias: Option<Tensor>,
    pub d: AttentionDims,
}

/// Operands of [`Backend::matmul_forward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulForward {
    pub out: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub gelu_pre: Option<Tensor>,
    pub d: MatmulDims,
}

/// Operands of [`Backend::matmul_backward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulBackward {
    pub dinp: Tensor,
    pub dweight: Tensor,
    pub dbias: Option<Tensor>,
    pub dout: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub gelu_pre: Option<Tensor>,
    /// With `gelu_pre`: `gelu_dbias += Σ_rows dinp`, the gradient of the bias that the layer before added into
    /// GELU's input (cuBLASLt computes it in the epilogue of the product that writes `dinp`).
    pub gelu_dbias: Option<Tensor>,
    pub d: MatmulDims,
}

impl MatmulBackward {
    /// Why these operands do not go together, if they do not.
    pub fn operand_problem(&self) -> Option<String> {
        (self.gelu_dbias.is_some() && self.gelu_pre.is_none())
            .then(|| "the bias gradient of GELU's input (gelu_dbias) needs GELU's input (gelu_pre)".into())
    }
}

/// Rotary position embedding (RoPE) of the queries and keys of a packed `qkv` activation of shape `d`, in place,
/// in Hugging Face's rotate-half pairing: within each head of `head_dim` channels, channel `i < head_dim/2` pairs
/// with `i + head_dim/2`, and at position `p` the pair `(x₁, x₂)` becomes `(x₁·cos θ − x₂·sin θ, x₂·cos θ + x₁·sin θ)`
/// with `θ = p·freq[i]`. Values are not rotated. Row `t` of each sequence is at position `first_pos + t` (a decoded
/// token's row is at its place in the cache).
///
/// `table` holds `cos θ` for every position `p < P` and pair `i` (`(P, head_dim/2)`), then `sin θ` likewise: the
/// model computes it once, so frequency scalings (Llama 3's) are the model's business. `inverse` rotates by `−θ`,
/// which is the backward pass (the rotation is orthogonal): applied to `dqkv` it turns the gradient of the rotated
/// queries and keys into that of the unrotated ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotary {
    pub qkv: Tensor,
    pub table: Tensor,
    pub d: AttentionDims,
    pub first_pos: usize,
    pub inverse: bool,
}

impl Rotary {
    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.table.len / self.d.head_dim.max(1)
    }

    /// Why this rotation cannot run, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let d = &self.d;
        if let Some(p) = d.problem() {
            return Some(p);
        }
        if d.head_dim % 2 != 0 {
            return Some(format!("head_dim {} is odd: rotary embedding rotates pairs of channels", d.head_dim));
        }
        if self.table.len % d.head_dim.max(1) != 0 || self.first_pos + d.time > self.positions() {
            return Some(format!(
                "positions {}..{} are not all in a table of {} elements for head_dim {}",
                self.first_pos,
                self.first_pos + d.time,
                self.table.len,
                d.head_dim
            ));
        }
        None
    }
}

/// Operands of [`Backend::qk_norm_forward`], Qwen3's QK-norm: every query head and key head of a packed qkv
/// activation (`d.batch · d.time` rows laid out as [`AttentionDims`] says) is RMS-normalised over its `head_dim`
/// channels, `y = x·r·w`, `r = 1/√(mean(x²) + ε)`, with `weight`'s first `head_dim` elements as `w` for query heads
/// and its last `head_dim` for key heads. `out` gets the normalised heads and the value heads unchanged; `rstd` gets
/// each normalised head's `r` (full precision, `heads + kv_heads` a row, queries first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkNormForward {
    pub out: Tensor,
    pub rstd: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub eps: f32,
    pub d: AttentionDims,
}

/// Operands of [`Backend::qk_norm_backward`]: `dqkv` holds the gradient of the forward's `out` and is turned, in
/// place, into that of its `inp` (with `g = dy·w` and `n = x·r` for each head, `dx = r·(g − n·mean(g·n))`; value
/// heads pass through); `dweight[i] += Σ dy·n` over the query heads' channel `i`, and likewise over the key heads' for
/// its second half.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkNormBackward {
    pub dqkv: Tensor,
    pub dweight: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub rstd: Tensor,
    pub d: AttentionDims,
}

/// Elements of each operand of the QK-norm ops of `d`: the packed rows, the weight, and `rstd`.
pub fn qk_norm_lens(d: &AttentionDims) -> [usize; 3] {
    let rows = d.batch * d.time;
    [rows * d.qkv_width(), 2 * d.head_dim, rows * (d.heads + d.kv_heads)]
}

/// One AdamW update: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `p ← p − lr·(m̂/(√v̂ + ε) + wd·p)` with bias-corrected
/// moments `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`, where `g = s·grad` and `s` clips the global gradient norm `‖g‖` to
/// `grad_clip`: `s = grad_clip/‖g‖` when `grad_clip > 0` and `‖g‖ > grad_clip`, otherwise 1 (computed in f32).
///
/// What changes from step to step is in `values`, three full-precision elements read when the update runs (so that a
/// captured graph takes each step's): the learning rate, the 1-based step count `t` (whole, and exact in f32 up to
/// 2²⁴), and `‖g‖`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub values: Tensor,
}

impl AdamWStep {
    /// The largest step count that [`AdamWStep::values`] holds exactly.
    pub const MAX_STEP: u64 = 1 << 24;

    /// What [`AdamWStep::values`] holds for step `t` (1-based) at learning rate `lr` with global gradient norm
    /// `grad_norm`.
    pub fn values_of(lr: f32, t: u64, grad_norm: f32) -> [f32; 3] {
        [lr, t as f32, grad_norm]
    }

    /// The clipping scale `s` for a global gradient norm (see above), as the CPU engine computes it; the CUDA
    /// engine's kernels/adamw.cu states the same formula.
    pub fn clip_scale(&self, grad_norm: f32) -> f32 {
        if self.grad_clip > 0.0 && grad_norm > self.grad_clip { self.grad_clip / grad_norm } else { 1.0 }
    }
}

/// An engine that owns memory and runs the operations of a GPT training step.
///
/// Every method returns an error instead of panicking: a kernel launch can fail, memory can run out, and a caller
/// can pass tensors that are too small or that overlap.
pub trait Backend {
    /// A short name for messages: `cpu`, `cuda:0`.
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------------------------------

    /// A new allocation of `len` elements, zero-filled.
    fn alloc(&mut self, len: usize, role: Role) -> Result<Tensor>;
    /// Copies host values into a real-valued tensor (`src.len() == dst.len`).
    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()>;
    /// Copies a real-valued tensor to the host (`dst.len() == src.len`).
    fn download(&mut self, src: Tensor, dst: &mut [f32]) -> Result<()>;
    /// A new one-element full-precision tensor holding `value`: a scale that an operation reads when it runs.
    fn scalar(&mut self, value: f32) -> Result<Tensor> {
        let t = self.alloc(1, Role::Stat)?;
        self.upload(t, &[value])?;
        Ok(t)
    }
    /// Copies token ids into an [`Role::Index`] tensor.
    fn upload_indices(&mut self, dst: Tensor, src: &[u32]) -> Result<()>;
    /// Sets every element to zero.
    fn zero(&mut self, t: Tensor) -> Result<()>;
    /// `dst += src`, elementwise, for full-precision tensors of equal length (gradients, statistics).
    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()>;
    /// Sum of all elements, returned to the host (this waits for the device).
    fn sum(&mut self, t: Tensor) -> Result<f32>;
    /// Sum of squares of all elements (for the global gradient norm), returned to the host.
    fn sum_squares(&mut self, t: Tensor) -> Result<f32>;
    /// Writes the sum of all elements of `t`, or with `squares` of their squares, into `out` (one full-precision
    /// element) without waiting: the value [`Backend::sum`] or [`Backend::sum_squares`] returns, left on the device,
    /// so that a step can read several sums with one [`Backend::download`], and a captured graph can compute them.
    fn sum_into(&mut self, t: Tensor, squares: bool, out: Tensor) -> Result<()>;
    /// Waits for all work queued so far (a no-op for an engine that runs each operation to completion).
    fn synchronize(&mut self) -> Result<()>;
    /// Bytes held by this backend's allocations. The model's are all made before the first step; an engine may add
    /// working memory for its kernels during the first step, after which this is the peak.
    fn allocated_bytes(&self) -> u64;
    /// How this engine lays out memory (element sizes, what it takes beyond its allocations), for memory plans.
    fn memory_model(&self) -> Box<dyn MemoryModel>;
    /// Bytes free for new allocations where this engine allocates (the device, or the host), if it can tell.
    fn free_bytes(&self) -> Option<u64>;

    // ---- graphs -------------------------------------------------------------------------------------------------

    /// Starts capturing: the operations called from here to [`Backend::end_capture`] are recorded into a graph
    /// instead of run, with their operands as they are now (a tensor's contents are read when the graph is replayed,
    /// so values that change between replays, such as the loss scale, must be in tensors). Host transfers, sums
    /// returned to the host, allocations and waits are errors while capturing. Returns false, capturing nothing, on
    /// an engine that cannot capture: the caller then runs its operations as usual.
    fn begin_capture(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Ends the capture that [`Backend::begin_capture`] started and returns the graph, which has not run yet.
    fn end_capture(&mut self) -> Result<Graph> {
        Err(crate::Error::backend(self.name(), "end_capture: this engine does not capture graphs"))
    }
    /// Ends a capture during which an operation failed, keeping nothing of it: the engine runs work again.
    fn abandon_capture(&mut self) -> Result<()> {
        Err(crate::Error::backend(self.name(), "abandon_capture: this engine does not capture graphs"))
    }
    /// Queues the work of a graph captured by this engine, as the operations would have queued it.
    fn replay(&mut self, graph: Graph) -> Result<()> {
        Err(crate::Error::backend(self.name(), format!("replay: this engine captured no graph {graph:?}")))
    }
    /// Whether the engine keeps what it is given: not a backend that only counts allocations, for which uploads need
    /// not be computed.
    fn holds_data(&self) -> bool {
        true
    }
    /// Whether a mixture of experts' routing can be captured into a graph: not where the experts' products are sized
    /// on the host from the routing read back (the CUDA engine's per-expert products).
    fn captures_routing(&self) -> bool {
        true
    }
    /// Whether a capture is in progress.
    fn capturing(&self) -> bool {
        false
    }
    /// While capturing, records `work`, which acts on this engine's tensors from the host (the collectives of ranks
    /// that are threads of one process), so that each replay runs it in its place among the operations. An engine
    /// whose graphs hold device work only refuses it, and the capture then fails.
    fn capture_host(&mut self, _work: HostWork<Self>) -> Result<()>
    where
        Self: Sized,
    {
        Err(crate::Error::backend(self.name(), "capture_host: this engine's graphs cannot run work of the host's"))
    }

    // ---- timing -------------------------------------------------------------------------------------------------

    /// Marks where the device work to be timed by [`Backend::timed_ms`] starts, in the order of the work queued.
    fn time_from_here(&mut self) -> Result<()> {
        Ok(())
    }
    /// Marks where it ends.
    fn time_to_here(&mut self) -> Result<()> {
        Ok(())
    }
    /// Milliseconds the device took from the start mark to the end mark (waiting for the work up to the end mark if
    /// it has not run yet); `None` on an engine that runs each operation as it is called, where the host's clock
    /// tells the same.
    fn timed_ms(&mut self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// The device's dense peak arithmetic rate, in TFLOP/s, at the precision this engine computes in, if known:
    /// what MFU is measured against.
    fn peak_tflops(&self) -> Option<f64> {
        None
    }
    /// Says that this rank updates only `pieces` (element ranges) of the parameter tensor `params`, as a ZeRO
    /// stage 1 rank does. An engine that keeps an fp32 master copy of lower-precision parameters may then keep it
    /// for those pieces alone: afterwards uploads to `params` set the master copy only there, downloads read it
    /// there (and the working copy elsewhere), and [`Backend::adamw`] updates only ranges inside one piece. An
    /// engine without a master copy has nothing to do.
    fn keep_master_pieces(&mut self, params: Tensor, pieces: &[Range<usize>]) -> Result<()> {
        let _ = (params, pieces);
        Ok(())
    }

    // ---- layers -------------------------------------------------------------------------------------------------

    /// `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]`, or without `wpe` (a model whose positions are rotary) just
    /// the token's row; `out` is `(batch·time, c)`.
    fn encoder_forward(
        &mut self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        batch: usize,
        time: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dwte[tokens[b,t],:] += dout[b,t,:]` and, when given, `dwpe[t,:] += dout[b,t,:]`.
    fn encoder_backward(
        &mut self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        batch: usize,
        time: usize,
        c: usize,
    ) -> Result<()>;

    /// Normalises each row (see [`NormKind`]), saving its statistics for the backward pass; with
    /// [`NormForward::residual`], the row normalised is the residual add in front of it, which is written too.
    fn norm_forward(&mut self, op: NormForward) -> Result<()>;
    /// Backward of [`Backend::norm_forward`]. Accumulates into `dinp` (it is the residual stream's gradient, which
    /// the layer adds to), `dweight` and `dbias`; writes `dinp_sums`.
    fn norm_backward(&mut self, op: NormBackward) -> Result<()>;

    /// `out = inp · weightᵀ + bias`. With `gelu_pre`, the product plus bias is saved there and `out` receives
    /// `gelu(product + bias)` (tanh approximation), as a fused epilogue would produce it.
    fn matmul_forward(&mut self, op: MatmulForward) -> Result<()>;
    /// Backward of a linear layer: `dinp = dout · weight` (overwritten), `dweight += doutᵀ · inp`,
    /// `dbias += Σ_rows dout`. With `gelu_pre` (the pre-activation of the GELU that produced `inp`), `dinp` is
    /// multiplied by `gelu'(gelu_pre)`, so it is the gradient of that pre-activation, and with `gelu_dbias` too its
    /// column sums are added there.
    fn matmul_backward(&mut self, op: MatmulBackward) -> Result<()>;
    /// `out = gelu(pre)` (tanh approximation), elementwise over tensors of equal length: what
    /// [`Backend::matmul_forward`] with `gelu_pre` writes to `out`, from the `pre` it saved (a backward pass that
    /// recomputes GELU's output rather than keep it calls this).
    fn gelu_forward(&mut self, out: Tensor, pre: Tensor) -> Result<()>;

    /// SwiGLU: `out = silu(gate) ⊙ up` for each row of `inp` = `[gate | up]` (`(rows, 2·ffn)`, as one fused product
    /// of the gate and up projections writes it), `silu(x) = x·σ(x)`; `out` is `(rows, ffn)`.
    fn swiglu_forward(&mut self, out: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()>;
    /// Backward of [`Backend::swiglu_forward`]: writes `dinp` (`(rows, 2·ffn)`, overwritten) from `dout` and the
    /// forward's `inp`: `dgate = dout ⊙ up ⊙ silu'(gate)`, `dup = dout ⊙ silu(gate)`.
    fn swiglu_backward(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()>;

    /// Rotates the queries and keys of a packed `qkv` activation in place by their positions (see [`Rotary`]).
    fn rope(&mut self, op: Rotary) -> Result<()>;

    /// Normalises the query and key heads of a packed qkv activation (see [`QkNormForward`]).
    fn qk_norm_forward(&mut self, op: QkNormForward) -> Result<()>;
    /// Backward of [`Backend::qk_norm_forward`] (see [`QkNormBackward`]).
    fn qk_norm_backward(&mut self, op: QkNormBackward) -> Result<()>;

    /// Self-attention: `out` (`(batch·time, heads·head_dim)`) from `qkv`, with the log-sum-exp of every row of
    /// scaled scores saved in `lse` (`(batch, heads, time)`) for the backward pass.
    fn attention_forward(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, d: AttentionDims) -> Result<()>;
    /// Backward of [`Backend::attention_forward`] (see [`AttentionBackward`]).
    fn attention_backward(&mut self, op: AttentionBackward) -> Result<()>;

    /// Attention of one new position of a single sequence (`d.batch` = 1) over itself and the positions before
    /// it: `qkv` is the layer's `(time, qkv_width)` activation whose rows `0..=pos` hold keys and values (the
    /// key/value cache) and whose row `pos` holds the query; writes the `C` outputs of that position to `out`. This is
    /// decoding with a cache: each new token costs one position, not the whole context.
    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, d: AttentionDims) -> Result<()>;

    /// Routes each token of a mixture-of-experts MLP to its experts (see [`MoeRoute`] and the module
    /// [`crate::experts`]).
    fn moe_route(&mut self, op: MoeRoute) -> Result<()>;
    /// Backward of [`Backend::moe_route`] (see [`MoeRouteBackward`]).
    fn moe_route_backward(&mut self, op: MoeRouteBackward) -> Result<()>;
    /// Dispatches tokens to their experts' rows (see [`MoeGather`]).
    fn moe_gather(&mut self, op: MoeGather) -> Result<()>;
    /// Sums each token's experts' outputs, weighted (see [`MoeCombine`]); unweighted, the gather's backward.
    fn moe_combine(&mut self, op: MoeCombine) -> Result<()>;
    /// Backward of the weighted [`Backend::moe_combine`] (see [`MoeCombineBackward`]).
    fn moe_combine_backward(&mut self, op: MoeCombineBackward) -> Result<()>;
    /// One linear layer per expert over its run of dispatched rows (see [`ExpertMatmulForward`]).
    fn expert_matmul_forward(&mut self, op: ExpertMatmulForward) -> Result<()>;
    /// Backward of [`Backend::expert_matmul_forward`] (see [`ExpertMatmulBackward`]).
    fn expert_matmul_backward(&mut self, op: ExpertMatmulBackward) -> Result<()>;

    /// Softmax cross-entropy over the first `vocab` of `padded_vocab` logits of each row (padded columns get no
    /// probability). Accumulates each row's loss into `losses[row]`; rows whose target is [`IGNORE_TARGET`] add
    /// nothing. With `dloss` (one full-precision element, read when the operation runs), the logits are replaced in
    /// place by the gradient of `dloss · Σ losses` (`dloss · (softmax − onehot)`, zero on padded columns and on
    /// ignored rows).
    fn classifier(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        targets: Tensor,
        rows: usize,
        vocab: usize,
        padded_vocab: usize,
        dloss: Option<Tensor>,
    ) -> Result<()>;

    /// One AdamW step over a range of parameters and their gradients and moments (all of equal length), with the
    /// values of [`AdamWStep::values`] as they are when it runs.
    fn adamw(&mut self, params: Tensor, grads: Tensor, m: Tensor, v: Tensor, step: &AdamWStep) -> Result<()>;
}
