//! Sampling and evaluation apart from training: a model read from a directory, with nothing a trainer needs (no
//! optimizer moments, no gradients, no training data) and activations sized for the request.
//!
//! The directory may be a kiln checkpoint or export, or one written by transformers: its `config.json` gives the
//! model, its safetensors files the weights, and its tokenizer (kiln's, or a `tokenizer.json`) the text.

use crate::checkpoint;
use kiln_core::config::ModelConfig;
use kiln_core::{Backend, Error, Result};
use kiln_data::Dataset;
use kiln_data::codec::Codec;
use kiln_model::{Model, ModelSpec, Pass, generate};
use std::path::Path;

/// What the activations are sized for.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// Continuing one prompt by up to `new_tokens` tokens.
    Sample { prompt: &'a str, new_tokens: usize },
    /// Scoring batches of up to `batch` sequences of `time` tokens.
    Score { batch: usize, time: usize },
}

pub struct Inference<B: Backend> {
    backend: B,
    model: Model,
    codec: Option<Codec>,
}

impl<B: Backend> Inference<B> {
    /// Opens the model in `dir` on `backend` for `request`.
    pub fn open(dir: &Path, mut backend: B, request: Request) -> Result<Self> {
        let (mut config, vocab) = ModelConfig::from_hf_dir(dir)?;
        let codec = Codec::load(dir)?;
        if let Some(codec) = codec.as_ref().filter(|c| c.vocab_size() > vocab) {
            let message = format!(
                "its tokenizer ({}) has {} tokens, more than the model's vocabulary of {vocab}",
                codec.name(),
                codec.vocab_size()
            );
            return Err(Error::data(dir, message));
        }
        let context = config.block_size;
        let (batch, time) = match request {
            Request::Sample { prompt, new_tokens } => {
                let prompt_tokens = match &codec {
                    Some(codec) => codec.encode(prompt)?.len().max(1),
                    None => return Err(no_tokenizer(dir)),
                };
                if prompt_tokens > context {
                    let message =
                        format!("a prompt of {prompt_tokens} tokens is longer than the model's context of {context}");
                    return Err(Error::Usage(message));
                }
                (1, prompt_tokens.saturating_add(new_tokens).min(context))
            }
            Request::Score { batch, time } if (1..=context).contains(&time) => (batch, time),
            Request::Score { time, .. } => {
                return Err(Error::Usage(format!(
                    "windows of {time} tokens: the model's context holds 1 to {context}"
                )));
            }
        };
        config.block_size = time;
        let model = Model::for_inference(&mut backend, ModelSpec::new(&config, vocab), batch)?;
        checkpoint::load_weights(dir, &model, &mut backend, &mut checkpoint::into_params(&model))?;
        Ok(Inference { backend, model, codec })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Continues `prompt` with the model, handing the new text to `on_text` as each token completes a piece of it
    /// (a BPE token can end inside a character). An empty prompt starts from end-of-text where the tokenizer has
    /// one. Returns the number of tokens produced.
    pub fn sample(
        &mut self,
        prompt: &str,
        options: &generate::SampleOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<usize> {
        let codec = self.codec.as_ref().ok_or_else(|| Error::Usage("this model has no tokenizer".into()))?;
        let mut ids = codec.encode(prompt)?;
        if ids.is_empty() {
            ids.extend(codec.end_of_text());
        }
        if ids.is_empty() {
            return Err(Error::Usage(
                "this model's tokenizer has no end-of-text token to start from: give a --prompt".into(),
            ));
        }
        let options = generate::SampleOptions { stop: codec.end_of_text(), ..options.clone() };
        let (mut produced, mut shown) = (Vec::new(), 0);
        let new = generate::sample(&self.model, &mut self.backend, &ids, &options, |t| {
            produced.push(t);
            let bytes = codec.decode_bytes(&produced)?;
            let complete = match std::str::from_utf8(&bytes[shown..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            on_text(std::str::from_utf8(&bytes[shown..shown + complete]).expect("checked"));
            shown += complete;
            Ok(())
        })?;
        Ok(new.len())
    }

    /// Mean loss over the whole validation split of `data`, in consecutive windows of the model's `block_size`, and
    /// the number of tokens scored; `None` for a corpus without a fixed split.
    pub fn evaluate(&mut self, data: &Dataset) -> Result<Option<(f32, usize)>> {
        let (mb, t, vocab) = (self.model.max_batch, self.model.spec.block_size, self.model.spec.vocab);
        // Ids mean nothing apart from their tokenizer: scoring text tokenised another way would give a number, wrongly.
        if let (Some(ours), Some(theirs)) = (&self.codec, data.codec()) {
            if !ours.same_as(&theirs) {
                return Err(Error::Usage(format!(
                    "the data was tokenised with {}, the model with {}{}; prepare the data with the model's tokenizer \
                     (kiln prepare --tokenizer)",
                    theirs.name(),
                    ours.name(),
                    if ours.name() == theirs.name() { " of its own" } else { "" }
                )));
            }
        }
        if data.vocab_size() > vocab {
            return Err(Error::Usage(format!(
                "the data's vocabulary of {} tokens is larger than the model's {vocab}",
                data.vocab_size()
            )));
        }
        let Some(windows) = data.val_windows(t) else { return Ok(None) };
        let (mut inputs, mut targets) = (vec![0u32; mb * t], vec![0u32; mb * t]);
        let b = &mut self.backend;
        b.zero(self.model.losses)?;
        for first in (0..windows).step_by(mb) {
            let rows = mb.min(windows - first);
            let (inputs, targets) = (&mut inputs[..rows * t], &mut targets[..rows * t]);
            for r in 0..rows {
                let range = r * t..(r + 1) * t;
                data.val_window(first + r, &mut inputs[range.clone()], &mut targets[range])?;
            }
            self.model.load_batch(b, inputs, Some(targets))?;
            self.model.forward(b, rows, t, Pass::Loss)?;
        }
        let tokens = windows * t;
        Ok(Some((b.sum(self.model.losses)? / tokens.max(1) as f32, tokens)))
    }
}

fn no_tokenizer(dir: &Path) -> Error {
    Error::Usage(format!(
        "{}: no tokenizer (kiln_tokenizer.json or tokenizer.json) to turn a prompt into tokens",
        dir.display()
    ))
}
