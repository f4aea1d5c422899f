//! Tokenizer from HF tokenizer.json.
