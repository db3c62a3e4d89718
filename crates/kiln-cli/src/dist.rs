//! The command line of data-parallel jobs: `kiln launch`; `kiln info --rendezvous`, which checks a job's wiring
//! (who is which rank, whether all ranks can meet) before it trains; and the ranks of a data-parallel job, for
//! training and for `kiln bench allreduce`: threads of one process (CPU `--ranks`, or `--gpus`) or one process of a
//! launched job, each with its communicator.

use crate::engine::Engine;
use clap::Args;
use kiln_core::{Communicator, Config, Error, Result};
use kiln_cuda::backend::CudaBackend;
use kiln_cuda::libraries::Library;
use kiln_cuda::nccl::NcclComm;
use kiln_dist::env::Placement;
use kiln_dist::launch::LaunchSpec;
use kiln_dist::rendezvous::{ID_BYTES, Rendezvous, UniqueId, Watch};
use kiln_train::threads::Rank;
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

/// Where a command's data-parallel ranks run: threads of this process or one process of a launched job.
#[derive(clap::Args)]
pub struct JobArgs {
    /// Data-parallel ranks as threads of this process (the CPU engine).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    ranks: u16,
    /// The GPUs this process runs on: `all`, or numbers such as 0,1,2,3 (one rank per GPU, reducing with
    /// NCCL). In a job a launcher started, one GPU (default: the local rank).
    #[arg(long, value_name = "all|0,1,...")]
    gpus: Option<String>,
    /// Where the processes of a launched job meet (default: tcp://MASTER_ADDR:MASTER_PORT).
    #[arg(long, value_name = "tcp://HOST:PORT|file:///PATH")]
    rendezvous: Option<String>,
    /// Seconds to wait for every process of a launched job to arrive.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    rendezvous_timeout: u64,
}

/// The ranks of a data-parallel job, as this process takes part in it.
pub enum Job {
    /// Ranks that are threads of this process on the CPU engine.
    CpuThreads(usize),
    /// One rank per GPU, each a thread of this process.
    Gpus(Vec<usize>),
    /// This process is one rank of a job that a launcher started, on one GPU.
    Launched(LaunchedRank),
}

/// This process's place in a launched job, and how it meets the others.
pub struct LaunchedRank {
    placement: Placement,
    /// The GPU `--gpus` names, if it names one (default: the local rank).
    gpu: Option<usize>,
    rendezvous: Option<String>,
    rendezvous_timeout: Duration,
}

impl Job {
    /// The number of ranks in the whole job.
    pub fn ranks(&self) -> usize {
        match self {
            Job::CpuThreads(ranks) => *ranks,
            Job::Gpus(gpus) => gpus.len(),
            Job::Launched(rank) => rank.placement.world,
        }
    }

    /// Whether this process has the job's rank 0, which reports for the job.
    pub fn lead(&self) -> bool {
        match self {
            Job::Launched(rank) => rank.placement.rank == 0,
            Job::CpuThreads(_) | Job::Gpus(_) => true,
        }
    }
}

impl JobArgs {
    /// The job that the arguments, the engine and the launcher's environment make together; a combination that
    /// cannot run is a usage error saying what to write instead.
    pub fn job(&self, engine: Engine) -> Result<Job> {
        // A launcher's variables place this process in a job of several: one rank, one GPU, NCCL.
        let launched = kiln_dist::env::detect_from_process_env()?;
        let ranks = usize::from(self.ranks);
        let gpus = self.gpus.as_deref().map(parse_gpus).transpose()?;
        // A launcher's job of one process is fine (a script written for N nodes, run on one); none at all is not.
        if let (Some(rendezvous), None) = (&self.rendezvous, &launched) {
            return Err(Error::Usage(format!(
                "--rendezvous {rendezvous}: nothing in the environment places this process in a job of several (RANK \
                 and WORLD_SIZE from torchrun or kiln launch, Slurm's or Open MPI's variables); start it with a \
                 launcher, or leave --rendezvous out"
            )));
        }
        let placement = launched.filter(|p| p.world > 1);
        match (engine, placement) {
            (Engine::Cpu, Some(p)) => Err(Error::Usage(format!(
                "{} places this process in a job of {} processes, which needs GPUs (NCCL); the CPU engine runs \
                 data-parallel in one process: --backend cpu --ranks N",
                p.source, p.world
            ))),
            (Engine::Cpu, None) if gpus.is_some() => Err(Error::Usage("--gpus needs the CUDA engine".into())),
            (Engine::Cpu, None) => Ok(Job::CpuThreads(ranks)),
            (Engine::Cuda, _) if ranks > 1 => Err(Error::Usage(
                "--ranks runs ranks as threads on the CPU engine; add --backend cpu (GPUs take one rank each: --gpus)"
                    .into(),
            )),
            (Engine::Cuda, Some(placement)) => {
                let gpu = match gpus.as_deref() {
                    None => None,
                    Some([gpu]) => Some(*gpu),
                    Some(_) => {
                        return Err(Error::Usage("in a launched job each process runs on one GPU: --gpus N".into()));
                    }
                };
                Ok(Job::Launched(LaunchedRank {
                    placement,
                    gpu,
                    rendezvous: self.rendezvous.clone(),
                    rendezvous_timeout: Duration::from_secs(self.rendezvous_timeout),
                }))
            }
            (Engine::Cuda, None) => Ok(Job::Gpus(gpus.unwrap_or(vec![0]))),
        }
    }
}

/// Trains with one rank per GPU of `gpus`, as threads of this process, summing gradients with NCCL.
pub fn train_gpus(config: &Config, gpus: &[usize], resume: Option<&Path>, hooks: &mut Hooks) -> Result<Summary> {
    if let [gpu] = gpus {
        return kiln_train::threads::train(config, 1, |_| crate::engine::cuda(*gpu, config), resume, hooks, true);
    }
    let timeout = Duration::from_secs(config.dist.timeout_s);
    let make_rank = gpu_ranks(gpus, |gpu| crate::engine::cuda(gpu, config), timeout)?;
    kiln_train::threads::train_ranks(config, gpus.len(), make_rank, resume, hooks, true)
}

/// How [`kiln_train::threads::run_ranks`] makes the rank of each GPU of `gpus`: its engine `make_backend(gpu)`
/// and an NCCL communicator with the others (whose collectives give up after `timeout`).
pub fn gpu_ranks<'a>(
    gpus: &'a [usize],
    make_backend: impl Fn(usize) -> Result<CudaBackend> + Sync + 'a,
    timeout: Duration,
) -> Result<impl Fn(usize, &Arc<AtomicBool>) -> Result<Rank<CudaBackend>> + Sync + 'a> {
    let id = kiln_cuda::nccl::unique_id()?;
    let world = gpus.len();
    // NCCL's initialisation waits for every rank, so each rank's engine is ready before any rank joins: a GPU that
    // cannot start fails the job instead of leaving the others in that wait.
    let ready = AtomicUsize::new(0);
    Ok(move |rank: usize, failed: &Arc<AtomicBool>| -> Result<Rank<CudaBackend>> {
        let backend = make_backend(gpus[rank])?;
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
        let comm = NcclComm::new(&backend, &id, rank, world, false, failed.clone(), timeout)?;
        Ok((backend, Box::new(comm) as Box<dyn Communicator<CudaBackend>>))
    })
}

/// This process's rank of a launched job, joined: its engine, its NCCL communicator with the other processes, and
/// the rendezvous's watch, which must outlive the communicator (its connections tell the other processes that
/// this one is gone, and its flag tells the communicator that another one is).
pub struct JoinedRank {
    /// The GPU it runs on.
    pub gpu: usize,
    pub backend: CudaBackend,
    pub comm: NcclComm,
    pub watch: Watch,
}

/// Joins a job that a launcher started (torchrun, `kiln launch`, srun, mpirun) as `rank`: starts the engine
/// `make_backend(gpu)` on its GPU (default: the local rank), meets the other processes at the rendezvous, where
/// rank 0 hands out NCCL's id, and sets up NCCL with them (whose collectives give up after `timeout`).
pub fn join(
    rank: &LaunchedRank,
    make_backend: impl FnOnce(usize) -> Result<CudaBackend>,
    timeout: Duration,
) -> Result<JoinedRank> {
    let placement = &rank.placement;
    let rv = match &rank.rendezvous {
        Some(text) => Rendezvous::parse(text)?,
        None => default_rendezvous(placement)?,
    };
    // Each rank checks its libraries and starts its engine before the rendezvous: a rank that fails there exits
    // before meeting the others, who are told at the rendezvous or by its timeout, rather than while they wait in
    // NCCL's initialisation (which a lost rank or the timeout also ends, but later).
    Library::Nccl.require()?;
    let gpu = match rank.gpu {
        Some(gpu) => gpu,
        // srun and others may bind each task to its own GPU, which it then sees as the only one.
        None if kiln_cuda::devices::list()?.len() == 1 => 0,
        None => placement.local_rank,
    };
    let backend = make_backend(gpu)?;
    let (id, watch) = kiln_dist::rendezvous::exchange(
        &rv,
        placement.rank,
        placement.world,
        kiln_cuda::nccl::unique_id,
        rank.rendezvous_timeout,
    )?;
    let comm = NcclComm::new(&backend, &id, placement.rank, placement.world, true, watch.flag(), timeout)?;
    Ok(JoinedRank { gpu, backend, comm, watch })
}

/// Trains as one process of a job that a launcher started, on the GPU and with the other processes that [`join`]
/// finds.
pub fn train_process(
    config: &Config,
    rank: &LaunchedRank,
    resume: Option<&Path>,
    hooks: &mut Hooks,
) -> Result<Summary> {
    let timeout = Duration::from_secs(config.dist.timeout_s);
    let JoinedRank { backend, comm, watch, .. } = join(rank, |gpu| crate::engine::cuda(gpu, config), timeout)?;
    let mut trainer = Trainer::with_comm(config, backend, Box::new(comm))?;
    if let Some(dir) = resume {
        trainer.resume(dir)?;
    }
    let summary = trainer.run(hooks, true);
    // The communicator goes first: the watch must outlive it.
    drop(trainer);
    drop(watch);
    summary
}
