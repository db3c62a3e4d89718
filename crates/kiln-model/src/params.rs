//! Where each weight lives in the flat parameter vector, and how it starts.
//!
//! [`crate::ModelSpec::params`] lays the tensors out; this module describes one ([`ParamInfo`]), finds the runs
//! that take weight decay, and draws the initial weights.

use crate::spec::ModelSpec;
use kiln_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

/// One parameter tensor: its name (kiln's, which follow GPT-2's without the `transformer.` prefix: `h.3.attn.qkv.weight`),
/// shape, initialisation, whether it takes weight decay, its offset in the flat vector, and its unit.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub decay: bool,
    pub offset: usize,
    /// The part of the model it belongs to, whose gradients are final together: 0 for the embeddings, `1 + i` for
    /// block `i`, `n_layer + 1` for the final norm and the LM head.
    pub unit: usize,
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

/// The flat range of each unit (see [`ParamInfo::unit`]) of a layout whose tensors take `len` elements with padding:
/// from its first tensor to the next unit's (the last to `len`), so that any padding after a unit is its own.
pub fn units(layout: &[ParamInfo], len: usize) -> Vec<Range<usize>> {
    let mut starts: Vec<usize> = Vec::new();
    for p in layout {
        if starts.len() == p.unit {
            starts.push(p.offset);
        }
    }
    let ends = starts.iter().skip(1).copied().chain(std::iter::once(len));
    starts.iter().zip(ends).map(|(&start, end)| start..end).collect()
}

/// The initial weights drawn from `seed`, `len` values laid out as `layout`. The padded rows of `wte` and
/// `lm_head` start at zero: no token selects them and no logit they produce is used, so they never change the
/// model. The draws go in layout order, so the weights do not depend on the padding between units.
pub fn initial_weights(spec: &ModelSpec, layout: &[ParamInfo], len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut host = vec![0.0f32; len];
    for p in layout {
        let values = &mut host[p.offset..p.offset + p.len()];
        match p.init {
            Init::Zeros => {}
            Init::Ones => values.fill(1.0),
            Init::Normal(std) => {
                let normal = Normal::new(0.0, std).expect("a positive standard deviation");
                let used = if ModelSpec::has_vocab_rows(&p.name) { spec.vocab * spec.n_embd } else { values.len() };
                for v in &mut values[..used] {
                    *v = normal.sample(&mut rng);
                }
            }
        }
    }
    host
}
