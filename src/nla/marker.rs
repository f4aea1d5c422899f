//! The marker token: the one token of the actor's prompt at which a vector is injected.
//!
//! Prompts in the datasets hold a marker text (`<INJECT>`); before tokenisation each occurrence
//! is replaced by a string that the tokenizer turns into exactly one token, whose id marks the
//! injection sites. The tokenizer itself is never modified. The choice
//! (`reference/NLA_SEMANTICS.md`, "Decisions" and section 1):
//!
//! 1. `injection_token_id`, when set: that id, whose text must encode back to it alone;
//! 2. else the marker text itself, when it is one token of the vocabulary;
//! 3. else (\[O\]) the first codepoint in U+3200..=U+33FF that encodes (without special tokens)
//!    to exactly one id, decodes back to itself, and is not a special token.

use std::ops::RangeInclusive;

use crate::config::InjectionConfig;
use crate::model::Tokenizer;
use crate::{Error, Result};

/// The codepoints searched when the marker text is not one token (\[O\]).
pub const MARKER_CODEPOINTS: RangeInclusive<u32> = 0x3200..=0x33FF;

/// The marker: the text in the prompts, the string that replaces it, and that string's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The marker text in the prompts, e.g. `<INJECT>`.
    pub text: String,
    /// What replaces `text` before tokenisation: exactly one token.
    pub token: String,
    /// The id of `token`; the injection sites are the positions holding it.
    pub id: u32,
}

impl Marker {
    /// The marker for `model.injection` (`injection_token`, `injection_token_id`).
    pub fn from_config(tok: &Tokenizer, cfg: &InjectionConfig) -> Result<Self> {
        Marker::choose(tok, &cfg.injection_token, cfg.injection_token_id)
    }

    /// Chooses the marker for prompts holding `text` (see the module doc).
    pub fn choose(tok: &Tokenizer, text: &str, token_id: Option<u32>) -> Result<Self> {
        let fail = |msg: String| Error::Tokenizer {
            path: tok.path().to_path_buf(),
            msg,
        };
        if let Some(id) = token_id {
            let token = tok.decode(&[id], false)?;
            if single_token(tok, &token) != Some(id) {
                return Err(fail(format!(
                    "injection_token_id {id} cannot be the marker: its text {token:?} does not \
                     encode back to that one id"
                )));
            }
            return Ok(Marker {
                text: text.to_string(),
                token,
                id,
            });
        }
        if let Some(id) = single_token(tok, text) {
            return Ok(Marker {
                text: text.to_string(),
                token: text.to_string(),
                id,
            });
        }
        for cp in MARKER_CODEPOINTS {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let token = c.to_string();
            if let Some(id) = single_token(tok, &token) {
                // a special token is dropped when decoding with `skip_special_tokens`
                if !tok.decode(&[id], true)?.is_empty() {
                    return Ok(Marker {
                        text: text.to_string(),
                        token,
                        id,
                    });
                }
            }
        }
        Err(fail(format!(
            "no marker token: the injection token {text:?} is not one token of the vocabulary, \
             injection_token_id is not set, and no codepoint in U+{:04X}..=U+{:04X} encodes to \
             one non-special token that decodes back to itself; set \
             model.injection.injection_token to a single token of this tokenizer, or \
             injection_token_id to its id",
            MARKER_CODEPOINTS.start(),
            MARKER_CODEPOINTS.end()
        )))
    }

    /// `prompt` with every marker text replaced by the marker token.
    pub fn apply(&self, prompt: &str) -> String {
        if self.text == self.token {
            prompt.to_string()
        } else {
            prompt.replace(&self.text, &self.token)
        }
    }
}

/// The id of `text` when it encodes (without special tokens) to exactly one id that decodes
/// back to `text`; None otherwise, also when the tokenizer cannot encode it.
fn single_token(tok: &Tokenizer, text: &str) -> Option<u32> {
    match tok.encode(text, false).ok()?.as_slice() {
        [id] if tok.decode(&[*id], false).ok()? == text => Some(*id),
        _ => None,
    }
}
