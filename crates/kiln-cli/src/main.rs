//! `kiln`: train GPT-style language models from the command line.
//!
//! Parses arguments, sets up logging (and a progress bar on a terminal) and hands each command to its module, which
//! owns its arguments; [`engine`] picks the backend a command runs on. Errors end the process with a message and
//! an exit code: 2 for usage, configuration and input errors, 1 for failures at run time, 130 when interrupted.

mod allreduce_bench;
mod attention_bench;
mod bench;
mod dist;
mod engine;
mod eval;
mod export;
mod info;
mod kernels;
mod log;
mod plan;
mod prepare;
mod report;
mod sample;
mod selftest;
mod train;

use clap::{Parser, Subcommand};
use kiln_core::{Config, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln", version, about = "A training engine for GPT-style language models")]
struct Cli {
    /// Worker threads of the CPU engine (default: one per core; at most 4096).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=4096))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

/// The configuration a command runs with: a file, or the command's own built-in one, and overrides.
#[derive(clap::Args)]
struct ConfigArgs {
    /// A TOML configuration file (default: the command's built-in configuration, which its help names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one configuration key, e.g. --set train.max_steps=500 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    /// The file's configuration with the overrides; without a file, `built_in` (its text, and the name errors give
    /// it), or the quickstart's.
    fn load(&self, built_in: Option<(&str, &str)>) -> Result<Config> {
        match (&self.config, built_in) {
            (None, Some((text, source))) => Config::from_toml_str(text, source, &self.overrides),
            (path, _) => Config::load(path.as_deref(), &self.overrides),
        }
    }
}

/// The commands; each variant's doc comment is its line in `kiln --help`.
#[derive(Subcommand)]
enum Command {
    /// Train a model. With no arguments, runs the built-in quickstart (a small GPT learning to add).
    Train(train::Args),
    /// Tokenise text into shards (llm.c's .bin format) that `data.train = "DIR"` trains on.
    Prepare(prepare::Args),
    /// Validation loss and perplexity of a checkpoint over a whole validation split.
    Eval(eval::Args),
    /// Generate text from a model directory (a checkpoint, an export, or one saved by transformers), streaming it as
    /// it is produced.
    Sample(sample::Args),
    /// Write a clean, model-only copy of a checkpoint for other tools.
    Export(export::Args),
    /// Check an engine against the CPU engine in f64: every operation, the model's gradients, 20 training steps.
    Selftest(selftest::Args),
    /// Show the version, the engines available, CPU threads, CUDA libraries and GPUs.
    Info(info::Args),
    /// Start this node's processes of a data-parallel job, pass on their output, and stop them all when one fails.
    Launch(dist::LaunchArgs),
    /// The memory a training run will take on each rank, by component, and whether it fits (without --config, the
    /// built-in quickstart's).
    Plan(plan::Args),
    /// One self-contained HTML page charting runs' metrics.jsonl side by side: loss, learning rate, gradient norm,
    /// throughput, memory, and skips, rollbacks and resumes.
    Report(report::ReportCommand),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// CUDA kernels: compile them ahead of time into the on-disk cache.
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`kiln info | head -1`) would panic; end quietly
    // instead, as command-line tools do.
    // SAFETY: restores the default disposition of one signal, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let bar = log::init();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(usize::from(n)).build_global()
    {
        eprintln!("error: cannot start {n} threads: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Train(args) => train::run(args, bar),
        Command::Prepare(args) => prepare::run(args, bar),
        Command::Eval(args) => eval::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Export(args) => export::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Info(args) => info::run(args),
        Command::Launch(args) => match dist::launch(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Plan(args) => plan::run(args),
        Command::Report(command) => report::run(command),
        Command::Bench(command) => bench::run(command),
        Command::Kernels(command) => kernels::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
