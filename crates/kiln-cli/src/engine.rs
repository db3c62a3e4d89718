//! The engine a command runs on: `--backend`'s choice, what `auto` resolves to, and [`on_engine`], which builds the
//! chosen engine and runs a command's work on it, so that each command writes its work once, generic over the
//! engine, instead of once per engine.

use clap::ValueEnum;
use kiln_core::{Backend, Config, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::backend::CudaBackend;
use std::path::Path;

/// `--backend`: the engine a command asks for.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU is present, otherwise the CPU.
    Auto,
}

/// The engine a [`BackendChoice`] resolves to on this machine.
pub enum Engine {
    Cpu,
    Cuda,
}

/// `auto` becomes CUDA when a usable GPU is present, otherwise the CPU with one warning.
pub fn resolve(choice: BackendChoice) -> Result<Engine> {
    Ok(match choice {
        BackendChoice::Cpu => Engine::Cpu,
        BackendChoice::Cuda => Engine::Cuda,
        BackendChoice::Auto => match kiln_cuda::devices::list() {
            Ok(gpus) if !gpus.is_empty() => Engine::Cuda,
            Ok(_) => {
                tracing::warn!("no GPU found: running on the CPU");
                Engine::Cpu
            }
            Err(e) => {
                tracing::warn!("no usable GPU ({e}): running on the CPU");
                Engine::Cpu
            }
        },
    })
}

/// The CUDA engine on GPU `ordinal`, in the precision and with the attention kernel that `config` asks for.
pub fn cuda(ordinal: usize, config: &Config) -> Result<CudaBackend> {
    CudaBackend::new(ordinal, config.train.precision, config.model.attention, config.train.deterministic)
}

/// The engine settings (precision, attention kernels, determinism) for using the model in `dir`: a checkpoint's
/// own, or the defaults for a directory that is not one.
pub fn settings_for_model(dir: &Path) -> Result<Config> {
    match kiln_train::checkpoint::config(dir, &[]) {
        Ok(config) => Ok(config),
        Err(_) if !dir.join("state.json").exists() => Config::load(None, &[]),
        Err(e) => Err(e),
    }
}

/// A command's work, written once for any engine. A trait rather than a closure because the work is generic over
/// the engine's type, which a closure cannot be.
pub trait OnEngine {
    /// What the work returns.
    type Output;

    /// The CUDA engine on GPU `ordinal`, set up as the work needs it; asked for only when the work runs on CUDA,
    /// so that settings only the CUDA engine uses are read only then.
    fn cuda_engine(&self, ordinal: usize) -> Result<CudaBackend>;

    /// Does the work on `backend`; `gpu` is the ordinal of the GPU it runs on, if any.
    fn run<B: Backend>(self, backend: B, gpu: Option<usize>) -> Result<Self::Output>;
}

/// Resolves `choice` and runs `work` on that engine: the CPU engine in f32, or the CUDA engine on GPU 0.
pub fn on_engine<W: OnEngine>(choice: BackendChoice, work: W) -> Result<W::Output> {
    match resolve(choice)? {
        Engine::Cpu => work.run(CpuBackend::<f32>::new(), None),
        Engine::Cuda => {
            let backend = work.cuda_engine(0)?;
            work.run(backend, Some(0))
        }
    }
}
