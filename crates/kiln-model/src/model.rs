//! The transformer's forward and backward passes, one layer at a time, for every [`ModelSpec`].
//!
//! Forward, for tokens `x` of a `(B, T)` batch:
//! ```text
//! h = wte[x] (+ wpe[0..T] with learned positions)
//! for each block:   a = h + proj(attention(rope(qk_norm(qkv(norm_1(h))))))   rope only with rotary positions
//!                                                     (not in NoPE blocks), qk_norm only with QK-norm
//!                   h = a + proj(act(fc(norm_2(a))))            act: gelu, or swiglu of fc's two halves
//! logits = norm_f(h) · headᵀ          (head = wte when the embeddings are tied)
//! loss   = cross_entropy(logits[..vocab], targets)
//! ```
//! Each residual add is fused with the normalisation that follows it. The backward pass walks the same steps in
//! reverse, accumulating weight gradients into one flat gradient vector laid out like the parameters. Where the
//! families differ the code matches on the spec's fields, at a few points: the embedding (positions), after the
//! qkv product (QK-norm, rotary), the MLP's nonlinearity, and which optional tensors (biases, norm biases, the LM
//! head) exist.
//!
//! With activation recomputation ([`Recompute`]) the backward pass writes some activations again, from the ones kept,
//! just before it reads them: with `Elementwise` the norms' outputs and the MLP's hidden layer (and with QK-norm the
//! normalised, rotated queries, keys and values), with `Block` all of a block's activations, by running the block's
//! forward pass again from its input. What is recomputed lives in one buffer that every block shares.

use crate::params::{self, ParamInfo};
use crate::spec::{Mlp, ModelSpec};
use kiln_core::config::Recompute;
use kiln_core::experts::{
    Balance, ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeDims, MoeGather, MoeRoute,
    MoeRouteBackward,
};
use kiln_core::{
    AttentionBackward, AttentionDims, Backend, MatmulBackward, MatmulDims, MatmulForward, NormBackward, NormDims,
    NormForward, NormKind, QkNormBackward, QkNormForward, ResidualAdd, Result, Role, Rotary, Tensor,
};

/// What a forward pass computes beyond the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pass {
    /// Logits only (sampling).
    Logits,
    /// Losses too, accumulated into [`Model::losses`] (evaluation).
    Loss,
    /// Losses, and the logits replaced by the gradient of `dloss · Σ losses`, ready for [`Model::backward`]; `dloss`
    /// is one full-precision element, read when the pass runs (so that a graph of the pass takes each step's).
    Train { dloss: Tensor },
}

/// Which positions a forward pass computes.
#[derive(Clone, Copy)]
enum Span {
    /// Every position of a `batch × time` batch.
    Full { batch: usize, time: usize },
    /// One new position of a single sequence, attending to the cached ones before it.
    Decode { pos: usize },
}

/// A normalisation's weight and, for layer normalisation, its bias.
#[derive(Clone, Copy, Debug)]
struct NormWeights {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Views of every weight (of the parameters, or of their gradients: the layouts are the same).
#[derive(Clone, Debug)]
struct Weights {
    wte: Tensor,
    wpe: Option<Tensor>,
    blocks: Vec<BlockWeights>,
    ln_f: NormWeights,
    /// The LM head: `wte` itself when tied.
    head: Tensor,
}

#[derive(Clone, Debug)]
struct BlockWeights {
    ln_1: NormWeights,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    /// QK-norm's weights, the queries' then the keys'.
    qk_norm: Option<Tensor>,
    proj_w: Tensor,
    proj_b: Option<Tensor>,
    ln_2: NormWeights,
    /// With experts, the router's matrix; `fc_w` and `fcproj_w` then hold every expert's.
    router: Option<Tensor>,
    fc_w: Tensor,
    fc_b: Option<Tensor>,
    fcproj_w: Tensor,
    fcproj_b: Option<Tensor>,
}

impl Weights {
    /// The views `view` gives of each tensor of `layout`.
    fn new(layout: &[ParamInfo], view: impl Fn(&ParamInfo) -> Tensor, n_layer: usize) -> Self {
        let find = |name: &str| layout.iter().find(|p| p.name == name).map(&view);
        let view = |name: &str| find(name).unwrap_or_else(|| panic!("no parameter {name}"));
        let norm = |prefix: &str| NormWeights {
            weight: view(&format!("{prefix}.weight")),
            bias: find(&format!("{prefix}.bias")),
        };
        let blocks = (0..n_layer)
            .map(|i| {
                let v = |n: &str| view(&format!("h.{i}.{n}"));
                let optional = |n: &str| find(&format!("h.{i}.{n}"));
                BlockWeights {
                    ln_1: norm(&format!("h.{i}.ln_1")),
                    qkv_w: v("attn.qkv.weight"),
                    qkv_b: optional("attn.qkv.bias"),
                    qk_norm: optional("attn.qk_norm.weight"),
                    proj_w: v("attn.proj.weight"),
                    proj_b: optional("attn.proj.bias"),
                    ln_2: norm(&format!("h.{i}.ln_2")),
                    router: optional("mlp.router.weight"),
                    fc_w: v("mlp.fc.weight"),
                    fc_b: optional("mlp.fc.bias"),
                    fcproj_w: v("mlp.proj.weight"),
                    fcproj_b: optional("mlp.proj.bias"),
                }
            })
            .collect();
        let wte = view("wte");
        Weights { wte, wpe: find("wpe"), blocks, ln_f: norm("ln_f"), head: find("lm_head").unwrap_or(wte) }
    }
}

/// What a normalisation saves for its backward pass: the row statistics (no mean for RMS normalisation).
#[derive(Clone, Copy, Debug)]
struct NormStats {
    mean: Option<Tensor>,
    rstd: Tensor,
}

/// The activations one block saves for its backward pass, each sized for the largest batch. With recomputation,
/// those recomputed are one buffer shared by every block (see [`BlockActivations::take`]).
#[derive(Clone, Debug)]
struct BlockActivations {
    /// `norm_1` of the block's input (written by the previous block's fused residual add and norm).
    ln1: Tensor,
    ln1_stats: NormStats,
    /// After QK-norm and the rotary embedding, where there are: attention reads it, and in decoding it is the cache.
    qkv: Tensor,
    /// With QK-norm, the qkv product's output, which it normalises (empty without), and each normalised head's `r`.
    qkv_pre: Tensor,
    qk_rstd: Tensor,
    atty: Tensor,
    att_lse: Tensor,
    /// The residual stream after attention.
    res2: Tensor,
    ln2: Tensor,
    ln2_stats: NormStats,
    /// With experts, the tokens' routing and dispatched rows.
    routing: Option<Routing>,
    /// The MLP's first product: GELU's input, or SwiGLU's gate and up halves (with experts, of the dispatched rows).
    fch_pre: Tensor,
    /// The MLP's hidden layer, after the nonlinearity.
    fch: Tensor,
    /// The residual stream after the MLP: the next block's input.
    res3: Tensor,
}

impl BlockActivations {
    /// One block's activations for `n` rows, taken from `a`; but after the first block (`first`), those that the
    /// backward pass recomputes at level `recompute` are the first block's, one buffer that each block writes in turn.
    fn take(a: &mut Arenas, spec: &ModelSpec, n: usize, first: Option<&Self>, recompute: Recompute) -> Self {
        let c = spec.n_embd;
        // Recomputed at either level: the norms' outputs and the MLP's hidden layer. With whole blocks: everything but
        // the block's output, which is the next block's input.
        let elementwise = first.filter(|_| recompute != Recompute::None);
        let block = first.filter(|_| recompute == Recompute::Block);
        let qk = |len: usize| if spec.qk_norm { len } else { 0 };
        let mlp_rows = spec.mlp_rows(n);
        BlockActivations {
            ln1: elementwise.map_or_else(|| a.acts.take(n * c), |f| f.ln1),
            ln1_stats: block.map_or_else(|| a.norm_stats(spec, n), |f| f.ln1_stats),
            // With QK-norm, qkv is the normalisation's output (and the rotation's), which the elementwise level
            // recomputes from qkv_pre.
            qkv: if spec.qk_norm { elementwise } else { block }
                .map_or_else(|| a.acts.take(n * spec.qkv_width()), |f| f.qkv),
            qkv_pre: block.map_or_else(|| a.acts.take(qk(n * spec.qkv_width())), |f| f.qkv_pre),
            qk_rstd: block.map_or_else(|| a.stats.take(qk(n * (spec.n_head + spec.n_kv_head))), |f| f.qk_rstd),
            atty: block.map_or_else(|| a.acts.take(n * spec.attention_width()), |f| f.atty),
            att_lse: block.map_or_else(|| a.stats.take(n * spec.n_head), |f| f.att_lse),
            res2: block.map_or_else(|| a.acts.take(n * c), |f| f.res2),
            ln2: elementwise.map_or_else(|| a.acts.take(n * c), |f| f.ln2),
            ln2_stats: block.map_or_else(|| a.norm_stats(spec, n), |f| f.ln2_stats),
            routing: spec.experts.and_then(|_| match block {
                Some(f) => f.routing,
                None => Some(Routing::take(a, spec, n)),
            }),
            fch_pre: block.map_or_else(|| a.acts.take(mlp_rows * spec.fc_width()), |f| f.fch_pre),
            fch: elementwise.map_or_else(|| a.acts.take(mlp_rows * spec.ffn_dim), |f| f.fch),
            res3: a.acts.take(n * c),
        }
    }
}

/// A block's routing of its tokens to their experts and the rows it dispatched (see `kiln_core::experts`).
#[derive(Clone, Copy, Debug)]
struct Routing {
    probs: Tensor,
    weights: Tensor,
    chosen: Tensor,
    order: Tensor,
    place: Tensor,
    offsets: Tensor,
    /// The norm's output, a row per slot in dispatch order: the experts' input.
    dispatched: Tensor,
    /// The experts' outputs, before their weighted sum.
    expert_out: Tensor,
}

impl Routing {
    fn take(a: &mut Arenas, spec: &ModelSpec, n: usize) -> Self {
        let (experts, slots, c) = (spec.mlps(), spec.mlp_rows(n), spec.n_embd);
        Routing {
            probs: a.stats.take(n * experts),
            weights: a.stats.take(slots),
            chosen: a.index.take(slots),
            order: a.index.take(slots),
            place: a.index.take(slots),
            offsets: a.index.take(experts + 1),
            dispatched: a.acts.take(slots * c),
            expert_out: a.acts.take(slots * c),
        }
    }
}

/// Where a model for training keeps each block's weights and gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// In place: weights and gradients in flat vectors laid out like the parameters, the gradients accumulating
    /// over backward passes.
    InPlace,
    /// For ZeRO stage 2: the gradients of the embeddings and of the final norm and LM head in place, and each
    /// block's in one of two buffers the size of a block, which the blocks alternate between (block `l` writes
    /// buffer `l % 2`). Each backward pass writes its own gradients afresh, and a trainer takes each unit's away once
    /// [`Model::backward_with`] reports it final ([`Moment::Ready`]; before the pass reaches the block after next,
    /// which reuses its buffer). Every unit starts at a multiple of the padding, so that it cuts into equal pieces,
    /// one per rank.
    AlternatingGradients,
    /// For ZeRO stage 3: the gradients as with `AlternatingGradients`, and the weights likewise: the embeddings' and
    /// the final norm's and head's in place, each block's in one of two buffers, where a trainer puts them (gathers
    /// them from the ranks) when a pass says it is about to read them ([`Moment::Forward`], [`Moment::Backward`]).
    /// These buffers hold working copies only; the weights are the trainer's.
    AlternatingWeightsAndGradients,
}

/// Where a pass is, for a trainer that moves weights and gradients while it runs (see [`Blocks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// The forward pass is about to read block `l`'s weights (for `l > 0`, in the norm that ends block `l - 1`).
    Forward(usize),
    /// The backward pass is about to read block `l`'s weights.
    Backward(usize),
    /// The gradients of the units from element `from` of the layout to its end are final (`from` is the start of a
    /// unit of [`Model::units`]: after the final norm, after each block from the last to the first, and `0` after
    /// the embeddings).
    Ready(usize),
}

/// How a model for training lays out its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingMemory {
    /// The flat vectors (with alternating [`Blocks`], every unit) are padded to a multiple of this many elements.
    pub multiple: usize,
    pub recompute: Recompute,
    pub blocks: Blocks,
    /// The pieces of the parameters whose master copy an engine keeps (see `Backend::keep_master_pieces`): a ZeRO
    /// rank's, said as soon as the parameters are allocated, so that the whole copy is never held beside the rest.
    /// `None` keeps all of it.
    pub master_pieces: Option<Vec<std::ops::Range<usize>>>,
}

/// A transformer whose parameters, gradients and activations live on a backend, sized for batches of up to
/// `max_batch` sequences of up to `block_size` tokens.
pub struct Model {
    pub spec: ModelSpec,
    pub layout: Vec<ParamInfo>,
    pub max_batch: usize,
    /// The flat range of each unit of the layout ([`ParamInfo::unit`]), padding after it included.
    pub units: Vec<std::ops::Range<usize>>,
    /// The parameters' allocation: all of them in [`Self::layout`] order, or with
    /// [`Blocks::AlternatingWeightsAndGradients`] the buffers it describes.
    pub params: Tensor,
    /// The gradients' allocation: laid out like the parameters, or with alternating [`Blocks`] the buffers they
    /// describe.
    pub grads: Tensor,
    /// Where each unit's weights are, in `params`.
    unit_params: Vec<Tensor>,
    /// Where each unit's gradients are, in `grads` (none in a model built for inference).
    unit_grads: Vec<Tensor>,
    blocks: Blocks,
    /// Per-position losses, accumulated by [`Pass::Loss`] and [`Pass::Train`] passes.
    pub losses: Tensor,
    /// With experts and a balancing loss, in a model built for training: the balancing loss's terms, one per
    /// expert, accumulated by [`Pass::Train`] passes (zero them with the losses). Their sum is the loss's share of the
    /// objective, `α·aux_loss` weighted by each pass's `dloss · rows` (see [`Balance`]).
    pub balance_terms: Option<Tensor>,
    p: Weights,
    /// Views of the gradients; none in a model built for inference.
    g: Option<Weights>,
    /// Every other buffer: the forward pass's activations and the backward pass's working memory.
    acts: Activations,
    /// Which activations the backward pass recomputes; [`Activations::take`] shared their buffers accordingly.
    recompute: Recompute,
    /// See [`Model::fuse_bias_gradients`].
    fused_bias_gradients: bool,
}

impl Activations {
    /// Elements of each kind of activation, with the role it is stored in (see [`Model::activation_kinds`]). A
    /// buffer that blocks share (under recomputation) counts once.
    fn kinds(&self) -> Vec<(&'static str, Role, usize)> {
        let stats = |st: &NormStats| st.mean.into_iter().chain([st.rstd]).collect::<Vec<_>>();
        let mut kinds: Vec<(&'static str, Role, Vec<Tensor>)> = vec![
            ("activations: residual stream", Role::Activation, vec![self.encoded]),
            ("activations: norm outputs", Role::Activation, vec![self.lnf]),
            ("activations: queries, keys and values", Role::Activation, vec![]),
            ("activations: attention outputs", Role::Activation, vec![]),
            ("activations: MLP pre-activations and hidden layers", Role::Activation, vec![]),
            ("activations: logits (and their gradient)", Role::Activation, vec![self.logits]),
            (
                "activations: projection output and the backward pass's buffers",
                Role::Activation,
                vec![
                    self.proj,
                    self.dresidual,
                    self.dbtc,
                    self.dqkv,
                    self.dfch,
                    self.dfch_pre,
                    self.router_logits,
                    self.dexpert_out,
                    self.ddispatched,
                    self.dlogits,
                ],
            ),
            ("statistics: norms, attention log-sum-exp, losses, rotary table", Role::Stat, {
                let mut s = stats(&self.lnf_stats);
                s.extend([self.losses, self.rope_table, self.dres_sums, self.dweights]);
                s.extend([self.balance, self.probability_sums, self.balance_terms]);
                s
            }),
            ("token ids and targets", Role::Index, vec![self.tokens, self.targets]),
        ];
        for b in &self.blocks {
            kinds[0].2.extend([b.res2, b.res3]);
            kinds[1].2.extend([b.ln1, b.ln2]);
            kinds[2].2.extend([b.qkv, b.qkv_pre]);
            kinds[3].2.push(b.atty);
            kinds[4].2.extend([b.fch_pre, b.fch]);
            if let Some(r) = &b.routing {
                kinds[4].2.extend([r.dispatched, r.expert_out]);
                kinds[7].2.extend([r.probs, r.weights]);
                kinds[8].2.extend([r.chosen, r.order, r.place, r.offsets]);
            }
            kinds[7].2.extend(stats(&b.ln1_stats).into_iter().chain(stats(&b.ln2_stats)).chain([b.att_lse, b.qk_rstd]));
        }
        let mut seen = std::collections::HashSet::new();
        kinds
            .into_iter()
            .map(|(name, role, tensors)| {
                let distinct = tensors.into_iter().filter(|t| seen.insert((t.buffer, t.offset, t.len)));
                (name, role, distinct.map(|t| t.len).sum())
            })
            .collect()
    }
}

/// Hands out consecutive views of one allocation. Counting first ([`Arena::counting`]) and then taking the same views
/// from a real one sizes the allocation from the views themselves.
struct Arena {
    whole: Tensor,
    used: usize,
}

impl Arena {
    fn counting() -> Self {
        Arena { whole: Tensor { buffer: kiln_core::backend::BufferId(u32::MAX), offset: 0, len: usize::MAX }, used: 0 }
    }

    fn new<B: Backend + ?Sized>(backend: &mut B, len: usize, role: Role) -> Result<Self> {
        Ok(Arena { whole: backend.alloc(len, role)?, used: 0 })
    }

    fn take(&mut self, len: usize) -> Tensor {
        let t = self.whole.slice(self.used, len);
        self.used += len;
        t
    }
}

/// The three arenas every activation comes from: real-valued activations, full-precision statistics, token ids.
struct Arenas {
    acts: Arena,
    stats: Arena,
    index: Arena,
}

impl Arenas {
    fn norm_stats(&mut self, spec: &ModelSpec, rows: usize) -> NormStats {
        let mean = (spec.norm == NormKind::Layer).then(|| self.stats.take(rows));
        NormStats { mean, rstd: self.stats.take(rows) }
    }
}

/// Every activation of a model: the buffers of [`Model`] that are not parameters.
struct Activations {
    losses: Tensor,
    tokens: Tensor,
    targets: Tensor,
    encoded: Tensor,
    blocks: Vec<BlockActivations>,
    lnf: Tensor,
    lnf_stats: NormStats,
    logits: Tensor,
    /// The rotary table (see [`Rotary`]); empty with learned positions.
    rope_table: Tensor,
    // The output of a block's attention or MLP projection, which the residual add that follows consumes at once and
    // the backward pass never reads: one buffer for both in every block.
    proj: Tensor,
    // Gradient buffers reused by every block during the backward pass (empty in a model built for inference).
    dresidual: Tensor,
    dbtc: Tensor,
    dqkv: Tensor,
    dfch: Tensor,
    /// The gradient of SwiGLU's input (empty for GELU, whose derivative the product's backward applies).
    dfch_pre: Tensor,
    /// With experts (empty without): the router's output, which routing consumes at once; the backward pass's
    /// gradients of the experts' outputs, of their input, of the slots' weights and of the router's output; and the
    /// load-balancing loss's gradient, probability sums and terms (see [`Balance`]), which a training pass
    /// accumulates.
    router_logits: Tensor,
    dexpert_out: Tensor,
    ddispatched: Tensor,
    dweights: Tensor,
    dlogits: Tensor,
    balance: Tensor,
    probability_sums: Tensor,
    balance_terms: Tensor,
    /// The column sums of the residual stream's gradient, a projection's bias gradient before it is added in (see
    /// [`Model::fuse_bias_gradients`]); empty without biases.
    dres_sums: Tensor,
}

impl Activations {
    /// Takes every activation from `a`, the blocks' as `recompute` shares them; without `training`, the backward
    /// pass's buffers are empty.
    fn take(a: &mut Arenas, spec: &ModelSpec, max_batch: usize, training: bool, recompute: Recompute) -> Self {
        let (c, t) = (spec.n_embd, spec.block_size);
        let n = max_batch * t;
        let swiglu = spec.mlp == Mlp::SwiGlu;
        let backward = |len: usize| if training { len } else { 0 };
        let (mlp_rows, moe) = (spec.mlp_rows(n), spec.experts.is_some());
        let routed = |len: usize| if moe { len } else { 0 };
        let first = BlockActivations::take(a, spec, n, None, recompute);
        let rest: Vec<_> =
            (1..spec.n_layer).map(|_| BlockActivations::take(a, spec, n, Some(&first), recompute)).collect();
        Activations {
            losses: a.stats.take(n),
            tokens: a.index.take(n),
            targets: a.index.take(n),
            encoded: a.acts.take(n * c),
            blocks: std::iter::once(first).chain(rest).collect(),
            lnf: a.acts.take(n * c),
            lnf_stats: a.norm_stats(spec, n),
            logits: a.acts.take(n * spec.padded_vocab),
            rope_table: a.stats.take(spec.rope_table_len()),
            proj: a.acts.take(n * c),
            dresidual: a.acts.take(backward(n * c)),
            // Attention's output gradient as well as the norms' inputs'.
            dbtc: a.acts.take(backward(n * c.max(spec.attention_width()))),
            dqkv: a.acts.take(backward(n * spec.qkv_width())),
            dfch: a.acts.take(backward(mlp_rows * spec.ffn_dim)),
            dfch_pre: a.acts.take(backward(if swiglu { mlp_rows * spec.fc_width() } else { 0 })),
            // The experts' products' operands before the router's logits, whose n · experts elements may be no
            // multiple of 8: the CUDA engine's grouped products need their operands 16-byte aligned.
            dexpert_out: a.acts.take(backward(routed(mlp_rows * c))),
            ddispatched: a.acts.take(backward(routed(mlp_rows * c))),
            router_logits: a.acts.take(routed(n * spec.mlps())),
            dweights: a.stats.take(backward(routed(mlp_rows))),
            dlogits: a.acts.take(backward(routed(n * spec.mlps()))),
            balance: a.stats.take(backward(routed(spec.mlps()))),
            probability_sums: a.stats.take(backward(routed(spec.mlps()))),
            balance_terms: a.stats.take(backward(routed(spec.mlps()))),
            dres_sums: a.stats.take(backward(if spec.biases.into_residual() { c } else { 0 })),
        }
    }
}

/// The rows a pass covers: every position of a `batch × time` batch, or one decoded position (a batch of one row).
#[derive(Clone, Copy)]
struct Rows {
    span: Span,
    batch: usize,
    time: usize,
}

impl Rows {
    fn new(span: Span) -> Self {
        let (batch, time) = match span {
            Span::Full { batch, time } => (batch, time),
            Span::Decode { .. } => (1, 1),
        };
        Rows { span, batch, time }
    }

    fn n(&self) -> usize {
        self.batch * self.time
    }

    /// The first `n` rows of `width` elements of an activation.
    fn of(&self, t: Tensor, width: usize) -> Tensor {
        t.slice(0, self.n() * width)
    }

    /// The MLP's rows of `width` elements of an activation for these rows: with experts, the dispatched rows.
    fn mlp(&self, spec: &ModelSpec, t: Tensor, width: usize) -> Tensor {
        t.slice(0, spec.mlp_rows(self.n()) * width)
    }

    /// The routing of these rows to `spec`'s experts.
    fn moe(&self, spec: &ModelSpec) -> Option<MoeDims> {
        spec.experts.map(|e| MoeDims { rows: self.n(), experts: e.count, top_k: e.per_token })
    }

    /// The statistics of the first `n` rows.
    fn stats(&self, st: NormStats) -> NormStats {
        NormStats { mean: st.mean.map(|m| self.of(m, 1)), rstd: self.of(st.rstd, 1) }
    }
}

/// One allocation of `role` laid out like the parameters (`len` elements), and each unit's part of it.
fn in_place<B: Backend + ?Sized>(
    backend: &mut B,
    units: &[std::ops::Range<usize>],
    len: usize,
    role: Role,
) -> Result<(Tensor, Vec<Tensor>)> {
    let whole = backend.alloc(len, role)?;
    Ok((whole, units.iter().map(|u| whole.slice(u.start, u.len())).collect()))
}

/// One allocation of `role` laid out as alternating [`Blocks`] lay it out: `[embeddings | final norm and head | block
/// buffer 0 | block buffer 1]`, each block buffer the size of the largest block; and each unit's part of it.
fn alternating<B: Backend + ?Sized>(
    backend: &mut B,
    units: &[std::ops::Range<usize>],
    role: Role,
) -> Result<(Tensor, Vec<Tensor>)> {
    let last = units.len() - 1;
    let (first_len, last_len) = (units[0].len(), units[last].len());
    let slot = units[1..last].iter().map(|u| u.len()).max().unwrap_or(0);
    let whole = backend.alloc(first_len + last_len + 2 * slot, role)?;
    let parts = (0..units.len())
        .map(|u| match u {
            0 => whole.slice(0, first_len),
            u if u == last => whole.slice(first_len, last_len),
            u => whole.slice(first_len + last_len + (u - 1) % 2 * slot, units[u].len()),
        })
        .collect();
    Ok((whole, parts))
}

impl Model {
    /// Allocates everything the model will ever use and initialises the weights from `seed`.
    pub fn new<B: Backend + ?Sized>(backend: &mut B, spec: ModelSpec, max_batch: usize, seed: u64) -> Result<Self> {
        Model::with_padding(backend, spec, max_batch, seed, 1, Recompute::None)
    }

    /// [`Model::new`] with the flat parameter and gradient vectors padded with zeros to a multiple of `multiple`
    /// elements, so that a data-parallel job can cut them into equal pieces, one per rank, and with the activations
    /// that `recompute` names recomputed by the backward pass rather than kept.
    pub fn with_padding<B: Backend + ?Sized>(
        backend: &mut B,
        spec: ModelSpec,
        max_batch: usize,
        seed: u64,
        multiple: usize,
        recompute: Recompute,
    ) -> Result<Self> {
        let memory = TrainingMemory { multiple, recompute, blocks: Blocks::InPlace, master_pieces: None };
        let model = Model::for_training(backend, spec, max_batch, memory)?;
        model.initialize(backend, seed)?;
        Ok(model)
    }

    /// Allocates everything a model for training uses, laid out as `memory` says, leaving the weights at zero: for
    /// weights that come from elsewhere ([`Model::initialize`] draws them), and for counting what a run allocates
    /// (see `kiln_core::memory`).
    pub fn for_training<B: Backend + ?Sized>(
        backend: &mut B,
        spec: ModelSpec,
        max_batch: usize,
        memory: TrainingMemory,
    ) -> Result<Self> {
        Model::build(backend, spec, max_batch, Some(memory))
    }

    /// A model for sampling and evaluation: parameters (zero until weights are loaded) and the forward pass's
    /// activations for batches of up to `max_batch` sequences of up to `spec.block_size` tokens; no gradients.
    pub fn for_inference<B: Backend + ?Sized>(backend: &mut B, spec: ModelSpec, max_batch: usize) -> Result<Self> {
        Model::build(backend, spec, max_batch, None)
    }

    /// Draws the initial weights from `seed` (see [`params::initial_weights`]); a trainer puts those of a model
    /// whose blocks' weights alternate.
    pub fn initialize<B: Backend + ?Sized>(&self, backend: &mut B, seed: u64) -> Result<()> {
        self.check_weights_in_place()?;
        backend.upload(self.params, &params::initial_weights(&self.spec, &self.layout, self.params.len, seed))
    }

    fn build<B: Backend + ?Sized>(
        backend: &mut B,
        spec: ModelSpec,
        max_batch: usize,
        training: Option<TrainingMemory>,
    ) -> Result<Self> {
        spec.check_size(max_batch)?;
        spec.check_engine(&*backend.memory_model())?;
        let (training, memory) = match training {
            Some(memory) => (true, memory),
            None => (
                false,
                TrainingMemory {
                    multiple: 1,
                    recompute: Recompute::None,
                    blocks: Blocks::InPlace,
                    master_pieces: None,
                },
            ),
        };
        let TrainingMemory { multiple, recompute, blocks, master_pieces } = memory;
        let (layout, units, len) = Model::layout(&spec, multiple, blocks);
        let (params, unit_params) = match blocks {
            Blocks::AlternatingWeightsAndGradients => {
                let (params, unit_params) = alternating(backend, &units, Role::Param)?;
                // Working copies, gathered: the weights that an optimizer updates, with their master copy, are
                // elsewhere.
                backend.keep_master_pieces(params, &[])?;
                (params, unit_params)
            }
            _ => {
                let (params, unit_params) = in_place(backend, &units, len, Role::Param)?;
                if let Some(pieces) = &master_pieces {
                    backend.keep_master_pieces(params, pieces)?;
                }
                (params, unit_params)
            }
        };
        let (grads, unit_grads) = match (training, blocks) {
            (false, _) => (backend.alloc(0, Role::Grad)?, Vec::new()),
            (true, Blocks::InPlace) => in_place(backend, &units, len, Role::Grad)?,
            (true, _) => alternating(backend, &units, Role::Grad)?,
        };

        let mut counting = Arenas { acts: Arena::counting(), stats: Arena::counting(), index: Arena::counting() };
        Activations::take(&mut counting, &spec, max_batch, training, recompute);
        let mut arenas = Arenas {
            acts: Arena::new(backend, counting.acts.used, Role::Activation)?,
            stats: Arena::new(backend, counting.stats.used, Role::Stat)?,
            index: Arena::new(backend, counting.index.used, Role::Index)?,
        };
        let a = Activations::take(&mut arenas, &spec, max_batch, training, recompute);
        // Not computed for a plan, which only counts.
        if a.rope_table.len > 0 && backend.holds_data() {
            backend.upload(a.rope_table, &spec.rope_table()?)?;
        }
        let l = spec.n_layer;
        let view = |of: &[Tensor], p: &ParamInfo| of[p.unit].slice(p.offset - units[p.unit].start, p.len());
        Ok(Model {
            p: Weights::new(&layout, |p| view(&unit_params, p), l),
            g: training.then(|| Weights::new(&layout, |p| view(&unit_grads, p), l)),
            spec,
            layout,
            units,
            max_batch,
            params,
            grads,
            unit_params,
            unit_grads,
            blocks,
            losses: a.losses,
            balance_terms: (training && spec.balances_experts()).then_some(a.balance_terms),
            acts: a,
            recompute,
            fused_bias_gradients: false,
        })
    }

    /// The layout of `spec`'s parameters for a model padded to `multiple` (see [`TrainingMemory`]): the tensors, the
    /// flat range of each unit, and the padded length.
    pub fn layout(
        spec: &ModelSpec,
        multiple: usize,
        blocks: Blocks,
    ) -> (Vec<ParamInfo>, Vec<std::ops::Range<usize>>, usize) {
        let layout = spec.params_aligned(if blocks == Blocks::InPlace { 1 } else { multiple });
        let last = layout.last().expect("a model has parameters");
        let len = (last.offset + last.len()).next_multiple_of(multiple);
        let units = params::units(&layout, len);
        (layout, units, len)
    }

    /// Elements of each kind of activation the model keeps, with the role it is stored in: what a memory plan shows.
    /// They add up to the model's activation, statistics and token-id allocations.
    pub fn activation_kinds(&self) -> Vec<(&'static str, Role, usize)> {
        self.acts.kinds()
    }

    /// Whether the backward pass takes bias gradients from the operations that produce the gradients they sum, rather
    /// than reading those gradients again: the output projections' from the norms' backward passes before them (the
    /// residual stream's gradient is their output gradient), the first MLP layer's from the product that applies
    /// GELU's derivative (cuBLASLt's DGELU_BGRAD epilogue on the GPU), the qkv projection's from attention's backward
    /// pass (the GPU's fused kernels sum what they write). The qkv projection keeps its own sum with rotary
    /// positions, as does an MLP's first layer under SwiGLU. The sums are the same; their rounding may differ.
    pub fn fuse_bias_gradients(&mut self, fused: bool) {
        self.fused_bias_gradients = fused;
    }

    /// The weights of unit `u` (see [`ParamInfo::unit`]), `units[u].len()` elements.
    pub fn unit_parameters(&self, u: usize) -> Tensor {
        self.unit_params[u]
    }

    /// The gradients of unit `u`, `units[u].len()` elements laid out like its weights.
    pub fn unit_gradients(&self, u: usize) -> Tensor {
        self.unit_grads[u]
    }

    /// An error unless every block's weights are in place: a pass that cannot say when it reads them
    /// ([`Model::forward_with`]) cannot run with alternating ones.
    fn check_weights_in_place(&self) -> Result<()> {
        if self.blocks == Blocks::AlternatingWeightsAndGradients {
            return Err(kiln_core::Error::Invalid(
                "a model whose blocks' weights alternate runs its passes through forward_with and backward_with".into(),
            ));
        }
        Ok(())
    }

    fn check_batch(&self, batch: usize, time: usize) -> Result<()> {
        if batch == 0 || batch > self.max_batch || time == 0 || time > self.spec.block_size {
            return Err(kiln_core::Error::Invalid(format!(
                "a batch of {batch}×{time} does not fit a model built for {}×{}",
                self.max_batch, self.spec.block_size
            )));
        }
        Ok(())
    }

    /// Copies a batch of `batch × time` token ids (and, for a loss, their targets) to the backend.
    pub fn load_batch<B: Backend + ?Sized>(
        &self,
        backend: &mut B,
        tokens: &[u32],
        targets: Option<&[u32]>,
    ) -> Result<()> {
        backend.upload_indices(self.acts.tokens.slice(0, tokens.len()), tokens)?;
        if let Some(targets) = targets {
            backend.upload_indices(self.acts.targets.slice(0, targets.len()), targets)?;
        }
        Ok(())
    }

    /// Runs the model on the batch last loaded. Losses accumulate into [`Self::losses`] (zero it first).
    pub fn forward<B: Backend + ?Sized>(&self, b: &mut B, batch: usize, time: usize, pass: Pass) -> Result<()> {
        self.check_weights_in_place()?;
        self.forward_with(b, batch, time, pass, &mut |_, _| Ok(()))
    }

    /// [`Model::forward`], calling `on(b, Moment::Forward(l))` before the pass reads block `l`'s weights.
    pub fn forward_with<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        batch: usize,
        time: usize,
        pass: Pass,
        on: &mut dyn FnMut(&mut B, Moment) -> Result<()>,
    ) -> Result<()> {
        self.check_batch(batch, time)?;
        self.forward_span(b, Span::Full { batch, time }, pass, on)
    }

    /// Runs one new `token` at position `pos` of a single sequence whose earlier positions went through
    /// [`Model::forward`] (batch 1) or earlier calls of this: each block's `qkv` activation is the key/value cache,
    /// so the step costs one position, not the whole context. Its logits are row 0 of [`Model::logits_row`]. A model
    /// that recomputes whole blocks, or with QK-norm recomputes at all, has no cache: its blocks share one `qkv`.
    pub fn decode_step<B: Backend + ?Sized>(&self, b: &mut B, token: u32, pos: usize) -> Result<()> {
        if pos >= self.spec.block_size {
            return Err(kiln_core::Error::Invalid(format!(
                "position {pos} is past block_size {}",
                self.spec.block_size
            )));
        }
        if self.recompute == Recompute::Block || (self.spec.qk_norm && self.recompute != Recompute::None) {
            return Err(kiln_core::Error::Invalid(
                "a model that recomputes its queries, keys and values keeps no key/value cache to decode with".into(),
            ));
        }
        self.check_weights_in_place()?;
        self.load_batch(b, &[token], None)?;
        self.forward_span(b, Span::Decode { pos }, Pass::Logits, &mut |_, _| Ok(()))
    }

    /// The normalisation of `rows` rows.
    fn norm_dims(&self, rows: usize) -> NormDims {
        NormDims { rows, c: self.spec.n_embd, kind: self.spec.norm, eps: self.spec.norm_eps as f32 }
    }

    /// The residual stream entering block `l`; past the last block, the final norm's input.
    fn block_input(&self, l: usize) -> Tensor {
        match l.checked_sub(1) {
            None => self.acts.encoded,
            Some(previous) => self.acts.blocks[previous].res3,
        }
    }

    /// The norm `nw` of the rows `r` of `inp`, or with `residual` of the sum it writes, into `out` and `stats`.
    fn norm<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        out: Tensor,
        stats: NormStats,
        inp: Tensor,
        residual: Option<ResidualAdd>,
        nw: NormWeights,
    ) -> Result<()> {
        let (c, st) = (self.spec.n_embd, r.stats(stats));
        b.norm_forward(NormForward {
            out: r.of(out, c),
            mean: st.mean,
            rstd: st.rstd,
            inp: r.of(inp, c),
            residual: residual.map(|ra| ResidualAdd { other: r.of(ra.other, c), sum: r.of(ra.sum, c) }),
            weight: nw.weight,
            bias: nw.bias,
            d: self.norm_dims(r.n()),
        })
    }

    /// Block `l`'s first norm, of the residual stream entering it.
    fn norm_1<B: Backend + ?Sized>(&self, b: &mut B, r: Rows, l: usize) -> Result<()> {
        let a = &self.acts.blocks[l];
        self.norm(b, r, a.ln1, a.ln1_stats, self.block_input(l), None, self.p.blocks[l].ln_1)
    }

    /// Block `l`'s second norm written again, where the elementwise level of recomputation shares its output: from
    /// the residual sum that the forward pass wrote and normalised, which the norm's backward reads.
    fn norm_2_again<B: Backend + ?Sized>(&self, b: &mut B, r: Rows, l: usize) -> Result<()> {
        if self.recompute != Recompute::Elementwise {
            return Ok(());
        }
        let a = &self.acts.blocks[l];
        self.norm(b, r, a.ln2, a.ln2_stats, a.res2, None, self.p.blocks[l].ln_2)
    }

    /// Block `l`'s MLP nonlinearity, from the pre-activation `fch_pre` to the hidden layer `fch`.
    fn activation<B: Backend + ?Sized>(&self, b: &mut B, r: Rows, l: usize) -> Result<()> {
        let (s, a) = (&self.spec, &self.acts.blocks[l]);
        let (fch, pre) = (r.mlp(s, a.fch, s.ffn_dim), r.mlp(s, a.fch_pre, s.fc_width()));
        match s.mlp {
            Mlp::Gelu => b.gelu_forward(fch, pre),
            Mlp::SwiGlu => b.swiglu_forward(fch, pre, s.mlp_rows(r.n()), s.ffn_dim),
        }
    }

    /// Block `l`'s queries, keys and values as attention reads them, in `qkv` (its rows from `first_pos`): QK-norm of
    /// the qkv product's output and the rotation, where the model has them. The elementwise level of recomputation
    /// runs this again.
    fn attention_input<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        l: usize,
        qkv: Tensor,
        first_pos: usize,
    ) -> Result<()> {
        let s = &self.spec;
        let (a, wt) = (&self.acts.blocks[l], &self.p.blocks[l]);
        let att = self.spec.attention_dims(r.batch, r.time);
        if let Some(weight) = wt.qk_norm {
            let (inp, rstd) = (r.of(a.qkv_pre, s.qkv_width()), r.of(a.qk_rstd, s.n_head + s.n_kv_head));
            b.qk_norm_forward(QkNormForward { out: qkv, rstd, inp, weight, eps: s.norm_eps as f32, d: att })?;
        }
        if s.rotates(l) {
            b.rope(Rotary { qkv, table: self.acts.rope_table, d: att, first_pos, inverse: false })?;
        }
        Ok(())
    }

    /// Block `l`'s forward pass from its first norm's output to the MLP's hidden layer: all but the MLP's output
    /// projection and the residual add that ends the block. A backward pass that recomputes whole blocks runs this
    /// again (without `balance`: routing again adds nothing to the balancing loss's gradient).
    fn block_to_hidden<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        l: usize,
        balance: Option<Balance>,
    ) -> Result<()> {
        let s = &self.spec;
        let (a, wt) = (&self.acts.blocks[l], &self.p.blocks[l]);
        let (c, n, w, ffn, fc_width) = (s.n_embd, r.n(), s.qkv_width(), s.ffn_dim, s.fc_width());
        let aw = s.attention_width();
        let att = self.spec.attention_dims(r.batch, r.time);
        let lin = |c_in, c_out| MatmulDims { rows: n, c_in, c_out };
        // A decoded token is rotated as position `pos`, and its queries, keys and values go to row `pos` of the cache.
        let (qkv, first_pos) = match r.span {
            Span::Full { .. } => (r.of(a.qkv, w), 0),
            Span::Decode { pos } => (a.qkv.slice(pos * w, w), pos),
        };
        // QK-norm normalises the product's output into `qkv` (a decoded token's one row too).
        b.matmul_forward(MatmulForward {
            out: if s.qk_norm { r.of(a.qkv_pre, w) } else { qkv },
            inp: r.of(a.ln1, c),
            weight: wt.qkv_w,
            bias: wt.qkv_b,
            gelu_pre: None,
            d: lin(c, w),
        })?;
        self.attention_input(b, r, l, qkv, first_pos)?;
        match r.span {
            Span::Full { .. } => {
                b.attention_forward(r.of(a.atty, aw), r.of(a.att_lse, s.n_head), r.of(a.qkv, w), att)?
            }
            Span::Decode { pos } => {
                let cache = a.qkv.slice(0, (pos + 1) * w);
                b.attention_decode(r.of(a.atty, aw), cache, pos, AttentionDims { time: pos + 1, ..att })?
            }
        }
        b.matmul_forward(MatmulForward {
            out: r.of(self.acts.proj, c),
            inp: r.of(a.atty, aw),
            weight: wt.proj_w,
            bias: wt.proj_b,
            gelu_pre: None,
            d: lin(aw, c),
        })?;
        let residual = ResidualAdd { other: self.acts.proj, sum: a.res2 };
        self.norm(b, r, a.ln2, a.ln2_stats, self.block_input(l), Some(residual), wt.ln_2)?;
        if let (Some(routing), Some(router), Some(d)) = (a.routing, wt.router, r.moe(s)) {
            return self.experts_to_hidden(b, r, l, routing, router, d, balance);
        }
        match s.mlp {
            Mlp::Gelu => b.matmul_forward(MatmulForward {
                out: r.of(a.fch, ffn),
                inp: r.of(a.ln2, c),
                weight: wt.fc_w,
                bias: wt.fc_b,
                gelu_pre: Some(r.of(a.fch_pre, fc_width)),
                d: lin(c, fc_width),
            }),
            Mlp::SwiGlu => {
                b.matmul_forward(MatmulForward {
                    out: r.of(a.fch_pre, fc_width),
                    inp: r.of(a.ln2, c),
                    weight: wt.fc_w,
                    bias: wt.fc_b,
                    gelu_pre: None,
                    d: lin(c, fc_width),
                })?;
                self.activation(b, r, l)
            }
        }
    }

    /// With experts, block `l`'s MLP from the norm's output to the experts' hidden layers: the router's product,
    /// routing (adding to the balancing loss's gradient where `balance`), the dispatch, and the experts' first
    /// products and nonlinearity.
    #[allow(clippy::too_many_arguments)]
    fn experts_to_hidden<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        l: usize,
        routing: Routing,
        router: Tensor,
        d: MoeDims,
        balance: Option<Balance>,
    ) -> Result<()> {
        let (s, a) = (&self.spec, &self.acts.blocks[l]);
        let (c, n, fc_width, slots) = (s.n_embd, r.n(), s.fc_width(), d.slots());
        let logits = r.of(self.acts.router_logits, d.experts);
        let inp = r.of(a.ln2, c);
        let d_router = MatmulDims { rows: n, c_in: c, c_out: d.experts };
        b.matmul_forward(MatmulForward { out: logits, inp, weight: router, bias: None, gelu_pre: None, d: d_router })?;
        let Routing { probs, weights, chosen, order, place, offsets, dispatched, .. } = routing;
        let (probs, weights, dispatched) = (r.of(probs, d.experts), r.mlp(s, weights, 1), r.mlp(s, dispatched, c));
        let (chosen, order, place) = (r.mlp(s, chosen, 1), r.mlp(s, order, 1), r.mlp(s, place, 1));
        let normalize = s.normalizes_expert_weights();
        b.moe_route(MoeRoute { probs, weights, chosen, order, place, offsets, logits, normalize, balance, d })?;
        b.moe_gather(MoeGather { out: dispatched, inp, order, width: c, d })?;
        b.expert_matmul_forward(ExpertMatmulForward {
            out: r.mlp(s, a.fch_pre, fc_width),
            inp: dispatched,
            weight: self.p.blocks[l].fc_w,
            offsets,
            experts: d.experts,
            d: MatmulDims { rows: slots, c_in: c, c_out: fc_width },
        })?;
        self.activation(b, r, l)
    }

    /// With experts, block `l`'s experts' outputs from their hidden layers: the products that end its MLP, before
    /// their weighted sum. A backward pass that recomputes whole blocks runs this again, as it reads them.
    fn experts_out<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        l: usize,
        routing: Routing,
        d: MoeDims,
    ) -> Result<()> {
        let (s, a) = (&self.spec, &self.acts.blocks[l]);
        b.expert_matmul_forward(ExpertMatmulForward {
            out: r.mlp(s, routing.expert_out, s.n_embd),
            inp: r.mlp(s, a.fch, s.ffn_dim),
            weight: self.p.blocks[l].fcproj_w,
            offsets: routing.offsets,
            experts: d.experts,
            d: MatmulDims { rows: d.slots(), c_in: s.ffn_dim, c_out: s.n_embd },
        })
    }

    /// The load-balancing loss's part in a pass of `r`'s rows: only a training pass has one, and only with a
    /// coefficient above 0.
    fn balance(&self, r: Rows, pass: Pass) -> Option<Balance> {
        let (Pass::Train { dloss }, Some(experts)) = (pass, self.spec.experts) else { return None };
        let layers = self.spec.n_layer as f64;
        let scale = experts.aux_loss * experts.count as f64 / (layers * layers * r.n() as f64);
        let (gradient, probability_sums) = (self.acts.balance, self.acts.probability_sums);
        let terms = self.balance_terms;
        self.spec.balances_experts().then_some(Balance {
            gradient,
            probability_sums,
            terms,
            dloss,
            scale: scale as f32,
        })
    }

    fn forward_span<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        span: Span,
        pass: Pass,
        on: &mut dyn FnMut(&mut B, Moment) -> Result<()>,
    ) -> Result<()> {
        let s = &self.spec;
        let r = Rows::new(span);
        let (c, n, ffn) = (s.n_embd, r.n(), s.ffn_dim);
        // A decoded token's position embedding is row `pos`; everything else about it is a one-row batch.
        let first_pos = match span {
            Span::Full { .. } => 0,
            Span::Decode { pos } => pos,
        };
        let wpe = self.p.wpe.map(|wpe| wpe.slice(first_pos * c, r.time * c));
        b.encoder_forward(r.of(self.acts.encoded, c), r.of(self.acts.tokens, 1), self.p.wte, wpe, r.batch, r.time, c)?;
        let balance = self.balance(r, pass);
        if let Some(balance) = balance {
            b.zero(balance.gradient)?;
            b.zero(balance.probability_sums)?;
        }
        on(b, Moment::Forward(0))?;
        self.norm_1(b, r, 0)?;
        for (l, (a, wt)) in self.acts.blocks.iter().zip(&self.p.blocks).enumerate() {
            // The last layer's routing adds the loss's terms, from every layer's counts and probabilities.
            let last = l + 1 == s.n_layer;
            self.block_to_hidden(b, r, l, balance.map(|bal| Balance { terms: bal.terms.filter(|_| last), ..bal }))?;
            let fch = r.mlp(s, a.fch, ffn);
            match (a.routing, r.moe(s)) {
                (Some(routing), Some(d)) => {
                    self.experts_out(b, r, l, routing, d)?;
                    b.moe_combine(MoeCombine {
                        out: r.of(self.acts.proj, c),
                        expert_out: r.mlp(s, routing.expert_out, c),
                        weights: Some(r.mlp(s, routing.weights, 1)),
                        place: r.mlp(s, routing.place, 1),
                        accumulate: false,
                        width: c,
                        d,
                    })?;
                }
                _ => b.matmul_forward(MatmulForward {
                    out: r.of(self.acts.proj, c),
                    inp: fch,
                    weight: wt.fcproj_w,
                    bias: wt.fcproj_b,
                    gelu_pre: None,
                    d: MatmulDims { rows: n, c_in: ffn, c_out: c },
                })?,
            }
            // The residual add that ends this block, fused with the norm that starts the next (or the final norm).
            if l + 1 < s.n_layer {
                on(b, Moment::Forward(l + 1))?;
            }
            let (out, stats, nw) = match (self.acts.blocks.get(l + 1), self.p.blocks.get(l + 1)) {
                (Some(next), Some(w)) => (next.ln1, next.ln1_stats, w.ln_1),
                _ => (self.acts.lnf, self.acts.lnf_stats, self.p.ln_f),
            };
            self.norm(b, r, out, stats, a.res2, Some(ResidualAdd { other: self.acts.proj, sum: a.res3 }), nw)?;
        }
        let vp = s.padded_vocab;
        b.matmul_forward(MatmulForward {
            out: r.of(self.acts.logits, vp),
            inp: r.of(self.acts.lnf, c),
            weight: self.p.head,
            bias: None,
            gelu_pre: None,
            d: MatmulDims { rows: n, c_in: c, c_out: vp },
        })?;
        let dloss = match pass {
            Pass::Logits => return Ok(()),
            Pass::Loss => None,
            Pass::Train { dloss } => Some(dloss),
        };
        b.classifier(
            r.of(self.acts.logits, vp),
            r.of(self.losses, 1),
            r.of(self.acts.targets, 1),
            n,
            s.vocab,
            vp,
            dloss,
        )
    }

    /// Accumulates the gradients of the last [`Pass::Train`] forward pass (same batch shape) into
    /// [`Self::grads`] (with [`Gradients::Alternating`], writes them there: see it).
    pub fn backward<B: Backend + ?Sized>(&self, b: &mut B, batch: usize, time: usize) -> Result<()> {
        self.check_weights_in_place()?;
        self.backward_with(b, batch, time, &mut |_, _| Ok(()))
    }

    /// [`Model::backward`], calling `on(b, Moment::Backward(l))` before the pass reads block `l`'s weights and
    /// `on(b, Moment::Ready(from))` each time gradients become final: a data-parallel trainer starts reducing them
    /// there, while the rest of the backward pass runs.
    pub fn backward_with<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        batch: usize,
        time: usize,
        on: &mut dyn FnMut(&mut B, Moment) -> Result<()>,
    ) -> Result<()> {
        self.check_batch(batch, time)?;
        let Some(grads) = &self.g else {
            return Err(kiln_core::Error::Invalid("a model built for inference has no gradients".into()));
        };
        // The layout puts each block's tensors after the previous block's, the final norm and an untied LM head
        // last and the embeddings first (see ModelSpec::params), so what is final always runs from a unit's start to
        // the end.
        let s = &self.spec;
        let (last_unit, alternating) = (s.n_layer + 1, self.blocks != Blocks::InPlace);
        if alternating {
            b.zero(self.unit_grads[0])?;
            b.zero(self.unit_grads[last_unit])?;
        }
        let r = Rows::new(Span::Full { batch, time });
        let (c, n, vp, w, aw) = (s.n_embd, r.n(), s.padded_vocab, s.qkv_width(), s.attention_width());
        let att = self.spec.attention_dims(batch, time);
        let lin = |c_in, c_out| MatmulDims { rows: n, c_in, c_out };
        let (dres, dbtc) = (r.of(self.acts.dresidual, c), r.of(self.acts.dbtc, c));
        // With fused bias gradients, a norm's backward pass also sums dres for the projection before it (into
        // dres_sums, added to that bias gradient once its block's gradients are cleared), the product that applies
        // GELU's derivative sums its output for the first MLP layer's bias, and attention's backward sums dqkv for
        // the qkv projection's (unless a rotation follows it: the bias was added before the rotation).
        let fused = self.fused_bias_gradients && s.biases.into_residual();
        let fused_gelu = self.fused_bias_gradients && s.biases.mlp && s.mlp == Mlp::Gelu;
        let fused_qkv = s.attention_bias_sums(self.fused_bias_gradients);
        // A product's own bias gradient, unless it is summed elsewhere.
        let own = |db: Option<Tensor>, elsewhere: bool| if elsewhere { None } else { db };
        let dres_sums = fused.then_some(self.acts.dres_sums);
        // Backward of the norm `nw` of input `inp` that saved `st`: its gradient `dout` is added to dres.
        let norm_backward = |b: &mut B, dout: Tensor, inp: Tensor, nw: NormWeights, gw: NormWeights, st, sums| {
            let NormStats { mean, rstd } = r.stats(st);
            b.norm_backward(NormBackward {
                dinp: dres,
                dweight: gw.weight,
                dbias: gw.bias,
                dout,
                inp: r.of(inp, c),
                weight: nw.weight,
                mean,
                rstd,
                dinp_sums: sums,
                d: self.norm_dims(n),
            })
        };
        let add_sums = |b: &mut B, dbias: Option<Tensor>| match (dres_sums, dbias) {
            (Some(sums), Some(dbias)) => b.add(dbias, sums),
            _ => Ok(()),
        };
        let elementwise = self.recompute == Recompute::Elementwise;

        // LM head, then the final norm: the residual stream's gradient starts here.
        b.matmul_backward(MatmulBackward {
            dinp: dbtc,
            dweight: grads.head,
            dbias: None,
            dout: r.of(self.acts.logits, vp),
            inp: r.of(self.acts.lnf, c),
            weight: self.p.head,
            gelu_pre: None,
            gelu_dbias: None,
            d: lin(c, vp),
        })?;
        b.zero(dres)?;
        let input = self.block_input(s.n_layer);
        norm_backward(b, dbtc, input, self.p.ln_f, grads.ln_f, self.acts.lnf_stats, dres_sums)?;
        on(b, Moment::Ready(self.units[last_unit].start))?;
        for l in (0..s.n_layer).rev() {
            let (a, wt, g) = (&self.acts.blocks[l], &self.p.blocks[l], &grads.blocks[l]);
            on(b, Moment::Backward(l))?;
            if alternating {
                b.zero(self.unit_grads[1 + l])?;
            }
            let (ffn, fc_width) = (s.ffn_dim, s.fc_width());
            // A recomputed activation is written again just before the first operation that reads it (with whole
            // blocks, all of them at once).
            match self.recompute {
                Recompute::None => {}
                Recompute::Elementwise => self.activation(b, r, l)?,
                Recompute::Block => {
                    self.norm_1(b, r, l)?;
                    self.block_to_hidden(b, r, l, None)?;
                    if let (Some(routing), Some(d)) = (a.routing, r.moe(s)) {
                        self.experts_out(b, r, l, routing, d)?;
                    }
                }
            }
            // MLP: dres is the gradient of res3, which flows unchanged to res2 and into the MLP's output.
            if let (Some(routing), Some(d)) = (a.routing, r.moe(s)) {
                self.experts_backward(b, r, l, routing, d, g)?;
            } else {
                let dfch = r.of(self.acts.dfch, ffn);
                let gelu_pre = (s.mlp == Mlp::Gelu).then(|| r.of(a.fch_pre, fc_width));
                add_sums(b, g.fcproj_b)?;
                b.matmul_backward(MatmulBackward {
                    dinp: dfch,
                    dweight: g.fcproj_w,
                    dbias: own(g.fcproj_b, fused),
                    dout: dres,
                    inp: r.of(a.fch, ffn),
                    weight: wt.fcproj_w,
                    gelu_pre,
                    gelu_dbias: if fused_gelu { g.fc_b } else { None },
                    d: lin(ffn, c),
                })?;
                // dfch is now the gradient of GELU's input; SwiGLU's backward takes it to that of the gate and up.
                let dfc_out = match s.mlp {
                    Mlp::Gelu => dfch,
                    Mlp::SwiGlu => {
                        let dpre = r.of(self.acts.dfch_pre, fc_width);
                        b.swiglu_backward(dpre, dfch, r.of(a.fch_pre, fc_width), n, ffn)?;
                        dpre
                    }
                };
                self.norm_2_again(b, r, l)?;
                b.matmul_backward(MatmulBackward {
                    dinp: dbtc,
                    dweight: g.fc_w,
                    dbias: own(g.fc_b, fused_gelu),
                    dout: dfc_out,
                    inp: r.of(a.ln2, c),
                    weight: wt.fc_w,
                    gelu_pre: None,
                    gelu_dbias: None,
                    d: lin(c, fc_width),
                })?;
            }
            norm_backward(b, dbtc, a.res2, wt.ln_2, g.ln_2, a.ln2_stats, dres_sums)?;
            // Attention.
            let dqkv = r.of(self.acts.dqkv, w);
            add_sums(b, g.proj_b)?;
            if elementwise && s.qk_norm {
                self.attention_input(b, r, l, r.of(a.qkv, w), 0)?;
            }
            let datty = r.of(self.acts.dbtc, aw);
            b.matmul_backward(MatmulBackward {
                dinp: datty,
                dweight: g.proj_w,
                dbias: own(g.proj_b, fused),
                dout: dres,
                inp: r.of(a.atty, aw),
                weight: wt.proj_w,
                gelu_pre: None,
                gelu_dbias: None,
                d: lin(aw, c),
            })?;
            b.attention_backward(AttentionBackward {
                dqkv,
                dout: datty,
                qkv: r.of(a.qkv, w),
                out: r.of(a.atty, aw),
                lse: r.of(a.att_lse, s.n_head),
                dbias: if fused_qkv { g.qkv_b } else { None },
                d: att,
            })?;
            if s.rotates(l) {
                b.rope(Rotary { qkv: dqkv, table: self.acts.rope_table, d: att, first_pos: 0, inverse: true })?;
            }
            if let (Some(weight), Some(dweight)) = (wt.qk_norm, g.qk_norm) {
                let (inp, rstd) = (r.of(a.qkv_pre, w), r.of(a.qk_rstd, s.n_head + s.n_kv_head));
                b.qk_norm_backward(QkNormBackward { dqkv, dweight, inp, weight, rstd, d: att })?;
            }
            if elementwise {
                self.norm_1(b, r, l)?;
            }
            b.matmul_backward(MatmulBackward {
                dinp: dbtc,
                dweight: g.qkv_w,
                dbias: own(g.qkv_b, fused_qkv),
                dout: dqkv,
                inp: r.of(a.ln1, c),
                weight: wt.qkv_w,
                gelu_pre: None,
                gelu_dbias: None,
                d: lin(c, w),
            })?;
            // The first block's input is the embeddings', which have no bias.
            let sums = dres_sums.filter(|_| l > 0);
            norm_backward(b, dbtc, self.block_input(l), wt.ln_1, g.ln_1, a.ln1_stats, sums)?;
            on(b, Moment::Ready(self.units[1 + l].start))?;
        }
        b.encoder_backward(grads.wte, grads.wpe, dres, r.of(self.acts.tokens, 1), batch, time, c)?;
        on(b, Moment::Ready(0))
    }

    /// With experts, block `l`'s MLP backward from `dres`, the gradient of its output, to `dbtc`, that of its input
    /// (the norm's output): the combination, the experts' products and nonlinearity, the routing (with the
    /// balancing loss's gradient where training has one) and the router's product, and the dispatch's backward,
    /// which adds each token's share from its experts.
    fn experts_backward<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        r: Rows,
        l: usize,
        routing: Routing,
        d: MoeDims,
        g: &BlockWeights,
    ) -> Result<()> {
        let (s, a, wt, acts) = (&self.spec, &self.acts.blocks[l], &self.p.blocks[l], &self.acts);
        let (c, ffn, fc_width, slots, experts) = (s.n_embd, s.ffn_dim, s.fc_width(), d.slots(), d.experts);
        let (Some(router), Some(drouter)) = (wt.router, g.router) else {
            return Err(kiln_core::Error::Invalid("a model with experts has a router in every block".into()));
        };
        let Routing { probs, weights, chosen, order, place, offsets, dispatched, expert_out } = routing;
        let (weights, chosen, order, place) =
            (r.mlp(s, weights, 1), r.mlp(s, chosen, 1), r.mlp(s, order, 1), r.mlp(s, place, 1));
        let (dexpert_out, dweights) = (r.mlp(s, acts.dexpert_out, c), r.mlp(s, acts.dweights, 1));
        let (dres, dbtc) = (r.of(acts.dresidual, c), r.of(acts.dbtc, c));
        b.moe_combine_backward(MoeCombineBackward {
            dexpert_out,
            dweights,
            dout: dres,
            expert_out: r.mlp(s, expert_out, c),
            weights,
            order,
            place,
            width: c,
            d,
        })?;
        let lin = |c_in, c_out| MatmulDims { rows: slots, c_in, c_out };
        let dfch = r.mlp(s, acts.dfch, ffn);
        b.expert_matmul_backward(ExpertMatmulBackward {
            dinp: dfch,
            dweight: g.fcproj_w,
            dout: dexpert_out,
            inp: r.mlp(s, a.fch, ffn),
            weight: wt.fcproj_w,
            offsets,
            experts,
            d: lin(ffn, c),
        })?;
        let dpre = r.mlp(s, acts.dfch_pre, fc_width);
        b.swiglu_backward(dpre, dfch, r.mlp(s, a.fch_pre, fc_width), slots, ffn)?;
        let ddispatched = r.mlp(s, acts.ddispatched, c);
        b.expert_matmul_backward(ExpertMatmulBackward {
            dinp: ddispatched,
            dweight: g.fc_w,
            dout: dpre,
            inp: r.mlp(s, dispatched, c),
            weight: wt.fc_w,
            offsets,
            experts,
            d: lin(c, fc_width),
        })?;
        let dlogits = r.of(acts.dlogits, experts);
        let balance = s.balances_experts().then_some(acts.balance);
        let normalize = s.normalizes_expert_weights();
        let probs = r.of(probs, experts);
        b.moe_route_backward(MoeRouteBackward { dlogits, dweights, probs, weights, chosen, normalize, balance, d })?;
        self.norm_2_again(b, r, l)?;
        b.matmul_backward(MatmulBackward {
            dinp: dbtc,
            dweight: drouter,
            dbias: None,
            dout: dlogits,
            inp: r.of(a.ln2, c),
            weight: router,
            gelu_pre: None,
            gelu_dbias: None,
            d: MatmulDims { rows: r.n(), c_in: c, c_out: experts },
        })?;
        b.moe_combine(MoeCombine {
            out: dbtc,
            expert_out: ddispatched,
            weights: None,
            place,
            accumulate: true,
            width: c,
            d,
        })
    }

    /// The logits of one position (`row = b·time + t` of the last forward pass), over the real vocabulary.
    pub fn logits_row<B: Backend + ?Sized>(&self, backend: &mut B, row: usize, out: &mut [f32]) -> Result<()> {
        let vp = self.spec.padded_vocab;
        backend.download(self.acts.logits.slice(row * vp, self.spec.vocab), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::config::Config;

    /// Where every operand of the experts' products starts in its arena, for a model whose widths are multiples of
    /// 8 but whose rows (3 × 29) and experts (5) are not: the CUDA engine runs those products grouped only on
    /// 16-byte aligned operands (8 elements of bf16), and otherwise per expert, which a graph cannot capture.
    #[test]
    fn the_experts_operands_start_at_multiples_of_8_elements() {
        let sets = ["model.arch=llama", "model.n_embd=48", "model.n_head=3", "model.ffn_dim=72", "model.block_size=29"];
        let sets: Vec<String> = sets.iter().chain(&["model.experts=5"]).map(|s| s.to_string()).collect();
        let config = Config::load(None, &sets).unwrap();
        let spec = ModelSpec::new(&config.model, 13);
        for recompute in [Recompute::None, Recompute::Elementwise, Recompute::Block] {
            let mut a = Arenas { acts: Arena::counting(), stats: Arena::counting(), index: Arena::counting() };
            let acts = Activations::take(&mut a, &spec, 3, true, recompute);
            for (l, block) in acts.blocks.iter().enumerate() {
                let routing = block.routing.expect("a model with experts routes");
                let operands = [routing.dispatched, routing.expert_out, block.fch_pre, block.fch];
                let operands =
                    operands.into_iter().chain([acts.dfch, acts.dfch_pre, acts.dexpert_out, acts.ddispatched]);
                for (i, t) in operands.enumerate() {
                    assert_eq!(t.offset % 8, 0, "operand {i} of block {l} at element {} ({recompute:?})", t.offset);
                }
            }
        }
    }
}
