//! The transformer, written once against [`kiln_core::Backend`], for GPT-2 and Llama-style models.
//!
//! [`spec`] says what a model is (a [`ModelSpec`]: its sizes and which variant of each part it uses) and lays every
//! weight out in one flat vector (so the optimizer, the gradient norm and a data-parallel all-reduce each see a
//! single tensor); [`params`] initialises it; [`model`] holds the activations and runs the forward and backward
//! passes layer by layer, explicitly, with every buffer allocated once when the model is built; [`hf`] gives each
//! weight its name and layout in transformers' checkpoints, and writes their `config.json`.

pub mod generate;
pub mod hf;
pub mod model;
pub mod params;
pub mod spec;

pub use model::{Blocks, Model, Moment, Pass, TrainingMemory};
pub use params::ParamInfo;
pub use spec::{Biases, Mlp, ModelSpec, Positions};
