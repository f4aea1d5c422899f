//! nla-engine: a training engine for Natural Language Autoencoders.
//!
//! The model's forward and backward are explicit sequences of [`device::Device`] ops over
//! buffers laid out ahead of time; the CPU device is the reference for every op.

pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod generate;
pub mod memory;
pub mod model;
pub mod nla;
pub mod plot;
pub mod profile;
pub mod train;

pub use error::{Error, Result};
