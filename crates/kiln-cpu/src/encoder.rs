//! Token and position embeddings.
//!
//! Forward: `out[b,t,:] = wte[tok[b,t],:] + wpe[t,:]`.
//! Backward: `dwte[tok[b,t],:] += dout[b,t,:]`, `dwpe[t,:] += dout[b,t,:]`, summed over every (b, t).

use crate::math::Real;
use rayon::prelude::*;

pub fn forward<T: Real>(out: &mut [T], tokens: &[u32], wte: &[T], wpe: &[T], time: usize, c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().with_min_len(64).for_each(|(row, (o, &tok))| {
        let t = row % time;
        let we = &wte[tok as usize * c..][..c];
        let pe = &wpe[t * c..][..c];
        for ((o, &w), &p) in o.iter_mut().zip(we).zip(pe) {
            *o = w + p;
        }
    });
}

/// Sequential over rows, so that the sum for a token that occurs many times is always taken in the same order.
pub fn backward<T: Real>(dwte: &mut [T], dwpe: &mut [T], dout: &[T], tokens: &[u32], time: usize, c: usize) {
    for (row, (d, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        let t = row % time;
        for (w, &g) in dwte[tok as usize * c..][..c].iter_mut().zip(d) {
            *w = *w + g;
        }
        for (p, &g) in dwpe[t * c..][..c].iter_mut().zip(d) {
            *p = *p + g;
        }
    }
}
