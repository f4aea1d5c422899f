//! HF safetensors weights: load (single file or sharded; f32/bf16/f16) into the flat buffer, save.
