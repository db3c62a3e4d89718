//! `kiln bench train`, `kiln bench attention` and `kiln bench allreduce`: measure, print for people, then print one
//! JSON report (the numbers, the machine, and for training the resolved configuration), written to a file with
//! `--json` and checked against an earlier one with `--baseline`, so that scripts can catch a regression by the exit
//! code.

use crate::dist::{self, Job, JobArgs};
use crate::engine::{self, BackendChoice, OnEngine};
use crate::{ConfigArgs, allreduce_bench, attention_bench};
use clap::Subcommand;
use kiln_core::config::AttentionKernel;
use kiln_core::config::DistConfig;
use kiln_core::memory::describe_bytes;
use kiln_core::{AttentionDims, Backend, Config, Error, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::backend::{CudaBackend, ExpertProducts, FlashWgmma};
use kiln_cuda::kernels::Precision;
use kiln_cuda::libraries::Library;
use kiln_train::threads::{Failures, Rank};
use kiln_train::{StepStats, Trainer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// The subcommands of `kiln bench`.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training steps: median step time, tokens/s, MFU, memory, and where the time goes. The last line printed
    /// is the report: one JSON object with the same numbers, the machine and the resolved configuration. Without
    /// --config, the built-in configs/bench-gpt2-124m.toml: GPT-2 124M at 32 × 1024.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// Steps measured.
        #[arg(long, default_value_t = 20)]
        steps: u64,
        /// Steps run first and not measured (kernel caches, allocator and clock warm-up).
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// The device's dense peak in TFLOP/s, for MFU (default: for a bf16 run, the GPU's dense bf16 peak where
        /// kiln knows it, as training's metrics use; on another GPU the H100 SXM's bf16 peak, 989, as the anchors
        /// use; on the CPU none, and no MFU).
        #[arg(long)]
        peak_tflops: Option<f64>,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Attention alone: median time and TFLOP/s of the forward pass and of forward+backward, one line per shape.
    /// The last line printed is the report: one JSON object with an entry per shape and the machine.
    Attention {
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Query heads.
        #[arg(long, default_value_t = 12)]
        heads: usize,
        /// Key/value heads (default: as many as query heads; fewer is grouped-query attention).
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        #[arg(long)]
        causal: bool,
        /// With --causal, a sliding window: each query sees itself and the N − 1 keys before it.
        #[arg(long, value_name = "N", requires = "causal", value_parser = clap::value_parser!(u64).range(1..))]
        window: Option<u64>,
        /// The five shapes of the anchors' attention table instead, beside FlashAttention-2's and cuDNN's
        /// numbers on an H100 (sized for a GPU).
        #[arg(long)]
        suite: bool,
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// GPU storage precision, bf16 or fp32 (the fused kernel runs in bf16).
        #[arg(long, default_value = "bf16")]
        precision: Precision,
        /// The GPU's attention kernels, fused or unfused.
        #[arg(long, default_value = "fused")]
        kernel: AttentionKernel,
        /// Time the fused backward that adds dQ with atomics (what train.deterministic = false runs) instead of
        /// the deterministic one (the CPU engine has only one).
        #[arg(long)]
        atomic_dq: bool,
        /// Runs measured per shape and pass.
        #[arg(long, default_value_t = 30)]
        reps: usize,
        /// Runs first, not measured.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// All-reduce over the job's ranks, as nccl-tests' all_reduce_perf measures it: for each size, doubling, the
    /// mean time of an in-place f32 sum (the slowest rank's), the algorithm bandwidth (size / time) and the bus
    /// bandwidth (× 2(n−1)/n for n ranks; 0 for one rank, as nccl-tests reports). The ranks: threads on the CPU
    /// engine (--ranks), GPUs of this process (--gpus), or the processes a launcher started (kiln launch,
    /// torchrun), one GPU each, rank 0 printing. The last line printed is the report.
    Allreduce {
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        #[command(flatten)]
        job: JobArgs,
        /// The smallest size: bytes, or with nccl-tests' binary K, M, G (1M is 2^20 bytes).
        #[arg(long, default_value = "1M", value_parser = allreduce_bench::parse_size)]
        min_bytes: u64,
        /// The largest size; its buffer is allocated once on each rank.
        #[arg(long, default_value = "1G", value_parser = allreduce_bench::parse_size)]
        max_bytes: u64,
        /// All-reduces timed at each size.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        iters: u64,
        /// All-reduces run first at each size, not timed.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[command(flatten)]
        report: ReportArgs,
    },
}

/// Where the report goes, and the earlier report it must not fall behind.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Also write the report (the JSON object printed last) to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// A report written by --json earlier: exit with code 1 when this run is slower than it by more than
    /// --tolerance (training: tokens/s; attention: each shape's forward+backward TFLOP/s; all-reduce: each
    /// size's bus bandwidth, or algorithm bandwidth for one rank).
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// How much slower than the baseline still passes: a percentage (5%) or a fraction (0.05).
    #[arg(long, default_value = "5%", value_parser = parse_tolerance, requires = "baseline")]
    tolerance: f64,
}

/// `--tolerance`: a percentage (`5%`) or a fraction (`0.05`), at least 0 and below 1.
fn parse_tolerance(value: &str) -> std::result::Result<f64, String> {
    let (number, scale) = match value.strip_suffix('%') {
        Some(percent) => (percent, 100.0),
        None => (value, 1.0),
    };
    let fraction = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("\"{value}\" is not a percentage (5%) or a fraction (0.05)"))?
        / scale;
    if (0.0..1.0).contains(&fraction) {
        Ok(fraction)
    } else {
        Err(format!("{value} is not at least 0 and below 100% (a fraction below 1)"))
    }
}

/// Runs one subcommand of `kiln bench`.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train { config, backend, steps, warmup, peak_tflops, report } => {
            train(&config, backend, TrainRun { steps, warmup, peak_tflops }, &report)
        }
        BenchCommand::Attention {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
            causal,
            window,
            suite,
            backend,
            precision,
            kernel,
            atomic_dq,
            reps,
            warmup,
            report,
        } => {
            let (kv_heads, window) = (kv_heads.unwrap_or(heads), window.map(|w| w as usize));
            let one = AttentionDims { batch, time: seq, heads, kv_heads, head_dim, causal, window };
            let shapes = if suite { attention_bench::SUITE.iter().map(|(d, _)| *d).collect() } else { vec![one] };
            attention(&shapes, backend, precision, kernel, !atomic_dq, (warmup, reps), &report)
        }
        BenchCommand::Allreduce { backend, job, min_bytes, max_bytes, iters, warmup, report } => {
            let sizes = allreduce_bench::doubling_sizes(min_bytes, max_bytes);
            if sizes.is_empty() {
                return Err(Error::Usage(format!("--min-bytes {min_bytes} is above --max-bytes {max_bytes}")));
            }
            let job = job.job(engine::resolve(backend)?)?;
            allreduce(&job, &allreduce_bench::Plan { sizes, warmup, iters: iters as usize }, &report)
        }
    }
}

/// The H100 SXM's dense bf16 peak, which the anchors' MFU is measured against.
const H100_SXM_BF16_TFLOPS: f64 = 989.0;

const BENCH_CONFIG: &str = include_str!("../../../configs/bench-gpt2-124m.toml");

#[derive(Clone, Copy)]
struct TrainRun {
    steps: u64,
    warmup: u64,
    peak_tflops: Option<f64>,
}

fn train(config: &ConfigArgs, backend: BackendChoice, run: TrainRun, output: &ReportArgs) -> Result<()> {
    let config = config.load(Some((BENCH_CONFIG, "configs/bench-gpt2-124m.toml (built in)")))?;
    if run.steps == 0 {
        return Err(Error::Usage("--steps must be at least 1".into()));
    }
    // Read before measuring, so that a bad baseline fails at once rather than after the run.
    let baseline = match &output.baseline {
        Some(path) => {
            Some(baseline_rate(&read_report(path)?, "tokens_per_s", path, "a `kiln bench train --json` report")?)
        }
        None => None,
    };
    let report = engine::on_engine(backend, TrainSteps { config: &config, run })?;
    publish(&report, output)?;
    let compared = baseline.map(|baseline| Rate {
        name: "tokens/s".into(),
        measured: report["tokens_per_s"].as_f64().unwrap_or(0.0),
        baseline,
    });
    check_against_baseline(compared.as_slice(), output)
}

/// The measured training steps of one configuration, on whichever engine is chosen.
struct TrainSteps<'a> {
    config: &'a Config,
    run: TrainRun,
}

impl OnEngine for TrainSteps<'_> {
    /// The report.
    type Output = Value;

    fn cuda_engine(&self, ordinal: usize) -> Result<CudaBackend> {
        engine::cuda(ordinal, self.config)
    }

    fn run<B: Backend>(self, backend: B, gpu: Option<usize>) -> Result<Value> {
        train_on(self.config, backend, gpu, self.run)
    }
}

/// Runs the steps, prints what they took, and returns the report. `gpu` is the ordinal of the GPU `backend` runs
/// on, if any.
fn train_on<B: Backend>(config: &Config, backend: B, gpu: Option<usize>, run: TrainRun) -> Result<Value> {
    let mut trainer = Trainer::new(config, backend)?;
    trainer.set_profile(true);
    let shape = trainer.model().spec;
    let tokens = config.total_batch_tokens() as f64;
    let flops_per_token = shape.flops_per_token(config.model.block_size);
    for _ in 0..run.warmup {
        trainer.train_step()?;
    }
    let mut stats: Vec<StepStats> = (0..run.steps).map(|_| trainer.train_step()).collect::<Result<_>>()?;
    let median = |f: fn(&StepStats) -> f64, stats: &mut Vec<StepStats>| {
        stats.sort_by(|a, b| f(a).total_cmp(&f(b)));
        f(&stats[stats.len() / 2])
    };
    let step_ms = median(|s| s.data_ms + s.passes_ms + s.optimizer_ms, &mut stats);
    let (data_ms, passes_ms, queue_ms, optimizer_ms) = (
        median(|s| s.data_ms, &mut stats),
        median(|s| s.passes_ms, &mut stats),
        median(|s| s.queue_ms, &mut stats),
        median(|s| s.optimizer_ms, &mut stats),
    );
    let tokens_per_s = tokens / (step_ms / 1e3);
    let tflops = tokens_per_s * flops_per_token / 1e12;
    let peak_tflops = run.peak_tflops.or(trainer.backend().peak_tflops()).or(gpu.map(|_| H100_SXM_BF16_TFLOPS));
    let mfu = peak_tflops.map(|peak| tflops / peak);
    let bytes = trainer.backend().allocated_bytes();
    println!("backend     {}", trainer.backend().name());
    println!(
        "model       {:.1}M parameters, {} × {} tokens per step ({} accumulation steps)",
        shape.num_counted_params() as f64 / 1e6,
        trainer.micro_batch(),
        config.model.block_size,
        trainer.accumulation_steps()
    );
    println!("step        {step_ms:.2} ms median of {} (after {} warm-up)", run.steps, run.warmup);
    println!(
        "  phases    data {data_ms:.2} ms, forward+backward {passes_ms:.2} ms (queued by the host in {queue_ms:.2} ms), \
         optimizer {optimizer_ms:.2} ms"
    );
    let mfu_text = match (mfu, peak_tflops) {
        (Some(mfu), Some(peak)) => format!("MFU {:.1}% of {peak} TFLOP/s", mfu * 100.0),
        _ => "no MFU (--peak-tflops gives this device's peak)".into(),
    };
    println!("throughput  {tokens_per_s:.0} tokens/s, {tflops:.2} TFLOP/s, {mfu_text}");
    println!("memory      {:.2} GiB allocated", bytes as f64 / (1u64 << 30) as f64);
    if config.train.graphs {
        let how = if trainer.replays_graphs() { "replayed" } else { "not replayed: the capture failed (see above)" };
        println!("graphs      {how}");
    }
    // Through the resolved TOML rather than serde_json directly: that fills in what was derived (the batch) and
    // writes the f32 settings as they were given (0.9, not 0.8999999761581421).
    let config_json = toml::from_str::<Value>(&config.to_toml_string())
        .map_err(|e| Error::Invalid(format!("the configuration as JSON: {e}")))?;
    Ok(json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "machine": machine(gpu),
        "backend": trainer.backend().name(),
        "steps": run.steps,
        "warmup": run.warmup,
        "step_ms": step_ms,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "data_ms": data_ms,
        "passes_ms": passes_ms,
        "queue_ms": queue_ms,
        "optimizer_ms": optimizer_ms,
        "allocated_bytes": bytes,
        "micro_batch": trainer.micro_batch(),
        "accumulation": trainer.accumulation_steps(),
        "graphs": trainer.replays_graphs(),
        "config": config_json,
    }))
}

fn attention(
    shapes: &[AttentionDims],
    backend: BackendChoice,
    precision: Precision,
    kernel: AttentionKernel,
    deterministic: bool,
    runs: (usize, usize),
    output: &ReportArgs,
) -> Result<()> {
    if runs.1 == 0 {
        return Err(Error::Usage("--reps must be at least 1".into()));
    }
    let rows = BaselineRows { command: "attention", list: "shapes", key: "shape", field: "forward_backward_tflops" };
    let baselines = match &output.baseline {
        Some(path) => {
            let measured: Vec<(Value, String)> = shapes
                .iter()
                .map(attention_bench::describe)
                .map(|shape| (shape.clone().into(), format!("shape {shape}")))
                .collect();
            Some(baseline_rates(&read_report(path)?, path, &rows, &measured)?)
        }
        None => None,
    };
    let report = engine::on_engine(backend, AttentionRuns { shapes, precision, kernel, deterministic, runs })?;
    publish(&report, output)?;
    let compared = rates(&report, &rows, baselines, |entry| {
        format!("{} forward+backward TFLOP/s", entry["shape"].as_str().unwrap_or_default())
    });
    check_against_baseline(&compared, output)
}

/// The timed attention of some shapes, on whichever engine is chosen, and how the CUDA engine runs it.
struct AttentionRuns<'a> {
    shapes: &'a [AttentionDims],
    precision: Precision,
    kernel: AttentionKernel,
    /// Whether the fused backward adds dQ deterministically rather than with atomics.
    deterministic: bool,
    /// Warm-up runs, then measured runs.
    runs: (usize, usize),
}

impl OnEngine for AttentionRuns<'_> {
    /// The report.
    type Output = Value;

    /// The CUDA engine the flags ask for, after printing the fused kernels it will run for each head dimension.
    fn cuda_engine(&self, ordinal: usize) -> Result<CudaBackend> {
        let backend = CudaBackend::new(ordinal, self.precision, self.kernel, self.deterministic)?;
        let mut head_dims: Vec<usize> = self.shapes.iter().map(|d| d.head_dim).collect();
        head_dims.sort();
        head_dims.dedup();
        for d in head_dims {
            if let Some(kernels) = backend.fused_kernels(d) {
                println!("head dimension {d}: {}", kernels.join(", "));
            }
        }
        Ok(backend)
    }

    fn run<B: Backend>(self, backend: B, gpu: Option<usize>) -> Result<Value> {
        attention_on(self.shapes, backend, gpu, self.runs)
    }
}

/// Times each shape, prints a line for each, and returns the report. `gpu` as for `train_on`.
fn attention_on<B: Backend>(
    shapes: &[AttentionDims],
    mut backend: B,
    gpu: Option<usize>,
    (warmup, reps): (usize, usize),
) -> Result<Value> {
    println!("backend {}", backend.name());
    let mut entries = Vec::new();
    for d in shapes {
        let t = attention_bench::measure(&mut backend, *d, warmup, reps)?;
        let (fwd, both) = (t.forward_tflops(d), t.forward_backward_tflops(d));
        let anchors = attention_bench::SUITE.iter().find(|(s, _)| s == d).map(|(_, a)| a);
        println!(
            "{:<28} forward {:>9.3} ms {:>8.3} TFLOP/s | forward+backward {:>9.3} ms {:>8.3} TFLOP/s{}",
            attention_bench::describe(d),
            t.forward_ms,
            fwd,
            t.forward_backward_ms,
            both,
            anchors.map_or(String::new(), |a| format!(
                "  (H100 FlashAttention-2 {:.0} / {:.0}, cuDNN {:.0} / {:.0})",
                a[0], a[1], a[2], a[3]
            ))
        );
        entries.push(json!({
            "shape": attention_bench::describe(d),
            "forward_ms": t.forward_ms,
            "forward_tflops": fwd,
            "forward_backward_ms": t.forward_backward_ms,
            "forward_backward_tflops": both,
        }));
    }
    Ok(json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "machine": machine(gpu),
        "backend": backend.name(),
        "warmup": warmup,
        "reps": reps,
        "shapes": entries,
    }))
}

fn allreduce(job: &Job, plan: &allreduce_bench::Plan, output: &ReportArgs) -> Result<()> {
    let (key, name) = compared_bandwidth(job.ranks());
    let rows = BaselineRows { command: "allreduce", list: "sizes", key: "bytes", field: key };
    let baseline = match &output.baseline {
        Some(path) => {
            let measured: Vec<(Value, String)> =
                plan.sizes.iter().map(|&bytes| (bytes.into(), format!("size of {bytes} bytes"))).collect();
            Some(baseline_rates(&read_report(path)?, path, &rows, &measured)?)
        }
        None => None,
    };
    let timeout = Duration::from_secs(DistConfig::default().timeout_s);
    let largest = plan.sizes.iter().copied().max().unwrap_or(0);
    let cuda = |gpu| CudaBackend::new(gpu, Precision::Fp32, AttentionKernel::default(), true);
    let measured = match job {
        Job::CpuThreads(ranks) => {
            // Every rank's buffer, its slot in the group and its sums, all in the host's memory.
            let needed = largest * 3 * *ranks as u64;
            if let Some(free) = kiln_core::memory::host_available_bytes()
                && free < needed
            {
                return Err(Error::Usage(format!(
                    "--max-bytes {largest} on {ranks} ranks needs {} of host memory (a buffer, a copy to sum and \
                     the sums on each rank) and {} is available",
                    describe_bytes(needed),
                    describe_bytes(free)
                )));
            }
            let make_rank = kiln_train::threads::thread_ranks(*ranks, timeout, |_| Ok(CpuBackend::<f32>::new()));
            allreduce_threads(*ranks, make_rank, plan, None)?
        }
        Job::Gpus(gpus) => allreduce_threads(gpus.len(), dist::gpu_ranks(gpus, cuda, timeout)?, plan, Some(gpus[0]))?,
        Job::Launched(rank) => {
            let dist::JoinedRank { gpu, mut backend, mut comm, watch } = dist::join(rank, cuda, timeout)?;
            let seconds = allreduce_bench::measure(&mut backend, &mut comm, plan)?;
            // The communicator goes first: the watch must outlive it.
            drop(comm);
            drop(watch);
            AllreduceRun { backend: backend.name(), world: job.ranks(), gpu: Some(gpu), seconds }
        }
    };
    if !job.lead() {
        return Ok(());
    }
    let report = allreduce_report(plan, &measured);
    publish(&report, output)?;
    let compared = rates(&report, &rows, baseline, |entry| format!("{} B {name}", entry["bytes"]));
    check_against_baseline(&compared, output)
}

/// What the job's rank 0 measured: on which engine (and the GPU, if one), over how many ranks, and the slowest
/// rank's mean seconds per all-reduce at each size of the plan.
struct AllreduceRun {
    backend: String,
    world: usize,
    gpu: Option<usize>,
    seconds: Vec<f64>,
}

/// Runs the plan on `world` ranks that are threads of this process, made by `make_rank`, and returns rank 0's
/// measurement; `gpu` is rank 0's GPU, if any.
fn allreduce_threads<B: Backend>(
    world: usize,
    make_rank: impl Fn(usize, &Arc<AtomicBool>) -> Result<Rank<B>> + Sync,
    plan: &allreduce_bench::Plan,
    gpu: Option<usize>,
) -> Result<AllreduceRun> {
    let rank = |rank: usize, failures: &Failures| -> Option<AllreduceRun> {
        let (mut backend, mut comm) = match make_rank(rank, failures.flag()) {
            Ok(made) => made,
            Err(e) => return failures.record(e),
        };
        match allreduce_bench::measure(&mut backend, comm.as_mut(), plan) {
            Ok(seconds) => Some(AllreduceRun { backend: backend.name(), world, gpu, seconds }),
            Err(e) => failures.record(e),
        }
    };
    kiln_train::threads::run_ranks(
        world,
        |failures| rank(0, failures),
        |r, failures| {
            rank(r, failures);
        },
    )
}

/// The bandwidth that a run of `world` ranks is compared with its baseline by, as its key in the report and its
/// name for people: the bus bandwidth, which compares across job sizes, except for one rank, whose bus bandwidth
/// is 0 whatever its speed.
fn compared_bandwidth(world: usize) -> (&'static str, &'static str) {
    if world == 1 { ("algbw_gbps", "algbw GB/s") } else { ("busbw_gbps", "busbw GB/s") }
}

/// Prints nccl-tests' table of `run` and returns the report.
fn allreduce_report(plan: &allreduce_bench::Plan, run: &AllreduceRun) -> Value {
    println!(
        "# all-reduce (sum, in place) of f32 over {} ranks, {}; {} timed after {} warm-up",
        run.world, run.backend, plan.iters, plan.warmup
    );
    println!("#{:>12} {:>13} {:>10} {:>8} {:>8}", "size", "count", "time", "algbw", "busbw");
    println!("#{:>12} {:>13} {:>10} {:>8} {:>8}", "(B)", "(elements)", "(us)", "(GB/s)", "(GB/s)");
    let mut entries = Vec::new();
    for (&bytes, &seconds) in plan.sizes.iter().zip(&run.seconds) {
        let algbw = allreduce_bench::algorithm_bandwidth(bytes, seconds) / 1e9;
        let busbw = allreduce_bench::bus_bandwidth(algbw, run.world);
        println!(" {bytes:>12} {:>13} {:>10.1} {algbw:>8.2} {busbw:>8.2}", bytes / 4, seconds * 1e6);
        entries.push(json!({
            "bytes": bytes,
            "count": bytes / 4,
            "time_us": seconds * 1e6,
            "algbw_gbps": algbw,
            "busbw_gbps": busbw,
        }));
    }
    let average = entries.iter().map(|e| e["busbw_gbps"].as_f64().unwrap_or(0.0)).sum::<f64>() / entries.len() as f64;
    println!("# Avg bus bandwidth    : {average:.3}");
    json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "machine": machine(run.gpu),
        "backend": run.backend,
        "ranks": run.world,
        "warmup": plan.warmup,
        "iters": plan.iters,
        "sizes": entries,
        "average_busbw_gbps": average,
    })
}

/// Where a report was measured, to tell whether two reports compare: the host, the CPU threads, the environment's
/// switches of the CUDA kernels (each set value, or null), and when a GPU ran it (ordinal `gpu`), that GPU and the
/// CUDA libraries' versions (the driver's as the CUDA version it supports).
fn machine(gpu: Option<usize>) -> Value {
    let kernel_switches: serde_json::Map<String, Value> = [FlashWgmma::VARIABLE, ExpertProducts::VARIABLE]
        .into_iter()
        .map(|name| (name.to_owned(), json!(std::env::var(name).ok())))
        .collect();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned());
    let (gpu, cuda_libraries) = match gpu {
        None => (Value::Null, Value::Null),
        Some(ordinal) => {
            let gpu = kiln_cuda::devices::list().ok().and_then(|gpus| gpus.into_iter().find(|g| g.ordinal == ordinal));
            let libraries: serde_json::Map<String, Value> =
                Library::ALL.iter().map(|lib| (lib.file_name().to_owned(), json!(lib.version()))).collect();
            let gpu = gpu.map(|g| {
                let (major, minor) = g.compute_capability;
                json!({
                    "ordinal": g.ordinal,
                    "name": g.name,
                    "compute_capability": format!("{major}.{minor}"),
                    "memory_bytes": g.memory_bytes,
                })
            });
            (json!(gpu), Value::Object(libraries))
        }
    };
    json!({
        "hostname": hostname,
        "cpu_threads": rayon::current_num_threads(),
        "kernel_switches": kernel_switches,
        "gpu": gpu,
        "cuda_libraries": cuda_libraries,
    })
}

/// Prints the report as the last line, and writes it to `--json`'s file.
fn publish(report: &Value, output: &ReportArgs) -> Result<()> {
    println!("{report}");
    if let Some(path) = &output.json {
        let text =
            serde_json::to_string_pretty(report).map_err(|e| Error::Invalid(format!("the report as JSON: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// A report that `--json` wrote, as JSON; a file that cannot be read or is not JSON is an error naming it.
fn read_report(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::data(path, format!("cannot read the baseline: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::data(path, format!("not a report written by --json: {e}")))
}

/// The rate under `key` in `object`, part of the baseline report at `path`: a number above 0, since the run is
/// judged by its ratio to it. Anything else is an error naming the file and what it should have been.
fn baseline_rate(object: &Value, key: &str, path: &Path, expected: &str) -> Result<f64> {
    let rate = object[key].as_f64().ok_or_else(|| Error::data(path, format!("no number \"{key}\": not {expected}")))?;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(Error::data(path, format!("\"{key}\" is {rate}: a baseline's rate must be above 0")));
    }
    Ok(rate)
}

/// Where the baseline report of one `kiln bench` command keeps its rates: in the list `list`, one entry per
/// measurement, found by its `key`, with the rate in `field`.
struct BaselineRows<'a> {
    command: &'a str,
    list: &'a str,
    key: &'a str,
    field: &'a str,
}

/// The baseline's rate for each of `measured`, in order: each the value of the key of an entry this run measures,
/// and how messages name it. A measurement the baseline lacks is an error, so that a run is never passed without
/// being compared.
fn baseline_rates(report: &Value, path: &Path, rows: &BaselineRows, measured: &[(Value, String)]) -> Result<Vec<f64>> {
    let expected = format!("a `kiln bench {} --json` report", rows.command);
    let entries = report[rows.list]
        .as_array()
        .ok_or_else(|| Error::data(path, format!("no list \"{}\": not {expected}", rows.list)))?;
    measured
        .iter()
        .map(|(wanted, name)| {
            let entry = entries
                .iter()
                .find(|e| &e[rows.key] == wanted)
                .ok_or_else(|| Error::data(path, format!("the baseline has no {name}")))?;
            baseline_rate(entry, rows.field, path, &expected)
        })
        .collect()
}

/// This run's rates beside `baselines` (none without a baseline): the entries of `report`'s list of `rows`, in order,
/// each named by `name`.
fn rates(
    report: &Value,
    rows: &BaselineRows,
    baselines: Option<Vec<f64>>,
    name: impl Fn(&Value) -> String,
) -> Vec<Rate> {
    let entries = report[rows.list].as_array().into_iter().flatten();
    baselines
        .unwrap_or_default()
        .into_iter()
        .zip(entries)
        .map(|(baseline, entry)| Rate {
            name: name(entry),
            measured: entry[rows.field].as_f64().unwrap_or(0.0),
            baseline,
        })
        .collect()
}

/// A rate of this run (higher is faster) beside the baseline's.
struct Rate {
    name: String,
    measured: f64,
    baseline: f64,
}

/// Fails (exit code 1) when any rate is below its baseline by more than the tolerance, naming each such rate.
fn check_against_baseline(rates: &[Rate], output: &ReportArgs) -> Result<()> {
    let Some(path) = &output.baseline else { return Ok(()) };
    let tolerance = output.tolerance;
    let percent = |x: f64| format!("{:.1}%", x * 100.0);
    let mut slower = Vec::new();
    for r in rates {
        let change = r.measured / r.baseline - 1.0;
        tracing::info!("{}: {:.4}, baseline {:.4} ({:+.1}%)", r.name, r.measured, r.baseline, change * 100.0);
        if r.measured < r.baseline * (1.0 - tolerance) {
            slower.push(format!(
                "{} {:.4} is {} below the baseline's {:.4}, beyond the tolerance of {}",
                r.name,
                r.measured,
                percent(-change),
                r.baseline,
                percent(tolerance)
            ));
        }
    }
    if slower.is_empty() {
        return Ok(());
    }
    Err(Error::backend("bench", format!("slower than {}: {}", path.display(), slower.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_a_percentage_or_a_fraction_below_one() {
        assert_eq!(parse_tolerance("5%"), Ok(0.05));
        assert_eq!(parse_tolerance("0.05"), Ok(0.05));
        assert_eq!(parse_tolerance("0"), Ok(0.0));
        // A bare 5 would be 500%: refused rather than guessed to mean 5%.
        assert!(parse_tolerance("5").is_err());
        assert!(parse_tolerance("100%").is_err());
        assert!(parse_tolerance("-1%").is_err());
        assert!(parse_tolerance("fast").is_err());
    }
}
