//! `kiln info`: the version, the engines available, CPU threads, CUDA libraries and GPUs; or, in a job of several
//! processes, a check of its rendezvous.

use crate::dist;
use kiln_core::Result;
use kiln_cuda::compile::Compiler;
use kiln_cuda::libraries::Library;

/// The arguments of `kiln info`.
#[derive(clap::Args)]
pub struct Args {
    /// Instead of the report, meet the job's other processes and print this process's rank and the id rank 0
    /// sent. Without a value: tcp://MASTER_ADDR:MASTER_PORT. Implied when the environment (torchrun, kiln launch,
    /// srun, mpirun) places this process in a job of several.
    #[arg(long, value_name = "tcp://HOST:PORT|file:///PATH", num_args = 0..=1)]
    pub rendezvous: Option<Option<String>>,
    /// Seconds to wait for every rank to arrive.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub rendezvous_timeout: u64,
}

/// Prints the report, unless a rendezvous to check, asked for or implied by a placement in a job of several,
/// replaces it.
pub fn run(args: Args) -> Result<()> {
    if !dist::check_rendezvous(&args)? {
        report();
    }
    Ok(())
}

/// Prints what this machine offers kiln.
fn report() {
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
