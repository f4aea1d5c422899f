//! The Llama-family decoder: config, flat parameter table, weights and tokenizer I/O,
//! forward and backward.

pub mod config;
pub mod params;

pub use config::ModelConfig;
pub use params::{LayerParams, ParamEntry, ParamTable};
pub mod activations;
pub mod backward;
pub mod batch;
pub mod forward;
pub mod llama;
pub mod safetensors_io;
pub mod tokenizer;

pub use activations::{ActivationSet, Activations, LayerActs, LayerSet};
pub use backward::backward;
pub use batch::{Batch, DeviceBatch};
pub use forward::{forward, LossSum};
pub use llama::Model;
pub use safetensors_io::{
    load_params, read_tensors, save_params, weight_files, write_tensors, NamedTensor, SaveDtype,
};
pub use tokenizer::Tokenizer;
