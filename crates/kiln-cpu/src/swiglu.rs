//! SwiGLU, the gated MLP nonlinearity of Llama-style models, on the output of one fused gate-and-up product.
//!
//! Each input row is `[gate | up]` (`2·F` channels). Forward: `y = silu(gate)·up`, `silu(x) = x·σ(x)`,
//! `σ(x) = 1/(1 + e^{−x})`. Backward: `dgate = dy·up·silu'(gate)` with `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`, and
//! `dup = dy·silu(gate)`.

use crate::math::Real;
use rayon::prelude::*;

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_v())
}

/// `out` is `(rows, ffn)`, `inp` `(rows, 2·ffn)`.
pub fn forward<T: Real>(out: &mut [T], inp: &[T], ffn: usize) {
    out.par_chunks_mut(ffn).zip(inp.par_chunks(2 * ffn)).with_min_len(16).for_each(|(y, x)| {
        let (gate, up) = x.split_at(ffn);
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g * sigmoid(g) * u;
        }
    });
}

/// `dinp` is `(rows, 2·ffn)` and overwritten; `dout` is `(rows, ffn)`.
pub fn backward<T: Real>(dinp: &mut [T], dout: &[T], inp: &[T], ffn: usize) {
    dinp.par_chunks_mut(2 * ffn).zip(dout.par_chunks(ffn)).zip(inp.par_chunks(2 * ffn)).with_min_len(16).for_each(
        |((dx, dy), x)| {
            let (dgate, dup) = dx.split_at_mut(ffn);
            let (gate, up) = x.split_at(ffn);
            for i in 0..ffn {
                let (g, s) = (gate[i], sigmoid(gate[i]));
                dgate[i] = dy[i] * up[i] * s * (T::one() + g * (T::one() - s));
                dup[i] = dy[i] * g * s;
            }
        },
    );
}
