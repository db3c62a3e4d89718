//! `kiln kernels`: the CUDA kernels, compiled ahead of time into the on-disk cache.

use clap::Subcommand;
use kiln_core::{Error, Result};
use kiln_cuda::compile::Compiler;
use kiln_cuda::kernels::KERNELS;

/// The subcommands of `kiln kernels`.
#[derive(Subcommand)]
pub enum KernelsCommand {
    /// Compile every kernel with NVRTC (no GPU needed) and report registers, shared memory and spills.
    Build {
        /// Architectures to compile for, e.g. sm_90a (repeatable; default: those of the GPUs present).
        #[arg(long = "arch")]
        archs: Vec<String>,
    },
}

/// Runs one subcommand of `kiln kernels`.
pub fn run(command: KernelsCommand) -> Result<()> {
    match command {
        KernelsCommand::Build { archs } => build(archs),
    }
}

/// Compiles every kernel in each of its precisions for each of `archs` (default: the GPUs present), printing what
/// each function uses.
fn build(mut archs: Vec<String>) -> Result<()> {
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
    // Before NVRTC is looked for: a typo is the first thing to hear about.
    archs.iter().try_for_each(|arch| kiln_cuda::compile::check_arch(arch))?;
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
