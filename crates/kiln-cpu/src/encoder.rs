//! Token and position embeddings.
//!
//! Forward: `out[b,t,:] = wte[tok[b,t],:] + wpe[t,:]` (no `wpe` term for a model without learned positions).
//! Backward: `dwte[tok[b,t],:] += dout[b,t,:]`, `dwpe[t,:] += dout[b,t,:]`, summed over every (b, t).

use crate::math::Real;
use rayon::prelude::*;

pub fn forward<T: Real>(out: &mut [T], tokens: &[u32], wte: &[T], wpe: Option<&[T]>, time: usize, c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().with_min_len(64).for_each(|(row, (o, &tok))| {
        let we = &wte[tok as usize * c..][..c];
        match wpe {
            Some(wpe) => {
                let pe = &wpe[row % time * c..][..c];
                for ((o, &w), &p) in o.iter_mut().zip(we).zip(pe) {
                    *o = w + p;
                }
            }
            None => o.copy_from_slice(we),
        }
    });
}

/// Sequential over rows, so that the sum for a token that occurs many times is always taken in the same order.
pub fn backward<T: Real>(
    dwte: &mut [T],
    mut dwpe: Option<&mut [T]>,
    dout: &[T],
    tokens: &[u32],
    time: usize,
    c: usize,
) {
    for (row, (d, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        for (w, &g) in dwte[tok as usize * c..][..c].iter_mut().zip(d) {
            *w = *w + g;
        }
        if let Some(dwpe) = dwpe.as_deref_mut() {
            for (p, &g) in dwpe[row % time * c..][..c].iter_mut().zip(d) {
                *p = *p + g;
            }
        }
    }
}
