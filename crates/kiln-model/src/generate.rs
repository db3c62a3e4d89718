//! Greedy completion of prompts, batched.

use crate::{Gpt, Pass};
use kiln_core::{Backend, Error, Result};

/// Extends each prompt by `new_tokens` tokens, each the most likely next token given everything before it. All
/// prompts must have the same length; they run `model.max_batch` at a time, and every new token costs a forward
/// pass over the whole context (there is no key/value cache).
pub fn greedy<B: Backend + ?Sized>(
    model: &Gpt,
    backend: &mut B,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let Some(len) = prompts.first().map(Vec::len) else { return Ok(Vec::new()) };
    if prompts.iter().any(|p| p.len() != len) {
        return Err(Error::Invalid("greedy completion needs prompts of equal length".into()));
    }
    if len == 0 || len + new_tokens > model.shape.block_size + 1 {
        return Err(Error::Invalid(format!(
            "a prompt of {len} tokens plus {new_tokens} new ones does not fit block_size {}",
            model.shape.block_size
        )));
    }
    let mut logits = vec![0.0f32; model.shape.vocab];
    let mut done = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(model.max_batch) {
        let mut seqs: Vec<Vec<u32>> = chunk.to_vec();
        for _ in 0..new_tokens {
            let t = seqs[0].len();
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            model.load_batch(backend, &flat, None)?;
            model.forward(backend, seqs.len(), t, Pass::Logits)?;
            for (i, seq) in seqs.iter_mut().enumerate() {
                model.logits_row(backend, i * t + t - 1, &mut logits)?;
                let best = logits.iter().enumerate().fold(0, |best, (j, &v)| if v > logits[best] { j } else { best });
                seq.push(best as u32);
            }
        }
        done.extend(seqs);
    }
    Ok(done)
}
