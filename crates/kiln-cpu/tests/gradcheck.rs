//! Every operation's backward pass against central finite differences, run in f64 on random inputs whose sizes
//! are not multiples of anything in particular. The scalar checked is `Σ out ⊙ R` for a random `R`, so the
//! backward pass receives `R` as the output gradient.

use kiln_core::backend::IGNORE_TARGET;
use kiln_core::experts::{
    Balance, ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeDims, MoeGather, MoeRoute,
    MoeRouteBackward,
};
use kiln_core::{
    AdamWStep, AttentionBackward, AttentionDims, Backend, MatmulBackward, MatmulDims, MatmulForward, NormBackward,
    NormDims, NormForward, NormKind, ResidualAdd, Role, Rotary, Tensor,
};
use kiln_cpu::CpuBackend;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

type B = CpuBackend<f64>;

struct Fixture {
    b: B,
    rng: ChaCha8Rng,
}

impl Fixture {
    fn new(seed: u64) -> Self {
        Fixture { b: B::new(), rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    fn random(&mut self, n: usize, scale: f64) -> Tensor {
        let t = self.b.alloc(n, Role::Activation).unwrap();
        let rng = &mut self.rng;
        for v in self.b.values_mut(t).unwrap() {
            *v = (rng.random::<f64>() * 2.0 - 1.0) * scale;
        }
        t
    }

    fn zeros(&mut self, n: usize) -> Tensor {
        self.b.alloc(n, Role::Activation).unwrap()
    }

    fn tokens(&mut self, ids: &[u32]) -> Tensor {
        let t = self.b.alloc(ids.len(), Role::Index).unwrap();
        self.b.upload_indices(t, ids).unwrap();
        t
    }

    fn values(&mut self, t: Tensor) -> Vec<f64> {
        self.b.values_mut(t).unwrap().to_vec()
    }

    fn dot(&mut self, a: Tensor, r: Tensor) -> f64 {
        let r = self.values(r);
        self.b.values_mut(a).unwrap().iter().zip(&r).map(|(x, y)| x * y).sum()
    }

    /// Compares `analytic` (the gradient of `loss` with respect to every element of `x`) with central
    /// differences at up to `samples` elements spread over `x`.
    fn check(&mut self, what: &str, x: Tensor, analytic: &[f64], mut loss: impl FnMut(&mut Self) -> f64) {
        assert_eq!(analytic.len(), x.len);
        let h = 1e-5;
        let samples = 48.min(x.len);
        let mut worst = 0.0f64;
        for s in 0..samples {
            let i = s * x.len / samples + self.rng.random_range(0..(x.len / samples).max(1));
            let i = i.min(x.len - 1);
            let orig = self.b.values_mut(x).unwrap()[i];
            self.b.values_mut(x).unwrap()[i] = orig + h;
            let plus = loss(self);
            self.b.values_mut(x).unwrap()[i] = orig - h;
            let minus = loss(self);
            self.b.values_mut(x).unwrap()[i] = orig;
            let numeric = (plus - minus) / (2.0 * h);
            let err = (numeric - analytic[i]).abs() / (1e-6 + numeric.abs().max(analytic[i].abs()));
            worst = worst.max(err);
            assert!(
                err < 1e-5 || (numeric - analytic[i]).abs() < 1e-8,
                "{what}[{i}]: analytic {} vs numeric {numeric} (relative error {err:e})",
                analytic[i]
            );
        }
        assert!(worst.is_finite());
    }
}

/// A normalisation's operands: its output and statistics (a mean only for layer normalisation), input, weight and
/// bias (layer normalisation only).
#[derive(Clone, Copy)]
struct Norm {
    out: Tensor,
    mean: Option<Tensor>,
    rstd: Tensor,
    inp: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    d: NormDims,
}

impl Norm {
    fn new(f: &mut Fixture, kind: NormKind, rows: usize, c: usize) -> Self {
        let layer = kind == NormKind::Layer;
        Norm {
            out: f.zeros(rows * c),
            mean: layer.then(|| f.zeros(rows)),
            rstd: f.zeros(rows),
            inp: f.random(rows * c, 2.0),
            weight: f.random(c, 1.0),
            bias: layer.then(|| f.random(c, 1.0)),
            d: NormDims { rows, c, kind, eps: 1e-5 },
        }
    }

    fn forward(&self, f: &mut Fixture, residual: Option<ResidualAdd>) {
        let Norm { out, mean, rstd, inp, weight, bias, d } = *self;
        f.b.norm_forward(NormForward { out, mean, rstd, inp, residual, weight, bias, d }).unwrap();
    }

    /// Backward into fresh gradients of the weight and bias, accumulating into `dinp` (and writing its column sums
    /// into `dinp_sums`); returns them.
    fn backward(
        &self,
        f: &mut Fixture,
        dinp: Tensor,
        dout: Tensor,
        dinp_sums: Option<Tensor>,
    ) -> (Tensor, Option<Tensor>) {
        let (dweight, dbias) = (f.zeros(self.d.c), self.bias.map(|_| f.zeros(self.d.c)));
        let Norm { inp, weight, mean, rstd, d, .. } = *self;
        let op = NormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sums, d };
        f.b.norm_backward(op).unwrap();
        (dweight, dbias)
    }
}

fn matmul(
    f: &mut Fixture,
    out: Tensor,
    inp: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    gelu_pre: Option<Tensor>,
    d: MatmulDims,
) {
    f.b.matmul_forward(MatmulForward { out, inp, weight, bias, gelu_pre, d }).unwrap();
}

#[allow(clippy::too_many_arguments)]
fn matmul_backward(
    f: &mut Fixture,
    dinp: Tensor,
    dweight: Tensor,
    dbias: Option<Tensor>,
    dout: Tensor,
    inp: Tensor,
    weight: Tensor,
    gelu: Option<(Tensor, Option<Tensor>)>,
    d: MatmulDims,
) {
    let (gelu_pre, gelu_dbias) = (gelu.map(|g| g.0), gelu.and_then(|g| g.1));
    let op = MatmulBackward { dinp, dweight, dbias, dout, inp, weight, gelu_pre, gelu_dbias, d };
    f.b.matmul_backward(op).unwrap();
}

#[test]
fn encoder_gradients() {
    let (batch, time, c, vocab) = (3, 5, 7, 11);
    let mut f = Fixture::new(1);
    let ids: Vec<u32> = (0..batch * time).map(|i| (i * 7 % vocab) as u32).collect();
    let tokens = f.tokens(&ids);
    let wte = f.random(vocab * c, 1.0);
    let wpe = f.random(time * c, 1.0);
    let out = f.zeros(batch * time * c);
    let r = f.random(batch * time * c, 1.0);
    let (dwte, dwpe) = (f.zeros(vocab * c), f.zeros(time * c));
    f.b.encoder_forward(out, tokens, wte, Some(wpe), batch, time, c).unwrap();
    f.b.encoder_backward(dwte, Some(dwpe), r, tokens, batch, time, c).unwrap();
    let loss = |f: &mut Fixture| {
        f.b.encoder_forward(out, tokens, wte, Some(wpe), batch, time, c).unwrap();
        f.dot(out, r)
    };
    let (gte, gpe) = (f.values(dwte), f.values(dwpe));
    f.check("dwte", wte, &gte, loss);
    f.check("dwpe", wpe, &gpe, loss);
    // Without learned positions (rotary models) the output is the token's row alone.
    let dwte_alone = f.zeros(vocab * c);
    f.b.encoder_forward(out, tokens, wte, None, batch, time, c).unwrap();
    let (e, table) = (f.values(out), f.values(wte));
    for (row, &id) in ids.iter().enumerate() {
        assert_eq!(e[row * c..][..c], table[id as usize * c..][..c]);
    }
    f.b.encoder_backward(dwte_alone, None, r, tokens, batch, time, c).unwrap();
    assert_eq!(f.values(dwte_alone), gte);
}

#[test]
fn norm_gradients() {
    for kind in [NormKind::Layer, NormKind::Rms] {
        let (rows, c) = (37, 19);
        let mut f = Fixture::new(2);
        let norm = Norm::new(&mut f, kind, rows, c);
        let r = f.random(rows * c, 1.0);
        let dinp = f.zeros(rows * c);
        norm.forward(&mut f, None);
        let (dw, db) = norm.backward(&mut f, dinp, r, None);
        let loss = |f: &mut Fixture| {
            norm.forward(f, None);
            f.dot(norm.out, r)
        };
        let (gi, gw) = (f.values(dinp), f.values(dw));
        f.check(&format!("{kind:?} dinp"), norm.inp, &gi, loss);
        f.check(&format!("{kind:?} dweight"), norm.weight, &gw, loss);
        if let (Some(bias), Some(db)) = (norm.bias, db) {
            let gb = f.values(db);
            f.check("dbias", bias, &gb, loss);
        }
    }
}

#[test]
fn rms_norm_is_x_over_its_root_mean_square_times_the_weight() {
    let (rows, c) = (3, 7);
    let mut f = Fixture::new(14);
    let norm = Norm::new(&mut f, NormKind::Rms, rows, c);
    norm.forward(&mut f, None);
    let (x, w, y) = (f.values(norm.inp), f.values(norm.weight), f.values(norm.out));
    for row in 0..rows {
        let x = &x[row * c..][..c];
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / c as f64 + 1e-5).sqrt();
        for j in 0..c {
            assert!((y[row * c + j] - x[j] / rms * w[j]).abs() < 1e-12);
        }
    }
}

#[test]
fn norm_backward_accumulates_into_the_residual_gradient() {
    for kind in [NormKind::Layer, NormKind::Rms] {
        let (rows, c) = (5, 9);
        let mut f = Fixture::new(3);
        let norm = Norm::new(&mut f, kind, rows, c);
        let r = f.random(rows * c, 1.0);
        norm.forward(&mut f, None);
        let fresh = f.zeros(rows * c);
        norm.backward(&mut f, fresh, r, None);
        let prior = f.random(rows * c, 1.0);
        let before = f.values(prior);
        norm.backward(&mut f, prior, r, None);
        let (after, grad) = (f.values(prior), f.values(fresh));
        for i in 0..rows * c {
            assert!((after[i] - (before[i] + grad[i])).abs() < 1e-12);
        }
    }
}

#[test]
fn residual_norm_equals_add_then_norm() {
    for kind in [NormKind::Layer, NormKind::Rms] {
        let (rows, c) = (13, 21);
        let mut f = Fixture::new(4);
        let fused = Norm::new(&mut f, kind, rows, c);
        let (other, sum) = (f.random(rows * c, 1.0), f.zeros(rows * c));
        fused.forward(&mut f, Some(ResidualAdd { other, sum }));
        let (va, vb, vsum) = (f.values(fused.inp), f.values(other), f.values(sum));
        for i in 0..rows * c {
            assert_eq!(vsum[i], va[i] + vb[i]);
        }
        let separate = Norm { out: f.zeros(rows * c), inp: sum, ..Norm::new(&mut f, kind, rows, c) };
        let separate = Norm { weight: fused.weight, bias: fused.bias, ..separate };
        separate.forward(&mut f, None);
        assert_eq!(f.values(fused.out), f.values(separate.out));
        assert_eq!(f.values(fused.rstd), f.values(separate.rstd));
    }
}

#[test]
fn swiglu_gradients() {
    let (rows, ffn) = (7, 11);
    let mut f = Fixture::new(15);
    let x = f.random(rows * 2 * ffn, 3.0);
    let (y, r) = (f.zeros(rows * ffn), f.random(rows * ffn, 1.0));
    // Poisoned: the backward pass overwrites every element.
    let dx = f.random(rows * 2 * ffn, 1.0);
    f.b.swiglu_forward(y, x, rows, ffn).unwrap();
    let (xs, ys) = (f.values(x), f.values(y));
    let silu = |v: f64| v / (1.0 + (-v).exp());
    for row in 0..rows {
        for j in 0..ffn {
            let (gate, up) = (xs[row * 2 * ffn + j], xs[row * 2 * ffn + ffn + j]);
            assert!((ys[row * ffn + j] - silu(gate) * up).abs() < 1e-12);
        }
    }
    f.b.swiglu_backward(dx, r, x, rows, ffn).unwrap();
    let g = f.values(dx);
    f.check("dx", x, &g, |f| {
        f.b.swiglu_forward(y, x, rows, ffn).unwrap();
        f.dot(y, r)
    });
}

#[test]
fn rope_rotates_rotate_half_pairs_of_queries_and_keys_and_its_inverse_is_its_gradient() {
    let d = AttentionDims { kv_heads: 2, ..AttentionDims::causal(2, 5, 4, 6) };
    let (rows, w, half) = (d.batch * d.time, d.qkv_width(), d.head_dim / 2);
    let (first_pos, positions) = (3, 9);
    let mut f = Fixture::new(16);
    // A real table: cos and sin of angles θ = p·freq[i].
    let freqs = [1.0, 0.3, 0.01];
    let table = f.zeros(2 * positions * half);
    for p in 0..positions {
        for i in 0..half {
            let angle = p as f64 * freqs[i];
            let t = f.b.values_mut(table).unwrap();
            t[p * half + i] = angle.cos();
            t[(positions + p) * half + i] = angle.sin();
        }
    }
    let qkv = f.random(rows * w, 1.0);
    let before = f.values(qkv);
    let rope = |f: &mut Fixture, qkv: Tensor, inverse: bool| {
        f.b.rope(Rotary { qkv, table, d, first_pos, inverse }).unwrap();
    };
    rope(&mut f, qkv, false);
    let after = f.values(qkv);
    let rotated = (d.heads + d.kv_heads) * d.head_dim;
    for row in 0..rows {
        let p = first_pos + row % d.time;
        for col in 0..w {
            let (x, y) = (before[row * w + col], after[row * w + col]);
            if col >= rotated {
                assert_eq!(x, y, "values are not rotated");
                continue;
            }
            let (i, head_start) = (col % d.head_dim, col - col % d.head_dim);
            let angle = p as f64 * freqs[i % half];
            let partner = before[row * w + head_start + (i + half) % d.head_dim];
            let want = if i < half {
                x * angle.cos() - partner * angle.sin()
            } else {
                x * angle.cos() + partner * angle.sin()
            };
            assert!((y - want).abs() < 1e-12, "row {row} column {col}: {y} vs {want}");
        }
    }
    rope(&mut f, qkv, true);
    for (a, b) in f.values(qkv).iter().zip(&before) {
        assert!((a - b).abs() < 1e-12, "the inverse rotation undoes the rotation");
    }
    // The loss Σ rope(qkv)·R has gradient rope⁻¹(R).
    let r = f.random(rows * w, 1.0);
    let grad = f.zeros(rows * w);
    let rv = f.values(r);
    f.b.values_mut(grad).unwrap().copy_from_slice(&rv);
    rope(&mut f, grad, true);
    let (g, copy) = (f.values(grad), f.zeros(rows * w));
    f.check("dqkv", qkv, &g, |f| {
        let x = f.values(qkv);
        f.b.values_mut(copy).unwrap().copy_from_slice(&x);
        rope(f, copy, false);
        f.dot(copy, r)
    });
}

#[test]
fn matmul_and_fused_gelu_gradients() {
    // x → gelu(x·W1ᵀ + b1) → ·W2ᵀ + b2: exercises the GELU epilogue forwards and backwards.
    let (rows, c, hidden, c_out) = (11, 6, 13, 5);
    let mut f = Fixture::new(5);
    let x = f.random(rows * c, 1.0);
    let (w1, b1) = (f.random(hidden * c, 0.7), f.random(hidden, 0.5));
    let (w2, b2) = (f.random(c_out * hidden, 0.7), f.random(c_out, 0.5));
    let (pre, h, y) = (f.zeros(rows * hidden), f.zeros(rows * hidden), f.zeros(rows * c_out));
    let r = f.random(rows * c_out, 1.0);
    let d1 = MatmulDims { rows, c_in: c, c_out: hidden };
    let d2 = MatmulDims { rows, c_in: hidden, c_out };
    let forward = |f: &mut Fixture| {
        matmul(f, h, x, w1, Some(b1), Some(pre), d1);
        matmul(f, y, h, w2, Some(b2), None, d2);
    };
    forward(&mut f);
    // GELU on its own, as a backward pass recomputes it, writes what the epilogue wrote, bit for bit.
    let again = f.zeros(rows * hidden);
    f.b.gelu_forward(again, pre).unwrap();
    assert_eq!(f.values(again), f.values(h));
    let (dpre, dx) = (f.zeros(rows * hidden), f.zeros(rows * c));
    let (dw1, db1, dw2, db2) = (f.zeros(hidden * c), f.zeros(hidden), f.zeros(c_out * hidden), f.zeros(c_out));
    // b1's gradient twice: from the product that applies GELU's derivative (added to what is there), and from the
    // first layer's own backward pass.
    let db1_from_gelu = f.random(hidden, 1.0);
    let before = f.values(db1_from_gelu);
    matmul_backward(&mut f, dpre, dw2, Some(db2), r, h, w2, Some((pre, Some(db1_from_gelu))), d2);
    matmul_backward(&mut f, dx, dw1, Some(db1), dpre, x, w1, None, d1);
    let loss = |f: &mut Fixture| {
        forward(f);
        f.dot(y, r)
    };
    for (name, t, g) in [("dx", x, dx), ("dw1", w1, dw1), ("db1", b1, db1), ("dw2", w2, dw2), ("db2", b2, db2)] {
        let g = f.values(g);
        f.check(name, t, &g, loss);
    }
    let from_gelu: Vec<f64> = f.values(db1_from_gelu).iter().zip(&before).map(|(a, b)| a - b).collect();
    f.check("db1 from the GELU product", b1, &from_gelu, loss);
}

#[test]
fn a_norms_input_gradient_sums_to_the_bias_gradient_of_the_projection_before_it() {
    // A projection's output is added to the residual stream, which is normalised; the residual stream's gradient
    // also has a part from above (a later layer's). The norm's backward pass sums the whole over rows: db.
    for kind in [NormKind::Layer, NormKind::Rms] {
        let (rows, c_in, c) = (9, 5, 11);
        let mut f = Fixture::new(15);
        let (x, w, b) = (f.random(rows * c_in, 1.0), f.random(c * c_in, 0.7), f.random(c, 0.5));
        let (proj, sum) = (f.zeros(rows * c), f.zeros(rows * c));
        let norm = Norm::new(&mut f, kind, rows, c);
        let (r, above) = (f.random(rows * c, 1.0), f.random(rows * c, 1.0));
        let d = MatmulDims { rows, c_in, c_out: c };
        let forward = |f: &mut Fixture| {
            matmul(f, proj, x, w, Some(b), None, d);
            norm.forward(f, Some(ResidualAdd { other: proj, sum }));
        };
        forward(&mut f);
        let (dres, sums) = (f.zeros(rows * c), f.random(c, 1.0));
        let from_above = f.values(above);
        f.b.values_mut(dres).unwrap().copy_from_slice(&from_above);
        Norm { inp: sum, ..norm }.backward(&mut f, dres, r, Some(sums));
        let loss = |f: &mut Fixture| {
            forward(f);
            f.dot(norm.out, r) + f.dot(sum, above)
        };
        let g = f.values(sums);
        f.check(&format!("{kind:?}: the projection's bias"), b, &g, loss);
    }
}

#[test]
fn matmul_backward_accumulates_weight_gradients() {
    let d = MatmulDims { rows: 4, c_in: 3, c_out: 2 };
    let mut f = Fixture::new(6);
    let (x, w, r) = (f.random(12, 1.0), f.random(6, 1.0), f.random(8, 1.0));
    let (dx, dw, db) = (f.zeros(12), f.zeros(6), f.zeros(2));
    matmul_backward(&mut f, dx, dw, Some(db), r, x, w, None, d);
    let (once_w, once_b) = (f.values(dw), f.values(db));
    matmul_backward(&mut f, dx, dw, Some(db), r, x, w, None, d);
    let (twice_w, twice_b) = (f.values(dw), f.values(db));
    for (a, b) in once_w.iter().chain(&once_b).zip(twice_w.iter().chain(&twice_b)) {
        assert!((2.0 * a - b).abs() < 1e-12);
    }
}

#[test]
fn attention_gradients() {
    // One shape within a single 4×8 block, one spanning several blocks with more batch elements than threads;
    // then non-causal attention, and grouped-query attention (2 and 3 query heads per key/value head); then sliding
    // windows, shorter than a block and across blocks.
    for d in [
        AttentionDims::causal(2, 7, 3, 5),
        AttentionDims::causal(5, 19, 2, 12),
        AttentionDims { causal: false, ..AttentionDims::causal(2, 19, 2, 5) },
        AttentionDims { kv_heads: 2, ..AttentionDims::causal(2, 9, 4, 6) },
        AttentionDims { kv_heads: 1, causal: false, ..AttentionDims::causal(1, 17, 3, 4) },
        AttentionDims { window: Some(3), ..AttentionDims::causal(2, 19, 2, 5) },
        AttentionDims { kv_heads: 1, window: Some(20), ..AttentionDims::causal(1, 37, 2, 4) },
    ] {
        attention_gradients_at(d);
    }
}

fn attention_gradients_at(d: AttentionDims) {
    let (c, w) = (d.channels(), d.qkv_width());
    let rows = d.batch * d.time;
    let mut f = Fixture::new(7);
    let qkv = f.random(rows * w, 1.0);
    let (out, lse) = (f.zeros(rows * c), f.zeros(d.batch * d.heads * d.time));
    let r = f.random(rows * c, 1.0);
    // Poisoned: the backward pass overwrites every element, summing a group's key/value gradients itself.
    let dqkv = f.random(rows * w, 1.0);
    f.b.attention_forward(out, lse, qkv, d).unwrap();
    // With the bias gradient of the product that wrote qkv: the column sums of dqkv, added to what is there.
    let dbias = f.random(w, 1.0);
    let before = f.values(dbias);
    let op = AttentionBackward { dqkv, dout: r, qkv, out, lse, dbias: Some(dbias), d };
    f.b.attention_backward(op).unwrap();
    let g = f.values(dqkv);
    f.check("dqkv", qkv, &g, |f| {
        f.b.attention_forward(out, lse, qkv, d).unwrap();
        f.dot(out, r)
    });
    let sums: Vec<f64> = f.values(dbias).iter().zip(&before).map(|(a, b)| a - b).collect();
    for (j, s) in sums.iter().enumerate() {
        let want: f64 = g.iter().skip(j).step_by(w).sum();
        assert!((s - want).abs() < 1e-12 * (1.0 + want.abs()), "column {j}: {s} against {want}");
    }
}

#[test]
fn attention_is_causal_only_when_asked() {
    // Changing the last position's keys and values must not change any earlier output of causal attention, and
    // must change every output of non-causal attention.
    for causal in [true, false] {
        let d = AttentionDims { causal, kv_heads: 1, ..AttentionDims::causal(1, 6, 2, 4) };
        let (c, w) = (d.channels(), d.qkv_width());
        let mut f = Fixture::new(8);
        let qkv = f.random(d.time * w, 1.0);
        let (out, lse) = (f.zeros(d.time * c), f.zeros(d.heads * d.time));
        f.b.attention_forward(out, lse, qkv, d).unwrap();
        let before = f.values(out);
        for v in &mut f.b.values_mut(qkv).unwrap()[(d.time - 1) * w + c..] {
            *v += 1.0;
        }
        f.b.attention_forward(out, lse, qkv, d).unwrap();
        let after = f.values(out);
        let earlier = (d.time - 1) * c;
        assert_eq!(causal, before[..earlier] == after[..earlier], "causal: {causal}");
        assert_ne!(before[earlier..], after[earlier..]);
    }
}

#[test]
fn a_sliding_window_hides_older_keys() {
    // Changing the keys and values of position 2 changes the outputs of the positions whose window of 3 holds it
    // (2, 3 and 4), and no other; decoding with a cache gives the forward pass's outputs.
    let d = AttentionDims { window: Some(3), kv_heads: 1, ..AttentionDims::causal(1, 8, 2, 4) };
    let (c, w) = (d.channels(), d.qkv_width());
    let mut f = Fixture::new(9);
    let qkv = f.random(d.time * w, 1.0);
    let (out, lse) = (f.zeros(d.time * c), f.zeros(d.heads * d.time));
    let decoded = f.zeros(d.time * c);
    let outputs = |f: &mut Fixture| {
        f.b.attention_forward(out, lse, qkv, d).unwrap();
        for pos in 0..d.time {
            let (one, cache) = (decoded.slice(pos * c, c), qkv.slice(0, (pos + 1) * w));
            f.b.attention_decode(one, cache, pos, AttentionDims { time: pos + 1, ..d }).unwrap();
        }
        let (forward, decoded) = (f.values(out), f.values(decoded));
        for (x, y) in forward.iter().zip(&decoded) {
            assert!((x - y).abs() < 1e-12, "decoding {y} against the forward pass's {x}");
        }
        forward
    };
    let before = outputs(&mut f);
    for v in &mut f.b.values_mut(qkv).unwrap()[2 * w + c..3 * w] {
        *v += 1.0;
    }
    let after = outputs(&mut f);
    for (pos, (b, a)) in before.chunks(c).zip(after.chunks(c)).enumerate() {
        assert_eq!((2..5).contains(&pos), b != a, "position {pos}");
    }
}

#[test]
fn grouped_query_attention_equals_repeated_key_value_heads() {
    // Two query heads sharing one key/value head give what two heads with copies of it give.
    let grouped = AttentionDims { kv_heads: 1, ..AttentionDims::causal(1, 5, 2, 3) };
    let full = AttentionDims::causal(1, 5, 2, 3);
    let mut f = Fixture::new(10);
    let g = f.random(grouped.time * grouped.qkv_width(), 1.0);
    let rows = f.values(g);
    let hs = grouped.head_dim;
    // q0 q1 k v  →  q0 q1 k k v v
    let repeated: Vec<f64> = rows
        .chunks(grouped.qkv_width())
        .flat_map(|r| [&r[..2 * hs], &r[2 * hs..3 * hs], &r[2 * hs..3 * hs], &r[3 * hs..], &r[3 * hs..]].concat())
        .collect();
    let r = f.zeros(repeated.len());
    f.b.values_mut(r).unwrap().copy_from_slice(&repeated);
    let outs: Vec<Vec<f64>> = [(grouped, g), (full, r)]
        .into_iter()
        .map(|(d, qkv)| {
            let (out, lse) = (f.zeros(d.time * d.channels()), f.zeros(d.heads * d.time));
            f.b.attention_forward(out, lse, qkv, d).unwrap();
            f.values(out)
        })
        .collect();
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn classifier_loss_and_gradient() {
    let (rows, vocab, padded) = (9, 10, 16);
    let mut f = Fixture::new(9);
    let logits = f.random(rows * padded, 3.0);
    let work = f.zeros(rows * padded);
    let losses = f.zeros(rows);
    let mut ids: Vec<u32> = (0..rows).map(|i| (i * 3 % vocab) as u32).collect();
    ids[4] = IGNORE_TARGET;
    let targets = f.tokens(&ids);
    let original = f.values(logits);
    // Σ losses, evaluated on a copy since the classifier overwrites its logits when asked for gradients.
    let loss = |f: &mut Fixture| {
        let src = f.values(logits);
        f.b.values_mut(work).unwrap().copy_from_slice(&src);
        f.b.zero(losses).unwrap();
        f.b.classifier(work, losses, targets, rows, vocab, padded, None).unwrap();
        f.b.sum(losses).unwrap() as f64
    };
    // The loss of a row is log Σ e^z − z_target over the real vocabulary only.
    loss(&mut f);
    let per_row = f.values(losses);
    for row in 0..rows {
        let z = &original[row * padded..][..vocab];
        let want = if ids[row] == IGNORE_TARGET {
            0.0
        } else {
            z.iter().map(|v| v.exp()).sum::<f64>().ln() - z[ids[row] as usize]
        };
        assert!((per_row[row] - want).abs() < 1e-12, "row {row}: {} vs {want}", per_row[row]);
    }
    f.b.zero(losses).unwrap();
    let one = f.b.scalar(1.0).unwrap();
    f.b.classifier(logits, losses, targets, rows, vocab, padded, Some(one)).unwrap();
    let grad = f.values(logits);
    f.b.values_mut(logits).unwrap().copy_from_slice(&original);
    for row in 0..rows {
        assert!(
            grad[row * padded + vocab..][..padded - vocab].iter().all(|&g| g == 0.0),
            "padded columns get no gradient"
        );
    }
    assert!(grad[4 * padded..][..padded].iter().all(|&g| g == 0.0), "ignored rows get no gradient");
    // The f32-rounded sum in `loss` limits precision; use the exact per-row f64 losses instead.
    f.check("dlogits", logits, &grad, |f| {
        let src = f.values(logits);
        f.b.values_mut(work).unwrap().copy_from_slice(&src);
        f.b.zero(losses).unwrap();
        f.b.classifier(work, losses, targets, rows, vocab, padded, None).unwrap();
        f.values(losses).iter().sum()
    });
}

#[test]
fn adamw_matches_the_formula() {
    let n = 1000;
    let mut f = Fixture::new(10);
    let (p, g, m, v) = (f.random(n, 1.0), f.random(n, 1.0), f.random(n, 0.1), f.random(n, 0.1));
    for x in f.b.values_mut(v).unwrap() {
        *x = x.abs();
    }
    let (p0, g0, m0, v0) = (f.values(p), f.values(g), f.values(m), f.values(v));
    // A gradient norm of 4 clipped to 2: a scale of one half.
    let values = f.b.alloc(3, Role::Stat).unwrap();
    f.b.upload(values, &AdamWStep::values_of(0.01, 3, 4.0)).unwrap();
    let s = AdamWStep { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 2.0, values };
    f.b.adamw(p, g, m, v, &s).unwrap();
    let (p1, m1, v1) = (f.values(p), f.values(m), f.values(v));
    let (b1, b2) = (0.9f32 as f64, 0.95f32 as f64);
    for i in 0..n {
        let grad = g0[i] * 0.5;
        let mm = b1 * m0[i] + (1.0 - b1) * grad;
        let vv = b2 * v0[i] + (1.0 - b2) * grad * grad;
        let mhat = mm / (1.0 - b1.powi(3));
        let vhat = vv / (1.0 - b2.powi(3));
        let want = p0[i] - 0.01f32 as f64 * (mhat / (vhat.sqrt() + 1e-8f32 as f64) + 0.1f32 as f64 * p0[i]);
        assert!((m1[i] - mm).abs() < 1e-12 && (v1[i] - vv).abs() < 1e-12);
        assert!((p1[i] - want).abs() < 1e-12, "p[{i}] {} vs {want}", p1[i]);
    }
}

#[test]
fn adamw_updates_only_inside_the_master_pieces_a_rank_keeps() {
    let mut f = Fixture::new(13);
    let (p, g, m, v) = (f.random(300, 1.0), f.random(300, 1.0), f.zeros(300), f.zeros(300));
    let values = f.b.alloc(3, Role::Stat).unwrap();
    f.b.upload(values, &AdamWStep::values_of(0.01, 1, 1.0)).unwrap();
    let s = AdamWStep { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, grad_clip: 1.0, values };
    f.b.keep_master_pieces(p.slice(100, 200), &[0..50, 50..120]).unwrap();
    // Inside one piece (elements 150..220 of the allocation): updated. Outside every piece: refused.
    f.b.adamw(p.slice(160, 60), g.slice(0, 60), m.slice(0, 60), v.slice(0, 60), &s).unwrap();
    f.b.adamw(p.slice(0, 100), g.slice(0, 100), m.slice(0, 100), v.slice(0, 100), &s).unwrap_err();
    // Across the boundary of two pieces, even adjacent ones: a packed master copy has no such range.
    let err = f.b.adamw(p.slice(140, 20), g.slice(0, 20), m.slice(0, 20), v.slice(0, 20), &s).unwrap_err();
    assert!(err.to_string().contains("not all in one piece"), "{err}");
    let err = f.b.keep_master_pieces(p.slice(100, 200), &[0..10, 190..201]).unwrap_err();
    assert!(err.to_string().contains("past the tensor"), "{err}");
}

#[test]
fn sums() {
    let mut f = Fixture::new(11);
    let t = f.random(100_003, 1.0);
    let vals = f.values(t);
    let want: f64 = vals.iter().sum();
    let want_sq: f64 = vals.iter().map(|x| x * x).sum();
    assert!((f.b.sum(t).unwrap() as f64 - want).abs() < 1e-3);
    assert!(((f.b.sum_squares(t).unwrap() as f64) - want_sq).abs() / want_sq < 1e-6);
}

#[test]
fn bad_operands_are_errors_not_panics() {
    let mut f = Fixture::new(12);
    let buf = f.random(100, 1.0);
    let (w, bias) = (f.random(10, 1.0), f.random(10, 1.0));
    let stats = f.zeros(20);
    let d = NormDims { rows: 5, c: 10, kind: NormKind::Layer, eps: 1e-5 };
    let norm = |out: Tensor, inp: Tensor, mean: Option<Tensor>| NormForward {
        out,
        mean,
        rstd: stats.slice(5, 5),
        inp,
        residual: None,
        weight: w,
        bias: Some(bias),
        d,
    };
    // Output overlapping the input.
    let err = f.b.norm_forward(norm(buf.slice(0, 50), buf.slice(40, 50), Some(stats.slice(0, 5))));
    assert!(err.unwrap_err().to_string().contains("overlaps"));
    // Wrong size.
    let err = f.b.norm_forward(norm(buf.slice(0, 40), buf.slice(50, 50), Some(stats.slice(0, 5))));
    assert!(err.unwrap_err().to_string().contains("expected 50"));
    let err = f.b.gelu_forward(buf.slice(0, 10), buf.slice(50, 11));
    assert!(err.unwrap_err().to_string().contains("expected 11"));
    // Layer normalisation without a mean, and RMS normalisation with a bias.
    let err = f.b.norm_forward(norm(buf.slice(0, 50), buf.slice(50, 50), None));
    assert!(err.unwrap_err().to_string().contains("mean and a bias"));
    let rms =
        NormForward { d: NormDims { kind: NormKind::Rms, ..d }, ..norm(buf.slice(0, 50), buf.slice(50, 50), None) };
    assert!(f.b.norm_forward(rms).unwrap_err().to_string().contains("mean and a bias"));
    // The bias gradient of GELU's input, with no GELU.
    let lin = MatmulDims { rows: 2, c_in: 5, c_out: 2 };
    let (dx, dw, g, x, wt, gb) =
        (f.zeros(10), f.zeros(10), f.random(4, 1.0), f.random(10, 1.0), f.random(10, 1.0), f.zeros(5));
    let op = MatmulBackward {
        dinp: dx,
        dweight: dw,
        dbias: None,
        dout: g,
        inp: x,
        weight: wt,
        gelu_pre: None,
        gelu_dbias: Some(gb),
        d: lin,
    };
    assert!(f.b.matmul_backward(op).unwrap_err().to_string().contains("needs GELU's input"));
    // A rotary table too short for the positions asked.
    let d = AttentionDims::causal(1, 4, 1, 2);
    let (qkv, table) = (f.random(4 * d.qkv_width(), 1.0), f.random(2 * 4, 1.0));
    let err = f.b.rope(Rotary { qkv, table, d, first_pos: 1, inverse: false });
    assert!(err.unwrap_err().to_string().contains("not all in a table"));
    // Token outside the vocabulary.
    let tokens = f.tokens(&[0, 99]);
    let (wte, wpe, out) = (f.random(40, 1.0), f.random(40, 1.0), f.zeros(20));
    let err = f.b.encoder_forward(out, tokens, wte, Some(wpe), 1, 2, 10);
    assert!(err.unwrap_err().to_string().contains("outside the vocabulary"));
    // A dispatch that routing did not write: slots out of range, runs that do not cover the slots, order and place
    // that are not each other's inverse; and more choices than experts.
    let d = MoeDims { rows: 2, experts: 3, top_k: 2 };
    let (x, rows) = (f.random(2 * 5, 1.0), f.zeros(4 * 5));
    let order = f.tokens(&[0, 1, 2, 4]);
    let err = f.b.moe_gather(MoeGather { out: rows, inp: x, order, width: 5, d });
    assert!(err.unwrap_err().to_string().contains("not a dispatch"));
    let (order, place) = (f.tokens(&[0, 1, 2, 3]), f.tokens(&[1, 0, 2, 3]));
    let (dexpert_out, dweights, weights) = (f.zeros(4 * 5), f.zeros(4), f.random(4, 1.0));
    let backward =
        MoeCombineBackward { dexpert_out, dweights, dout: x, expert_out: rows, weights, order, place, width: 5, d };
    assert!(f.b.moe_combine_backward(backward).unwrap_err().to_string().contains("not a dispatch"));
    let (out, weight) = (f.zeros(4 * 2), f.random(3 * 2 * 5, 1.0));
    for offsets in [[0, 1, 2, 3], [0, 3, 2, 4], [1, 2, 3, 4]] {
        let offsets = f.tokens(&offsets);
        let op = ExpertMatmulForward {
            out,
            inp: rows,
            weight,
            offsets,
            experts: 3,
            d: MatmulDims { rows: 4, c_in: 5, c_out: 2 },
        };
        assert!(f.b.expert_matmul_forward(op).unwrap_err().to_string().contains("not a dispatch"), "{offsets:?}");
    }
    let wide = MoeDims { top_k: 4, ..d };
    let (out, order) = (f.zeros(8 * 5), f.tokens(&[0; 8]));
    let err = f.b.moe_gather(MoeGather { out, inp: x, order, width: 5, d: wide });
    assert!(err.unwrap_err().to_string().contains("top_k 4 of 3 experts"));
    let (out, order) = (f.zeros(0), f.tokens(&[0, 1, 2, 3]));
    let err = f.b.moe_gather(MoeGather { out, inp: x.slice(0, 0), order, width: 0, d });
    assert!(err.unwrap_err().to_string().contains("width 0"));
}

/// A mixture-of-experts MLP's operands: `rows` tokens of `c` channels routed to `top_k` of `experts` SwiGLU experts
/// of width `ffn`, and a load-balancing gradient scaled by `dloss`.
struct Moe {
    d: MoeDims,
    c: usize,
    ffn: usize,
    x: Tensor,
    router: Tensor,
    fc: Tensor,
    proj: Tensor,
    logits: Tensor,
    probs: Tensor,
    weights: Tensor,
    chosen: Tensor,
    order: Tensor,
    place: Tensor,
    offsets: Tensor,
    xs: Tensor,
    pre: Tensor,
    hidden: Tensor,
    expert_out: Tensor,
    y: Tensor,
    balance: Balance,
}

impl Moe {
    fn new(f: &mut Fixture, d: MoeDims, c: usize, ffn: usize) -> Self {
        let (n, s, e) = (d.rows, d.slots(), d.experts);
        let index = |f: &mut Fixture, len| f.b.alloc(len, Role::Index).unwrap();
        Moe {
            d,
            c,
            ffn,
            x: f.random(n * c, 1.0),
            router: f.random(e * c, 1.0),
            fc: f.random(e * 2 * ffn * c, 0.5),
            proj: f.random(e * c * ffn, 0.5),
            logits: f.zeros(n * e),
            probs: f.zeros(n * e),
            weights: f.zeros(s),
            chosen: index(f, s),
            order: index(f, s),
            place: index(f, s),
            offsets: index(f, e + 1),
            xs: f.zeros(s * c),
            pre: f.zeros(s * 2 * ffn),
            hidden: f.zeros(s * ffn),
            expert_out: f.zeros(s * c),
            y: f.zeros(n * c),
            balance: Balance {
                gradient: f.zeros(e),
                probability_sums: f.zeros(e),
                terms: Some(f.zeros(e)),
                dloss: f.random(1, 1.0),
                scale: 0.7,
            },
        }
    }

    fn matmul(&self, rows: usize, c_in: usize, c_out: usize) -> MatmulDims {
        MatmulDims { rows, c_in, c_out }
    }

    /// `y`, and the balance's gradient, probability sums and terms zeroed and then accumulated.
    fn forward(&self, f: &mut Fixture, normalize: bool) {
        let (d, c, ffn, s) = (self.d, self.c, self.ffn, self.d.slots());
        f.b.matmul_forward(MatmulForward {
            out: self.logits,
            inp: self.x,
            weight: self.router,
            bias: None,
            gelu_pre: None,
            d: self.matmul(d.rows, c, d.experts),
        })
        .unwrap();
        for t in [self.balance.gradient, self.balance.probability_sums, self.balance.terms.unwrap()] {
            f.b.zero(t).unwrap();
        }
        let (probs, weights, chosen, order, place, offsets) =
            (self.probs, self.weights, self.chosen, self.order, self.place, self.offsets);
        let (logits, balance) = (self.logits, Some(self.balance));
        f.b.moe_route(MoeRoute { probs, weights, chosen, order, place, offsets, logits, normalize, balance, d })
            .unwrap();
        f.b.moe_gather(MoeGather { out: self.xs, inp: self.x, order, width: c, d }).unwrap();
        let experts = d.experts;
        let fc = ExpertMatmulForward {
            out: self.pre,
            inp: self.xs,
            weight: self.fc,
            offsets,
            experts,
            d: self.matmul(s, c, 2 * ffn),
        };
        f.b.expert_matmul_forward(fc).unwrap();
        f.b.swiglu_forward(self.hidden, self.pre, s, ffn).unwrap();
        let proj = ExpertMatmulForward {
            out: self.expert_out,
            inp: self.hidden,
            weight: self.proj,
            offsets,
            experts,
            d: self.matmul(s, ffn, c),
        };
        f.b.expert_matmul_forward(proj).unwrap();
        let (expert_out, accumulate) = (self.expert_out, false);
        f.b.moe_combine(MoeCombine { out: self.y, expert_out, weights: Some(weights), place, accumulate, width: c, d })
            .unwrap();
    }

    /// `Σ y ⊙ r` plus the balancing loss whose gradient with respect to the probabilities the route wrote: with the
    /// counts held, `dloss·scale·Σ_e count_e·Σ_t p_te`, which must be the sum of the terms the route wrote.
    fn loss(&self, f: &mut Fixture, r: Tensor) -> f64 {
        let e = self.d.experts;
        let (probs, gradient) = (f.values(self.probs), f.values(self.balance.gradient));
        let balance: f64 = probs.chunks(e).map(|p| p.iter().zip(&gradient).map(|(p, g)| p * g).sum::<f64>()).sum();
        let terms: f64 = f.values(self.balance.terms.unwrap()).iter().sum();
        assert!((terms - balance).abs() <= 1e-12 * balance.abs(), "the terms sum to {terms}, not {balance}");
        f.dot(self.y, r) + balance
    }
}

#[test]
fn mixture_of_experts_routes_each_token_to_its_top_experts() {
    let d = MoeDims { rows: 13, experts: 5, top_k: 2 };
    let (c, ffn) = (6, 7);
    let mut f = Fixture::new(21);
    let m = Moe::new(&mut f, d, c, ffn);
    for normalize in [false, true] {
        m.forward(&mut f, normalize);
        let (x, router, fc, proj) = (f.values(m.x), f.values(m.router), f.values(m.fc), f.values(m.proj));
        let (y, weights) = (f.values(m.y), f.values(m.weights));
        let silu = |v: f64| v / (1.0 + (-v).exp());
        for t in 0..d.rows {
            let x = &x[t * c..(t + 1) * c];
            let logits: Vec<f64> = router.chunks(c).map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
            let total: f64 = logits.iter().map(|l| l.exp()).sum();
            let mut ranked: Vec<(usize, f64)> = logits.iter().map(|l| l.exp() / total).enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top = &ranked[..d.top_k];
            let sum: f64 = if normalize { top.iter().map(|(_, p)| p).sum() } else { 1.0 };
            let mut expected = vec![0.0; c];
            for (j, &(e, p)) in top.iter().enumerate() {
                assert!((weights[t * d.top_k + j] - p / sum).abs() < 1e-12, "token {t} choice {j}");
                let fc = &fc[e * 2 * ffn * c..(e + 1) * 2 * ffn * c];
                let pre: Vec<f64> = fc.chunks(c).map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
                let hidden: Vec<f64> = (0..ffn).map(|i| silu(pre[i]) * pre[ffn + i]).collect();
                for (o, w) in expected.iter_mut().zip(proj[e * c * ffn..(e + 1) * c * ffn].chunks(ffn)) {
                    *o += p / sum * w.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f64>();
                }
            }
            for (i, want) in expected.iter().enumerate() {
                assert!((y[t * c + i] - want).abs() < 1e-12, "token {t} channel {i}: {} vs {want}", y[t * c + i]);
            }
        }
    }
}

#[test]
fn mixture_of_experts_gradients() {
    let d = MoeDims { rows: 11, experts: 4, top_k: 2 };
    let (c, ffn) = (5, 6);
    for normalize in [false, true] {
        let mut f = Fixture::new(22 + u64::from(normalize));
        let m = Moe::new(&mut f, d, c, ffn);
        let (n, s, e) = (d.rows, d.slots(), d.experts);
        let r = f.random(n * c, 1.0);
        // Poisoned where the backward pass overwrites; zeroed where it accumulates.
        let (dexpert_out, dweights, dhidden) = (f.random(s * c, 1.0), f.random(s, 1.0), f.random(s * ffn, 1.0));
        let (dpre, dxs, dlogits, dx) =
            (f.random(s * 2 * ffn, 1.0), f.random(s * c, 1.0), f.random(n * e, 1.0), f.random(n * c, 1.0));
        let (drouter, dfc, dproj) = (f.zeros(e * c), f.zeros(e * 2 * ffn * c), f.zeros(e * c * ffn));
        m.forward(&mut f, normalize);
        let (weights, order, place, offsets) = (m.weights, m.order, m.place, m.offsets);
        let (expert_out, width) = (m.expert_out, c);
        f.b.moe_combine_backward(MoeCombineBackward {
            dexpert_out,
            dweights,
            dout: r,
            expert_out,
            weights,
            order,
            place,
            width,
            d,
        })
        .unwrap();
        let lin = |c_in, c_out| MatmulDims { rows: s, c_in, c_out };
        let backward = |dinp, dweight, dout, inp, weight, d| ExpertMatmulBackward {
            dinp,
            dweight,
            dout,
            inp,
            weight,
            offsets,
            experts: e,
            d,
        };
        f.b.expert_matmul_backward(backward(dhidden, dproj, dexpert_out, m.hidden, m.proj, lin(ffn, c))).unwrap();
        f.b.swiglu_backward(dpre, dhidden, m.pre, s, ffn).unwrap();
        f.b.expert_matmul_backward(backward(dxs, dfc, dpre, m.xs, m.fc, lin(c, 2 * ffn))).unwrap();
        let (probs, chosen, balance) = (m.probs, m.chosen, Some(m.balance.gradient));
        let route = MoeRouteBackward { dlogits, dweights, probs, weights, chosen, normalize, balance, d };
        f.b.moe_route_backward(route).unwrap();
        f.b.matmul_backward(MatmulBackward {
            dinp: dx,
            dweight: drouter,
            dbias: None,
            dout: dlogits,
            inp: m.x,
            weight: m.router,
            gelu_pre: None,
            gelu_dbias: None,
            d: MatmulDims { rows: n, c_in: c, c_out: e },
        })
        .unwrap();
        let (expert_out, accumulate) = (dxs, true);
        f.b.moe_combine(MoeCombine { out: dx, expert_out, weights: None, place, accumulate, width, d }).unwrap();
        for (what, x, g) in
            [("dx", m.x, dx), ("drouter", m.router, drouter), ("dfc", m.fc, dfc), ("dproj", m.proj, dproj)]
        {
            let g = f.values(g);
            f.check(what, x, &g, |f| {
                m.forward(f, normalize);
                m.loss(f, r)
            });
        }
    }
}
