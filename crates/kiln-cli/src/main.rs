//! `kiln`: train GPT-style language models from the command line.
//!
//! Parses arguments, sets up logging (and a progress bar on a terminal), picks a backend and hands over to
//! `kiln-train`. Errors end the process with a message and an exit code: 2 for usage, configuration and input
//! errors, 1 for failures at run time, 130 when interrupted.

mod attention_bench;
mod bench;
mod dist;
mod log;
mod plan;
mod report;

use clap::{Parser, Subcommand, ValueEnum};
use kiln_core::Backend;
use kiln_core::config::{AttentionKernel, DataConfig};
use kiln_core::{Config, Error, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::backend::CudaBackend;
use kiln_cuda::compile::Compiler;
use kiln_cuda::kernels::{KERNELS, Precision};
use kiln_data::Dataset;
use kiln_data::hf::{EndOfText, HfTokenizer};
use kiln_data::prepare::{PrepareOptions, Tokenization};
use kiln_model::generate::SampleOptions;
use kiln_train::inference::{Inference, Request};
use kiln_train::{Hooks, describe_sum};
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

#[derive(Subcommand)]
enum Command {
    /// Train a model. With no arguments, runs the built-in quickstart (a small GPT learning to add).
    Train {
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
    },
    /// Tokenise text into shards (llm.c's .bin format) that `data.train = "DIR"` trains on.
    Prepare {
        /// Text files, directories of them, or JSON Lines files (repeatable).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// gpt2 (GPT-2's BPE, embedded), byte (raw UTF-8 bytes), char (one token per character of the input), or
        /// the path of a Hugging Face tokenizer.json (a value with a path separator or ending in .json).
        #[arg(long, value_name = "gpt2|byte|char|PATH", default_value = "gpt2", value_parser = parse_tokenizer)]
        tokenizer: TokenizerChoice,
        /// With a tokenizer.json: the token put before each document (default: the first of <|endoftext|>,
        /// <|end_of_text|>, </s>, <eos>, <|im_end|> among its special tokens).
        #[arg(long, value_name = "TOKEN")]
        eos_token: Option<String>,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// The fraction of the input (the last part, by bytes) held out for validation.
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// The field of a JSON Lines object that holds the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Replace invalid UTF-8 and report how much, instead of stopping at it.
        #[arg(long)]
        lossy: bool,
    },
    /// Validation loss and perplexity of a checkpoint over a whole validation split.
    Eval {
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
    },
    /// Generate text from a model directory (a checkpoint, an export, or one saved by transformers), streaming it as
    /// it is produced.
    Sample {
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
    },
    /// Write a clean, model-only copy of a checkpoint for other tools.
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        /// hf: model.safetensors (or shards and model.safetensors.index.json) and config.json, loadable by
        /// transformers' GPT2LMHeadModel or LlamaForCausalLM.
        #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
        format: ExportFormat,
        #[arg(long)]
        out: PathBuf,
        /// Split the weights into shards of at most this many megabytes (10⁶ bytes), as transformers does.
        #[arg(long, default_value_t = 5000.0)]
        max_shard_mb: f64,
    },
    /// Check an engine against the CPU engine in f64: every operation, the model's gradients, 20 training steps.
    Selftest {
        /// The engine to check.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// The cuda engine's precision to check (both when absent); a separate process per precision keeps one
        /// precision's fault from hiding the other's results, since a CUDA context does not survive a fault.
        #[arg(long)]
        precision: Option<Precision>,
    },
    /// Show the version, the engines available, CPU threads, CUDA libraries and GPUs.
    Info(dist::InfoArgs),
    /// Start this node's processes of a data-parallel job, pass on their output, and stop them all when one fails.
    Launch(dist::LaunchArgs),
    /// The memory a training run will take on each rank, by component, and whether it fits (without --config, the
    /// built-in quickstart's).
    Plan(plan::PlanArgs),
    /// One self-contained HTML page charting runs' metrics.jsonl side by side: loss, learning rate, gradient norm,
    /// throughput, memory, and skips, rollbacks and resumes.
    Report(report::ReportCommand),
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// CUDA kernels: compile them ahead of time into the on-disk cache.
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
    },
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// Compile every kernel with NVRTC (no GPU needed) and report registers, shared memory and spills.
    Build {
        /// Architectures to compile for, e.g. sm_90a (repeatable; default: those of the GPUs present).
        #[arg(long = "arch")]
        archs: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Hf,
}

#[derive(Clone)]
enum TokenizerChoice {
    Gpt2,
    Byte,
    Char,
    HfFile(PathBuf),
}

/// `--tokenizer`: a built-in tokenizer's name, or a path.
fn parse_tokenizer(value: &str) -> std::result::Result<TokenizerChoice, String> {
    match value {
        "gpt2" => Ok(TokenizerChoice::Gpt2),
        "byte" => Ok(TokenizerChoice::Byte),
        "char" => Ok(TokenizerChoice::Char),
        path if path.chars().any(std::path::is_separator) || path.ends_with(".json") => {
            Ok(TokenizerChoice::HfFile(PathBuf::from(path)))
        }
        other => Err(format!(
            "\"{other}\" is not gpt2, byte or char; a tokenizer.json is named by a path (with a / or ending in .json)"
        )),
    }
}

/// The tokenizer `kiln prepare` uses: a built-in one, or a tokenizer.json with its end-of-text token.
fn tokenization(choice: TokenizerChoice, eos_token: Option<&str>) -> Result<Tokenization> {
    Ok(match (choice, eos_token) {
        (TokenizerChoice::HfFile(path), eos_token) => {
            let hf = HfTokenizer::load(&path, eos_token.map_or(EndOfText::Find, EndOfText::Token))?;
            tracing::info!(
                "{}: {} tokens, end-of-text {:?} = {}; documents tokenised {}",
                path.display(),
                hf.vocab_size(),
                hf.end_of_text_token(),
                hf.end_of_text(),
                if hf.tokenises_in_blocks() {
                    "in blocks"
                } else {
                    "whole (its pipeline is not known to split alike at block cuts)"
                }
            );
            Tokenization::Hf(Arc::new(hf))
        }
        (_, Some(_)) => {
            return Err(Error::Usage(
                "--eos-token goes with --tokenizer PATH/tokenizer.json; gpt2, byte and char have their own".into(),
            ));
        }
        (TokenizerChoice::Gpt2, None) => Tokenization::Gpt2,
        (TokenizerChoice::Byte, None) => Tokenization::Byte,
        (TokenizerChoice::Char, None) => Tokenization::Char(None),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU is present, otherwise the CPU.
    Auto,
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`kiln info | head -1`) would panic; end quietly
    // instead, as command-line tools do.
    // SAFETY: restores the default disposition of one signal, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let bar = log::init();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global()
    {
        eprintln!("error: cannot start {n} threads: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Train { config, backend, resume, ranks, gpus, rendezvous, rendezvous_timeout } => {
            let job = Job { ranks: ranks.into(), gpus, rendezvous, rendezvous_timeout };
            train(&config, backend, resume, job, bar)
        }
        // A rendezvous to check, asked for or implied by a placement in a job of several, replaces the report.
        Command::Info(args) => dist::check_rendezvous(&args).map(|checked| {
            if !checked {
                info()
            }
        }),
        Command::Launch(args) => match dist::launch(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Kernels { command: KernelsCommand::Build { archs } } => build_kernels(archs),
        Command::Plan(args) => plan::plan(args),
        Command::Selftest { backend, precision } => selftest(backend, precision),
        Command::Eval { checkpoint, data, block_size, batch, backend } => {
            eval(&checkpoint, data, block_size, batch, backend)
        }
        Command::Sample {
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            no_kv_cache,
            backend,
        } => {
            let options =
                SampleOptions { max_new_tokens, temperature, top_k, top_p, seed, stop: None, kv_cache: !no_kv_cache };
            sample(&checkpoint, &prompt, &options, backend)
        }
        Command::Export { checkpoint, format: ExportFormat::Hf, out, max_shard_mb } => {
            export_hf(&checkpoint, &out, max_shard_mb)
        }
        Command::Prepare { inputs, tokenizer, eos_token, out, val_fraction, shard_tokens, text_field, lossy } => {
            tokenization(tokenizer, eos_token.as_deref()).and_then(|tokenizer| {
                let block_bytes = kiln_data::prepare::BLOCK_BYTES;
                let options = PrepareOptions {
                    inputs,
                    tokenizer,
                    out,
                    val_fraction,
                    shard_tokens,
                    text_field,
                    lossy,
                    block_bytes,
                };
                prepare(options, bar)
            })
        }
        Command::Bench { command } => bench::run(command),
        Command::Report(command) => report::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// How `kiln train` spreads over ranks.
struct Job {
    ranks: usize,
    gpus: Option<String>,
    rendezvous: Option<String>,
    rendezvous_timeout: u64,
}

fn train(
    config: &ConfigArgs,
    backend: BackendChoice,
    resume: Option<Option<PathBuf>>,
    job: Job,
    bar: log::ProgressSlot,
) -> Result<()> {
    let config = config.load(None)?;
    let resume = match resume {
        Some(dir) => Some(checkpoint_to_resume(&dir.unwrap_or_else(|| kiln_train::checkpoint::root(&config)))?),
        None => None,
    };
    let resume = resume.as_deref();
    // A launcher's variables place this process in a job of several: one rank, one GPU, NCCL.
    let placement = kiln_dist::env::detect_from_process_env()?.filter(|p| p.world > 1);
    let engine = resolve(backend)?;
    let lead = placement.as_ref().is_none_or(|p| p.rank == 0);
    run_training(&config, lead, bar, |hooks| match (engine, &placement) {
        (Engine::Cpu, Some(p)) => Err(Error::Usage(format!(
            "{} places this process in a job of {} processes, which needs GPUs (NCCL); the CPU engine trains \
             data-parallel in one process: --backend cpu --ranks N",
            p.source, p.world
        ))),
        (Engine::Cpu, None) if job.gpus.is_some() => Err(Error::Usage("--gpus needs the CUDA engine".into())),
        (Engine::Cpu, None) => {
            kiln_train::threads::train(&config, job.ranks, |_| Ok(CpuBackend::<f32>::new()), resume, hooks, true)
        }
        (Engine::Cuda, _) if job.ranks > 1 => Err(Error::Usage(
            "--ranks runs ranks as threads on the CPU engine; add --backend cpu (GPUs take one rank each: --gpus)"
                .into(),
        )),
        (Engine::Cuda, Some(p)) => {
            let gpu = match job.gpus.as_deref().map(dist::parse_gpus).transpose()?.as_deref() {
                None => None,
                Some([gpu]) => Some(*gpu),
                Some(_) => {
                    return Err(Error::Usage("in a launched job each process trains on one GPU: --gpus N".into()));
                }
            };
            let timeout = std::time::Duration::from_secs(job.rendezvous_timeout);
            dist::train_process(&config, p, gpu, job.rendezvous.as_deref(), timeout, resume, hooks)
        }
        (Engine::Cuda, None) => {
            let gpus = job.gpus.as_deref().map_or(Ok(vec![0]), dist::parse_gpus)?;
            dist::train_gpus(&config, &gpus, resume, hooks)
        }
    })
}

/// The checkpoint `--resume` names: `dir` itself when it is one, else the newest complete one inside it.
fn checkpoint_to_resume(dir: &std::path::Path) -> Result<PathBuf> {
    if dir.join("state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    kiln_train::checkpoint::list(dir)
        .pop()
        .map(|(_, path)| path)
        .ok_or_else(|| Error::Usage(format!("--resume: no complete checkpoint in {}", dir.display())))
}

enum Engine {
    Cpu,
    Cuda,
}

/// The CUDA engine on GPU `ordinal`, in the precision and with the attention kernel that `config` asks for.
fn cuda(ordinal: usize, config: &Config) -> Result<CudaBackend> {
    CudaBackend::new(ordinal, config.train.precision, config.model.attention, config.train.deterministic)
}

/// `auto` becomes CUDA when a usable GPU is present, otherwise the CPU with one warning.
fn resolve(choice: BackendChoice) -> Result<Engine> {
    Ok(match choice {
        BackendChoice::Cpu => Engine::Cpu,
        BackendChoice::Cuda => Engine::Cuda,
        BackendChoice::Auto => match kiln_cuda::devices::list() {
            Ok(gpus) if !gpus.is_empty() => Engine::Cuda,
            Ok(_) => {
                tracing::warn!("no GPU found: training on the CPU");
                Engine::Cpu
            }
            Err(e) => {
                tracing::warn!("no usable GPU ({e}): training on the CPU");
                Engine::Cpu
            }
        },
    })
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

/// The engine settings (precision, attention kernels, determinism) for using the model in `dir`: a checkpoint's
/// own, or the defaults for a directory that is not one.
fn engine_settings(dir: &std::path::Path) -> Result<Config> {
    match kiln_train::checkpoint::config(dir, &[]) {
        Ok(config) => Ok(config),
        Err(_) if !dir.join("state.json").exists() => Config::load(None, &[]),
        Err(e) => Err(e),
    }
}

fn sample(checkpoint: &std::path::Path, prompt: &str, options: &SampleOptions, backend: BackendChoice) -> Result<()> {
    let request = Request::Sample { prompt, new_tokens: options.max_new_tokens };
    match resolve(backend)? {
        Engine::Cpu => sample_on(Inference::open(checkpoint, CpuBackend::<f32>::new(), request)?, prompt, options),
        Engine::Cuda => {
            let engine = cuda(0, &engine_settings(checkpoint)?)?;
            sample_on(Inference::open(checkpoint, engine, request)?, prompt, options)
        }
    }
}

fn sample_on<B: Backend>(mut model: Inference<B>, prompt: &str, options: &SampleOptions) -> Result<()> {
    use std::io::Write;
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

/// The window `kiln eval` scores a directory that is not a checkpoint in, unless the model's context is shorter.
const DEFAULT_EVAL_WINDOW: usize = 1024;

fn eval(
    checkpoint: &std::path::Path,
    data: Option<PathBuf>,
    block_size: Option<usize>,
    batch: usize,
    backend: BackendChoice,
) -> Result<()> {
    let settings = engine_settings(checkpoint)?;
    let is_checkpoint = checkpoint.join("state.json").exists();
    let data = match (data, is_checkpoint) {
        (Some(dir), _) => DataConfig { train: dir.display().to_string(), val: None },
        (None, true) => settings.data.clone(),
        (None, false) => {
            return Err(Error::Usage(format!(
                "{}: not a kiln checkpoint; name the data to score with --data",
                checkpoint.display()
            )));
        }
    };
    let time = match block_size {
        Some(t) => t,
        None if is_checkpoint => settings.model.block_size,
        // A model's whole context (131,072 tokens for Llama 3.2) would be a costly default window.
        None => kiln_core::config::ModelConfig::from_hf_dir(checkpoint)?.0.block_size.min(DEFAULT_EVAL_WINDOW),
    };
    if batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let dataset = Dataset::open_validation(&data, time)?;
    let request = Request::Score { batch, time };
    let (loss, tokens) = match resolve(backend)? {
        Engine::Cpu => Inference::open(checkpoint, CpuBackend::<f32>::new(), request)?.evaluate(&dataset)?,
        Engine::Cuda => Inference::open(checkpoint, cuda(0, &settings)?, request)?.evaluate(&dataset)?,
    }
    .ok_or_else(|| {
        Error::Usage(format!("{}: a synthetic corpus has no fixed validation split to score; pass --data", data.train))
    })?;
    println!("val loss {loss:.4}, perplexity {:.3}, over {tokens} tokens of {}", loss.exp(), data.train);
    Ok(())
}

/// Writes the model of a checkpoint into a new directory as transformers reads it, whole or not at all.
fn export_hf(checkpoint: &std::path::Path, out: &std::path::Path, max_shard_mb: f64) -> Result<()> {
    if !(max_shard_mb.is_finite() && max_shard_mb > 0.0) {
        return Err(Error::Usage(format!("--max-shard-mb {max_shard_mb} must be a number above 0")));
    }
    let written = kiln_train::checkpoint::export(checkpoint, out, (max_shard_mb * 1e6) as usize)?;
    let names: Vec<String> =
        written.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    println!("wrote {} ({}, config.json)", out.display(), names.join(", "));
    Ok(())
}

fn prepare(options: PrepareOptions, bar: log::ProgressSlot) -> Result<()> {
    let started = std::time::Instant::now();
    let progress = bar.start_bytes();
    let summary = kiln_data::prepare::prepare(&options, |bytes, tokens| {
        if let Some(p) = &progress {
            p.set_position(bytes);
            p.set_message(format!("{tokens} tokens"));
        }
    });
    bar.finish();
    let summary = summary?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "{} train and {} validation tokens in {} shards under {}",
        summary.train_tokens,
        summary.val_tokens,
        summary.shards.len(),
        options.out.display()
    );
    tracing::info!(
        "{:.1} MB/s of text, {:.0} tokens/s ({:.1} s)",
        summary.bytes as f64 / 1e6 / seconds,
        (summary.train_tokens + summary.val_tokens) as f64 / seconds,
        seconds
    );
    if summary.replaced > 0 {
        tracing::warn!("replaced {} invalid UTF-8 sequences", summary.replaced);
    }
    Ok(())
}

/// Prints one line per check and a count; fails (exit code 1) if any check does. The CUDA engine is checked in
/// both precisions.
fn selftest(backend: BackendChoice, precision: Option<Precision>) -> Result<()> {
    let print = |c: &kiln_selftest::Check| println!("{}", c.line());
    let mut checks = Vec::new();
    match resolve(backend)? {
        Engine::Cpu if precision == Some(Precision::Bf16) => {
            return Err(Error::Usage("--precision bf16 needs the cuda engine: the cpu engine computes in f32".into()));
        }
        Engine::Cpu => {
            println!("checking the cpu engine (f32) against the cpu engine in f64");
            checks.extend(kiln_selftest::run(|| Ok(CpuBackend::<f32>::new()), kiln_selftest::Tolerance::FP32, print)?);
        }
        Engine::Cuda => {
            // bf16 twice: with the deterministic attention backward, then with the one that adds dQ atomically.
            let (fp32, bf16) = (kiln_selftest::Tolerance::FP32, kiln_selftest::Tolerance::BF16);
            let all = [(Precision::Fp32, fp32, true), (Precision::Bf16, bf16, true), (Precision::Bf16, bf16, false)];
            for (precision, tolerance, deterministic) in
                all.into_iter().filter(|(p, _, _)| precision.is_none_or(|wanted| wanted == *p))
            {
                let atomic = if deterministic { "" } else { ", attention's dQ added atomically" };
                println!("checking the cuda engine ({}{atomic}) against the cpu engine in f64", precision.name());
                checks.extend(kiln_selftest::run(
                    || CudaBackend::new(0, precision, AttentionKernel::Fused, deterministic),
                    tolerance,
                    print,
                )?);
            }
        }
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} passed, {failed} failed", checks.len() - failed);
    if failed > 0 {
        return Err(Error::backend("selftest", format!("{failed} of {} checks failed", checks.len())));
    }
    Ok(())
}

fn info() {
    use kiln_cuda::libraries::Library;
    println!("kiln {}", env!("CARGO_PKG_VERSION"));
    println!("engines:");
    println!("  cpu   available: f32, {} threads", rayon::current_num_threads());
    println!("  cuda  bf16 and fp32 (`kiln selftest --backend cuda` checks it on this machine's GPU)");
    println!("cuda libraries:");
    for lib in Library::ALL {
        match lib.version() {
            Some(version) => println!("  {:<18} found, version {version}", lib.file_name()),
            None if lib.is_present() => println!("  {:<18} found", lib.file_name()),
            None => println!("  {:<18} not found", lib.file_name()),
        }
    }
    if let Ok(compiler) = Compiler::new() {
        println!("  kernel cache       {}", compiler.cache_dir().display());
    }
    match kiln_cuda::devices::list() {
        Ok(gpus) if !gpus.is_empty() => {
            println!("gpus:");
            for g in gpus {
                let (major, minor) = g.compute_capability;
                println!(
                    "  {}: {}, compute capability {major}.{minor}, {:.1} GiB",
                    g.ordinal,
                    g.name,
                    g.memory_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
        Ok(_) => println!("gpus: none"),
        Err(e) => println!("gpus: none usable ({e})"),
    }
}

fn build_kernels(mut archs: Vec<String>) -> Result<()> {
    if archs.is_empty() {
        let gpus = kiln_cuda::devices::list().map_err(|e| {
            Error::Usage(format!("no GPU to compile for ({e}); name one with --arch, e.g. --arch sm_90a"))
        })?;
        archs = gpus.iter().map(|g| g.arch()).collect();
        archs.dedup();
        if archs.is_empty() {
            return Err(Error::Usage("no GPU found; name an architecture with --arch, e.g. --arch sm_90a".into()));
        }
    }
    let compiler = Compiler::new()?;
    println!("cache: {}", compiler.cache_dir().display());
    for arch in &archs {
        for kernel in KERNELS {
            for &precision in kernel.precisions {
                let built = compiler.compile(kernel, arch, precision)?;
                let how = if built.cached { "cached" } else { "compiled" };
                println!("{}.cu {arch} {}: {how}, {} bytes", kernel.name, precision.name(), built.cubin.len());
                for name in &built.entry_points {
                    match built.stats.iter().find(|s| &s.function == name) {
                        Some(s) => println!(
                            "  {name:<28} {:>3} registers, {:>6} B shared, {} B stack, {} B spilled",
                            s.registers,
                            s.shared_bytes,
                            s.stack_bytes,
                            s.spill_stores + s.spill_loads
                        ),
                        None => println!("  {name:<28} (no ptxas report in the compile log)"),
                    }
                }
            }
        }
    }
    Ok(())
}
