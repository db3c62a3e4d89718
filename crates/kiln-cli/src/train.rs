//! `kiln train`: train a model, on one engine or data-parallel over ranks: threads of this process (the CPU
//! engine's `--ranks`, or one per GPU with `--gpus`), or one process of a job that a launcher started.
//!
//! Choosing the engine is only part of the dispatch here: the CPU engine's ranks each build their own engine, and
//! a GPU job places each rank on its own GPU, so training resolves the engine itself instead of going through
//! [`engine::on_engine`].

use crate::dist::{Job, JobArgs};
use crate::engine::{self, BackendChoice};
use crate::{ConfigArgs, dist, log};
use kiln_core::{Config, Error, Result};
use kiln_cpu::CpuBackend;
use kiln_train::{Hooks, describe_sum};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The arguments of `kiln train`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// The engine to train on.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Continue from a checkpoint: a checkpoint directory, a directory of them (the newest complete one is
    /// taken), or nothing for the newest under train.out_dir/checkpoints.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    #[command(flatten)]
    job: JobArgs,
}

/// Trains as the arguments and the launcher's environment say, showing progress on a terminal through `bar`.
pub fn run(args: Args, bar: log::ProgressSlot) -> Result<()> {
    let config = args.config.load(None)?;
    let resume = match args.resume {
        Some(dir) => Some(checkpoint_to_resume(&dir.unwrap_or_else(|| kiln_train::checkpoint::root(&config)))?),
        None => None,
    };
    let resume = resume.as_deref();
    let job = args.job.job(engine::resolve(args.backend)?)?;
    run_training(&config, job.lead(), bar, |hooks| match &job {
        Job::CpuThreads(ranks) => {
            kiln_train::threads::train(&config, *ranks, |_| Ok(CpuBackend::<f32>::new()), resume, hooks, true)
        }
        Job::Gpus(gpus) => dist::train_gpus(&config, gpus, resume, hooks),
        Job::Launched(rank) => dist::train_process(&config, rank, resume, hooks),
    })
}

/// The checkpoint `--resume` names: `dir` itself when it is one, else the newest complete one inside it.
fn checkpoint_to_resume(dir: &Path) -> Result<PathBuf> {
    if dir.join("state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    kiln_train::checkpoint::list(dir)
        .pop()
        .map(|(_, path)| path)
        .ok_or_else(|| Error::Usage(format!("--resume: no complete checkpoint in {}", dir.display())))
}

/// Runs `train` with a Ctrl-C handler and, on the job's lead process, a progress bar and the closing report.
fn run_training(
    config: &Config,
    lead: bool,
    bar: log::ProgressSlot,
    train: impl FnOnce(&mut Hooks) -> Result<kiln_train::Summary>,
) -> Result<()> {
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
    let progress = if lead { bar.start(config.train.max_steps) } else { None };
    let mut hooks =
        Hooks { stop, on_step: progress.map(|p| Box::new(move |step| p.set_position(step)) as Box<dyn FnMut(u64)>) };
    let summary = train(&mut hooks);
    bar.finish();
    let summary = summary?;
    if !lead {
        return Ok(());
    }

    if let Some(accuracy) = summary.exact_match {
        tracing::info!("exact match on held-out sums: {:.1}%", accuracy * 100.0);
        for s in &summary.samples {
            tracing::info!("  {}  {}", describe_sum(&s.prompt, &s.completion), if s.correct { "✓" } else { "✗" });
        }
    }
    if !summary.skipped.is_empty() {
        tracing::warn!(
            "the guard skipped the updates of {} step{} and rolled back {} time{} (train.guard; events in metrics.jsonl)",
            summary.skipped.len(),
            if summary.skipped.len() == 1 { "" } else { "s" },
            summary.rollbacks.len(),
            if summary.rollbacks.len() == 1 { "" } else { "s" }
        );
    }
    if summary.first_step == summary.steps {
        tracing::info!("done: the run was already at step {}, train.max_steps; nothing was trained", summary.steps);
    } else {
        let (steps, rate) = (summary.steps, summary.tokens_per_s);
        let metrics = PathBuf::from(&config.train.out_dir).join("metrics.jsonl");
        tracing::info!("done: {steps} steps, median {rate:.0} tokens/s; metrics in {}", metrics.display());
    }
    Ok(())
}
