//! GPT-2's forward and backward passes, one layer at a time.
//!
//! Forward, for tokens `x` of a `(B, T)` batch:
//! ```text
//! h = wte[x] + wpe[0..T]
//! for each block:   a = h + proj(attention(qkv(ln_1(h))))
//!                   h = a + proj(gelu(fc(ln_2(a))))
//! logits = ln_f(h) · wteᵀ          (the LM head shares the token embedding)
//! loss   = cross_entropy(logits[..vocab], targets)
//! ```
//! Each residual add is fused with the layer norm that follows it. The backward pass walks the same steps in
//! reverse, accumulating weight gradients into one flat gradient vector laid out like the parameters.

use crate::params::{self, GptShape, ParamInfo};
use kiln_core::{AttentionDims, Backend, MatmulDims, Result, Role, Tensor};

/// What a forward pass computes beyond the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pass {
    /// Logits only (sampling).
    Logits,
    /// Losses too, accumulated into [`Gpt::losses`] (evaluation).
    Loss,
    /// Losses, and the logits replaced by the gradient of `dloss · Σ losses`, ready for [`Gpt::backward`].
    Train { dloss: f32 },
}

/// Which positions a forward pass computes.
#[derive(Clone, Copy)]
enum Span {
    /// Every position of a `batch × time` batch.
    Full { batch: usize, time: usize },
    /// One new position of a single sequence, attending to the cached ones before it.
    Decode { pos: usize },
}

/// Views of every weight (of the parameters, or of their gradients: the layouts are the same).
#[derive(Clone, Debug)]
struct Weights {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<BlockWeights>,
    lnf_w: Tensor,
    lnf_b: Tensor,
}

#[derive(Clone, Debug)]
struct BlockWeights {
    ln1_w: Tensor,
    ln1_b: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    fc_w: Tensor,
    fc_b: Tensor,
    fcproj_w: Tensor,
    fcproj_b: Tensor,
}

impl Weights {
    fn new(layout: &[ParamInfo], flat: Tensor, n_layer: usize) -> Self {
        let view = |name: &str| {
            let p = layout.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no parameter {name}"));
            p.view(flat)
        };
        let blocks = (0..n_layer)
            .map(|i| {
                let v = |n: &str| view(&format!("h.{i}.{n}"));
                BlockWeights {
                    ln1_w: v("ln_1.weight"),
                    ln1_b: v("ln_1.bias"),
                    qkv_w: v("attn.qkv.weight"),
                    qkv_b: v("attn.qkv.bias"),
                    proj_w: v("attn.proj.weight"),
                    proj_b: v("attn.proj.bias"),
                    ln2_w: v("ln_2.weight"),
                    ln2_b: v("ln_2.bias"),
                    fc_w: v("mlp.fc.weight"),
                    fc_b: v("mlp.fc.bias"),
                    fcproj_w: v("mlp.proj.weight"),
                    fcproj_b: v("mlp.proj.bias"),
                }
            })
            .collect();
        Weights { wte: view("wte"), wpe: view("wpe"), blocks, lnf_w: view("ln_f.weight"), lnf_b: view("ln_f.bias") }
    }
}

/// The activations one block saves for its backward pass, each sized for the largest batch.
#[derive(Clone, Debug)]
struct BlockActivations {
    /// `ln_1` of the block's input (written by the previous block's fused residual add and norm).
    ln1: Tensor,
    ln1_mean: Tensor,
    ln1_rstd: Tensor,
    qkv: Tensor,
    atty: Tensor,
    att_lse: Tensor,
    /// The residual stream after attention.
    res2: Tensor,
    ln2: Tensor,
    ln2_mean: Tensor,
    ln2_rstd: Tensor,
    fch_pre: Tensor,
    fch: Tensor,
    /// The residual stream after the MLP: the next block's input.
    res3: Tensor,
}

/// A GPT-2 whose parameters, gradients and activations live on a backend, sized for batches of up to
/// `max_batch` sequences of up to `block_size` tokens.
pub struct Gpt {
    pub shape: GptShape,
    pub layout: Vec<ParamInfo>,
    pub max_batch: usize,
    /// All parameters, in [`Self::layout`] order.
    pub params: Tensor,
    /// Their gradients, same layout.
    pub grads: Tensor,
    /// Per-position losses, accumulated by [`Pass::Loss`] and [`Pass::Train`] passes.
    pub losses: Tensor,
    p: Weights,
    g: Weights,
    tokens: Tensor,
    targets: Tensor,
    encoded: Tensor,
    blocks: Vec<BlockActivations>,
    lnf: Tensor,
    lnf_mean: Tensor,
    lnf_rstd: Tensor,
    logits: Tensor,
    // The output of a block's attention or MLP projection, which the residual add that follows consumes at once and
    // the backward pass never reads: one buffer for both in every block.
    proj: Tensor,
    // Gradient buffers reused by every block during the backward pass.
    dresidual: Tensor,
    dbtc: Tensor,
    dqkv: Tensor,
    dfch: Tensor,
}

/// Hands out consecutive views of one allocation.
struct Arena {
    whole: Tensor,
    used: usize,
}

impl Arena {
    fn new<B: Backend + ?Sized>(backend: &mut B, len: usize, role: Role) -> Result<Self> {
        Ok(Arena { whole: backend.alloc(len, role)?, used: 0 })
    }

    fn take(&mut self, len: usize) -> Tensor {
        let t = self.whole.slice(self.used, len);
        self.used += len;
        t
    }
}

impl Gpt {
    /// Allocates everything the model will ever use and initialises the weights from `seed`.
    pub fn new<B: Backend + ?Sized>(backend: &mut B, shape: GptShape, max_batch: usize, seed: u64) -> Result<Self> {
        Gpt::with_padding(backend, shape, max_batch, seed, 1)
    }

    /// [`Gpt::new`] with the flat parameter and gradient vectors padded with zeros to a multiple of `multiple`
    /// elements, so that a data-parallel job can cut them into equal pieces, one per rank.
    pub fn with_padding<B: Backend + ?Sized>(
        backend: &mut B,
        shape: GptShape,
        max_batch: usize,
        seed: u64,
        multiple: usize,
    ) -> Result<Self> {
        let layout = shape.params();
        let padded = shape.num_params().next_multiple_of(multiple);
        let params = backend.alloc(padded, Role::Param)?;
        let grads = backend.alloc(padded, Role::Grad)?;
        params::initialize(backend, &shape, params, seed)?;

        let (c, l, t) = (shape.n_embd, shape.n_layer, shape.block_size);
        let n = max_batch * t;
        let lse_len = max_batch * shape.n_head * t;
        // Activations: per block 2C (ln1, atty) + 3C (qkv) + 2C (res2, ln2) + 8C (fch_pre, fch) + C (res3); then
        // encoded, lnf, logits, proj, and the backward pass's gradient buffers.
        let per_block = n * c * 16;
        let act_len = l * per_block + 3 * n * c + n * shape.padded_vocab + n * c * (1 + 1 + 3 + 4);
        let mut acts = Arena::new(backend, act_len, Role::Activation)?;
        let stat_len = l * (4 * n + lse_len) + 2 * n + n;
        let mut stats = Arena::new(backend, stat_len, Role::Stat)?;
        let mut index = Arena::new(backend, 2 * n, Role::Index)?;

        let blocks = (0..l)
            .map(|_| BlockActivations {
                ln1: acts.take(n * c),
                ln1_mean: stats.take(n),
                ln1_rstd: stats.take(n),
                qkv: acts.take(n * 3 * c),
                atty: acts.take(n * c),
                att_lse: stats.take(lse_len),
                res2: acts.take(n * c),
                ln2: acts.take(n * c),
                ln2_mean: stats.take(n),
                ln2_rstd: stats.take(n),
                fch_pre: acts.take(n * 4 * c),
                fch: acts.take(n * 4 * c),
                res3: acts.take(n * c),
            })
            .collect();
        let model = Gpt {
            p: Weights::new(&layout, params, l),
            g: Weights::new(&layout, grads, l),
            shape,
            layout,
            max_batch,
            params,
            grads,
            losses: stats.take(n),
            tokens: index.take(n),
            targets: index.take(n),
            encoded: acts.take(n * c),
            blocks,
            lnf: acts.take(n * c),
            lnf_mean: stats.take(n),
            lnf_rstd: stats.take(n),
            logits: acts.take(n * shape.padded_vocab),
            proj: acts.take(n * c),
            dresidual: acts.take(n * c),
            dbtc: acts.take(n * c),
            dqkv: acts.take(n * 3 * c),
            dfch: acts.take(n * 4 * c),
        };
        debug_assert_eq!((acts.used, stats.used), (act_len, stat_len));
        Ok(model)
    }

    fn check_batch(&self, batch: usize, time: usize) -> Result<()> {
        if batch == 0 || batch > self.max_batch || time == 0 || time > self.shape.block_size {
            return Err(kiln_core::Error::Invalid(format!(
                "a batch of {batch}×{time} does not fit a model built for {}×{}",
                self.max_batch, self.shape.block_size
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
        backend.upload_indices(self.tokens.slice(0, tokens.len()), tokens)?;
        if let Some(targets) = targets {
            backend.upload_indices(self.targets.slice(0, targets.len()), targets)?;
        }
        Ok(())
    }

    /// Runs the model on the batch last loaded. Losses accumulate into [`Self::losses`] (zero it first).
    pub fn forward<B: Backend + ?Sized>(&self, b: &mut B, batch: usize, time: usize, pass: Pass) -> Result<()> {
        self.check_batch(batch, time)?;
        self.forward_span(b, Span::Full { batch, time }, pass)
    }

    /// Runs one new `token` at position `pos` of a single sequence whose earlier positions went through
    /// [`Gpt::forward`] (batch 1) or earlier calls of this: each block's `qkv` activation is the key/value cache,
    /// so the step costs one position, not the whole context. Its logits are row 0 of [`Gpt::logits_row`].
    pub fn decode_step<B: Backend + ?Sized>(&self, b: &mut B, token: u32, pos: usize) -> Result<()> {
        if pos >= self.shape.block_size {
            return Err(kiln_core::Error::Invalid(format!(
                "position {pos} is past block_size {}",
                self.shape.block_size
            )));
        }
        self.load_batch(b, &[token], None)?;
        self.forward_span(b, Span::Decode { pos }, Pass::Logits)
    }

    fn forward_span<B: Backend + ?Sized>(&self, b: &mut B, span: Span, pass: Pass) -> Result<()> {
        let s = &self.shape;
        let (batch, time) = match span {
            Span::Full { batch, time } => (batch, time),
            Span::Decode { .. } => (1, 1),
        };
        let (c, n) = (s.n_embd, batch * time);
        let rows = |t: Tensor, width: usize| t.slice(0, n * width);
        let att = AttentionDims::causal(batch, time, s.n_head, s.head_dim());
        let lin = |c_in, c_out| MatmulDims { rows: n, c_in, c_out };
        // A decoded token's position embedding is row `pos`; its queries, keys and values go to row `pos` of the
        // cache; everything else about it is a one-row batch.
        let (wpe, qkv_rows) = match span {
            Span::Full { .. } => (self.p.wpe, n),
            Span::Decode { pos } => (self.p.wpe.slice(pos * c, c), pos + 1),
        };
        let new_qkv = |qkv: Tensor| match span {
            Span::Full { .. } => rows(qkv, 3 * c),
            Span::Decode { pos } => qkv.slice(pos * 3 * c, 3 * c),
        };

        b.encoder_forward(rows(self.encoded, c), rows(self.tokens, 1), self.p.wte, wpe, batch, time, c)?;
        let first = &self.blocks[0];
        let pw = &self.p.blocks[0];
        b.layernorm_forward(
            rows(first.ln1, c),
            rows(first.ln1_mean, 1),
            rows(first.ln1_rstd, 1),
            rows(self.encoded, c),
            pw.ln1_w,
            pw.ln1_b,
            n,
            c,
        )?;
        for (l, (a, w)) in self.blocks.iter().zip(&self.p.blocks).enumerate() {
            let residual = if l == 0 { self.encoded } else { self.blocks[l - 1].res3 };
            b.matmul_forward(new_qkv(a.qkv), rows(a.ln1, c), w.qkv_w, Some(w.qkv_b), None, lin(c, 3 * c))?;
            let cache = a.qkv.slice(0, qkv_rows * 3 * c);
            match span {
                Span::Full { .. } => {
                    b.attention_forward(rows(a.atty, c), a.att_lse.slice(0, batch * s.n_head * time), cache, att)?
                }
                Span::Decode { pos } => {
                    b.attention_decode(rows(a.atty, c), cache, pos, AttentionDims { time: pos + 1, ..att })?
                }
            }
            b.matmul_forward(rows(self.proj, c), rows(a.atty, c), w.proj_w, Some(w.proj_b), None, lin(c, c))?;
            b.residual_layernorm_forward(
                rows(a.res2, c),
                rows(a.ln2, c),
                rows(a.ln2_mean, 1),
                rows(a.ln2_rstd, 1),
                rows(residual, c),
                rows(self.proj, c),
                w.ln2_w,
                w.ln2_b,
                n,
                c,
            )?;
            b.matmul_forward(
                rows(a.fch, 4 * c),
                rows(a.ln2, c),
                w.fc_w,
                Some(w.fc_b),
                Some(rows(a.fch_pre, 4 * c)),
                lin(c, 4 * c),
            )?;
            b.matmul_forward(
                rows(self.proj, c),
                rows(a.fch, 4 * c),
                w.fcproj_w,
                Some(w.fcproj_b),
                None,
                lin(4 * c, c),
            )?;
            // The residual add that ends this block, fused with the norm that starts the next (or ln_f).
            let (ln, mean, rstd, nw, nb) = match (self.blocks.get(l + 1), self.p.blocks.get(l + 1)) {
                (Some(next), Some(nw)) => (next.ln1, next.ln1_mean, next.ln1_rstd, nw.ln1_w, nw.ln1_b),
                _ => (self.lnf, self.lnf_mean, self.lnf_rstd, self.p.lnf_w, self.p.lnf_b),
            };
            b.residual_layernorm_forward(
                rows(a.res3, c),
                rows(ln, c),
                rows(mean, 1),
                rows(rstd, 1),
                rows(a.res2, c),
                rows(self.proj, c),
                nw,
                nb,
                n,
                c,
            )?;
        }
        let vp = s.padded_vocab;
        b.matmul_forward(rows(self.logits, vp), rows(self.lnf, c), self.p.wte, None, None, lin(c, vp))?;
        let dloss = match pass {
            Pass::Logits => return Ok(()),
            Pass::Loss => None,
            Pass::Train { dloss } => Some(dloss),
        };
        b.classifier(rows(self.logits, vp), rows(self.losses, 1), rows(self.targets, 1), n, s.vocab, vp, dloss)
    }

    /// Accumulates the gradients of the last [`Pass::Train`] forward pass (same batch shape) into
    /// [`Self::grads`].
    pub fn backward<B: Backend + ?Sized>(&self, b: &mut B, batch: usize, time: usize) -> Result<()> {
        self.backward_with(b, batch, time, &mut |_, _| Ok(()))
    }

    /// [`Gpt::backward`], calling `on_ready(b, from)` each time the gradients from element `from` of
    /// [`Self::grads`] to its end are final (after the final norm, after each block, from the last to the first,
    /// and with `from = 0` after the embeddings): a data-parallel trainer starts reducing them there, while the
    /// rest of the backward pass runs.
    pub fn backward_with<B: Backend + ?Sized>(
        &self,
        b: &mut B,
        batch: usize,
        time: usize,
        on_ready: &mut dyn FnMut(&mut B, usize) -> Result<()>,
    ) -> Result<()> {
        self.check_batch(batch, time)?;
        // The layout puts each block's tensors after the previous block's, the final norm last and the
        // embeddings first (see params.rs), so what is final always runs from some offset to the end.
        let ready_from = |t: Tensor| t.offset - self.grads.offset;
        let s = &self.shape;
        let (c, n, vp) = (s.n_embd, batch * time, s.padded_vocab);
        let rows = |t: Tensor, width: usize| t.slice(0, n * width);
        let att = AttentionDims::causal(batch, time, s.n_head, s.head_dim());
        let lin = |c_in, c_out| MatmulDims { rows: n, c_in, c_out };
        let (dres, dbtc) = (rows(self.dresidual, c), rows(self.dbtc, c));

        // LM head, then ln_f: the residual stream's gradient starts here.
        b.matmul_backward(
            dbtc,
            self.g.wte,
            None,
            rows(self.logits, vp),
            rows(self.lnf, c),
            self.p.wte,
            None,
            lin(c, vp),
        )?;
        b.zero(dres)?;
        let last = &self.blocks[s.n_layer - 1];
        b.layernorm_backward(
            dres,
            self.g.lnf_w,
            self.g.lnf_b,
            dbtc,
            rows(last.res3, c),
            self.p.lnf_w,
            rows(self.lnf_mean, 1),
            rows(self.lnf_rstd, 1),
            n,
            c,
        )?;
        on_ready(b, ready_from(self.g.lnf_w))?;
        for l in (0..s.n_layer).rev() {
            let (a, w, g) = (&self.blocks[l], &self.p.blocks[l], &self.g.blocks[l]);
            let residual = if l == 0 { self.encoded } else { self.blocks[l - 1].res3 };
            let dfch = rows(self.dfch, 4 * c);
            // MLP: dres is the gradient of res3, which flows unchanged to res2 and into the MLP's output.
            b.matmul_backward(
                dfch,
                g.fcproj_w,
                Some(g.fcproj_b),
                dres,
                rows(a.fch, 4 * c),
                w.fcproj_w,
                Some(rows(a.fch_pre, 4 * c)),
                lin(4 * c, c),
            )?;
            b.matmul_backward(dbtc, g.fc_w, Some(g.fc_b), dfch, rows(a.ln2, c), w.fc_w, None, lin(c, 4 * c))?;
            b.layernorm_backward(
                dres,
                g.ln2_w,
                g.ln2_b,
                dbtc,
                rows(a.res2, c),
                w.ln2_w,
                rows(a.ln2_mean, 1),
                rows(a.ln2_rstd, 1),
                n,
                c,
            )?;
            // Attention.
            let dqkv = rows(self.dqkv, 3 * c);
            b.matmul_backward(dbtc, g.proj_w, Some(g.proj_b), dres, rows(a.atty, c), w.proj_w, None, lin(c, c))?;
            b.attention_backward(
                dqkv,
                dbtc,
                rows(a.qkv, 3 * c),
                rows(a.atty, c),
                a.att_lse.slice(0, batch * s.n_head * time),
                att,
            )?;
            b.matmul_backward(dbtc, g.qkv_w, Some(g.qkv_b), dqkv, rows(a.ln1, c), w.qkv_w, None, lin(c, 3 * c))?;
            b.layernorm_backward(
                dres,
                g.ln1_w,
                g.ln1_b,
                dbtc,
                rows(residual, c),
                w.ln1_w,
                rows(a.ln1_mean, 1),
                rows(a.ln1_rstd, 1),
                n,
                c,
            )?;
            on_ready(b, ready_from(g.qkv_w))?;
        }
        b.encoder_backward(self.g.wte, self.g.wpe, dres, rows(self.tokens, 1), batch, time, c)?;
        on_ready(b, 0)
    }

    /// The logits of one position (`row = b·time + t` of the last forward pass), over the real vocabulary.
    pub fn logits_row<B: Backend + ?Sized>(&self, backend: &mut B, row: usize, out: &mut [f32]) -> Result<()> {
        let vp = self.shape.padded_vocab;
        backend.download(self.logits.slice(row * vp, self.shape.vocab), out)
    }
}
