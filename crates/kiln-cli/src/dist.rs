//! The command line of data-parallel jobs: `kiln launch`, and `kiln info --rendezvous`, which checks a job's
//! wiring (who is which rank, whether all ranks can meet) before it trains.

use clap::Args;
use kiln_core::{Error, Result};
use kiln_dist::env::Placement;
use kiln_dist::launch::LaunchSpec;
use kiln_dist::rendezvous::{ID_BYTES, Rendezvous, UniqueId};
use std::time::Duration;

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

#[derive(Args)]
pub struct InfoArgs {
    /// Instead of the report, meet the job's other processes and print this process's rank and the id rank 0
    /// sent. Without a value: tcp://MASTER_ADDR:MASTER_PORT. Implied when the environment (torchrun, kiln launch,
    /// srun, mpirun) places this process in a job of several.
    #[arg(long, value_name = "tcp://HOST:PORT|file:///PATH", num_args = 0..=1)]
    rendezvous: Option<Option<String>>,
    /// Seconds to wait for every rank to arrive.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    rendezvous_timeout: u64,
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
pub fn check_rendezvous(args: &InfoArgs) -> Result<bool> {
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
