//! `kiln export`: a clean, model-only copy of a checkpoint for other tools.

use clap::ValueEnum;
use kiln_core::{Error, Result};
use std::path::PathBuf;

/// The arguments of `kiln export`.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    checkpoint: PathBuf,
    /// hf: model.safetensors (or shards and model.safetensors.index.json) and config.json, loadable by
    /// transformers' AutoModelForCausalLM as the class config.json names (GPT2LMHeadModel, LlamaForCausalLM, …).
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    format: ExportFormat,
    #[arg(long)]
    out: PathBuf,
    /// Split the weights into shards of at most this many megabytes (10⁶ bytes), as transformers does.
    #[arg(long, default_value_t = 5000.0)]
    max_shard_mb: f64,
}

/// `--format`: the layouts an export can be written in.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Hf,
}

/// Writes the model of a checkpoint into a new directory as transformers reads it, whole or not at all.
pub fn run(args: Args) -> Result<()> {
    let Args { checkpoint, format: ExportFormat::Hf, out, max_shard_mb } = args;
    if !(max_shard_mb.is_finite() && max_shard_mb > 0.0) {
        return Err(Error::Usage(format!("--max-shard-mb {max_shard_mb} must be a number above 0")));
    }
    let written = kiln_train::checkpoint::export(&checkpoint, &out, (max_shard_mb * 1e6) as usize)?;
    let names: Vec<String> =
        written.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    println!("wrote {} ({}, config.json)", out.display(), names.join(", "));
    Ok(())
}
