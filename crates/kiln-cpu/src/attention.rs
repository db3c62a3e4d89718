//! Causal multi-head self-attention, exact and unfused, computed row by row.
//!
//! For one head, with queries `q_t`, keys `k_j`, values `v_j` and `s = 1/√head_dim`:
//! forward `P_tj = softmax_j≤t(s·q_t·k_j)`, `o_t = Σ_j P_tj v_j`, saving `lse_t = log Σ_j≤t exp(s·q_t·k_j)`;
//! backward (probabilities recomputed as `P_tj = exp(s·q_t·k_j − lse_t)`, and `D_t = dO_t·o_t`):
//! `dP_tj = dO_t·v_j`, `dS_tj = P_tj(dP_tj − D_t)`, `dq_t = s Σ_j dS_tj k_j`, `dk_j = s Σ_t dS_tj q_t`,
//! `dv_j = Σ_t P_tj dO_t`.
//!
//! Layouts: `qkv` is `(batch, time, 3·C)` with queries, keys and values each `C = heads·head_dim` wide; `out`
//! `(batch, time, C)`; `lse` `(batch, heads, time)`. Work is split by batch element, whose slices of `out`,
//! `lse` and `dqkv` are contiguous.

use crate::math::{Real, axpy, dot};
use kiln_core::AttentionDims;
use rayon::prelude::*;

/// Scratch elements the forward pass needs per batch element.
pub fn forward_scratch(d: &AttentionDims) -> usize {
    d.time
}

/// Scratch elements the backward pass needs per batch element.
pub fn backward_scratch(d: &AttentionDims) -> usize {
    d.time + d.head_dim
}

pub fn forward<T: Real>(out: &mut [T], lse: &mut [T], qkv: &[T], d: AttentionDims, scratch: &mut [T]) {
    let AttentionDims { time, heads, head_dim: hs, .. } = d;
    let c = d.channels();
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    out.par_chunks_mut(time * c)
        .zip(lse.par_chunks_mut(heads * time))
        .zip(qkv.par_chunks(time * 3 * c))
        .zip(scratch.par_chunks_mut(forward_scratch(&d)))
        .for_each(|(((out, lse), qkv), scores)| {
            for h in 0..heads {
                let q_at = |t: usize| &qkv[t * 3 * c + h * hs..][..hs];
                let k_at = |t: usize| &qkv[t * 3 * c + c + h * hs..][..hs];
                let v_at = |t: usize| &qkv[t * 3 * c + 2 * c + h * hs..][..hs];
                for t in 0..time {
                    let q = q_at(t);
                    let mut max = T::neg_infinity();
                    for (j, s) in scores[..=t].iter_mut().enumerate() {
                        *s = dot(q, k_at(j)) * scale;
                        max = max.max(*s);
                    }
                    let mut total = T::zero();
                    for s in scores[..=t].iter_mut() {
                        *s = (*s - max).exp_v();
                        total = total + *s;
                    }
                    let o = &mut out[t * c + h * hs..][..hs];
                    o.fill(T::zero());
                    let inv = T::one() / total;
                    for (j, &p) in scores[..=t].iter().enumerate() {
                        axpy(p * inv, v_at(j), o);
                    }
                    lse[h * time + t] = max + total.ln();
                }
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    d: AttentionDims,
    scratch: &mut [T],
) {
    let AttentionDims { time, heads, head_dim: hs, .. } = d;
    let c = d.channels();
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    dqkv.par_chunks_mut(time * 3 * c)
        .zip(dout.par_chunks(time * c).zip(out.par_chunks(time * c)))
        .zip(qkv.par_chunks(time * 3 * c).zip(lse.par_chunks(heads * time)))
        .zip(scratch.par_chunks_mut(backward_scratch(&d)))
        .for_each(|(((dqkv, (dout, out)), (qkv, lse)), scratch)| {
            dqkv.fill(T::zero());
            let (probs, dq) = scratch.split_at_mut(time);
            for h in 0..heads {
                let q_at = |t: usize| &qkv[t * 3 * c + h * hs..][..hs];
                let k_at = |t: usize| &qkv[t * 3 * c + c + h * hs..][..hs];
                let v_at = |t: usize| &qkv[t * 3 * c + 2 * c + h * hs..][..hs];
                for t in 0..time {
                    let q = q_at(t);
                    let d_o = &dout[t * c + h * hs..][..hs];
                    let row_d = dot(d_o, &out[t * c + h * hs..][..hs]);
                    let l = lse[h * time + t];
                    for (j, p) in probs[..=t].iter_mut().enumerate() {
                        *p = (dot(q, k_at(j)) * scale - l).exp_v();
                    }
                    dq.fill(T::zero());
                    for (j, &p) in probs[..=t].iter().enumerate() {
                        let ds = p * (dot(d_o, v_at(j)) - row_d) * scale;
                        axpy(ds, k_at(j), dq);
                        axpy(ds, q, &mut dqkv[j * 3 * c + c + h * hs..][..hs]);
                        axpy(p, d_o, &mut dqkv[j * 3 * c + 2 * c + h * hs..][..hs]);
                    }
                    dqkv[t * 3 * c + h * hs..][..hs].copy_from_slice(dq);
                }
            }
        });
}
