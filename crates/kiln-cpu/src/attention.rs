//! Multi-head self-attention, exact, one (batch element, head) at a time: causal or not, and with grouped-query
//! attention (several query heads sharing one key/value head).
//!
//! For one head, with queries `q_t`, keys `k_j`, values `v_j` and `s = 1/√head_dim`:
//! forward `S_tj = s·q_t·k_j` (for causal attention only `j ≤ t`, and with a sliding window `w` only `j > t − w`),
//! `P = softmax_rows(S)`, `o_t = Σ_j P_tj v_j`,
//! saving `lse_t = log Σ_j exp(S_tj)`;
//! backward (probabilities recomputed as `P_tj = exp(S_tj − lse_t)`, and `D_t = dO_t·o_t`):
//! `dP = dO·Vᵀ`, `dS = P ∘ (dP − D)`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`, `dV = Pᵀ·dO`; a key/value head shared by a
//! group of query heads sums the group's `dK` and `dV`.
//!
//! Layouts: see [`AttentionDims`] for `qkv`; `out` is `(batch, time, heads·head_dim)`, `lse` `(batch, heads,
//! time)`. Each head's operands are first gathered into small zero-padded matrices (rows and columns rounded up to
//! 16), so that every product above is one blocked loop ([`product`]) whose inner step is a row of 8-wide fused
//! multiply-adds, and the mask is honoured by skipping the blocks above the diagonal (and, under a sliding window,
//! those products' blocks that lie wholly before it). Batch elements are
//! split evenly over the threads.

use crate::math::{Real, axpy, dot};
use kiln_core::AttentionDims;
use rayon::prelude::*;
use std::ops::Range;

/// Columns per step of the blocked product: two AVX registers of f32. With [`ROWS`] rows that is eight
/// independent accumulators, enough to cover the latency of a fused multiply-add.
const COLS: usize = 16;
/// Rows per step of the blocked product.
const ROWS: usize = 4;

fn round_up(n: usize) -> usize {
    n.div_ceil(COLS) * COLS
}

/// `c[i][n_range(i-block)] = Σ_{k ∈ k_range(i-block)} a[i][k]·b[k][..]`, for `i < m`. Rows go in blocks of
/// [`ROWS`] and columns in blocks of [`COLS`]: the accumulator block stays in registers while `k` runs. Each row
/// block of `a` is first packed k-major into `pack` (`ROWS ×` the longest k range), so the inner loop reads both
/// operands in order. `n_range` must start and end at multiples of [`COLS`], within `b`'s rows.
#[inline(always)]
fn product<T: Real>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    m: usize,
    pack: &mut [T],
    blocks: impl Fn(Range<usize>) -> (Range<usize>, Range<usize>),
) {
    for i0 in (0..m).step_by(ROWS) {
        let rows = ROWS.min(m - i0);
        let (ks, ns) = blocks(i0..i0 + rows);
        let pack = &mut pack[..ROWS * ks.len()];
        for (kk, k) in ks.clone().enumerate() {
            for r in 0..ROWS {
                // Rows past `m` repeat the last row and are not stored.
                pack[kk * ROWS + r] = a[(i0 + r.min(rows - 1)) * lda + k];
            }
        }
        for j0 in ns.step_by(COLS) {
            let mut acc = [[T::zero(); COLS]; ROWS];
            let b_rows = b[ks.start * ldb..].chunks(ldb).take(ks.len());
            for (av, b_row) in pack.chunks_exact(ROWS).zip(b_rows) {
                let bv: &[T; COLS] = b_row[j0..j0 + COLS].try_into().expect("COLS columns");
                for r in 0..ROWS {
                    for l in 0..COLS {
                        acc[r][l] = av[r].mul_add(bv[l], acc[r][l]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                c[(i0 + r) * ldc + j0..][..COLS].copy_from_slice(acc);
            }
        }
    }
}

/// Copies `rows × cols` of a strided source into a dense `rows × ld` matrix (zeroing the padding), optionally
/// scaled.
fn gather<T: Real>(
    dst: &mut [T],
    ld: usize,
    src: &[T],
    stride: usize,
    offset: usize,
    rows: usize,
    cols: usize,
    scale: T,
) {
    for t in 0..rows {
        let row = &mut dst[t * ld..][..ld];
        for (d, s) in row[..cols].iter_mut().zip(&src[t * stride + offset..][..cols]) {
            *d = *s * scale;
        }
        row[cols..].fill(T::zero());
    }
    dst[rows * ld..].fill(T::zero());
}

/// `dst (cols × ld) = srcᵀ` for a dense `rows × src_ld` source, zeroing the padding.
fn transpose<T: Real>(dst: &mut [T], ld: usize, src: &[T], src_ld: usize, rows: usize, cols: usize) {
    dst.fill(T::zero());
    for t in 0..rows {
        for j in 0..cols {
            dst[j * ld + t] = src[t * src_ld + j];
        }
    }
}

/// Working memory of one thread: dense, padded copies of one head's operands.
struct Workspace<'a, T> {
    q: &'a mut [T],
    k: &'a mut [T],
    v: &'a mut [T],
    kt: &'a mut [T],
    o: &'a mut [T],
    d_o: &'a mut [T],
    p: &'a mut [T],
    dp: &'a mut [T],
    transposed: &'a mut [T],
    row_d: &'a mut [T],
    pack: &'a mut [T],
}

/// Scratch elements per thread.
fn workspace_len(d: &AttentionDims) -> usize {
    let (tp, hp) = (round_up(d.time), round_up(d.head_dim));
    // Saturating: a workspace too large to count is one no allocator gives, which the engine reports as such.
    [
        6usize.saturating_mul(tp).saturating_mul(hp),
        3usize.saturating_mul(tp).saturating_mul(tp),
        tp,
        ROWS.saturating_mul(tp.max(hp)),
    ]
    .into_iter()
    .fold(0, usize::saturating_add)
}

impl<'a, T: Real> Workspace<'a, T> {
    fn new(mem: &'a mut [T], d: &AttentionDims) -> Self {
        let (tp, hp) = (round_up(d.time), round_up(d.head_dim));
        let (q, rest) = mem.split_at_mut(tp * hp);
        let (k, rest) = rest.split_at_mut(tp * hp);
        let (v, rest) = rest.split_at_mut(tp * hp);
        let (kt, rest) = rest.split_at_mut(tp * hp);
        let (o, rest) = rest.split_at_mut(tp * hp);
        let (d_o, rest) = rest.split_at_mut(tp * hp);
        let (p, rest) = rest.split_at_mut(tp * tp);
        let (dp, rest) = rest.split_at_mut(tp * tp);
        let (transposed, rest) = rest.split_at_mut(tp * tp);
        let (row_d, pack) = rest.split_at_mut(tp);
        Workspace { q, k, v, kt, o, d_o, p, dp, transposed, row_d, pack }
    }
}

/// Scratch elements for `threads` workers.
pub fn scratch_len(d: &AttentionDims, threads: usize) -> usize {
    threads.saturating_mul(workspace_len(d))
}

/// Splits the batch into at most `threads` runs of whole batch elements, one workspace each.
fn for_each_batch_run<T: Real>(
    d: &AttentionDims,
    scratch: &mut [T],
    threads: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync + Send,
) {
    let per_run = d.batch.div_ceil(threads.max(1));
    scratch.par_chunks_mut(workspace_len(d)).enumerate().for_each(|(run, mem)| {
        let start = (run * per_run).min(d.batch);
        f(start..(start + per_run).min(d.batch), mem);
    });
}

/// Blocks of `S = Q·Kᵀ` for query rows `rows`: all of `head_dim`, and the blocks of keys they see (from the first
/// row's window, to the last row (causal), or all of them).
fn score_blocks(d: &AttentionDims) -> impl Fn(Range<usize>) -> (Range<usize>, Range<usize>) {
    let (d, hp) = (*d, round_up(d.head_dim));
    move |rows: Range<usize>| {
        let first = d.visible_keys(rows.start).start / COLS * COLS;
        (0..hp, first..round_up(d.visible_keys(rows.end - 1).end))
    }
}

/// Blocks of `P·V`-shaped products for query rows `rows`: the keys they see, all output columns.
fn key_blocks(d: &AttentionDims) -> impl Fn(Range<usize>) -> (Range<usize>, Range<usize>) {
    let (d, hp) = (*d, round_up(d.head_dim));
    move |rows: Range<usize>| (d.visible_keys(rows.start).start..d.visible_keys(rows.end - 1).end, 0..hp)
}

/// Blocks of `dSᵀ·Q`-shaped products for key rows `rows`: the queries that see them.
fn query_blocks(d: &AttentionDims) -> impl Fn(Range<usize>) -> (Range<usize>, Range<usize>) {
    let (d, hp) = (*d, round_up(d.head_dim));
    move |rows: Range<usize>| (d.visible_queries(rows.start).start..d.visible_queries(rows.end - 1).end, 0..hp)
}

/// Zeroes the entries of a row of `tp` scores or probabilities outside the keys the row sees: scores of unseen
/// keys (and of the zero padding) were computed with their block, and the products after must not see them.
fn mask_unseen<T: Real>(row: &mut [T], seen: Range<usize>) {
    let (before, rest) = row.split_at_mut(seen.start);
    before.fill(T::zero());
    rest[seen.len()..].fill(T::zero());
}

/// `S = s·Q·Kᵀ` into `ws.p` (where a query sees the key; other entries within a block may hold scores too),
/// leaving `s·Q` in `ws.q` and `K` in `ws.k`.
fn scores<T: Real>(ws: &mut Workspace<T>, qkv: &[T], d: &AttentionDims, h: usize) {
    let (t, hs, w) = (d.time, d.head_dim, d.qkv_width());
    let (tp, hp) = (round_up(t), round_up(hs));
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    gather(ws.q, hp, qkv, w, h * hs, t, hs, scale);
    gather(ws.k, hp, qkv, w, d.key_offset(d.kv_head(h)), t, hs, T::one());
    transpose(ws.kt, tp, ws.k, hp, tp, hp);
    ws.p.fill(T::zero());
    product(ws.p, tp, ws.q, hp, ws.kt, tp, t, ws.pack, score_blocks(d));
}

/// Column of value head `g` in a `qkv` row.
fn value_offset(d: &AttentionDims, g: usize) -> usize {
    d.key_offset(g) + d.kv_heads * d.head_dim
}

pub fn forward<T: Real>(out: &mut [T], lse: &mut [T], qkv: &[T], d: AttentionDims, scratch: &mut [T], threads: usize) {
    let (t, hs, c, heads, w) = (d.time, d.head_dim, d.channels(), d.heads, d.qkv_width());
    let (tp, hp) = (round_up(t), round_up(hs));
    let out_ptr = SharedMut(out.as_mut_ptr());
    let lse_ptr = SharedMut(lse.as_mut_ptr());
    for_each_batch_run(&d, scratch, threads, |batches, mem| {
        let mut ws = Workspace::new(mem, &d);
        for b in batches {
            let qkv = &qkv[b * t * w..][..t * w];
            // SAFETY: batch element `b` is handled by exactly one run, and these are its own rows.
            let out = unsafe { out_ptr.slice(b * t * c, t * c) };
            let lse = unsafe { lse_ptr.slice(b * heads * t, heads * t) };
            for h in 0..heads {
                scores(&mut ws, qkv, &d, h);
                for row in 0..t {
                    let seen = d.visible_keys(row);
                    let s = &mut ws.p[row * tp..][seen.clone()];
                    let max = s.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                    let mut total = T::zero();
                    for x in s.iter_mut() {
                        *x = (*x - max).exp_v();
                        total = total + *x;
                    }
                    let inv = T::one() / total;
                    for x in s.iter_mut() {
                        *x = *x * inv;
                    }
                    mask_unseen(&mut ws.p[row * tp..][..tp], seen);
                    lse[h * t + row] = max + total.ln();
                }
                gather(ws.v, hp, qkv, w, value_offset(&d, d.kv_head(h)), t, hs, T::one());
                product(ws.o, hp, ws.p, tp, ws.v, hp, t, ws.pack, key_blocks(&d));
                for row in 0..t {
                    out[row * c + h * hs..][..hs].copy_from_slice(&ws.o[row * hp..][..hs]);
                }
            }
        }
    });
}

pub fn backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    d: AttentionDims,
    scratch: &mut [T],
    threads: usize,
) {
    let (t, hs, c, heads, w) = (d.time, d.head_dim, d.channels(), d.heads, d.qkv_width());
    let (tp, hp) = (round_up(t), round_up(hs));
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    let dqkv_ptr = SharedMut(dqkv.as_mut_ptr());
    for_each_batch_run(&d, scratch, threads, |batches, mem| {
        let mut ws = Workspace::new(mem, &d);
        for b in batches {
            let qkv = &qkv[b * t * w..][..t * w];
            let (dout, out) = (&dout[b * t * c..][..t * c], &out[b * t * c..][..t * c]);
            let lse = &lse[b * heads * t..][..heads * t];
            // SAFETY: batch element `b` is handled by exactly one run, and these are its own rows.
            let dqkv = unsafe { dqkv_ptr.slice(b * t * w, t * w) };
            // Each key/value head sums the gradients of its group of query heads.
            for row in 0..t {
                dqkv[row * w + c..(row + 1) * w].fill(T::zero());
            }
            for h in 0..heads {
                let (k_col, v_col) = (d.key_offset(d.kv_head(h)), value_offset(&d, d.kv_head(h)));
                scores(&mut ws, qkv, &d, h);
                for row in 0..t {
                    let l = lse[h * t + row];
                    for x in ws.p[row * tp..][d.visible_keys(row)].iter_mut() {
                        *x = (*x - l).exp_v();
                    }
                }
                gather(ws.d_o, hp, dout, c, h * hs, t, hs, T::one());
                gather(ws.o, hp, out, c, h * hs, t, hs, T::one());
                for row in 0..t {
                    ws.row_d[row] = crate::math::dot(&ws.d_o[row * hp..][..hp], &ws.o[row * hp..][..hp]);
                }
                // dP = dO·Vᵀ (Vᵀ goes where Kᵀ was), then dS = P ∘ (dP − D), zero where a key is not seen.
                gather(ws.v, hp, qkv, w, v_col, t, hs, T::one());
                transpose(ws.kt, tp, ws.v, hp, tp, hp);
                ws.dp.fill(T::zero());
                product(ws.dp, tp, ws.d_o, hp, ws.kt, tp, t, ws.pack, score_blocks(&d));
                for row in 0..t {
                    let seen = d.visible_keys(row);
                    let (p, dp) = (&ws.p[row * tp..][seen.clone()], &mut ws.dp[row * tp..][..tp]);
                    for (ds, &p) in dp[seen.clone()].iter_mut().zip(p) {
                        *ds = p * (*ds - ws.row_d[row]);
                    }
                    mask_unseen(dp, seen);
                }
                // dQ = s·dS·K.
                product(ws.o, hp, ws.dp, tp, ws.k, hp, t, ws.pack, key_blocks(&d));
                for row in 0..t {
                    for (g, &x) in dqkv[row * w + h * hs..][..hs].iter_mut().zip(&ws.o[row * hp..]) {
                        *g = x * scale;
                    }
                }
                // dK = dSᵀ·(s·Q); dV = Pᵀ·dO.
                transpose(ws.transposed, tp, ws.dp, tp, t, t);
                product(ws.o, hp, ws.transposed, tp, ws.q, hp, t, ws.pack, query_blocks(&d));
                for row in 0..t {
                    axpy(T::one(), &ws.o[row * hp..][..hs], &mut dqkv[row * w + k_col..][..hs]);
                }
                for row in 0..t {
                    mask_unseen(&mut ws.p[row * tp..][..tp], d.visible_keys(row));
                }
                transpose(ws.transposed, tp, ws.p, tp, t, t);
                product(ws.o, hp, ws.transposed, tp, ws.d_o, hp, t, ws.pack, query_blocks(&d));
                for row in 0..t {
                    axpy(T::one(), &ws.o[row * hp..][..hs], &mut dqkv[row * w + v_col..][..hs]);
                }
            }
        }
    });
}

/// A pointer that parallel tasks may write through, each to its own disjoint range.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);

unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// The range must lie inside the allocation, and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// One query (row `pos` of a single sequence's `qkv`) against the keys and values it sees (`0..=pos`, or the
/// window's last of them), every head.
pub fn decode<T: Real>(out: &mut [T], qkv: &[T], pos: usize, d: AttentionDims, scores: &mut [T]) {
    let (hs, w) = (d.head_dim, d.qkv_width());
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    let seen = d.visible_keys(pos);
    for h in 0..d.heads {
        let (k_col, v_col) = (d.key_offset(d.kv_head(h)), value_offset(&d, d.kv_head(h)));
        let q = &qkv[pos * w + h * hs..][..hs];
        let mut max = T::neg_infinity();
        for (j, s) in seen.clone().zip(scores[seen.clone()].iter_mut()) {
            *s = dot(q, &qkv[j * w + k_col..][..hs]) * scale;
            max = max.max(*s);
        }
        let mut total = T::zero();
        for s in scores[seen.clone()].iter_mut() {
            *s = (*s - max).exp_v();
            total = total + *s;
        }
        let o = &mut out[h * hs..][..hs];
        o.fill(T::zero());
        for (j, &p) in seen.clone().zip(&scores[seen.clone()]) {
            axpy(p / total, &qkv[j * w + v_col..][..hs], o);
        }
    }
}
