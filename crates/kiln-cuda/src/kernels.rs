//! The CUDA C sources of `kernels/`, embedded in the binary.

/// Definitions every kernel file uses; compiled in front of each.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel file: its name (the file's, without `.cu`) and text.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
}

macro_rules! kernel {
    ($name:literal) => {
        KernelSource { name: $name, source: include_str!(concat!("../../../kernels/", $name, ".cu")) }
    };
}

pub const KERNELS: &[KernelSource] = &[
    kernel!("adamw"),
    kernel!("attention"),
    kernel!("bias"),
    kernel!("classifier"),
    kernel!("encoder"),
    kernel!("gelu"),
    kernel!("layernorm"),
    kernel!("reduce"),
];

/// Storage type of parameters and activations in a compiled kernel.
pub use kiln_core::config::Precision;
