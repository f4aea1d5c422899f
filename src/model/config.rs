//! HF `config.json` of a Llama-family decoder: the fields we use, checked, and every field whose
//! value we cannot honour refused by name.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Architecture of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral without sliding window).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    /// V
    pub vocab_size: usize,
    /// C
    pub hidden_size: usize,
    /// F
    pub intermediate_size: usize,
    /// L
    pub num_hidden_layers: usize,
    /// NH
    pub num_attention_heads: usize,
    /// NKV (divides NH)
    pub num_key_value_heads: usize,
    /// HS (defaults to C / NH)
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

const MODEL_TYPES: &[&str] = &["llama", "mistral"];
const ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&json, path)
    }

    /// Checks a parsed config; `path` is only used in error messages.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let f = Fields { json, path };
        if !json.is_object() {
            return Err(Error::format(path, "config.json is not a JSON object"));
        }
        let model_type = f.string("model_type")?.unwrap_or_default();
        if !MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(f.err(
                "model_type",
                format!(
                    "unsupported architecture {model_type:?}; supported: {}",
                    MODEL_TYPES.join(", ")
                ),
            ));
        }
        if let Some(archs) = json.get("architectures") {
            let list = archs
                .as_array()
                .ok_or_else(|| f.err("architectures", "expected a list of names"))?;
            for a in list {
                let name = a.as_str().unwrap_or("?");
                if !ARCHITECTURES.contains(&name) {
                    return Err(f.err(
                        "architectures",
                        format!(
                            "unsupported architecture {name:?}; supported: {}",
                            ARCHITECTURES.join(", ")
                        ),
                    ));
                }
            }
        }
        let hidden_size = f.req_usize("hidden_size")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        "does not divide hidden_size and no head_dim is given",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head size"),
            ));
        }
        let act = f.string("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(f.err(
                "hidden_act",
                format!("{act:?} is not supported (only \"silu\")"),
            ));
        }
        if let Some(v) = json.get("rope_scaling") {
            if !v.is_null() {
                return Err(f.err("rope_scaling", "RoPE scaling is not supported (only null)"));
            }
        }
        let rope_theta = f.rope_theta()?;
        for key in ["attention_bias", "mlp_bias", "use_sliding_window"] {
            if f.bool(key)?.unwrap_or(false) {
                return Err(f.err(key, "true is not supported"));
            }
        }
        if let Some(tp) = f.usize("pretraining_tp")? {
            if tp != 1 {
                return Err(f.err("pretraining_tp", format!("{tp} is not supported (only 1)")));
            }
        }
        let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(2048);
        if let Some(w) = f.usize("sliding_window")? {
            if w < max_position_embeddings {
                return Err(f.err(
                    "sliding_window",
                    format!("sliding-window attention ({w}) is not supported"),
                ));
            }
        }
        let eos_token_ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| f.err("eos_token_id", "expected token ids"))
                })
                .collect::<Result<_>>()?,
            Some(x) => vec![x
                .as_u64()
                .ok_or_else(|| f.err("eos_token_id", "expected a token id"))?
                as u32],
        };
        let cfg = ModelConfig {
            model_type,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f32("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
        };
        for (name, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("head_dim", cfg.head_dim),
        ] {
            if v == 0 {
                return Err(f.err(name, "must be positive"));
            }
        }
        if cfg.rms_norm_eps.is_nan() || cfg.rms_norm_eps <= 0.0 {
            return Err(f.err("rms_norm_eps", "must be positive"));
        }
        if cfg.rope_theta.is_nan() || cfg.rope_theta <= 0.0 {
            return Err(f.err("rope_theta", "must be positive"));
        }
        Ok(cfg)
    }

    /// The HF `config.json` for this architecture (what transformers needs to load our saves).
    pub fn to_json(&self) -> Value {
        let (arch, mt) = match self.model_type.as_str() {
            "mistral" => ("MistralForCausalLM", "mistral"),
            _ => ("LlamaForCausalLM", "llama"),
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": mt,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }

    /// Number of query-head channels, NH*HS.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Number of key (or value) channels, NKV*HS.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(PathBuf::from(self.path), field, msg)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    /// `rope_theta` at the top level (transformers 4) or in `rope_parameters` (transformers 5,
    /// whose `rope_type` must then be "default": scaled RoPE variants are refused).
    fn rope_theta(&self) -> Result<f32> {
        let top = self.f32("rope_theta")?;
        let Some(rp) = self.get("rope_parameters") else {
            return Ok(top.unwrap_or(10000.0));
        };
        let sub = Fields {
            json: rp,
            path: self.path,
        };
        let kind = sub.string("rope_type")?.unwrap_or_else(|| "default".into());
        if kind != "default" {
            return Err(self.err(
                "rope_parameters.rope_type",
                format!("{kind:?} RoPE is not supported (only \"default\")"),
            ));
        }
        let theta = sub
            .f32("rope_theta")
            .map_err(|_| self.err("rope_parameters.rope_theta", "expected a number"))?;
        match (top, theta) {
            (Some(a), Some(b)) if a != b => Err(self.err(
                "rope_theta",
                format!("{a} disagrees with rope_parameters.rope_theta {b}"),
            )),
            (a, b) => Ok(b.or(a).unwrap_or(10000.0)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
}
