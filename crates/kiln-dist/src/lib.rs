//! Data-parallel plumbing: where this process sits in a job ([`env`]), how its processes meet ([`rendezvous`]),
//! how a node's processes are launched ([`launch`]); and (`comm`, written separately) the in-process
//! communicator.
//!
//! A job is `world` processes, one per GPU, numbered by `rank`. A launcher (`kiln launch`, torchrun, Slurm's
//! `srun`, Open MPI's `mpirun`) starts them and says in environment variables which rank each one is; rank 0 then
//! hands every other rank the 128-byte id that NCCL needs to build its communicator.

pub mod env;
pub mod launch;
pub mod rendezvous;
