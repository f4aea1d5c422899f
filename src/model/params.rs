//! The flat parameter layout: every parameter of the model is a window of one buffer, named by
//! its HF name. Gradients and optimizer state use the same layout.

use std::collections::HashMap;

use super::config::ModelConfig;

/// One parameter: its HF name, HF shape and window `[offset, offset+len)` of the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Whether AdamW applies weight decay (matrices yes, norm weights no).
    pub decay: bool,
}

/// Windows of one decoder block's parameters in the flat buffer. wq, wk and wv are adjacent,
/// one [QKV,C] matrix at wq, and so are wgate and wup, one [2F,C] matrix at wgate: each group
/// is one matmul (`block::block_fwd`), in the parameters and in the gradients alike.
#[derive(Clone, Debug)]
pub struct LayerParams {
    /// input_layernorm [C]
    pub ln1: usize,
    /// q_proj [NH*HS, C]
    pub wq: usize,
    /// k_proj [NKV*HS, C]
    pub wk: usize,
    /// v_proj [NKV*HS, C]
    pub wv: usize,
    /// o_proj [C, NH*HS]
    pub wo: usize,
    /// post_attention_layernorm [C]
    pub ln2: usize,
    /// gate_proj [F, C]
    pub wgate: usize,
    /// up_proj [F, C]
    pub wup: usize,
    /// down_proj [C, F]
    pub wdown: usize,
}

/// The table of every parameter, in HF order, plus direct offsets for the forward pass.
#[derive(Clone, Debug)]
pub struct ParamTable {
    pub entries: Vec<ParamEntry>,
    /// Total number of f32 elements.
    pub total: usize,
    /// embed_tokens [V, C]
    pub wte: usize,
    pub layers: Vec<LayerParams>,
    /// model.norm [C]
    pub ln_f: usize,
    /// lm_head [V, C]; equals `wte` when the embeddings are tied.
    pub lm_head: usize,
    index: HashMap<String, usize>,
}

impl ParamTable {
    pub fn for_config(cfg: &ModelConfig) -> Self {
        let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mut t = ParamTable {
            entries: vec![],
            total: 0,
            wte: 0,
            layers: vec![],
            ln_f: 0,
            lm_head: 0,
            index: HashMap::new(),
        };
        t.wte = t.push("model.embed_tokens.weight", &[v, c], true);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let ln1 = t.push(&p("input_layernorm.weight"), &[c], false);
            // k and v right after q: the three are one [QKV,C] matrix (`block::block_fwd`)
            let wq = t.push(&p("self_attn.q_proj.weight"), &[qd, c], true);
            let wk = t.push(&p("self_attn.k_proj.weight"), &[kvd, c], true);
            let wv = t.push(&p("self_attn.v_proj.weight"), &[kvd, c], true);
            let wo = t.push(&p("self_attn.o_proj.weight"), &[c, qd], true);
            let ln2 = t.push(&p("post_attention_layernorm.weight"), &[c], false);
            // up right after gate: the two are one [2F,C] matrix (`linear::gate_up_fwd`)
            let wgate = t.push(&p("mlp.gate_proj.weight"), &[f, c], true);
            let wup = t.push(&p("mlp.up_proj.weight"), &[f, c], true);
            let wdown = t.push(&p("mlp.down_proj.weight"), &[c, f], true);
            debug_assert_eq!((wk, wv), (wq + qd * c, wq + (qd + kvd) * c));
            debug_assert_eq!(wup, wgate + f * c);
            t.layers.push(LayerParams {
                ln1,
                wq,
                wk,
                wv,
                wo,
                ln2,
                wgate,
                wup,
                wdown,
            });
        }
        t.ln_f = t.push("model.norm.weight", &[c], false);
        t.lm_head = if cfg.tie_word_embeddings {
            t.wte
        } else {
            t.push("lm_head.weight", &[v, c], true)
        };
        t
    }

    fn push(&mut self, name: &str, shape: &[usize], decay: bool) -> usize {
        let len = shape.iter().product();
        let offset = self.total;
        self.index.insert(name.to_string(), self.entries.len());
        self.entries.push(ParamEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset,
            len,
            decay,
        });
        self.total += len;
        offset
    }

    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }
}
