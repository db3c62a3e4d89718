//! Generating tokens: greedy completion of many equal-length prompts at once ([`greedy`], for scoring), and
//! sampling one sequence with a key/value cache ([`sample`]).

use crate::{Model, Moment, Pass};
use kiln_core::{Backend, Error, Result};

/// Extends each prompt by `new_tokens` tokens, each the most likely next token given everything before it. All
/// prompts must have the same length; they run `model.max_batch` at a time, and every new token costs a forward
/// pass over the whole context (there is no key/value cache), which calls `on` as [`Model::forward_with`] does.
pub fn greedy<B: Backend + ?Sized>(
    model: &Model,
    backend: &mut B,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    on: &mut dyn FnMut(&mut B, Moment) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let Some(len) = prompts.first().map(Vec::len) else { return Ok(Vec::new()) };
    if prompts.iter().any(|p| p.len() != len) {
        return Err(Error::Invalid("greedy completion needs prompts of equal length".into()));
    }
    if len == 0 || len + new_tokens > model.spec.block_size + 1 {
        return Err(Error::Invalid(format!(
            "a prompt of {len} tokens plus {new_tokens} new ones does not fit block_size {}",
            model.spec.block_size
        )));
    }
    let mut logits = vec![0.0f32; model.spec.vocab];
    let mut done = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(model.max_batch) {
        let mut seqs: Vec<Vec<u32>> = chunk.to_vec();
        for _ in 0..new_tokens {
            let t = seqs[0].len();
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            model.load_batch(backend, &flat, None)?;
            model.forward_with(backend, seqs.len(), t, Pass::Logits, on)?;
            for (i, seq) in seqs.iter_mut().enumerate() {
                model.logits_row(backend, i * t + t - 1, &mut logits)?;
                seq.push(argmax(&logits));
            }
        }
        done.extend(seqs);
    }
    Ok(done)
}

/// How [`sample`] picks tokens.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probabilities add up to `p`.
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Stop after producing this token (end-of-text).
    pub stop: Option<u32>,
    /// Decode with the key/value cache (each new token costs one position); off recomputes the whole context
    /// every token, for comparison.
    pub kv_cache: bool,
}

impl SampleOptions {
    /// A usage error unless the options pick tokens: a temperature of 0 or more, `top_k` at least 1, `top_p` above 0
    /// and at most 1.
    pub fn check(&self) -> Result<()> {
        let problem = if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            format!("--temperature {} must be a finite number, 0 or above", self.temperature)
        } else if self.top_k == Some(0) {
            "--top-k must be at least 1".to_string()
        } else if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            format!("--top-p {p} must be above 0 and at most 1")
        } else {
            return Ok(());
        };
        Err(Error::Usage(problem))
    }
}

/// Extends `prompt` (one sequence) by up to `max_new_tokens`, handing each new token to `on_token` as soon as
/// it exists. Stops at `stop` or when the context reaches `block_size`.
pub fn sample<B: Backend + ?Sized>(
    model: &Model,
    backend: &mut B,
    prompt: &[u32],
    o: &SampleOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    use rand::{RngExt, SeedableRng};
    o.check()?;
    let block = model.spec.block_size;
    if prompt.is_empty() || prompt.len() > block {
        return Err(Error::Invalid(format!("a prompt of {} tokens: it needs 1 to block_size = {block}", prompt.len())));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let mut logits = vec![0.0f32; model.spec.vocab];
    let mut seq = prompt.to_vec();
    model.load_batch(backend, prompt, None)?;
    model.forward(backend, 1, prompt.len(), Pass::Logits)?;
    model.logits_row(backend, prompt.len() - 1, &mut logits)?;
    for _ in 0..o.max_new_tokens {
        let token = pick(&logits, o, rng.random::<f64>());
        seq.push(token);
        on_token(token)?;
        let pos = seq.len() - 1;
        if Some(token) == o.stop || pos >= block {
            break;
        }
        if o.kv_cache {
            model.decode_step(backend, token, pos)?;
            model.logits_row(backend, 0, &mut logits)?;
        } else {
            model.load_batch(backend, &seq, None)?;
            model.forward(backend, 1, seq.len(), Pass::Logits)?;
            model.logits_row(backend, seq.len() - 1, &mut logits)?;
        }
    }
    Ok(seq[prompt.len()..].to_vec())
}

/// The most likely token (the first of equals).
fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best }) as u32
}

/// One token from `logits`, with `uniform` a draw from [0, 1).
fn pick(logits: &[f32], o: &SampleOptions, uniform: f64) -> u32 {
    if o.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let keep = o.top_k.unwrap_or(order.len()).clamp(1, order.len());
    let max = logits[order[0]];
    let mut probs: Vec<f64> =
        order[..keep].iter().map(|&i| (((logits[i] - max) / o.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = o.top_p {
        let mut mass = 0.0;
        let cut = probs.iter().position(|&p| {
            mass += p;
            mass >= top_p as f64
        });
        probs.truncate(cut.map_or(probs.len(), |c| c + 1));
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    let mut target = uniform;
    for (p, &i) in probs.iter().zip(&order) {
        if target < *p {
            return i as u32;
        }
        target -= p;
    }
    order[probs.len() - 1] as u32
}
