//! `kiln selftest`: check an engine against the CPU engine in f64, operation by operation, then the model's
//! gradients and 20 training steps.
//!
//! The check builds a fresh engine for each case, so it takes a way to build one rather than one engine, and the
//! CUDA engine is checked once per precision: it resolves the engine itself instead of going through
//! [`engine::on_engine`].

use crate::engine::{self, BackendChoice, Engine};
use kiln_core::config::AttentionKernel;
use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::backend::CudaBackend;
use kiln_cuda::kernels::Precision;

/// The arguments of `kiln selftest`.
#[derive(clap::Args)]
pub struct Args {
    /// The engine to check.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// The cuda engine's precision to check (both when absent); a separate process per precision keeps one
    /// precision's fault from hiding the other's results, since a CUDA context does not survive a fault.
    #[arg(long)]
    precision: Option<Precision>,
}

/// Prints one line per check and a count; fails (exit code 1) if any check does. The CUDA engine is checked in
/// both precisions.
pub fn run(args: Args) -> Result<()> {
    let Args { backend, precision } = args;
    let print = |c: &kiln_selftest::Check| println!("{}", c.line());
    let mut checks = Vec::new();
    match engine::resolve(backend)? {
        Engine::Cpu if precision == Some(Precision::Bf16) => {
            return Err(Error::Usage("--precision bf16 needs the cuda engine: the cpu engine computes in f32".into()));
        }
        Engine::Cpu => {
            println!("checking the cpu engine (f32) against the cpu engine in f64");
            checks.extend(kiln_selftest::run(|| Ok(CpuBackend::<f32>::new()), kiln_selftest::Tolerance::FP32, print)?);
        }
        Engine::Cuda => {
            // bf16 twice: with the deterministic attention backward, then with the one that adds dQ atomically, whose
            // runs differ in the last bits from one another, with graphs or without.
            let (fp32, bf16) = (kiln_selftest::Tolerance::FP32, kiln_selftest::Tolerance::BF16);
            let atomic = kiln_selftest::Tolerance { graphs: bf16.loss, ..bf16 };
            let all = [(Precision::Fp32, fp32, true), (Precision::Bf16, bf16, true), (Precision::Bf16, atomic, false)];
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
    let failed = checks.iter().filter(|c| c.failed()).count();
    let not_run = checks.iter().filter(|c| c.not_run.is_some()).count();
    println!("{} passed, {failed} failed, {not_run} not run", checks.len() - failed - not_run);
    if failed > 0 {
        return Err(Error::backend("selftest", format!("{failed} of {} checks failed", checks.len())));
    }
    Ok(())
}
