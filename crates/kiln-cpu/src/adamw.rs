//! AdamW with decoupled weight decay (Loshchilov & Hutter):
//! `g = scale·grad`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr·(m/(1−β₁ᵗ) / (√(v/(1−β₂ᵗ)) + ε) + wd·p)`, with the learning rate, `t` and the gradient norm (of which
//! the clipping scale) from [`AdamWStep::values`].

use crate::math::Real;
use kiln_core::AdamWStep;
use rayon::prelude::*;

const CHUNK: usize = 8192;

/// `values` is [`AdamWStep::values`]' contents.
pub fn update<T: Real>(params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T], s: &AdamWStep, values: &[T]) {
    let b1 = T::from_f32(s.beta1);
    let b2 = T::from_f32(s.beta2);
    let one = T::one();
    let t = values[1].to_f64() as i32;
    let bc1 = one / (one - b1.powi(t));
    let bc2 = one / (one - b2.powi(t));
    let lr = values[0];
    let wd = T::from_f32(s.weight_decay);
    let eps = T::from_f32(s.eps);
    let scale = T::from_f32(s.clip_scale(values[2].to_f32()));
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * scale;
                m[i] = b1 * m[i] + (one - b1) * g;
                v[i] = b2 * v[i] + (one - b2) * g * g;
                let step = (m[i] * bc1) / ((v[i] * bc2).sqrt() + eps) + wd * p[i];
                p[i] = p[i] - lr * step;
            }
        });
}
