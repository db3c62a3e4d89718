//! Softmax cross-entropy fused with its gradient.
//!
//! For a row of logits `z` over the real vocabulary (padded columns excluded) and target `y`:
//! `loss = log Σ_i e^{z_i} − z_y`; the gradient of `dloss·loss` is `dloss·(softmax(z) − onehot(y))`, written over
//! the logits in place, so no probabilities are ever stored.

use crate::math::Real;
use kiln_core::backend::IGNORE_TARGET;
use rayon::prelude::*;

pub fn forward<T: Real>(
    logits: &mut [T],
    losses: &mut [T],
    targets: &[u32],
    vocab: usize,
    padded_vocab: usize,
    dloss: Option<T>,
) {
    logits.par_chunks_mut(padded_vocab).zip(losses.par_iter_mut()).zip(targets.par_iter()).with_min_len(16).for_each(
        |((z, loss), &y)| {
            let ignored = y == IGNORE_TARGET;
            let real = &mut z[..vocab];
            let max = real.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            let mut total = T::zero();
            for &v in real.iter() {
                total = total + (v - max).exp_v();
            }
            let lse = max + total.ln();
            if !ignored {
                *loss = *loss + lse - real[y as usize];
            }
            if let Some(dloss) = dloss {
                if ignored {
                    z.fill(T::zero());
                    return;
                }
                for v in real.iter_mut() {
                    *v = (*v - lse).exp_v() * dloss;
                }
                real[y as usize] = real[y as usize] - dloss;
                z[vocab..].fill(T::zero());
            }
        },
    );
}
