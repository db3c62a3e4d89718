//! `kiln`: train GPT-style language models from the command line.
//!
//! Parses arguments, sets up logging (and a progress bar on a terminal), picks a backend and hands over to
//! `kiln-train`. Errors end the process with a message and an exit code: 2 for usage, configuration and input
//! errors, 1 for failures at run time, 130 when interrupted.

mod log;

use clap::{Parser, Subcommand, ValueEnum};
use kiln_core::{Config, Error, Result};
use kiln_cpu::CpuBackend;
use kiln_train::{Hooks, Trainer, describe_sum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(name = "kiln", version, about = "A training engine for GPT-style language models")]
struct Cli {
    /// Worker threads of the CPU engine (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model. With no arguments, runs the built-in quickstart (a small GPT learning to add).
    Train {
        /// A TOML configuration file (default: the built-in configs/quickstart.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one configuration key, e.g. --set train.max_steps=500 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The engine to train on.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
    },
    /// Show the version, the engines available and the CPU threads.
    Info,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU is present, otherwise the CPU.
    Auto,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bar = log::init();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global()
    {
        eprintln!("error: cannot start {n} threads: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Train { config, overrides, backend } => train(config, &overrides, backend, bar),
        Command::Info => {
            info();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn train(config: Option<PathBuf>, overrides: &[String], backend: BackendChoice, bar: log::ProgressSlot) -> Result<()> {
    let config = Config::load(config.as_deref(), overrides)?;
    if backend == BackendChoice::Cuda {
        return Err(Error::Usage(
            "--backend cuda: this build of kiln has no CUDA engine yet; use --backend cpu".into(),
        ));
    }
    let mut trainer = Trainer::new(&config, CpuBackend::<f32>::new())?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // First Ctrl-C: finish the step in flight and stop cleanly. Second: stop now.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting now");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to exit at once)");
    });
    let progress = bar.start(config.train.max_steps);
    let mut hooks =
        Hooks { stop, on_step: progress.map(|p| Box::new(move |step| p.set_position(step)) as Box<dyn FnMut(u64)>) };
    let summary = trainer.run(&mut hooks, true);
    bar.finish();
    let summary = summary?;

    if let Some(accuracy) = summary.exact_match {
        tracing::info!("exact match on held-out sums: {:.1}%", accuracy * 100.0);
        for s in &summary.samples {
            tracing::info!("  {}  {}", describe_sum(&s.prompt, &s.completion), if s.correct { "✓" } else { "✗" });
        }
    }
    tracing::info!(
        "done: {} steps, median {:.0} tokens/s; metrics in {}",
        summary.steps,
        summary.tokens_per_s,
        PathBuf::from(&config.train.out_dir).join("metrics.jsonl").display()
    );
    Ok(())
}

fn info() {
    println!("kiln {}", env!("CARGO_PKG_VERSION"));
    println!("engines:");
    println!("  cpu   available: f32, {} threads", rayon::current_num_threads());
    println!("  cuda  not in this build");
}
