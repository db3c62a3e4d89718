//! kiln's CUDA engine.
//!
//! Every CUDA library is loaded at run time (cudarc's dynamic loading), so kiln builds and its CPU engine runs on
//! machines without CUDA; [`libraries`] checks that each library is there before anything touches it and turns a
//! missing one into an error that names it and says what to install. The kernels are CUDA C files in the
//! repository's `kernels/` folder, embedded in the binary ([`kernels`]) and compiled by NVRTC for the GPU actually
//! present, with the results cached on disk ([`compile`]).
//!
//! [`backend::CudaBackend`] runs them, and [`nccl::NcclComm`] sums gradients across GPUs for data-parallel
//! training. The kernels compile for sm_80 and sm_90a in the tests here; on a GPU, `kiln selftest --backend cuda`
//! compares every operation with the CPU engine (scripts/gpu-check.sh runs it, and what has run is in the README).

pub mod backend;
pub mod compile;
pub mod devices;
pub mod kernels;
pub mod libraries;
mod matmul;
pub mod memory;
pub mod nccl;
