//! Every operation's backward pass against central finite differences, run in f64 on random inputs whose sizes
//! are not multiples of anything in particular. The scalar checked is `Σ out ⊙ R` for a random `R`, so the
//! backward pass receives `R` as the output gradient.

use kiln_core::backend::IGNORE_TARGET;
use kiln_core::{AdamWStep, AttentionDims, Backend, MatmulDims, Role, Tensor};
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
    f.b.encoder_forward(out, tokens, wte, wpe, batch, time, c).unwrap();
    f.b.encoder_backward(dwte, dwpe, r, tokens, batch, time, c).unwrap();
    let loss = |f: &mut Fixture| {
        f.b.encoder_forward(out, tokens, wte, wpe, batch, time, c).unwrap();
        f.dot(out, r)
    };
    let (gte, gpe) = (f.values(dwte), f.values(dwpe));
    f.check("dwte", wte, &gte, loss);
    f.check("dwpe", wpe, &gpe, loss);
}

#[test]
fn layernorm_gradients() {
    let (rows, c) = (37, 19);
    let mut f = Fixture::new(2);
    let inp = f.random(rows * c, 2.0);
    let w = f.random(c, 1.0);
    let bias = f.random(c, 1.0);
    let (out, mean, rstd) = (f.zeros(rows * c), f.zeros(rows), f.zeros(rows));
    let r = f.random(rows * c, 1.0);
    let (dinp, dw, db) = (f.zeros(rows * c), f.zeros(c), f.zeros(c));
    f.b.layernorm_forward(out, mean, rstd, inp, w, bias, rows, c).unwrap();
    f.b.layernorm_backward(dinp, dw, db, r, inp, w, mean, rstd, rows, c).unwrap();
    let loss = |f: &mut Fixture| {
        f.b.layernorm_forward(out, mean, rstd, inp, w, bias, rows, c).unwrap();
        f.dot(out, r)
    };
    let (gi, gw, gb) = (f.values(dinp), f.values(dw), f.values(db));
    f.check("dinp", inp, &gi, loss);
    f.check("dweight", w, &gw, loss);
    f.check("dbias", bias, &gb, loss);
}

#[test]
fn layernorm_backward_accumulates_into_the_residual_gradient() {
    let (rows, c) = (5, 9);
    let mut f = Fixture::new(3);
    let inp = f.random(rows * c, 1.0);
    let (w, bias) = (f.random(c, 1.0), f.random(c, 1.0));
    let (out, mean, rstd) = (f.zeros(rows * c), f.zeros(rows), f.zeros(rows));
    let r = f.random(rows * c, 1.0);
    let (dw, db) = (f.zeros(c), f.zeros(c));
    f.b.layernorm_forward(out, mean, rstd, inp, w, bias, rows, c).unwrap();
    let fresh = f.zeros(rows * c);
    f.b.layernorm_backward(fresh, dw, db, r, inp, w, mean, rstd, rows, c).unwrap();
    let prior = f.random(rows * c, 1.0);
    let before = f.values(prior);
    f.b.layernorm_backward(prior, dw, db, r, inp, w, mean, rstd, rows, c).unwrap();
    let (after, grad) = (f.values(prior), f.values(fresh));
    for i in 0..rows * c {
        assert!((after[i] - (before[i] + grad[i])).abs() < 1e-12);
    }
}

#[test]
fn residual_layernorm_equals_add_then_layernorm() {
    let (rows, c) = (13, 21);
    let mut f = Fixture::new(4);
    let (a, b) = (f.random(rows * c, 1.0), f.random(rows * c, 1.0));
    let (w, bias) = (f.random(c, 1.0), f.random(c, 1.0));
    let (res, out, mean, rstd) = (f.zeros(rows * c), f.zeros(rows * c), f.zeros(rows), f.zeros(rows));
    f.b.residual_layernorm_forward(res, out, mean, rstd, a, b, w, bias, rows, c).unwrap();
    let (va, vb, vres) = (f.values(a), f.values(b), f.values(res));
    for i in 0..rows * c {
        assert_eq!(vres[i], va[i] + vb[i]);
    }
    let (out2, mean2, rstd2) = (f.zeros(rows * c), f.zeros(rows), f.zeros(rows));
    f.b.layernorm_forward(out2, mean2, rstd2, res, w, bias, rows, c).unwrap();
    assert_eq!(f.values(out), f.values(out2));
    assert_eq!(f.values(rstd), f.values(rstd2));
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
        f.b.matmul_forward(h, x, w1, Some(b1), Some(pre), d1).unwrap();
        f.b.matmul_forward(y, h, w2, Some(b2), None, d2).unwrap();
    };
    forward(&mut f);
    let (dpre, dx) = (f.zeros(rows * hidden), f.zeros(rows * c));
    let (dw1, db1, dw2, db2) = (f.zeros(hidden * c), f.zeros(hidden), f.zeros(c_out * hidden), f.zeros(c_out));
    f.b.matmul_backward(dpre, dw2, Some(db2), r, h, w2, Some(pre), d2).unwrap();
    f.b.matmul_backward(dx, dw1, Some(db1), dpre, x, w1, None, d1).unwrap();
    let loss = |f: &mut Fixture| {
        forward(f);
        f.dot(y, r)
    };
    for (name, t, g) in [("dx", x, dx), ("dw1", w1, dw1), ("db1", b1, db1), ("dw2", w2, dw2), ("db2", b2, db2)] {
        let g = f.values(g);
        f.check(name, t, &g, loss);
    }
}

#[test]
fn matmul_backward_accumulates_weight_gradients() {
    let d = MatmulDims { rows: 4, c_in: 3, c_out: 2 };
    let mut f = Fixture::new(6);
    let (x, w, r) = (f.random(12, 1.0), f.random(6, 1.0), f.random(8, 1.0));
    let (dx, dw, db) = (f.zeros(12), f.zeros(6), f.zeros(2));
    f.b.matmul_backward(dx, dw, Some(db), r, x, w, None, d).unwrap();
    let (once_w, once_b) = (f.values(dw), f.values(db));
    f.b.matmul_backward(dx, dw, Some(db), r, x, w, None, d).unwrap();
    let (twice_w, twice_b) = (f.values(dw), f.values(db));
    for (a, b) in once_w.iter().chain(&once_b).zip(twice_w.iter().chain(&twice_b)) {
        assert!((2.0 * a - b).abs() < 1e-12);
    }
}

#[test]
fn attention_gradients() {
    // One shape within a single 4×8 block, one spanning several blocks with more batch elements than threads;
    // then non-causal attention, and grouped-query attention (2 and 3 query heads per key/value head).
    for d in [
        AttentionDims::causal(2, 7, 3, 5),
        AttentionDims::causal(5, 19, 2, 12),
        AttentionDims { causal: false, ..AttentionDims::causal(2, 19, 2, 5) },
        AttentionDims { kv_heads: 2, ..AttentionDims::causal(2, 9, 4, 6) },
        AttentionDims { kv_heads: 1, causal: false, ..AttentionDims::causal(1, 17, 3, 4) },
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
    f.b.attention_backward(dqkv, r, qkv, out, lse, d).unwrap();
    let g = f.values(dqkv);
    f.check("dqkv", qkv, &g, |f| {
        f.b.attention_forward(out, lse, qkv, d).unwrap();
        f.dot(out, r)
    });
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
    f.b.classifier(logits, losses, targets, rows, vocab, padded, Some(1.0)).unwrap();
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
    let s = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
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
    let s = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
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
    // Output overlapping the input.
    let err = f.b.layernorm_forward(
        buf.slice(0, 50),
        stats.slice(0, 5),
        stats.slice(5, 5),
        buf.slice(40, 50),
        w,
        bias,
        5,
        10,
    );
    assert!(err.unwrap_err().to_string().contains("overlaps"));
    // Wrong size.
    let err = f.b.layernorm_forward(
        buf.slice(0, 40),
        stats.slice(0, 5),
        stats.slice(5, 5),
        buf.slice(50, 50),
        w,
        bias,
        5,
        10,
    );
    assert!(err.unwrap_err().to_string().contains("expected 50"));
    // Token outside the vocabulary.
    let tokens = f.tokens(&[0, 99]);
    let (wte, wpe, out) = (f.random(40, 1.0), f.random(40, 1.0), f.zeros(20));
    let err = f.b.encoder_forward(out, tokens, wte, wpe, 1, 2, 10);
    assert!(err.unwrap_err().to_string().contains("outside the vocabulary"));
}
