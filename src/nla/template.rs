//! Chat templates: the text a model sees for a user turn and its assistant turn.
//!
//! A template comes from the model: `tokenizer_config.json`'s `chat_template` (or a
//! `chat_template.jinja` file) next to a Hugging Face model, the GGUF key
//! `tokenizer.chat_template`, or none ("plain": the prompt as it is, then the response). Jinja
//! templates are rendered as Hugging Face renders them: `trim_blocks` and `lstrip_blocks` on,
//! with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`
//! defined, and the Python string and dict methods templates commonly call. `strftime_now` is
//! left undefined, so templates that print a date fall back to their fixed default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{from_args, ValueKind};
use minijinja::{Environment, ErrorKind, State, Value};

use crate::model::gguf::{self, Gguf};
use crate::model::Tokenizer;
use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// A model's chat template and its special token strings.
#[derive(Clone)]
pub struct ChatTemplate {
    /// Where the template was read from (named in errors).
    origin: PathBuf,
    /// None = plain.
    env: Option<Environment<'static>>,
    /// The Jinja source (None = plain).
    source: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    /// The model's cls token, if it names one (`cls` pooling appends it).
    cls_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("plain", &self.env.is_none())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .finish()
    }
}

impl ChatTemplate {
    /// No template: the prompt as it is, then the response and `eos_token`.
    pub fn plain(
        origin: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_token: Option<String>,
    ) -> Self {
        ChatTemplate {
            origin,
            env: None,
            source: None,
            bos_token,
            eos_token,
            pad_token,
            cls_token: None,
        }
    }

    /// A Jinja chat template; fails on a syntax error.
    pub fn jinja(
        source: String,
        origin: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::format(&origin, format!("chat template: {e}")))?,
        );
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::format(&origin, format!("chat template: {e:#}")))?;
        Ok(ChatTemplate {
            origin,
            env: Some(env),
            source: Some(source),
            bos_token,
            eos_token,
            pad_token,
            cls_token: None,
        })
    }

    /// This template with the model's cls token.
    pub fn with_cls(mut self, cls_token: Option<String>) -> Self {
        self.cls_token = cls_token;
        self
    }

    /// The template of the model at `path`: a `.gguf` file or a Hugging Face model folder.
    pub fn load(path: &Path, tok: &Tokenizer) -> Result<Self> {
        if crate::model::is_gguf(path) {
            ChatTemplate::from_gguf(&gguf::read_gguf(path)?)
        } else {
            ChatTemplate::from_hf_dir(path, tok)
        }
    }

    /// From the GGUF keys `tokenizer.chat_template` and `tokenizer.ggml.{bos,eos,padding}_token_id`.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
        let token = |key: &str| -> Option<String> {
            let id = g.get(key)?.as_u64()?;
            let t = tokens?.get(usize::try_from(id).ok()?)?;
            t.as_str().map(str::to_string)
        };
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        let pad = token("tokenizer.ggml.padding_token_id");
        let cls = token("tokenizer.ggml.cls_token_id");
        let origin = g.path.clone();
        let t = match g.get("tokenizer.chat_template") {
            None => ChatTemplate::plain(origin, bos, eos, pad),
            Some(v) => match v.as_str() {
                Some(src) => ChatTemplate::jinja(src.to_string(), origin, bos, eos, pad)?,
                None => {
                    return Err(Error::format(
                        origin,
                        "key `tokenizer.chat_template` is not a string",
                    ))
                }
            },
        };
        Ok(t.with_cls(cls))
    }

    /// From a Hugging Face model folder: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of `{name, template}` of which `default` is taken),
    /// else plain. The token strings come from `tokenizer_config.json`; a missing EOS is taken
    /// from `config.json`'s `eos_token_id`.
    pub fn from_hf_dir(dir: &Path, tok: &Tokenizer) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let field = |name: &str| config.as_ref().and_then(|c| token_field(c.get(name)?));
        let bos = field("bos_token");
        let mut eos = field("eos_token");
        let pad = field("pad_token");
        let cls = field("cls_token");
        if eos.is_none() {
            if let Some(c) = read_json(&dir.join("config.json"))? {
                let id = match c.get("eos_token_id") {
                    Some(serde_json::Value::Array(ids)) => ids.first().and_then(|v| v.as_u64()),
                    Some(v) => v.as_u64(),
                    None => None,
                };
                eos = id
                    .and_then(|id| u32::try_from(id).ok())
                    .and_then(|id| tok.id_to_token(id));
            }
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let src =
                std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            return Ok(ChatTemplate::jinja(src, jinja_path, bos, eos, pad)?.with_cls(cls));
        }
        let src = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            Some(_) => {
                return Err(Error::format(
                    &config_path,
                    "`chat_template` is neither a string nor a list of named templates",
                ))
            }
        };
        let t = match src {
            Some(src) => ChatTemplate::jinja(src, config_path, bos, eos, pad)?,
            None => ChatTemplate::plain(dir.to_path_buf(), bos, eos, pad),
        };
        Ok(t.with_cls(cls))
    }

    /// Writes `tokenizer_config.json` into an HF model folder: the special tokens and the
    /// template, so that [`ChatTemplate::from_hf_dir`] (and transformers) read it back.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let mut cfg = serde_json::Map::new();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("chat_template", &self.source),
        ] {
            if let Some(v) = v {
                cfg.insert(k.into(), serde_json::Value::String(v.clone()));
            }
        }
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(cfg))
            .map_err(|e| Error::format(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(path, e))
    }

    pub fn is_plain(&self) -> bool {
        self.env.is_none()
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// Whether the rendered prompt is tokenised with the tokenizer's special tokens (its BOS):
    /// only for plain; a template writes its own (\[O\]: no double BOS).
    pub fn prompt_special_tokens(&self) -> bool {
        self.is_plain()
    }

    /// The text up to the start of the assistant turn (`add_generation_prompt = true`).
    pub fn render_prompt(&self, user: &str) -> Result<String> {
        self.render(&[("user", user)], true)
    }

    /// The whole conversation: the user turn and the assistant turn.
    pub fn render_conversation(&self, user: &str, assistant: &str) -> Result<String> {
        self.render(&[("user", user), ("assistant", assistant)], false)
    }

    fn render(&self, turns: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let Some(env) = &self.env else {
            return Ok(turns.iter().map(|(_, text)| *text).collect());
        };
        let fail =
            |e: minijinja::Error| Error::format(&self.origin, format!("chat template: {e:#}"));
        let messages: Vec<Value> = turns
            .iter()
            .map(|(role, content)| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(*role)),
                    ("content", Value::from(*content)),
                ]))
            })
            .collect();
        let token = |t: &Option<String>| Value::from(t.clone().unwrap_or_default());
        let ctx = Value::from(BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", token(&self.bos_token)),
            ("eos_token", token(&self.eos_token)),
        ]));
        env.get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(ctx))
            .map_err(fail)
    }

    /// The token that ends an assistant turn: the first special token the template writes after
    /// the assistant's text (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`), else the EOS token.
    pub fn end_of_turn_id(&self, tok: &Tokenizer) -> Result<u32> {
        if self.env.is_some() {
            const PROBE: &str = "\u{1}probe\u{1}";
            let full = self.render_conversation("hello", PROBE)?;
            if let Some(at) = full.rfind(PROBE) {
                let after = &full[at + PROBE.len()..];
                for id in tok.encode(after, false)? {
                    if tok.decode(&[id], true)?.is_empty() {
                        return Ok(id);
                    }
                }
            }
        }
        self.token_id(tok, self.eos_token.as_deref(), "EOS")
    }

    /// The padding id: the pad token, else the EOS token.
    pub fn pad_id(&self, tok: &Tokenizer) -> Result<u32> {
        let t = self.pad_token.as_deref().or(self.eos_token.as_deref());
        self.token_id(tok, t, "pad or EOS")
    }

    /// The id `cls` pooling appends: the model's cls token (`cls_token` of
    /// tokenizer_config.json, `tokenizer.ggml.cls_token_id` of a GGUF), else, for the models
    /// that name none (Llama tokenizers), the padding id.
    pub fn cls_id(&self, tok: &Tokenizer) -> Result<u32> {
        match self.cls_token.as_deref() {
            Some(t) => self.token_id(tok, Some(t), "cls"),
            None => self.pad_id(tok),
        }
    }

    fn token_id(&self, tok: &Tokenizer, token: Option<&str>, what: &str) -> Result<u32> {
        let token = token.ok_or_else(|| {
            Error::format(
                &self.origin,
                format!("the model names no {what} token (tokenizer_config.json, config.json or GGUF metadata)"),
            )
        })?;
        tok.token_to_id(token).ok_or_else(|| Error::Tokenizer {
            path: tok.path().to_path_buf(),
            msg: format!(
                "the {what} token {token:?} named by {} is not in the vocabulary",
                self.origin.display()
            ),
        })
    }
}

/// A JSON file, or None when it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A token in tokenizer_config.json: a string, or an object with `content`.
fn token_field(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The Python methods chat templates call on strings and dicts.
fn python_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        return match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let hit = |c: char| chars.map_or(c.is_whitespace(), |cs| cs.contains(c));
                Ok(Value::from(match method {
                    "strip" => s.trim_matches(hit),
                    "lstrip" => s.trim_start_matches(hit),
                    _ => s.trim_end_matches(hit),
                }))
            }
            "startswith" | "endswith" => {
                let (affix,): (&str,) = from_args(args)?;
                Ok(Value::from(if method == "startswith" {
                    s.starts_with(affix)
                } else {
                    s.ends_with(affix)
                }))
            }
            "split" => {
                let (sep, max): (Option<&str>, Option<i64>) = from_args(args)?;
                let parts: Vec<Value> = match (sep, max.and_then(|m| usize::try_from(m).ok())) {
                    (None, _) => s.split_whitespace().map(Value::from).collect(),
                    (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                    (Some(sep), Some(m)) => s.splitn(m + 1, sep).map(Value::from).collect(),
                };
                Ok(Value::from(parts))
            }
            "replace" => {
                let (from, to): (&str, &str) = from_args(args)?;
                Ok(Value::from(s.replace(from, to)))
            }
            "upper" => Ok(Value::from(s.to_uppercase())),
            "lower" => Ok(Value::from(s.to_lowercase())),
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" | "values" => {
                let () = from_args(args)?;
                let mut out = vec![];
                for k in value.try_iter()? {
                    out.push(if method == "keys" {
                        k
                    } else {
                        value.get_item(&k)?
                    });
                }
                Ok(Value::from(out))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}
