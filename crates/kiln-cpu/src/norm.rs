//! Normalisation over the channels of each row: layer normalisation and RMS normalisation.
//!
//! Layer norm forward: `μ = mean(x)`, `σ⁻¹ = 1/√(mean((x−μ)²) + ε)`, `n = (x−μ)·σ⁻¹`, `y = n·w + b`.
//! Backward, with `g = dy·w`: `dx += σ⁻¹·(g − mean(g) − n·mean(g·n))`, `dw += Σ_rows dy·n`, `db += Σ_rows dy`.
//!
//! RMS norm forward: `r = 1/√(mean(x²) + ε)`, `n = x·r`, `y = n·w`. Backward, with `g = dy·w`:
//! `dx += r·(g − n·mean(g·n))`, `dw += Σ_rows dy·n`. That is the layer norm's with `μ = 0` and without the
//! `mean(g)` term (nothing is subtracted before scaling), so one backward loop serves both.
//!
//! QK-norm (Qwen3's) is RMS normalisation of each query and key head of a packed qkv activation: [`qk_forward`] and
//! [`qk_backward`].

use crate::math::{Real, add_column_sums, sum};
use kiln_core::{AttentionDims, NormKind};
use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise scheduling, and fixed, so that the per-task partial sums of
/// `dw` and `db` (and with them the result) do not depend on the number of threads.
const ROWS_PER_TASK: usize = 32;

/// Where the forward pass saves each row's statistics (no mean for RMS normalisation).
pub struct Stats<'a, T> {
    pub mean: Option<&'a mut [T]>,
    pub rstd: &'a mut [T],
}

/// Normalises each row of `inp` into `out`, or with `residual = (other, sum)` writes `sum = inp + other` and
/// normalises that. Layer normalisation takes a `bias`; RMS normalisation takes none and writes no `mean`.
pub fn forward<T: Real>(
    out: &mut [T],
    stats: Stats<T>,
    inp: &[T],
    residual: Option<(&[T], &mut [T])>,
    weight: &[T],
    bias: Option<&[T]>,
    c: usize,
    eps: T,
) {
    let rows = stats.rstd.len();
    match stats.mean {
        Some(mean) => each_row(out, mean.par_iter_mut().map(Some), stats.rstd, inp, residual, weight, bias, c, eps),
        None => each_row(out, (0..rows).into_par_iter().map(|_| None), stats.rstd, inp, residual, weight, bias, c, eps),
    }
}

/// [`forward`] with each row's mean slot, if it has one, from `means`.
#[allow(clippy::too_many_arguments)]
fn each_row<'a, T: Real>(
    out: &mut [T],
    means: impl IndexedParallelIterator<Item = Option<&'a mut T>>,
    rstd: &mut [T],
    inp: &[T],
    residual: Option<(&[T], &mut [T])>,
    weight: &[T],
    bias: Option<&[T]>,
    c: usize,
    eps: T,
) {
    let normalize = |y: &mut [T], mean: Option<&mut T>, rstd: &mut T, x: &[T]| match (bias, mean) {
        (Some(bias), Some(mean)) => normalize_row(y, mean, rstd, x, weight, bias, eps),
        _ => rms_normalize_row(y, rstd, x, weight, eps),
    };
    let stats = means.zip(rstd.par_iter_mut());
    match residual {
        None => out
            .par_chunks_mut(c)
            .zip(stats)
            .zip(inp.par_chunks(c))
            .with_min_len(16)
            .for_each(|((y, (mean, rstd)), x)| normalize(y, mean, rstd, x)),
        Some((other, sum_out)) => sum_out
            .par_chunks_mut(c)
            .zip(out.par_chunks_mut(c))
            .zip(stats)
            .zip(inp.par_chunks(c).zip(other.par_chunks(c)))
            .with_min_len(16)
            .for_each(|(((s, y), (mean, rstd)), (a, b))| {
                for ((s, &a), &b) in s.iter_mut().zip(a).zip(b) {
                    *s = a + b;
                }
                normalize(y, mean, rstd, s);
            }),
    }
}

#[inline(always)]
fn normalize_row<T: Real>(y: &mut [T], mean: &mut T, rstd: &mut T, x: &[T], weight: &[T], bias: &[T], eps: T) {
    let n = T::from_f64(x.len() as f64);
    let mu = sum(x) / n;
    let mut var_acc = [T::zero(); 8];
    let chunks = x.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            let d = x[i * 8 + l] - mu;
            var_acc[l] = d.mul_add(d, var_acc[l]);
        }
    }
    let mut var = var_acc.iter().fold(T::zero(), |s, &v| s + v);
    for &v in &x[chunks * 8..] {
        var = (v - mu).mul_add(v - mu, var);
    }
    let rs = T::one() / (var / n + eps).sqrt();
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(weight).zip(bias) {
        *y = ((x - mu) * rs).mul_add(w, b);
    }
    *mean = mu;
    *rstd = rs;
}

#[inline(always)]
fn rms_normalize_row<T: Real>(y: &mut [T], rstd: &mut T, x: &[T], weight: &[T], eps: T) {
    let n = T::from_f64(x.len() as f64);
    let r = T::one() / (crate::math::dot(x, x) / n + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
        *y = x * r * w;
    }
    *rstd = r;
}

/// Backward of either normalisation: `kind` says which, and `mean` and `dbias` are used by layer normalisation only.
/// `dinp_sums`, when given, is overwritten with the column sums of `dinp` once the gradient is added in.
/// `scratch` must hold `2·c` elements per task of [`ROWS_PER_TASK`] rows: each task writes its partial `dw` and `db`
/// there, and they are summed in task order afterwards.
pub fn backward<T: Real>(
    kind: NormKind,
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    dinp_sums: Option<&mut [T]>,
    c: usize,
    scratch: &mut Vec<T>,
) {
    let layer = kind == NormKind::Layer;
    let rows = rstd.len();
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    scratch.clear();
    scratch.resize(tasks * 2 * c, T::zero());
    let n = T::from_f64(c as f64);
    scratch.par_chunks_mut(2 * c).zip(dinp.par_chunks_mut(ROWS_PER_TASK * c)).enumerate().for_each(
        |(task, (partial, dx_rows))| {
            let (pdw, pdb) = partial.split_at_mut(c);
            let first = task * ROWS_PER_TASK;
            for (i, dx) in dx_rows.chunks_exact_mut(c).enumerate() {
                let r = first + i;
                let dy = &dout[r * c..][..c];
                let x = &inp[r * c..][..c];
                let (mu, rs) = if layer { (mean[r], rstd[r]) } else { (T::zero(), rstd[r]) };
                // mean(g) and mean(g·n), with g = dy·w and n = (x−μ)·σ⁻¹.
                let mut g_acc = T::zero();
                let mut gn_acc = T::zero();
                for j in 0..c {
                    let g = dy[j] * weight[j];
                    g_acc = g_acc + g;
                    gn_acc = g.mul_add((x[j] - mu) * rs, gn_acc);
                }
                let g_mean = if layer { g_acc / n } else { T::zero() };
                let gn_mean = gn_acc / n;
                for j in 0..c {
                    let norm = (x[j] - mu) * rs;
                    let g = dy[j] * weight[j];
                    dx[j] = dx[j] + rs * (g - g_mean - norm * gn_mean);
                    pdw[j] = dy[j].mul_add(norm, pdw[j]);
                    pdb[j] = pdb[j] + dy[j];
                }
            }
        },
    );
    let mut dbias = dbias;
    for partial in scratch.chunks_exact(2 * c) {
        let (pdw, pdb) = partial.split_at(c);
        for (d, &p) in dweight.iter_mut().zip(pdw) {
            *d = *d + p;
        }
        for (d, &p) in dbias.iter_mut().flat_map(|d| d.iter_mut()).zip(pdb) {
            *d = *d + p;
        }
    }
    if let Some(sums) = dinp_sums {
        sums.fill(T::zero());
        add_column_sums(sums, dinp);
    }
}

/// QK-norm (see `kiln_core::QkNormForward`): each row of `inp` (`d.qkv_width()` elements) has its query heads and
/// key heads RMS-normalised into `out` with `weight`'s first and second halves, and its value heads copied; each
/// normalised head's `r` goes to `rstd`.
pub fn qk_forward<T: Real>(out: &mut [T], rstd: &mut [T], inp: &[T], weight: &[T], d: &AttentionDims, eps: T) {
    let (hd, width, normed) = (d.head_dim, d.qkv_width(), d.heads + d.kv_heads);
    let (query_weight, key_weight) = weight.split_at(hd);
    out.par_chunks_mut(width).zip(rstd.par_chunks_mut(normed)).zip(inp.par_chunks(width)).with_min_len(16).for_each(
        |((y, r), x)| {
            let (y_heads, y_values) = y.split_at_mut(normed * hd);
            for (h, ((y, r), x)) in y_heads.chunks_exact_mut(hd).zip(r).zip(x.chunks_exact(hd)).enumerate() {
                rms_normalize_row(y, r, x, if h < d.heads { query_weight } else { key_weight }, eps);
            }
            y_values.copy_from_slice(&x[normed * hd..]);
        },
    );
}

/// Backward of [`qk_forward`], in place: `dqkv` holds the gradient of `out` and becomes that of `inp` (value heads
/// unchanged); `dweight` (`2·head_dim`) accumulates the weights' gradients. `scratch` takes `2·head_dim` elements per
/// task of [`ROWS_PER_TASK`] rows, summed in task order, as [`backward`]'s.
pub fn qk_backward<T: Real>(
    dqkv: &mut [T],
    dweight: &mut [T],
    inp: &[T],
    weight: &[T],
    rstd: &[T],
    d: &AttentionDims,
    scratch: &mut Vec<T>,
) {
    let (hd, width, normed) = (d.head_dim, d.qkv_width(), d.heads + d.kv_heads);
    let rows = rstd.len() / normed.max(1);
    scratch.clear();
    scratch.resize(rows.div_ceil(ROWS_PER_TASK) * 2 * hd, T::zero());
    let n = T::from_f64(hd as f64);
    scratch.par_chunks_mut(2 * hd).zip(dqkv.par_chunks_mut(ROWS_PER_TASK * width)).enumerate().for_each(
        |(task, (partial, dx_rows))| {
            for (i, dx_row) in dx_rows.chunks_exact_mut(width).enumerate() {
                let row = task * ROWS_PER_TASK + i;
                let x_row = &inp[row * width..][..normed * hd];
                let heads = dx_row[..normed * hd].chunks_exact_mut(hd).zip(x_row.chunks_exact(hd));
                for (h, ((dx, x), &rs)) in heads.zip(&rstd[row * normed..][..normed]).enumerate() {
                    let half = if h < d.heads { 0..hd } else { hd..2 * hd };
                    let (w, pdw) = (&weight[half.clone()], &mut partial[half]);
                    // mean(g·n), with g = dy·w and n = x·r; then dx = r·(g − n·mean(g·n)), written over dy.
                    let mut gn_acc = T::zero();
                    for j in 0..hd {
                        gn_acc = (dx[j] * w[j]).mul_add(x[j] * rs, gn_acc);
                    }
                    let gn_mean = gn_acc / n;
                    for j in 0..hd {
                        let (dy, norm) = (dx[j], x[j] * rs);
                        dx[j] = rs * (dy * w[j] - norm * gn_mean);
                        pdw[j] = dy.mul_add(norm, pdw[j]);
                    }
                }
            }
        },
    );
    for partial in scratch.chunks_exact(2 * hd) {
        for (d, &p) in dweight.iter_mut().zip(partial) {
            *d = *d + p;
        }
    }
}
