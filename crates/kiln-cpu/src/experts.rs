//! A mixture-of-experts MLP's routing, dispatch and combination (the operands' meaning is in
//! `kiln_core::experts`).
//!
//! Route: `p = softmax(logits)` per row; the `top_k` largest `p` (a tie to the lower expert), their weights
//! `w_j = p_j` or `p_j / Σ_i p_i`; a counting sort of the slots by expert gives `order`, `place` and `offsets`.
//! Route backward: `g_j = dw_j`, or normalised `(dw_j − Σ_i dw_i·w_i)/Σ_i p_i`;
//! `dp_e = balance_e + Σ_{j: e_j = e} g_j`; `dlogits_e = p_e·(dp_e − Σ_i p_i·dp_i)`.
//! Combine: `y[t] = Σ_j w_j·e[place[s]]`; backward `de[place[s]] = w_s·dy[t]`, `dw_s = dy[t]·e[place[s]]`.

use crate::math::{Real, axpy, dot};
use kiln_core::experts::MoeDims;
use rayon::prelude::*;

/// Every row's probabilities and choices: `probs`, `weights` and `chosen` as `MoeRoute` says.
pub fn route<T: Real>(
    probs: &mut [T],
    weights: &mut [T],
    chosen: &mut [u32],
    logits: &[T],
    normalize: bool,
    d: MoeDims,
) {
    let (e, k) = (d.experts, d.top_k);
    probs
        .par_chunks_mut(e)
        .zip(weights.par_chunks_mut(k))
        .zip(chosen.par_chunks_mut(k))
        .zip(logits.par_chunks(e))
        .for_each(|(((p, w), c), x)| {
            let max = x.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            for (p, &v) in p.iter_mut().zip(x) {
                *p = (v - max).exp_v();
            }
            let total = p.iter().fold(T::zero(), |s, &v| s + v);
            for p in p.iter_mut() {
                *p = *p / total;
            }
            // Selection by repeated maximum: k is small. Strictly greater keeps the lower expert on a tie.
            for j in 0..k {
                let mut best = None::<usize>;
                for (i, &v) in p.iter().enumerate() {
                    if !c[..j].contains(&(i as u32)) && best.is_none_or(|b| v > p[b]) {
                        best = Some(i);
                    }
                }
                let best = best.expect("top_k is at most the experts");
                c[j] = best as u32;
                w[j] = p[best];
            }
            if normalize {
                let sum = w.iter().fold(T::zero(), |s, &v| s + v);
                for w in w.iter_mut() {
                    *w = *w / sum;
                }
            }
        });
}

/// The dispatch of the slots `chosen` to `experts` experts, a counting sort by expert: `offsets` (`experts + 1`),
/// `order` and its inverse `place`.
pub fn dispatch(order: &mut [u32], place: &mut [u32], offsets: &mut [u32], chosen: &[u32]) {
    // offsets[e] counts expert e - 1's slots, then (summed) is where expert e's run starts.
    offsets.fill(0);
    for &c in chosen {
        offsets[c as usize + 1] += 1;
    }
    for e in 1..offsets.len() {
        offsets[e] += offsets[e - 1];
    }
    // Each run filled in slot order, offsets[e] its cursor: afterwards, where run e ends (and run e + 1 starts).
    for (s, &c) in chosen.iter().enumerate() {
        let cursor = &mut offsets[c as usize];
        order[*cursor as usize] = s as u32;
        place[s] = *cursor;
        *cursor += 1;
    }
    offsets.copy_within(..offsets.len() - 1, 1);
    offsets[0] = 0;
}

/// `dlogits` from the weights' gradient (see the module).
pub fn route_backward<T: Real>(
    dlogits: &mut [T],
    dweights: &[T],
    probs: &[T],
    weights: &[T],
    chosen: &[u32],
    normalize: bool,
    balance: Option<&[T]>,
    d: MoeDims,
) {
    let (e, k) = (d.experts, d.top_k);
    dlogits
        .par_chunks_mut(e)
        .zip(dweights.par_chunks(k))
        .zip(probs.par_chunks(e))
        .zip(weights.par_chunks(k))
        .zip(chosen.par_chunks(k))
        .for_each(|((((dx, dw), p), w), c)| {
            let dp = dx;
            match balance {
                Some(b) => dp.copy_from_slice(b),
                None => dp.fill(T::zero()),
            }
            let (shift, sum) = if normalize {
                let sum = c.iter().fold(T::zero(), |s, &i| s + p[i as usize]);
                (dot(dw, w), sum)
            } else {
                (T::zero(), T::one())
            };
            for j in 0..k {
                let i = c[j] as usize;
                dp[i] = dp[i] + (dw[j] - shift) / sum;
            }
            let mean = dot(p, dp);
            for (dp, &p) in dp.iter_mut().zip(p) {
                *dp = p * (*dp - mean);
            }
        });
}

/// `out[p] = inp[order[p] / top_k]`, rows of `width`.
pub fn gather<T: Real>(out: &mut [T], inp: &[T], order: &[u32], width: usize, top_k: usize) {
    out.par_chunks_mut(width).zip(order).with_min_len(16).for_each(|(row, &s)| {
        let t = s as usize / top_k;
        row.copy_from_slice(&inp[t * width..(t + 1) * width]);
    });
}

/// `out[t] (+)= Σ_j w_s·expert_out[place[s]]`, `w = 1` without weights.
pub fn combine<T: Real>(
    out: &mut [T],
    expert_out: &[T],
    weights: Option<&[T]>,
    place: &[u32],
    accumulate: bool,
    width: usize,
    top_k: usize,
) {
    out.par_chunks_mut(width).zip(place.par_chunks(top_k)).enumerate().with_min_len(16).for_each(|(t, (y, places))| {
        if !accumulate {
            y.fill(T::zero());
        }
        for (j, &p) in places.iter().enumerate() {
            let w = weights.map_or(T::one(), |w| w[t * top_k + j]);
            axpy(w, &expert_out[p as usize * width..(p as usize + 1) * width], y);
        }
    });
}

/// `dexpert_out[place[s]] = w_s·dout[t]`, `dweights[s] = dout[t]·expert_out[place[s]]`; `order` is `place`'s
/// inverse, so that each task writes rows of its own.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: Real>(
    dexpert_out: &mut [T],
    dweights: &mut [T],
    dout: &[T],
    expert_out: &[T],
    weights: &[T],
    order: &[u32],
    place: &[u32],
    width: usize,
    top_k: usize,
) {
    dexpert_out.par_chunks_mut(width).zip(order).with_min_len(16).for_each(|(de, &s)| {
        let (w, dy) = (weights[s as usize], &dout[s as usize / top_k * width..][..width]);
        for (de, &g) in de.iter_mut().zip(dy) {
            *de = w * g;
        }
    });
    dweights.par_iter_mut().zip(place).enumerate().with_min_len(64).for_each(|(s, (dw, &p))| {
        let dy = &dout[s / top_k * width..][..width];
        *dw = dot(dy, &expert_out[p as usize * width..][..width]);
    });
}
