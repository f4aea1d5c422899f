//! The Llama-family decoder: config, flat parameter table, weights and tokenizer I/O,
//! forward and backward.

pub mod config;
pub mod params;

pub use config::ModelConfig;
pub use params::{LayerParams, ParamEntry, ParamTable};
pub mod safetensors_io;
pub mod tokenizer;
