//! The Llama-family decoder: config, flat parameter table, weights and tokenizer I/O,
//! forward and backward.

pub mod activations;
pub mod backward;
pub mod batch;
mod block;
pub mod builtin;
pub mod config;
pub mod forward;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod params;
pub mod safetensors_io;
pub mod tokenizer;

pub use activations::{
    phase, ActivationSet, Activations, Decl, LayerActs, LayerSet, Layout, Life, MemoryOptions,
    Recompute,
};
pub use backward::{backward, backward_blocks, backward_with};
pub use batch::{Batch, DeviceBatch};
pub use config::ModelConfig;
pub use forward::{forward, forward_blocks, forward_with, Injection, LossSum};
pub use kv_cache::KvCache;
pub use llama::{is_gguf, load_config, load_model, working_copy, Model};
pub use params::{LayerParams, ParamEntry, ParamTable};
pub use safetensors_io::{
    load_params, read_tensors, save_params, weight_files, write_tensors, NamedTensor, SaveDtype,
};
pub use tokenizer::Tokenizer;
