//! `kiln sample`: generate text from a model directory, streaming it as it is produced.

use crate::engine::{self, BackendChoice, OnEngine};
use kiln_core::{Backend, Result};
use kiln_cuda::backend::CudaBackend;
use kiln_model::generate::SampleOptions;
use kiln_train::inference::{Inference, Request};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The arguments of `kiln sample`.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to continue (default: start of a document).
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Recompute the whole context for every token instead of decoding with the key/value cache.
    #[arg(long)]
    no_kv_cache: bool,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

/// Samples `--max-new-tokens` tokens after the prompt on the chosen engine.
pub fn run(args: Args) -> Result<()> {
    let options = SampleOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop: None,
        kv_cache: !args.no_kv_cache,
    };
    // Before an engine starts.
    options.check()?;
    engine::on_engine(args.backend, Sampling { checkpoint: &args.checkpoint, prompt: &args.prompt, options: &options })
}

/// Sampling from one model on whichever engine is chosen.
struct Sampling<'a> {
    checkpoint: &'a Path,
    prompt: &'a str,
    options: &'a SampleOptions,
}

impl OnEngine for Sampling<'_> {
    type Output = ();

    fn cuda_engine(&self, ordinal: usize) -> Result<CudaBackend> {
        engine::cuda(ordinal, &engine::settings_for_model(self.checkpoint)?)
    }

    /// Prints the prompt and then each piece of text as it is produced, and logs the rate.
    fn run<B: Backend>(self, backend: B, _gpu: Option<usize>) -> Result<()> {
        let Sampling { checkpoint, prompt, options } = self;
        let request = Request::Sample { prompt, new_tokens: options.max_new_tokens };
        let mut model = Inference::open(checkpoint, backend, request)?;
        let started = std::time::Instant::now();
        print!("{prompt}");
        let produced = model.sample(prompt, options, |text| {
            print!("{text}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "{produced} tokens in {seconds:.2} s: {:.0} tokens/s ({})",
            produced as f64 / seconds,
            if options.kv_cache { "key/value cache" } else { "no cache" }
        );
        Ok(())
    }
}
