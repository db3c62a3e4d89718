//! The scalar type of the CPU engine and the few transcendental functions its loops need.
//!
//! The engine trains in `f32`; the gradient checks run the very same code in `f64`, where finite differences are
//! precise enough to check against. `exp` and `tanh` for `f32` are written out branch-free (range reduction plus
//! a polynomial, about 2 ulp) so that loops over them vectorise; the standard library's versions are calls into
//! libm, one element at a time.

use num_traits::Float;
use rayon::prelude::*;
use std::fmt::Debug;

pub trait Real: Float + Send + Sync + Default + Debug + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    /// `e^x`, vectorisable.
    fn exp_v(self) -> Self;
    /// `tanh x`, vectorisable.
    fn tanh_v(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_v(self) -> Self {
        // tanh x = 1 − 2/(e^{2x} + 1): exact at both tails, absolute error ~1e-7 near zero.
        let e = exp_f32(2.0 * self);
        1.0 - 2.0 / (e + 1.0)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_v(self) -> Self {
        self.tanh()
    }
}

/// `e^x` for f32: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `e^r` by a degree-6 Taylor polynomial, `2^n` by building
/// the exponent bits. Inputs below −87.3 give 0 and above 88.7 give +inf, as `f32::exp` does. Every step is a
/// float or a wrapping integer operation, so loops over it vectorise (a float-to-int `as` cast would not).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to the nearest integer and leaves it in the low bits of the mantissa.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x.mul_add(LOG2E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // The exponent field of 2^n is n + 127; `shifted`'s bits are SHIFTER's plus n.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127u32.wrapping_sub(SHIFTER.to_bits())) << 23);
    let e = p * scale;
    if x <= -87.3 { 0.0 } else { e }
}

/// `Σ a[i]·b[i]` with eight independent partial sums: strict IEEE order would forbid vectorising a plain loop.
#[inline(always)]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let chunks = n / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] = a[i * 8 + l].mul_add(b[i * 8 + l], acc[l]);
        }
    }
    let mut tail = T::zero();
    for i in chunks * 8..n {
        tail = a[i].mul_add(b[i], tail);
    }
    reduce8(acc) + tail
}

/// `Σ a[i]` with eight partial sums (see [`dot`]).
#[inline(always)]
pub fn sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] = acc[l] + a[i * 8 + l];
        }
    }
    let mut tail = T::zero();
    for &x in &a[chunks * 8..] {
        tail = tail + x;
    }
    reduce8(acc) + tail
}

#[inline(always)]
fn reduce8<T: Real>(acc: [T; 8]) -> T {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `y[i] += a·x[i]`.
#[inline(always)]
pub fn axpy<T: Real>(a: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

/// Bias-gradient columns per parallel task.
const BIAS_COLUMNS: usize = 64;

/// `sums[j] += Σ_rows m[row][j]` for the rows of `m` (`sums.len()` columns each). Each column is summed over rows
/// in order (deterministic); columns are split over threads.
pub fn add_column_sums<T: Real>(sums: &mut [T], m: &[T]) {
    let columns = sums.len();
    sums.par_chunks_mut(BIAS_COLUMNS).enumerate().for_each(|(i, sums)| {
        let first = i * BIAS_COLUMNS;
        for row in m.chunks_exact(columns) {
            for (s, &x) in sums.iter_mut().zip(&row[first..]) {
                *s = *s + x;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_match_the_standard_library() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let e = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((e - want) / want).abs());
            let t = x.tanh_v() as f64;
            worst_tanh = worst_tanh.max((t - (x as f64).tanh()).abs());
            x += 0.0137;
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn dot_and_sum_cover_the_tail() {
        let a: Vec<f64> = (0..19).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..19).map(|i| (i % 3) as f64).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want);
        assert_eq!(sum(&a), 171.0);
    }
}
