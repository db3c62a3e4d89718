//! `kiln plan`: the memory a training run will take on each rank, before it is started.

use crate::ConfigArgs;
use crate::engine::{self, BackendChoice, Engine};
use kiln_core::config::MicroBatch;
use kiln_core::memory::{MemoryModel, describe_bytes, parse_bytes};
use kiln_core::{Error, Result};
use kiln_cpu::CpuMemory;
use kiln_cuda::memory::CudaMemory;
use kiln_model::ModelSpec;
use kiln_train::plan::{self, MemoryPlan};

/// The arguments of `kiln plan`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// The engine the run would use: cuda plans in train.precision whether or not a GPU is here.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Ranks of the job, one per GPU (on the CPU engine, threads sharing the host's memory).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..), conflicts_with = "gpus")]
    ranks: u16,
    /// GPUs of the job, one rank each: as --ranks, on the cuda engine.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    gpus: Option<u16>,
    /// The memory of each GPU (or of the host, for the CPU engine), e.g. 80GiB (default: what is detected here:
    /// the first GPU's total, or the host's available memory).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    memory: Option<u64>,
    /// The data's vocabulary, instead of reading it from data.train (to plan without the data).
    #[arg(long)]
    vocab: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Prints the plan of the configured run, as a table or one JSON object, and whether it fits.
pub fn run(args: Args) -> Result<()> {
    let config = args.config.load(None)?;
    let cuda = match (args.backend, args.gpus) {
        (BackendChoice::Cpu, Some(_)) => return Err(Error::Usage("--gpus plans the cuda engine".into())),
        (_, Some(_)) | (BackendChoice::Cuda, None) => true,
        (BackendChoice::Cpu, None) => false,
        (BackendChoice::Auto, None) => matches!(engine::resolve(BackendChoice::Auto)?, Engine::Cuda),
    };
    let world = usize::from(args.gpus.unwrap_or(args.ranks));
    let memory: Box<dyn MemoryModel> = if cuda {
        let (precision, attention, deterministic) =
            (config.train.precision, config.model.attention, config.train.deterministic);
        Box::new(CudaMemory { precision, attention, deterministic })
    } else {
        Box::new(CpuMemory::<f32>::new())
    };
    let capacity = match args.memory {
        Some(bytes) => Some(bytes),
        None if cuda => kiln_cuda::devices::list().ok().and_then(|g| g.first().map(|g| g.memory_bytes as u64)),
        None => kiln_core::memory::host_available_bytes(),
    };
    let data_vocab = match args.vocab {
        Some(vocab) => vocab,
        None => kiln_data::Dataset::open(&config.data, config.model.block_size)
            .map_err(|e| Error::Usage(format!("{e}\n(--vocab N plans without reading the data)")))?
            .vocab_size(),
    };
    let spec = ModelSpec::new(&config.model, kiln_train::vocabulary(&config, data_vocab)?);
    let micro_batch = plan::micro_batch(&config, spec, world, memory.as_ref(), capacity)?;
    let plan = MemoryPlan::new(&config, spec, micro_batch, world, memory.as_ref())?;
    // What would fit, where the plan does not.
    let fixes = match capacity {
        Some(capacity) if plan.needed_bytes() > capacity => {
            plan::fixes(&config, spec, world, memory.as_ref(), capacity)
        }
        _ => Vec::new(),
    };
    if args.json {
        let mut json = plan.to_json(capacity);
        if json["fits"] == false {
            json["fixes"] = serde_json::to_value(&fixes).map_err(|e| Error::Invalid(format!("fixes as JSON: {e}")))?;
        }
        println!("{json}");
        return Ok(());
    }
    print!("{}", plan.describe());
    if config.train.micro_batch == MicroBatch::Auto {
        println!("  train.micro_batch = \"auto\" chose {micro_batch}");
    }
    match capacity {
        Some(capacity) if plan.needed_bytes() <= capacity => {
            println!("fits: {} of {}", describe_bytes(plan.needed_bytes()), describe_bytes(capacity))
        }
        Some(capacity) => print!(
            "does not fit: {} needed, {} available\n{}",
            describe_bytes(plan.needed_bytes()),
            describe_bytes(capacity),
            plan::describe_fixes(&fixes)
        ),
        None => println!("memory unknown here: --memory SIZE says whether it fits"),
    }
    Ok(())
}
