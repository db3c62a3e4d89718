//! The CUDA C sources of `kernels/`, embedded in the binary.

/// Definitions every kernel file uses; compiled in front of each.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");
/// Tensor-core helpers (inline PTX for sm_80 and later); compiled in front of each file, after [`COMMON`].
pub const MMA: &str = include_str!("../../../kernels/mma.cuh");

/// One kernel file: its name (the file's, without `.cu`), text, and the precisions an engine compiles it for.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub precisions: &'static [Precision],
}

macro_rules! kernel {
    ($name:literal) => {
        kernel!($name, &Precision::ALL)
    };
    ($name:literal, $precisions:expr) => {
        KernelSource {
            name: $name,
            source: include_str!(concat!("../../../kernels/", $name, ".cu")),
            precisions: $precisions,
        }
    };
}

pub const KERNELS: &[KernelSource] = &[
    kernel!("adamw"),
    kernel!("add"),
    kernel!("attention"),
    kernel!("classifier"),
    kernel!("encoder"),
    kernel!("experts"),
    // The experts' grouped products are tensor-core (bf16) kernels; an fp32 engine runs cuBLASLt per expert.
    kernel!("expert_products", &[Precision::Bf16]),
    // Fused attention is bf16 only (its types are bf16 whatever floatX is); an fp32 engine runs attention.cu.
    kernel!("flash_attention", &[Precision::Bf16]),
    kernel!("gelu"),
    kernel!("layernorm"),
    kernel!("reduce"),
    kernel!("rmsnorm"),
    kernel!("rope"),
    kernel!("swiglu"),
];

/// Storage type of parameters and activations in a compiled kernel.
pub use kiln_core::config::Precision;
