//! Linear layers through the `gemm` crate, with GELU as an optional epilogue.
//!
//! Forward: `out = inp · Wᵀ + b`, `inp` `(rows, c_in)`, `W` `(c_out, c_in)`.
//! Backward: `dinp = dout · W`, `dW += doutᵀ · inp`, `db += Σ_rows dout`.
//! GELU (tanh approximation): `gelu(x) = ½x(1 + tanh u)`, `u = √(2/π)(x + 0.044715x³)`;
//! `gelu'(x) = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)`.

use crate::math::{Real, add_column_sums};
use kiln_core::MatmulDims;
use rayon::prelude::*;

const GELU_SCALE: f32 = 0.797_884_6; // √(2/π)
const GELU_CUBE: f32 = 0.044_715;

/// Elements per parallel task of the elementwise loops.
const CHUNK: usize = 4096;

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, every matrix given by its row and column strides.
fn gemm<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let last =
        |rs: usize, cs: usize, r: usize, c: usize| if r == 0 || c == 0 { 0 } else { (r - 1) * rs + (c - 1) * cs + 1 };
    assert!(dst.len() >= last(dst_rs, dst_cs, m, n));
    assert!(lhs.len() >= last(lhs_rs, lhs_cs, m, k));
    assert!(rhs.len() >= last(rhs_rs, rhs_cs, k, n));
    // SAFETY: the three assertions keep every strided access inside its slice, and `dst` is a unique borrow that
    // cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// `out = inp·Wᵀ + bias`; with `gelu_pre`, the pre-activation goes there and `out = gelu(pre)`.
pub fn forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    gelu_pre: Option<&mut [T]>,
    d: MatmulDims,
) {
    let MatmulDims { rows, c_in, c_out } = d;
    let product = |dst: &mut [T]| {
        // Start from the bias so that the product accumulates onto it: one pass over the output instead of two.
        if let Some(b) = bias {
            dst.par_chunks_mut(c_out).with_min_len(64).for_each(|row| row.copy_from_slice(b));
        }
        gemm((rows, c_out, c_in), dst, (c_out, 1), bias.is_some(), inp, (c_in, 1), weight, (1, c_in));
    };
    match gelu_pre {
        None => product(out),
        Some(pre) => {
            product(pre);
            gelu_forward(out, pre);
        }
    }
}

/// `out = gelu(pre)`: the epilogue of [`forward`], and on its own the recomputation of GELU's output.
pub fn gelu_forward<T: Real>(out: &mut [T], pre: &[T]) {
    out.par_chunks_mut(CHUNK).zip(pre.par_chunks(CHUNK)).for_each(|(o, p)| {
        for (o, &x) in o.iter_mut().zip(p) {
            *o = gelu(x);
        }
    });
}

pub fn backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    weight: &[T],
    gelu: Option<(&[T], Option<&mut [T]>)>,
    d: MatmulDims,
) {
    let MatmulDims { rows, c_in, c_out } = d;
    gemm((rows, c_in, c_out), dinp, (c_in, 1), false, dout, (c_out, 1), weight, (c_in, 1));
    if let Some((pre, gelu_dbias)) = gelu {
        dinp.par_chunks_mut(CHUNK).zip(pre.par_chunks(CHUNK)).for_each(|(g, p)| {
            for (g, &x) in g.iter_mut().zip(p) {
                *g = *g * gelu_grad(x);
            }
        });
        if let Some(db) = gelu_dbias {
            add_column_sums(db, dinp);
        }
    }
    gemm((c_out, c_in, rows), dweight, (c_in, 1), true, dout, (1, c_out), inp, (c_in, 1));
    if let Some(db) = dbias {
        add_column_sums(db, dout);
    }
}

#[inline(always)]
pub fn gelu<T: Real>(x: T) -> T {
    let u = T::from_f32(GELU_SCALE) * x * (T::one() + T::from_f32(GELU_CUBE) * x * x);
    T::from_f32(0.5) * x * (T::one() + u.tanh_v())
}

#[inline(always)]
pub fn gelu_grad<T: Real>(x: T) -> T {
    let x2 = x * x;
    let u = T::from_f32(GELU_SCALE) * x * (T::one() + T::from_f32(GELU_CUBE) * x2);
    let t = u.tanh_v();
    let du = T::from_f32(GELU_SCALE) * (T::one() + T::from_f32(3.0 * GELU_CUBE) * x2);
    let half = T::from_f32(0.5);
    half * (T::one() + t) + half * x * (T::one() - t * t) * du
}
