//! Layer normalisation over the channels of each row.
//!
//! Forward: `μ = mean(x)`, `σ⁻¹ = 1/√(mean((x−μ)²) + 1e-5)`, `n = (x−μ)·σ⁻¹`, `y = n·w + b`.
//! Backward, with `g = dy·w`: `dx += σ⁻¹·(g − mean(g) − n·mean(g·n))`, `dw += Σ_rows dy·n`, `db += Σ_rows dy`.

use crate::math::{Real, sum};
use rayon::prelude::*;

pub const EPS: f32 = 1e-5;

/// Rows per parallel task: large enough to amortise scheduling, and fixed, so that the per-task partial sums of
/// `dw` and `db` (and with them the result) do not depend on the number of threads.
const ROWS_PER_TASK: usize = 32;

pub struct Stats<'a, T> {
    pub mean: &'a mut [T],
    pub rstd: &'a mut [T],
}

/// Normalises each row of `inp` into `out`. When `residual` is given, the row normalised is `inp + residual`,
/// and that sum is written back to `sum_out` (the fused residual add).
pub fn forward<T: Real>(out: &mut [T], stats: Stats<T>, inp: &[T], weight: &[T], bias: &[T], c: usize) {
    out.par_chunks_mut(c)
        .zip(stats.mean.par_iter_mut().zip(stats.rstd.par_iter_mut()))
        .zip(inp.par_chunks(c))
        .with_min_len(16)
        .for_each(|((y, (mean, rstd)), x)| normalize_row(y, mean, rstd, x, weight, bias));
}

/// `sum_out = a + b`, then normalise `sum_out` into `out`.
pub fn residual_forward<T: Real>(
    sum_out: &mut [T],
    out: &mut [T],
    stats: Stats<T>,
    a: &[T],
    b: &[T],
    weight: &[T],
    bias: &[T],
    c: usize,
) {
    sum_out
        .par_chunks_mut(c)
        .zip(out.par_chunks_mut(c))
        .zip(stats.mean.par_iter_mut().zip(stats.rstd.par_iter_mut()))
        .zip(a.par_chunks(c).zip(b.par_chunks(c)))
        .with_min_len(16)
        .for_each(|(((s, y), (mean, rstd)), (a, b))| {
            for ((s, &a), &b) in s.iter_mut().zip(a).zip(b) {
                *s = a + b;
            }
            normalize_row(y, mean, rstd, s, weight, bias);
        });
}

#[inline(always)]
fn normalize_row<T: Real>(y: &mut [T], mean: &mut T, rstd: &mut T, x: &[T], weight: &[T], bias: &[T]) {
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
    let rs = T::one() / (var / n + T::from_f32(EPS)).sqrt();
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(weight).zip(bias) {
        *y = ((x - mu) * rs).mul_add(w, b);
    }
    *mean = mu;
    *rstd = rs;
}

/// `scratch` must hold `2·c` elements per task of [`ROWS_PER_TASK`] rows: each task writes its partial `dw` and
/// `db` there, and they are summed in task order afterwards.
pub fn backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    c: usize,
    scratch: &mut Vec<T>,
) {
    let rows = mean.len();
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
                let (mu, rs) = (mean[r], rstd[r]);
                // mean(g) and mean(g·n), with g = dy·w and n = (x−μ)·σ⁻¹.
                let mut g_acc = T::zero();
                let mut gn_acc = T::zero();
                for j in 0..c {
                    let g = dy[j] * weight[j];
                    g_acc = g_acc + g;
                    gn_acc = g.mul_add((x[j] - mu) * rs, gn_acc);
                }
                let g_mean = g_acc / n;
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
    for partial in scratch.chunks_exact(2 * c) {
        let (pdw, pdb) = partial.split_at(c);
        for (d, &p) in dweight.iter_mut().zip(pdw) {
            *d = *d + p;
        }
        for (d, &p) in dbias.iter_mut().zip(pdb) {
            *d = *d + p;
        }
    }
}
