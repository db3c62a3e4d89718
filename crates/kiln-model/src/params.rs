//! Where each weight lives in the flat parameter vector, and how it starts.
//!
//! Order: `wte`, `wpe`, then each block's tensors, then the final norm. Within a block the four weight matrices
//! come first and the eight vectors (biases and norm parameters) after them, so that the weights that take
//! weight decay form one contiguous run per block and a block's gradients are contiguous (a data-parallel
//! reduction can start on a block as soon as its backward pass is done).

use kiln_core::config::{Arch, Config};
use kiln_core::{Backend, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// The sizes that determine a GPT's parameters and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Positions with a learned embedding: the longest sequence the model can see.
    pub block_size: usize,
    /// Tokens of the tokenizer.
    pub vocab: usize,
    /// `vocab` rounded up to a multiple of 64, for aligned matrix shapes; the extra rows are never used.
    pub padded_vocab: usize,
}

impl GptShape {
    pub fn new(config: &Config, vocab: usize) -> Self {
        let Arch::Gpt2 = config.model.arch;
        let m = &config.model;
        GptShape {
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
            block_size: m.block_size,
            vocab,
            padded_vocab: vocab.div_ceil(64) * 64,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The parameter tensors in layout order.
    pub fn params(&self) -> Vec<ParamInfo> {
        let (c, l) = (self.n_embd, self.n_layer);
        let std = 0.02;
        // GPT-2 scales the init of the projections that write into the residual stream by 1/√(2·n_layer), so
        // that the stream's variance does not grow with depth.
        let residual_std = std / ((2 * l) as f32).sqrt();
        let mut list = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, init: Init, decay: bool| {
            list.push(ParamInfo { name, shape, init, decay, offset: 0 });
        };
        push("wte".into(), vec![self.padded_vocab, c], Init::Normal(std), true);
        push("wpe".into(), vec![self.block_size, c], Init::Normal(std), true);
        for i in 0..l {
            let p = |n: &str| format!("h.{i}.{n}");
            push(p("attn.qkv.weight"), vec![3 * c, c], Init::Normal(std), true);
            push(p("attn.proj.weight"), vec![c, c], Init::Normal(residual_std), true);
            push(p("mlp.fc.weight"), vec![4 * c, c], Init::Normal(std), true);
            push(p("mlp.proj.weight"), vec![c, 4 * c], Init::Normal(residual_std), true);
            push(p("ln_1.weight"), vec![c], Init::Ones, false);
            push(p("ln_1.bias"), vec![c], Init::Zeros, false);
            push(p("attn.qkv.bias"), vec![3 * c], Init::Zeros, false);
            push(p("attn.proj.bias"), vec![c], Init::Zeros, false);
            push(p("ln_2.weight"), vec![c], Init::Ones, false);
            push(p("ln_2.bias"), vec![c], Init::Zeros, false);
            push(p("mlp.fc.bias"), vec![4 * c], Init::Zeros, false);
            push(p("mlp.proj.bias"), vec![c], Init::Zeros, false);
        }
        push("ln_f.weight".into(), vec![c], Init::Ones, false);
        push("ln_f.bias".into(), vec![c], Init::Zeros, false);
        let mut offset = 0;
        for p in &mut list {
            p.offset = offset;
            offset += p.len();
        }
        list
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(ParamInfo::len).sum()
    }

    /// Parameters excluding the position embeddings and the unused padded rows of `wte`, as GPT-2's papers and
    /// MFU formulas count them.
    pub fn num_counted_params(&self) -> usize {
        self.num_params() - (self.padded_vocab - self.vocab) * self.n_embd - self.block_size * self.n_embd
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

/// One parameter tensor: its name (GPT-2's, without the `transformer.` prefix), shape, initialisation, whether
/// it takes weight decay, and its offset in the flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub decay: bool,
    pub offset: usize,
}

impl ParamInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn view(&self, flat: Tensor) -> Tensor {
        flat.slice(self.offset, self.len())
    }
}

/// Maximal runs of consecutive parameters that share a weight-decay setting, as `(offset, len, decay)`.
pub fn decay_runs(params: &[ParamInfo]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for p in params {
        match runs.last_mut() {
            Some(run) if run.2 == p.decay && run.0 + run.1 == p.offset => run.1 += p.len(),
            _ => runs.push((p.offset, p.len(), p.decay)),
        }
    }
    runs
}

/// Fills `flat` with the initial weights drawn from `seed`. The padded rows of `wte` start at zero: no token
/// selects them and no logit they produce is used, so they never change the model.
pub fn initialize<B: Backend + ?Sized>(backend: &mut B, shape: &GptShape, flat: Tensor, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut host = vec![0.0f32; flat.len];
    for p in shape.params() {
        let values = &mut host[p.offset..p.offset + p.len()];
        match p.init {
            Init::Zeros => {}
            Init::Ones => values.fill(1.0),
            Init::Normal(std) => {
                let normal = Normal::new(0.0, std).expect("a positive standard deviation");
                let used = if p.name == "wte" { shape.vocab * shape.n_embd } else { values.len() };
                for v in &mut values[..used] {
                    *v = normal.sample(&mut rng);
                }
            }
        }
    }
    backend.upload(flat, &host)
}
