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
    kernel!("classifier"),
    kernel!("encoder"),
    kernel!("gelu"),
    kernel!("layernorm"),
    kernel!("reduce"),
];

/// Storage type of parameters and activations in a compiled kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Fp32, Precision::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}
