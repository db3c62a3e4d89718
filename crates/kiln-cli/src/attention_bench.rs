//! `kiln bench attention`: the time of attention alone, forward and forward+backward, on any engine, counted in
//! the FlashAttention papers' FLOPs (forward `4·B·H·T²·D`, halved when causal; backward 2.5 × forward), so that
//! the numbers compare with the anchors measured for FlashAttention-2 and cuDNN.

use kiln_core::{AttentionBackward, AttentionDims, Backend, Result, Role};
use std::time::Instant;

/// The attention rows of the anchors (../shared/ANCHORS.md, one H100): a shape, and TFLOP/s of FlashAttention-2
/// forward and forward+backward, then cuDNN forward and forward+backward.
pub const SUITE: [(AttentionDims, [f64; 4]); 5] = [
    (dims(32, 12, 1024, 64, true), [194.0, 135.0, 259.0, 193.0]),
    (dims(16, 32, 2048, 64, true), [245.0, 194.0, 399.0, 288.0]),
    (dims(8, 16, 4096, 128, true), [320.0, 255.0, 592.0, 429.0]),
    (dims(8, 16, 4096, 128, false), [347.0, 294.0, 640.0, 511.0]),
    (dims(2, 16, 16384, 128, true), [319.0, 307.0, 591.0, 527.0]),
];

const fn dims(batch: usize, heads: usize, time: usize, head_dim: usize, causal: bool) -> AttentionDims {
    AttentionDims { batch, time, heads, kv_heads: heads, head_dim, causal, window: None }
}

/// Median times of one shape, in milliseconds, and the rates they give.
pub struct Timing {
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
}

/// Forward FLOPs of attention at `d`, as the FlashAttention papers count them: 4·D for each (query, key) pair of
/// a head, T² pairs, T²/2 when causal, and under a sliding window of W its area of T·W − W²/2.
pub fn forward_flops(d: &AttentionDims) -> f64 {
    let t = d.time as f64;
    let pairs = match (d.causal, d.window) {
        (false, _) => t * t,
        (true, None) => t * t / 2.0,
        (true, Some(w)) => {
            let w = (w as f64).min(t);
            t * w - w * w / 2.0
        }
    };
    4.0 * (d.batch * d.heads * d.head_dim) as f64 * pairs
}

impl Timing {
    pub fn forward_tflops(&self, d: &AttentionDims) -> f64 {
        forward_flops(d) / (self.forward_ms * 1e9)
    }

    pub fn forward_backward_tflops(&self, d: &AttentionDims) -> f64 {
        3.5 * forward_flops(d) / (self.forward_backward_ms * 1e9)
    }
}

/// Times attention at `d` on `b`: `warmup` unmeasured runs, then the median of `reps`, each waited for.
pub fn measure<B: Backend>(b: &mut B, d: AttentionDims, warmup: usize, reps: usize) -> Result<Timing> {
    if let Some(problem) = d.problem() {
        return Err(kiln_core::Error::Usage(problem));
    }
    // The largest tensor, the queries, keys and values, in f64 (which no size overflows); a hard limit of 2^40
    // elements (4 TiB of fp32) leaves every size product below to fit a usize.
    let width = (d.heads as f64 + 2.0 * d.kv_heads as f64) * d.head_dim as f64;
    let qkv_elements = d.batch as f64 * d.time as f64 * width;
    if [d.batch, d.heads, d.time, d.head_dim].contains(&0) || qkv_elements > (1u64 << 40) as f64 {
        let shape = describe(&d);
        return Err(kiln_core::Error::Usage(format!("{shape}: sizes must be at least 1 and the tensors below 2^40")));
    }
    let (rows, c, w) = (d.batch * d.time, d.channels(), d.qkv_width());
    let qkv = b.alloc(rows * w, Role::Activation)?;
    let dout = b.alloc(rows * c, Role::Activation)?;
    let out = b.alloc(rows * c, Role::Activation)?;
    let lse = b.alloc(d.batch * d.heads * d.time, Role::Stat)?;
    let dqkv = b.alloc(rows * w, Role::Activation)?;
    // Values of the size a trained model's queries and keys have, from a fixed sequence.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    b.upload(qkv, &uniform(rows * w))?;
    b.upload(dout, &uniform(rows * c))?;
    let time = |b: &mut B, backward: bool| -> Result<f64> {
        let mut times = Vec::with_capacity(reps);
        for rep in 0..warmup + reps {
            let started = Instant::now();
            b.attention_forward(out, lse, qkv, d)?;
            if backward {
                b.attention_backward(AttentionBackward { dqkv, dout, qkv, out, lse, dbias: None, d })?;
            }
            b.synchronize()?;
            if rep >= warmup {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    Ok(Timing { forward_ms: time(b, false)?, forward_backward_ms: time(b, true)? })
}

/// `B32 H12 T1024 D64 causal` (with `/Nkv` after H for grouped-query attention).
pub fn describe(d: &AttentionDims) -> String {
    let kv = if d.kv_heads == d.heads { String::new() } else { format!("/{}kv", d.kv_heads) };
    let causal = if d.causal { " causal" } else { "" };
    let window = d.window.map(|w| format!(" window {w}")).unwrap_or_default();
    format!("B{} H{}{kv} T{} D{}{causal}{window}", d.batch, d.heads, d.time, d.head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_flash_attention_papers() {
        // GPT-2 124M's attention at B=32: 4·32·12·1024²·64 / 2 = 51.5 GFLOP forward.
        assert_eq!(forward_flops(&SUITE[0].0), 4.0 * 32.0 * 12.0 * 1024.0 * 1024.0 * 64.0 / 2.0);
        let t = Timing { forward_ms: 1.0, forward_backward_ms: 3.5 };
        assert!((t.forward_backward_tflops(&SUITE[0].0) - t.forward_tflops(&SUITE[0].0)).abs() < 1e-9);
        assert_eq!(describe(&AttentionDims { kv_heads: 4, ..SUITE[3].0 }), "B8 H16/4kv T4096 D128");
        // A window as long as the sequence is causal attention; a window of W covers T·W − W²/2 pairs.
        let causal = AttentionDims { causal: true, ..SUITE[3].0 };
        let window = |w| AttentionDims { window: Some(w), ..causal };
        assert_eq!(forward_flops(&window(4096)), forward_flops(&causal));
        assert_eq!(forward_flops(&window(1024)), 4.0 * 8.0 * 16.0 * 128.0 * (4096.0 * 1024.0 - 1024.0 * 512.0));
        assert_eq!(describe(&window(1024)), "B8 H16 T4096 D128 causal window 1024");
    }
}
