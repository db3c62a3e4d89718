//! What a model is: one transformer, its variants described by a [`ModelSpec`].
//!
//! Every model kiln trains is the same stack of pre-norm blocks (a normalisation, attention, a residual add; a
//! normalisation, an MLP, a residual add) between an embedding and an LM head. The families differ in a few
//! places, each a field here: the normalisation, how positions enter, the MLP's nonlinearity, whether the linear
//! layers have biases, how many key/value heads attention has, and whether the LM head is the token embedding. The
//! spec derives the parameter layout ([`ModelSpec::params`]) and the forward and backward passes (`model.rs`)
//! branch on these fields and nothing else, so a new variant is one more case of a field.

use crate::params::{Init, ParamInfo};
use kiln_core::config::{Arch, Experts, LinearGroup, ModelConfig, RopeScaling};
use kiln_core::memory::{MemoryModel, StepShapes};
use kiln_core::{AttentionDims, NormKind};

/// How a block learns where a token is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Positions {
    /// A learned embedding per position, added to the token's (GPT-2).
    Learned,
    /// Queries and keys rotated by position (RoPE), with frequencies `theta^(−2i/head_dim)`, optionally rescaled.
    Rotary { theta: f64, scaling: Option<RopeScaling> },
}

/// The MLP's nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `proj(gelu(fc(x)))`, `fc` of width `ffn_dim` (GPT-2).
    Gelu,
    /// `proj(silu(gate(x)) ⊙ up(x))`, with `gate` and `up` one fused product of width `2·ffn_dim` (Llama).
    SwiGlu,
}

/// Which linear layers have biases (`model.biases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Biases {
    /// Attention's query, key and value projections (one fused product).
    pub qkv: bool,
    /// Attention's output projection.
    pub proj: bool,
    /// The MLP's two products.
    pub mlp: bool,
}

impl Biases {
    pub fn of(set: &[LinearGroup]) -> Self {
        Biases {
            qkv: set.contains(&LinearGroup::Qkv),
            proj: set.contains(&LinearGroup::Proj),
            mlp: set.contains(&LinearGroup::Mlp),
        }
    }

    /// Whether a product that writes into the residual stream (attention's output, the MLP's last) has a bias: its
    /// gradient is the column sums of the residual stream's, which a norm's backward pass can take on the way.
    pub fn into_residual(&self) -> bool {
        self.proj || self.mlp
    }
}

/// The sizes and variants that determine a model's parameters and activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// Channels of each attention head: `n_embd / n_head` but where a Llama-style config sets it.
    pub head_dim: usize,
    pub ffn_dim: usize,
    /// The longest sequence the model sees: learned positions, or the rows of the rotary table.
    pub block_size: usize,
    /// Tokens of the tokenizer.
    pub vocab: usize,
    /// `vocab` rounded up to a multiple of 64, for aligned matrix shapes; the extra rows are never used.
    pub padded_vocab: usize,
    pub norm: NormKind,
    /// ε of every normalisation, as configured (the engines compute with it in f32).
    pub norm_eps: f64,
    pub positions: Positions,
    pub mlp: Mlp,
    pub biases: Biases,
    /// Whether each query and key head is RMS-normalised before the rotation (Qwen3's QK-norm).
    pub qk_norm: bool,
    /// With rotary positions, every this-many-th block does without them (SmolLM3's NoPE layers); see
    /// [`ModelSpec::rotates`].
    pub nope_interval: Option<usize>,
    /// Keys each query sees in every block, itself the last (sliding-window attention); none: every earlier one.
    pub sliding_window: Option<usize>,
    /// With experts, each block's MLP is `count` SwiGLU MLPs of width `ffn_dim`, of which a router (a matrix of its
    /// own) picks `per_token` for each token (see `kiln_core::experts`).
    pub experts: Option<Experts>,
    /// Whether the LM head is the token embedding.
    pub tie_embeddings: bool,
}

/// Standard deviation of the initial weights of every matrix.
const INIT_STD: f32 = 0.02;

impl ModelSpec {
    /// The model a config describes, for a tokenizer of `vocab` tokens.
    pub fn new(m: &ModelConfig, vocab: usize) -> Self {
        let llama = m.arch == Arch::Llama;
        ModelSpec {
            arch: m.arch,
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_kv_head: m.n_kv_head(),
            n_embd: m.n_embd,
            head_dim: m.head_dim(),
            ffn_dim: m.ffn_dim(),
            block_size: m.block_size,
            vocab,
            // Saturating: a vocabulary too large to pad is refused by check_size.
            padded_vocab: vocab.div_ceil(64).saturating_mul(64),
            norm: if llama { NormKind::Rms } else { NormKind::Layer },
            norm_eps: m.norm_eps(),
            positions: match m.rope_theta() {
                Some(theta) => Positions::Rotary { theta, scaling: m.rope_scaling },
                None => Positions::Learned,
            },
            mlp: if llama { Mlp::SwiGlu } else { Mlp::Gelu },
            biases: Biases::of(&m.biases()),
            qk_norm: m.qk_norm(),
            nope_interval: m.nope_interval,
            sliding_window: m.sliding_window,
            experts: m.experts(),
            tie_embeddings: m.tie_embeddings(),
        }
    }

    /// GPT-2 of the given sizes (the LM head tied, the MLP 4·n_embd wide, ε = 1e-5).
    pub fn gpt2(n_layer: usize, n_head: usize, n_embd: usize, block_size: usize, vocab: usize) -> Self {
        let config = ModelConfig {
            arch: Arch::Gpt2,
            n_layer,
            n_head,
            n_embd,
            block_size,
            n_kv_head: None,
            head_dim: None,
            ffn_dim: None,
            norm_eps: None,
            tie_embeddings: None,
            rope_theta: None,
            rope_scaling: None,
            qk_norm: None,
            nope_interval: None,
            sliding_window: None,
            experts: None,
            experts_per_token: None,
            normalize_expert_weights: None,
            router_aux_loss: None,
            biases: None,
            init: None,
            attention: Default::default(),
        };
        ModelSpec::new(&config, vocab)
    }

    /// Width of attention's output, the output projection's input: `n_head · head_dim`.
    pub fn attention_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Whether block `l` (from 0) rotates its queries and keys: with rotary positions, all but every
    /// `nope_interval`-th.
    pub fn rotates(&self, l: usize) -> bool {
        matches!(self.positions, Positions::Rotary { .. })
            && self.nope_interval.is_none_or(|k| (l + 1).checked_rem(k) != Some(0))
    }

    /// The shape of attention over `batch` sequences of `time` positions.
    pub fn attention_dims(&self, batch: usize, time: usize) -> AttentionDims {
        AttentionDims {
            kv_heads: self.n_kv_head,
            window: self.sliding_window,
            ..AttentionDims::causal(batch, time, self.n_head, self.head_dim)
        }
    }

    /// Width of a row of the fused query/key/value projection: the queries, then the keys, then the values.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }

    /// Width of the MLP's first product: the hidden layer, or for SwiGLU its gate and up halves.
    pub fn fc_width(&self) -> usize {
        match self.mlp {
            Mlp::Gelu => self.ffn_dim,
            Mlp::SwiGlu => 2 * self.ffn_dim,
        }
    }

    /// The MLPs of a block: its experts, or the one.
    pub fn mlps(&self) -> usize {
        self.experts.map_or(1, |e| e.count)
    }

    /// Whether training adds a load-balancing loss for the experts (a coefficient above 0).
    pub fn balances_experts(&self) -> bool {
        self.experts.is_some_and(|e| e.aux_loss > 0.0)
    }

    /// Whether a token's experts' weights are divided by their sum (see [`Experts::normalize`]).
    pub fn normalizes_expert_weights(&self) -> bool {
        self.experts.is_some_and(|e| e.normalize)
    }

    /// Rows of a block's MLP for `rows` tokens: each token's once per expert it goes to.
    pub fn mlp_rows(&self, rows: usize) -> usize {
        rows * self.experts.map_or(1, |e| e.per_token)
    }

    /// Whether attention's backward pass sums its input gradient for the qkv projection's bias gradient when bias
    /// gradients are `fused` (see `Model::fuse_bias_gradients`): not with rotary positions, since the bias was added
    /// before the rotation that the backward pass undoes after attention's.
    pub fn attention_bias_sums(&self, fused: bool) -> bool {
        fused && self.biases.qkv && !matches!(self.positions, Positions::Rotary { .. })
    }

    /// The widest bias of a linear layer: the most columns a bias gradient sums (0 without biases).
    fn max_bias_width(&self) -> usize {
        let b = &self.biases;
        let widths = [(b.qkv, self.qkv_width()), (b.proj, self.n_embd), (b.mlp, self.fc_width().max(self.n_embd))];
        widths.iter().filter(|(biased, _)| *biased).map(|&(_, width)| width).max().unwrap_or(0)
    }

    /// The shapes of a training step over micro-batches of `micro_batch` sequences, for an engine's working memory,
    /// with bias gradients `fused` or not.
    pub fn step_shapes(&self, micro_batch: usize, fused: bool) -> StepShapes {
        let attention = self.attention_dims(micro_batch, self.block_size);
        StepShapes {
            rows: micro_batch * self.block_size,
            n_embd: self.n_embd,
            max_bias_width: self.max_bias_width(),
            attention,
            norm_bias_sums: fused && self.biases.into_residual(),
            attention_bias_sums: self.attention_bias_sums(fused),
            qk_norm: self.qk_norm,
        }
    }

    /// The parameter tensors in layout order.
    ///
    /// Order: `wte`, `wpe` (learned positions), then each block's tensors, then the final norm and, when it is not
    /// tied, the LM head. Within a block the weight matrices (four; with experts, five: the router's after
    /// attention's) come first and the vectors (biases and norm parameters) after them, so that the weights that take
    /// weight decay form one contiguous run per block and a block's gradients are contiguous (a data-parallel
    /// reduction can start on a block as soon as its backward pass is done). Everything from any block on is final
    /// once the backward pass has passed that block, since the tensors after the blocks (final norm, LM head) are the
    /// first it finishes.
    ///
    /// Each unit (see [`ParamInfo::unit`]) starts at a multiple of `unit_align` elements, zeros between: ZeRO stage 2
    /// cuts every unit into equal pieces, one per rank.
    pub fn params_aligned(&self, unit_align: usize) -> Vec<ParamInfo> {
        let (c, l, f) = (self.n_embd, self.n_layer, self.ffn_dim);
        // GPT-2 scales the init of the projections that write into the residual stream by 1/√(2·n_layer), so
        // that the stream's variance does not grow with depth.
        let residual_std = INIT_STD / ((2 * l) as f32).sqrt();
        let layer_norm = self.norm == NormKind::Layer;
        let mut list = Vec::new();
        // The unit of the tensors pushed: the embeddings, then each block, then the final norm and head.
        let unit = std::cell::Cell::new(0);
        let mut push = |name: String, shape: Vec<usize>, init: Init, decay: bool| {
            list.push(ParamInfo { name, shape, init, decay, offset: 0, unit: unit.get() });
        };
        push("wte".into(), vec![self.padded_vocab, c], Init::Normal(INIT_STD), true);
        if self.positions == Positions::Learned {
            push("wpe".into(), vec![self.block_size, c], Init::Normal(INIT_STD), true);
        }
        for i in 0..l {
            unit.set(1 + i);
            let p = |n: &str| format!("h.{i}.{n}");
            push(p("attn.qkv.weight"), vec![self.qkv_width(), c], Init::Normal(INIT_STD), true);
            push(p("attn.proj.weight"), vec![c, self.attention_width()], Init::Normal(residual_std), true);
            // With experts, their matrices one after another, after the router's.
            if let Some(experts) = self.experts {
                push(p("mlp.router.weight"), vec![experts.count, c], Init::Normal(INIT_STD), true);
            }
            let mlps = self.mlps();
            push(p("mlp.fc.weight"), vec![mlps * self.fc_width(), c], Init::Normal(INIT_STD), true);
            push(p("mlp.proj.weight"), vec![mlps * c, f], Init::Normal(residual_std), true);
            push(p("ln_1.weight"), vec![c], Init::Ones, false);
            if layer_norm {
                push(p("ln_1.bias"), vec![c], Init::Zeros, false);
            }
            if self.biases.qkv {
                push(p("attn.qkv.bias"), vec![self.qkv_width()], Init::Zeros, false);
            }
            if self.qk_norm {
                // The queries' weight, then the keys'.
                push(p("attn.qk_norm.weight"), vec![2 * self.head_dim], Init::Ones, false);
            }
            if self.biases.proj {
                push(p("attn.proj.bias"), vec![c], Init::Zeros, false);
            }
            push(p("ln_2.weight"), vec![c], Init::Ones, false);
            if layer_norm {
                push(p("ln_2.bias"), vec![c], Init::Zeros, false);
            }
            if self.biases.mlp {
                push(p("mlp.fc.bias"), vec![self.fc_width()], Init::Zeros, false);
                push(p("mlp.proj.bias"), vec![c], Init::Zeros, false);
            }
        }
        unit.set(l + 1);
        push("ln_f.weight".into(), vec![c], Init::Ones, false);
        if layer_norm {
            push("ln_f.bias".into(), vec![c], Init::Zeros, false);
        }
        if !self.tie_embeddings {
            push("lm_head".into(), vec![self.padded_vocab, c], Init::Normal(INIT_STD), true);
        }
        let mut offset = 0usize;
        for i in 0..list.len() {
            if i > 0 && list[i].unit != list[i - 1].unit {
                offset = offset.next_multiple_of(unit_align);
            }
            list[i].offset = offset;
            offset += list[i].len();
        }
        list
    }

    /// Fails, naming the key, where `engine` cannot run this model (heads wider than its attention takes).
    /// Building a model and planning its memory check this before anything is allocated.
    pub fn check_engine(&self, engine: &dyn MemoryModel) -> kiln_core::Result<()> {
        match engine.max_head_dim() {
            Some(most) if self.head_dim > most => Err(kiln_core::Error::Usage(format!(
                "heads of {} channels (model.head_dim, n_embd / n_head unless set): the {} engine's attention takes \
                 at most {most}",
                self.head_dim,
                engine.engine()
            ))),
            _ => Ok(()),
        }
    }

    /// Fails, naming the sizes, unless a model of this shape for batches of `max_batch` sequences is of a size that
    /// a machine could hold: with sizes past that, the arithmetic that lays the model out could overflow, and its
    /// per-layer tables alone could exhaust the host. Building a model and planning its memory check this first.
    pub fn check_size(&self, max_batch: usize) -> kiln_core::Result<()> {
        /// Elements (2^50: 4 PiB of fp32), beyond any machine's memory and far from overflowing a `usize`.
        const MOST: f64 = (1u64 << 50) as f64;
        if self.vocab == 0 || self.vocab > 1 << 31 {
            let message = format!("a vocabulary of {} tokens: kiln's token ids are 1 to 2^31", self.vocab);
            return Err(kiln_core::Error::Usage(message));
        }
        // In f64, which no size overflows.
        let (c, layers, heads) = (self.n_embd as f64, self.n_layer as f64, self.n_head as f64);
        let (vocab, ffn, time) = (self.padded_vocab as f64, self.ffn_dim as f64, self.block_size as f64);
        let head_dim = self.head_dim as f64;
        let qkv = head_dim * (heads + 2.0 * self.n_kv_head as f64);
        let (mlps, mlp_rows) = (self.mlps() as f64, self.mlp_rows(1) as f64);
        let per_block = (qkv + 3.0 * ffn * mlps + mlps + 8.0) * (c + 1.0) + c * heads * head_dim + 2.0 * head_dim;
        // The weights with their gradients and two moments, and the activations of every row.
        let weights = 4.0 * (layers * per_block + 2.0 * vocab * c + time * c);
        let per_row = 2.0 * qkv + (3.0 * ffn + 2.0 * c) * mlp_rows + 8.0 * c + heads + 2.0 * mlps;
        let activations = max_batch as f64 * time * (layers * per_row + vocab);
        if weights + activations > MOST {
            let message = format!(
                "a model of {} layers {} wide (MLP {}, vocabulary {}) in batches of {max_batch} × {} tokens needs \
                 about {:.1e} numbers, more than any machine holds",
                self.n_layer,
                self.n_embd,
                self.ffn_dim,
                self.vocab,
                self.block_size,
                weights + activations
            );
            return Err(kiln_core::Error::Usage(message));
        }
        Ok(())
    }

    /// The parameter tensors in layout order, packed (see [`Self::params_aligned`]).
    pub fn params(&self) -> Vec<ParamInfo> {
        self.params_aligned(1)
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(ParamInfo::len).sum()
    }

    /// Parameters excluding the position embeddings and the unused padded rows of the embedding and LM head, as
    /// GPT-2's papers and MFU formulas count them.
    pub fn num_counted_params(&self) -> usize {
        let unused_rows = (self.padded_vocab - self.vocab) * if self.tie_embeddings { 1 } else { 2 };
        let positions = if self.positions == Positions::Learned { self.block_size } else { 0 };
        self.num_params() - (unused_rows + positions) * self.n_embd
    }

    /// The counted parameters ([`Self::num_counted_params`]) that each token's arithmetic uses: with experts, only
    /// the MLPs of those it goes to.
    pub fn num_active_params(&self) -> usize {
        let unused = self.experts.map_or(0, |e| e.count - e.per_token);
        let mlp = (self.fc_width() + self.ffn_dim) * self.n_embd;
        self.num_counted_params() - self.n_layer * unused * mlp
    }

    /// Arithmetic of a training step per token, on sequences of `t` tokens: 6 per active counted parameter (2
    /// forward, 4 backward) plus attention's 6·L·C·T (its two products, forward and backward), as llm.c and the
    /// anchors count for MFU, with C attention's width (`n_embd` unless the heads are set wider or narrower). A
    /// sliding window shorter than the sequence counts in its place, as it stands in its place in the products.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let keys = self.sliding_window.map_or(t, |w| w.min(t));
        6.0 * self.num_active_params() as f64 + 6.0 * (self.n_layer * self.attention_width() * keys) as f64
    }

    /// Whether `name` is a matrix with a row per token (the embedding, the LM head), whose padded rows are unused.
    pub fn has_vocab_rows(name: &str) -> bool {
        name == "wte" || name == "lm_head"
    }

    /// Elements of [`ModelSpec::rope_table`].
    pub fn rope_table_len(&self) -> usize {
        match self.positions {
            Positions::Learned => 0,
            Positions::Rotary { .. } => self.block_size * self.head_dim,
        }
    }

    /// The rotary table for [`kiln_core::Rotary`]: `cos θ` for every position below `block_size` and pair `i`, then
    /// `sin θ`, `θ = p·freq[i]`; empty for learned positions.
    ///
    /// The frequencies and angles are computed in f32 as transformers computes them (`1/theta^(2i/d)`, then the
    /// product with the position), so that a model loaded from Hugging Face sees the same angles; their cosines
    /// and sines are taken in f64 and rounded once. More than the host can hold (heads and contexts of absurd sizes)
    /// is an out-of-memory error.
    pub fn rope_table(&self) -> kiln_core::Result<Vec<f32>> {
        let Positions::Rotary { theta, scaling } = self.positions else { return Ok(Vec::new()) };
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let mut table = Vec::new();
        if table.try_reserve_exact(self.rope_table_len()).is_err() {
            let bytes = kiln_core::memory::describe_bytes(4 * self.rope_table_len() as u64);
            let message = format!("the rotary table ({} positions × head_dim {}) needs {bytes}", self.block_size, d);
            return Err(kiln_core::Error::OutOfMemory { backend: "host".into(), message });
        }
        table.resize(self.rope_table_len(), 0.0f32);
        let (cos, sin) = table.split_at_mut(self.block_size * half);
        for i in 0..half {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32);
            let freq = scaling.map_or(freq, |s| llama3_scaled(freq, &s));
            for p in 0..self.block_size {
                let angle = (p as f32 * freq) as f64;
                cos[p * half + i] = angle.cos() as f32;
                sin[p * half + i] = angle.sin() as f32;
            }
        }
        Ok(table)
    }
}

/// One rotary frequency under Llama 3's rescaling (see [`RopeScaling`]), in f32 as transformers computes it.
fn llama3_scaled(freq: f32, s: &RopeScaling) -> f32 {
    let (factor, low, high) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32);
    let old_context = s.original_max_position_embeddings as f32;
    let wavelength = 2.0 * std::f32::consts::PI / freq;
    if wavelength < old_context / high {
        freq
    } else if wavelength > old_context / low {
        freq / factor
    } else {
        let smooth = (old_context / wavelength - low) / (high - low);
        (1.0 - smooth) * freq / factor + smooth * freq
    }
}
