//! Tokenizer from HF tokenizer.json.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An HF `tokenizer.json` tokenizer; errors name the file it was loaded from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| err(path, format!("not a valid tokenizer.json: {e}")))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Wraps a tokenizer built in memory; `origin` (the file it was read from) names it in errors.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer, origin: PathBuf) -> Self {
        Tokenizer {
            inner,
            path: origin,
        }
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| err(&self.path, format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| err(&self.path, format!("cannot decode {} ids: {e}", ids.len())))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, with or without the added tokens.
    pub fn vocab_size(&self, with_added: bool) -> usize {
        self.inner.get_vocab_size(with_added)
    }

    /// Writes the tokenizer as (pretty-printed) tokenizer.json.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, true)
            .map_err(|e| err(path, format!("cannot save: {e}")))
    }
}

fn err(path: &Path, msg: String) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg,
    }
}
