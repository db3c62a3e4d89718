//! `kiln train`: train a model, on one engine or data-parallel over ranks: threads of this process (the CPU
//! engine's `--ranks`, or one per GPU with `--gpus`), or one process of a job that a launcher started.
//!
//! Choosing the engine is only part of the dispatch here: the CPU engine's ranks each build their own engine, and
//! a GPU job places each rank on its own GPU, so training resolves the engine itself instead of going through
//! [`engine::on_engine`].

use crate::engine::{self, BackendChoice, Engine};
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
    /// Data-parallel ranks as threads of this process (the CPU engine): each step's batch is split between
    /// them and their gradients are summed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    ranks: u16,
    /// The GPUs this process trains on: `all`, or numbers such as 0,1,2,3 (one rank per GPU, summing
    /// gradients with NCCL). In a job a launcher started, one GPU (default: the local rank).
    #[arg(long, value_name = "all|0,1,...")]
    gpus: Option<String>,
    /// Where the processes of a launched job meet (default: tcp://MASTER_ADDR:MASTER_PORT).
    #[arg(long, value_name = "tcp://HOST:PORT|file:///PATH")]
    rendezvous: Option<String>,
    /// Seconds to wait for every process of a launched job to arrive.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    rendezvous_timeout: u64,
}

/// Trains as the arguments and the launcher's environment say, showing progress on a terminal through `bar`.
pub fn run(args: Args, bar: log::ProgressSlot) -> Result<()> {
    let config = args.config.load(None)?;
    let resume = match args.resume {
        Some(dir) => Some(checkpoint_to_resume(&dir.unwrap_or_else(|| kiln_train::checkpoint::root(&config)))?),
        None => None,
    };
    let resume = resume.as_deref();
    // A launcher's variables place this process in a job of several: one rank, one GPU, NCCL.
    let placement = kiln_dist::env::detect_from_process_env()?.filter(|p| p.world > 1);
    let engine = engine::resolve(args.backend)?;
    let lead = placement.as_ref().is_none_or(|p| p.rank == 0);
    let ranks = usize::from(args.ranks);
    run_training(&config, lead, bar, |hooks| match (engine, &placement) {
        (Engine::Cpu, Some(p)) => Err(Error::Usage(format!(
            "{} places this process in a job of {} processes, which needs GPUs (NCCL); the CPU engine trains \
             data-parallel in one process: --backend cpu --ranks N",
            p.source, p.world
        ))),
        (Engine::Cpu, None) if args.gpus.is_some() => Err(Error::Usage("--gpus needs the CUDA engine".into())),
        (Engine::Cpu, None) => {
            kiln_train::threads::train(&config, ranks, |_| Ok(CpuBackend::<f32>::new()), resume, hooks, true)
        }
        (Engine::Cuda, _) if ranks > 1 => Err(Error::Usage(
            "--ranks runs ranks as threads on the CPU engine; add --backend cpu (GPUs take one rank each: --gpus)"
                .into(),
        )),
        (Engine::Cuda, Some(p)) => {
            let gpu = match args.gpus.as_deref().map(dist::parse_gpus).transpose()?.as_deref() {
                None => None,
                Some([gpu]) => Some(*gpu),
                Some(_) => {
                    return Err(Error::Usage("in a launched job each process trains on one GPU: --gpus N".into()));
                }
            };
            let timeout = std::time::Duration::from_secs(args.rendezvous_timeout);
            dist::train_process(&config, p, gpu, args.rendezvous.as_deref(), timeout, resume, hooks)
        }
        (Engine::Cuda, None) => {
            let gpus = args.gpus.as_deref().map_or(Ok(vec![0]), dist::parse_gpus)?;
            dist::train_gpus(&config, &gpus, resume, hooks)
        }
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
    tracing::info!(
        "done: {} steps, median {:.0} tokens/s; metrics in {}",
        summary.steps,
        summary.tokens_per_s,
        PathBuf::from(&config.train.out_dir).join("metrics.jsonl").display()
    );
    Ok(())
}
