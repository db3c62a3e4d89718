//! `kiln eval`: validation loss and perplexity of a model over a whole validation split.

use crate::engine::{self, BackendChoice, OnEngine};
use kiln_core::config::DataConfig;
use kiln_core::{Backend, Config, Error, Result};
use kiln_cuda::backend::CudaBackend;
use kiln_data::Dataset;
use kiln_train::inference::{Inference, Request};
use std::path::{Path, PathBuf};

/// The arguments of `kiln eval`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory: a checkpoint (out_dir/checkpoints/step_...), an export, or one saved by transformers.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The data to score (default: a checkpoint's own data.train).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per scored window (default: a checkpoint's block_size, else 1024 or the model's context if shorter).
    #[arg(long)]
    block_size: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

/// The window `kiln eval` scores a directory that is not a checkpoint in, unless the model's context is shorter.
const DEFAULT_EVAL_WINDOW: usize = 1024;

/// Scores the validation split in windows and prints the loss, the perplexity and the tokens scored.
pub fn run(args: Args) -> Result<()> {
    let checkpoint = args.checkpoint.as_path();
    let settings = engine::settings_for_model(checkpoint)?;
    let is_checkpoint = checkpoint.join("state.json").exists();
    let data = match (args.data, is_checkpoint) {
        (Some(dir), _) => DataConfig { train: dir.display().to_string(), val: None },
        (None, true) => settings.data.clone(),
        (None, false) => {
            return Err(Error::Usage(format!(
                "{}: not a kiln checkpoint; name the data to score with --data",
                checkpoint.display()
            )));
        }
    };
    let time = match args.block_size {
        Some(t) => t,
        None if is_checkpoint => settings.model.block_size,
        // A model's whole context (131,072 tokens for Llama 3.2) would be a costly default window.
        None => kiln_core::config::ModelConfig::from_hf_dir(checkpoint)?.0.block_size.min(DEFAULT_EVAL_WINDOW),
    };
    if args.batch == 0 || time == 0 {
        return Err(Error::Usage("--batch and --block-size must be at least 1".into()));
    }
    let dataset = Dataset::open_validation(&data, time)?;
    let scoring = Scoring {
        checkpoint,
        settings: &settings,
        dataset: &dataset,
        request: Request::Score { batch: args.batch, time },
    };
    let (loss, tokens) = engine::on_engine(args.backend, scoring)?.ok_or_else(|| {
        Error::Usage(format!("{}: a synthetic corpus has no fixed validation split to score; pass --data", data.train))
    })?;
    println!("val loss {loss:.4}, perplexity {:.3}, over {tokens} tokens of {}", loss.exp(), data.train);
    Ok(())
}

/// Scoring one model on a validation split on whichever engine is chosen.
struct Scoring<'a> {
    checkpoint: &'a Path,
    /// The model's engine settings.
    settings: &'a Config,
    dataset: &'a Dataset,
    request: Request<'a>,
}

impl OnEngine for Scoring<'_> {
    /// The mean loss and the tokens scored; none for data with no fixed validation split.
    type Output = Option<(f32, usize)>;

    fn cuda_engine(&self, ordinal: usize) -> Result<CudaBackend> {
        engine::cuda(ordinal, self.settings)
    }

    fn run<B: Backend>(self, backend: B, _gpu: Option<usize>) -> Result<Self::Output> {
        Inference::open(self.checkpoint, backend, self.request)?.evaluate(self.dataset)
    }
}
