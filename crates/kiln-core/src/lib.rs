//! kiln's shared vocabulary.
//!
//! Everything the other crates agree on lives here and nowhere else: the [`Backend`] interface that the model is
//! written against (and that the CPU and CUDA engines implement), the [`Tensor`] handles that name memory a backend
//! owns, the [`Communicator`] through which data-parallel ranks combine gradients, the training [`config`], the
//! [`memory`] a run will take, the [`Error`] type whose variants decide the process's exit code, and how every crate
//! publishes a file so that a crash leaves it whole or absent ([`durable`]).

pub mod backend;
pub mod comm;
pub mod config;
pub mod durable;
pub mod error;
pub mod experts;
pub mod memory;
pub mod pieces;

pub use backend::{
    AdamWStep, AttentionBackward, AttentionDims, Backend, Graph, HostWork, MatmulBackward, MatmulDims, MatmulForward,
    NormBackward, NormDims, NormForward, NormKind, QkNormBackward, QkNormForward, ResidualAdd, Role, Rotary, Tensor,
};
pub use comm::Communicator;
pub use config::Config;
pub use error::{Error, Result};
