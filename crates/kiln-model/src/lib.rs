//! The GPT-2 model, written once against [`kiln_core::Backend`].
//!
//! [`params`] lays every weight out in one flat vector (so the optimizer, the gradient norm and a data-parallel
//! all-reduce each see a single tensor) and initialises it; [`gpt`] holds the activations and runs the forward
//! and backward passes layer by layer, explicitly, with every buffer allocated once when the model is built.

pub mod generate;
pub mod gpt;
pub mod params;

pub use gpt::{Gpt, Pass};
pub use params::{GptShape, ParamInfo};
