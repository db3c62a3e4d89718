//! Rotary position embedding of the queries and keys of a packed qkv activation, in place.
//!
//! Within each query and key head of `D` channels, channel `i < D/2` pairs with `i + D/2` (Hugging Face's
//! rotate-half), and at position `p` the pair becomes `(x₁·cos θ − x₂·sin θ, x₂·cos θ + x₁·sin θ)`, `θ = p·freq[i]`,
//! with `cos θ` and `sin θ` read from the model's table. The inverse rotation (`sin θ` negated) is the backward
//! pass. Each element is a product and a sum of two, without fused multiply-adds, as PyTorch's
//! `q·cos + rotate_half(q)·sin` rounds it.

use crate::math::Real;
use kiln_core::Rotary;
use rayon::prelude::*;

/// `qkv` is `(batch·time, qkv_width)`; `table` is `cos` then `sin`, each `(positions, D/2)`.
pub fn apply<T: Real>(qkv: &mut [T], table: &[T], op: &Rotary) {
    let d = op.d;
    let (half, width) = (d.head_dim / 2, d.qkv_width());
    let (cos, sin) = table.split_at(table.len() / 2);
    // The queries and then the keys lead each row: the first `heads + kv_heads` heads are rotated.
    let rotated = (d.heads + d.kv_heads) * d.head_dim;
    qkv.par_chunks_mut(width).enumerate().with_min_len(16).for_each(|(row, x)| {
        let p = op.first_pos + row % d.time;
        let (cos, sin) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for head in x[..rotated].chunks_exact_mut(d.head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                let s = if op.inverse { -sin[i] } else { sin[i] };
                x1[i] = a * cos[i] - b * s;
                x2[i] = b * cos[i] + a * s;
            }
        }
    });
}
