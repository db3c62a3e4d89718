//! The command line of data-parallel jobs: `kiln launch`; `kiln info --rendezvous`, which checks a job's wiring
//! (who is which rank, whether all ranks can meet) before it trains; and training on several GPUs, as threads of
//! one process (`--gpus`) or as one process of a launched job.

use clap::Args;
use kiln_core::{Communicator, Config, Error, Result};
use kiln_cuda::backend::CudaBackend;
use kiln_cuda::libraries::Library;
use kiln_cuda::nccl::NcclComm;
use kiln_dist::env::Placement;
use kiln_dist::launch::LaunchSpec;
use kiln_dist::rendezvous::{ID_BYTES, Rendezvous, UniqueId};
use kiln_train::{Hooks, Summary, Trainer};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The arguments of `kiln launch`.
#[derive(Args)]
pub struct LaunchArgs {
    /// Processes to start on this node, one per GPU.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    nproc_per_node: u32,
    /// Nodes in the job, each running `kiln launch` with its own --node-rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    nnodes: u32,
    /// This node's number, from 0. Node 0 runs rank 0.
    #[arg(long, default_value_t = 0)]
    node_rank: u32,
    /// Where rank 0 can be reached: node 0's name or address.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long, default_value_t = 29500, value_parser = clap::value_parser!(u16).range(1..))]
    master_port: u16,
    /// The kiln command every process runs, after `--`: `kiln launch --nproc-per-node 8 -- train --config C`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Runs this node's processes of `args.command` and returns the launch's exit code: that of the first process to
/// fail, or 0.
pub fn launch(args: LaunchArgs) -> Result<u8> {
    let program = std::env::current_exe()
        .map_err(|e| Error::backend("launch", format!("cannot find the kiln executable to start: {e}")))?;
    let spec = LaunchSpec {
        nproc_per_node: args.nproc_per_node as usize,
        nnodes: args.nnodes as usize,
        node_rank: args.node_rank as usize,
        master_addr: args.master_addr,
        master_port: args.master_port,
        program,
        args: args.command,
    };
    // The children share this process group, so a Ctrl-C at the terminal reaches each of them directly; the
    // launcher stays to pass on their last output and their exit codes. A handler, unlike ignoring the signal,
    // is not inherited by the children.
    let _ = ctrlc::set_handler(|| {});
    let code = kiln_dist::launch::run(&spec)?;
    Ok(u8::try_from(code).unwrap_or(1))
}

/// Meets the job's other processes and prints one line, when a rendezvous is asked for or the environment places
/// this process in a job of several. Returns whether it did.
pub fn check_rendezvous(args: &crate::info::Args) -> Result<bool> {
    let placement = kiln_dist::env::detect_from_process_env()?;
    if args.rendezvous.is_none() && placement.as_ref().is_none_or(|p| p.world == 1) {
        return Ok(false);
    }
    let placement = placement.ok_or_else(|| {
        Error::Usage(
            "--rendezvous: nothing in the environment says which rank this process is (RANK and WORLD_SIZE from \
             torchrun or kiln launch, SLURM_PROCID from srun, OMPI_COMM_WORLD_RANK from mpirun)"
                .into(),
        )
    })?;
    let rv = match &args.rendezvous {
        Some(Some(text)) => Rendezvous::parse(text)?,
        _ => default_rendezvous(&placement)?,
    };
    let make_id = || {
        let mut id: UniqueId = [0; ID_BYTES];
        rand::fill(&mut id[..]);
        Ok(id)
    };
    let timeout = Duration::from_secs(args.rendezvous_timeout);
    let (id, _watch) = kiln_dist::rendezvous::exchange(&rv, placement.rank, placement.world, make_id, timeout)?;
    let id: String = id[..8].iter().map(|byte| format!("{byte:02x}")).collect();
    println!(
        "rank {} of {} (local rank {}, from {}) rendezvous {rv}: id {id}",
        placement.rank, placement.world, placement.local_rank, placement.source
    );
    Ok(true)
}

/// `tcp://MASTER_ADDR:MASTER_PORT`, as the launcher set them.
fn default_rendezvous(placement: &Placement) -> Result<Rendezvous> {
    match (&placement.master_addr, placement.master_port) {
        (Some(host), Some(port)) => Rendezvous::parse(&format!("tcp://{host}:{port}")),
        _ => Err(Error::Usage(format!(
            "no rendezvous address from {}: set MASTER_ADDR and MASTER_PORT, or pass --rendezvous tcp://HOST:PORT",
            placement.source
        ))),
    }
}

/// The GPUs `--gpus` names: `all`, or ids separated by commas.
pub fn parse_gpus(text: &str) -> Result<Vec<usize>> {
    if text == "all" {
        let found = kiln_cuda::devices::list()?.len();
        if found == 0 {
            return Err(Error::Usage("--gpus all: no GPU found".into()));
        }
        return Ok((0..found).collect());
    }
    let ids = text
        .split(',')
        .map(|id| id.trim().parse::<usize>().map_err(|_| Error::Usage(format!("--gpus: {id:?} is not a GPU number"))))
        .collect::<Result<Vec<_>>>()?;
    if (1..ids.len()).any(|i| ids[..i].contains(&ids[i])) {
        return Err(Error::Usage(format!("--gpus {text}: a GPU is named twice")));
    }
    Ok(ids)
}

/// Trains with one rank per GPU of `gpus`, as threads of this process, summing gradients with NCCL.
pub fn train_gpus(config: &Config, gpus: &[usize], resume: Option<&Path>, hooks: &mut Hooks) -> Result<Summary> {
    if let [gpu] = gpus {
        return kiln_train::threads::train(config, 1, |_| crate::engine::cuda(*gpu, config), resume, hooks, true);
    }
    let id = kiln_cuda::nccl::unique_id()?;
    let timeout = Duration::from_secs(config.dist.timeout_s);
    let world = gpus.len();
    // NCCL's initialisation waits for every rank, so each rank's engine is ready before any rank joins: a GPU that
    // cannot start fails the job instead of leaving the others in that wait.
    let ready = AtomicUsize::new(0);
    let make_rank = |rank: usize, failed: &Arc<AtomicBool>| -> Result<(CudaBackend, Box<dyn Communicator<_>>)> {
        let backend = crate::engine::cuda(gpus[rank], config)?;
        ready.fetch_add(1, Ordering::SeqCst);
        while ready.load(Ordering::SeqCst) < world {
            if failed.load(Ordering::Relaxed) {
                return Err(Error::backend(
                    "nccl",
                    format!("rank {rank} stops: another GPU of the job failed to start"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let comm = NcclComm::new(&backend, &id, rank, world, failed.clone(), timeout)?;
        Ok((backend, Box::new(comm)))
    };
    kiln_train::threads::train_ranks(config, world, make_rank, resume, hooks, true)
}

/// Trains as one process of a job that a launcher started (torchrun, `kiln launch`, srun, mpirun): meets the other
/// processes at the rendezvous, where rank 0 hands out NCCL's id, and trains on GPU `gpu` (default: the local
/// rank) with them.
pub fn train_process(
    config: &Config,
    placement: &Placement,
    gpu: Option<usize>,
    rendezvous: Option<&str>,
    rendezvous_timeout: Duration,
    resume: Option<&Path>,
    hooks: &mut Hooks,
) -> Result<Summary> {
    let rv = match rendezvous {
        Some(text) => Rendezvous::parse(text)?,
        None => default_rendezvous(placement)?,
    };
    let (rank, world) = (placement.rank, placement.world);
    // Each rank checks its libraries and starts its engine before the rendezvous: a rank that fails there exits
    // before meeting the others, who are told at the rendezvous or by its timeout, rather than while they wait in
    // NCCL's initialisation (which a lost rank or dist.timeout_s also ends, but later).
    Library::Nccl.require()?;
    let gpu = match gpu {
        Some(gpu) => gpu,
        // srun and others may bind each task to its own GPU, which it then sees as the only one.
        None if kiln_cuda::devices::list()?.len() == 1 => 0,
        None => placement.local_rank,
    };
    let backend = crate::engine::cuda(gpu, config)?;
    // The watch stays alive for the whole run: its connections tell the other processes that this one is gone.
    let (id, watch) =
        kiln_dist::rendezvous::exchange(&rv, rank, world, kiln_cuda::nccl::unique_id, rendezvous_timeout)?;
    let timeout = Duration::from_secs(config.dist.timeout_s);
    let comm = NcclComm::new(&backend, &id, rank, world, watch.flag(), timeout)?;
    let mut trainer = Trainer::with_comm(config, backend, Box::new(comm))?;
    if let Some(dir) = resume {
        trainer.resume(dir)?;
    }
    let summary = trainer.run(hooks, true);
    drop(watch);
    summary
}
