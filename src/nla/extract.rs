//! Building an NLA dataset from plain texts: run a subject model over each text, take its
//! residual stream at a few token positions, and pair each vector with the text just before it.
//!
//! Each text is tokenised without special tokens (no BOS) and truncated to the model's
//! `max_position_embeddings`. Texts shorter than `min_pos + 1` tokens give no rows (counted in
//! [`Extraction::skipped_short`]). For every other text, `per_text` distinct positions
//! `p >= min_pos` are drawn with a seeded RNG (all of them when the text has fewer); the row
//! of position p holds
//!
//! - `prompt`: [`ExtractSpec::prompt`] (one `<INJECT>`),
//! - `response`: the decoded `window` tokens ending at p (inclusive), trimmed,
//! - `activation_vector`: `res[layer]` at p (C values),
//! - extra columns `text_index` (Int, the text's index in the input), `position` (Int, p),
//!   `token` (Str, the decoded token at p) and `layer` (Int).
//!
//! Texts run in batches of [`ExtractSpec::batch`], right-padded with id 0: attention is causal,
//! so padding after a position never changes that position's residual stream.

use std::path::Path;

use rand::SeedableRng;

use crate::data::{ExtraValue, SampleOut};
use crate::device::{Device, View};
use crate::model::{forward_blocks, ActivationSet, Model, Recompute, Tokenizer};
use crate::{Error, Result};

/// The marker text the prompt must hold once.
pub const MARKER_TEXT: &str = "<INJECT>";

/// What to extract.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractSpec {
    /// Which residual stream, numbered as injection layers: 0 = the embedding output,
    /// i = the output of block i-1 (0..=L).
    pub layer: usize,
    /// Positions drawn per text.
    pub per_text: usize,
    /// The earliest token position drawn (0 = the first token).
    pub min_pos: usize,
    /// Tokens of context in the response: the `window` tokens ending at the position.
    pub window: usize,
    /// The actor prompt of every row; holds [`MARKER_TEXT`] exactly once.
    pub prompt: String,
    /// Seeds the choice of positions.
    pub seed: u64,
    /// Texts per forward pass.
    pub batch: usize,
}

impl Default for ExtractSpec {
    /// Layer 2, 4 positions per text from position 8, a window of 16 tokens, prompt
    /// `Explain <INJECT>:` (the marker is neither the prompt's first nor last token, which the
    /// actor's plain template requires), seed 0, batches of 16 texts.
    fn default() -> Self {
        ExtractSpec {
            layer: 2,
            per_text: 4,
            min_pos: 8,
            window: 16,
            prompt: format!("Explain {MARKER_TEXT}:"),
            seed: 0,
            batch: 16,
        }
    }
}

/// The rows, and what was left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Extraction {
    /// In text order, positions ascending within a text.
    pub rows: Vec<SampleOut>,
    /// Texts that gave rows.
    pub texts_used: usize,
    /// Texts with fewer than `min_pos + 1` tokens (after truncation to the model's positions).
    pub skipped_short: usize,
}

/// One text to run: its index, its (truncated) ids and the positions drawn.
struct Job {
    index: usize,
    ids: Vec<u32>,
    positions: Vec<usize>,
}

/// Runs `model` over `texts` and returns one row per drawn position (see the module doc).
pub fn extract<D: Device>(
    dev: &D,
    model: &Model<D>,
    tok: &Tokenizer,
    texts: &[String],
    spec: &ExtractSpec,
) -> Result<Extraction> {
    check_spec(model, spec)?;
    if texts.is_empty() {
        return Err(Error::invalid("extract", "no texts given"));
    }
    let cfg = &model.cfg;
    let c = cfg.hidden_size;
    let max_len = cfg.max_position_embeddings;
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut jobs = vec![];
    let mut skipped_short = 0;
    for (index, text) in texts.iter().enumerate() {
        let mut ids = tok.encode(text, false)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::Data {
                path: tok.path().to_path_buf(),
                row: index,
                column: "text".into(),
                msg: format!(
                    "token id {bad} is not below the model's vocabulary size {}",
                    cfg.vocab_size
                ),
            });
        }
        ids.truncate(max_len);
        if ids.len() <= spec.min_pos {
            skipped_short += 1;
            continue;
        }
        let candidates = ids.len() - spec.min_pos;
        let take = spec.per_text.min(candidates);
        let mut positions: Vec<usize> = rand::seq::index::sample(&mut rng, candidates, take)
            .into_iter()
            .map(|k| spec.min_pos + k)
            .collect();
        positions.sort_unstable();
        // the positions after the last one drawn change nothing before it: leave them out
        ids.truncate(positions[positions.len() - 1] + 1);
        jobs.push(Job {
            index,
            ids,
            positions,
        });
    }
    if jobs.is_empty() {
        return Err(Error::invalid(
            "extract",
            format!(
                "no usable text: all {} texts have fewer than min_pos + 1 = {} tokens",
                texts.len(),
                spec.min_pos + 1
            ),
        ));
    }
    let mut rows = Vec::with_capacity(jobs.iter().map(|j| j.positions.len()).sum());
    let mut acts: Option<ActivationSet<D::Buf>> = None;
    for group in jobs.chunks(spec.batch) {
        let b = group.len();
        let t = group.iter().map(|j| j.ids.len()).max().unwrap_or(1);
        let mut ids = vec![0u32; b * t];
        for (r, job) in group.iter().enumerate() {
            ids[r * t..r * t + job.ids.len()].copy_from_slice(&job.ids);
        }
        if acts.as_ref().is_some_and(|a| a.b != b || a.t != t) {
            acts = None; // free the old shape's buffers before allocating the new ones
        }
        let a = match acts {
            Some(ref mut a) => a,
            None => acts.insert(ActivationSet::blocks(dev, cfg, b, t, Recompute::None)?),
        };
        forward_blocks(dev, model, a, &dev.upload_ids(&ids)?, None)?;
        let res = dev.download(View::all(&a.res[spec.layer]))?;
        for (r, job) in group.iter().enumerate() {
            for &p in &job.positions {
                let row = r * t + p;
                rows.push(make_row(
                    tok,
                    spec,
                    job,
                    p,
                    res[row * c..(row + 1) * c].to_vec(),
                )?);
            }
        }
    }
    Ok(Extraction {
        rows,
        texts_used: jobs.len(),
        skipped_short,
    })
}

fn check_spec<D: Device>(model: &Model<D>, spec: &ExtractSpec) -> Result<()> {
    let layers = model.cfg.num_hidden_layers;
    let bad = |msg: String| Err(Error::invalid("extract", msg));
    if spec.layer > layers {
        return bad(format!(
            "layer {} is past the last block's output: the model has {layers} blocks, so the \
             residual streams are 0 (embeddings) ..= {layers}",
            spec.layer
        ));
    }
    let markers = spec.prompt.matches(MARKER_TEXT).count();
    if markers != 1 {
        return bad(format!(
            "the prompt {:?} holds {MARKER_TEXT} {markers} times; it must hold it exactly once",
            spec.prompt
        ));
    }
    for (name, v) in [
        ("per_text", spec.per_text),
        ("window", spec.window),
        ("batch", spec.batch),
    ] {
        if v == 0 {
            return bad(format!("{name} must be at least 1"));
        }
    }
    Ok(())
}

fn make_row(
    tok: &Tokenizer,
    spec: &ExtractSpec,
    job: &Job,
    p: usize,
    vector: Vec<f32>,
) -> Result<SampleOut> {
    let start = (p + 1).saturating_sub(spec.window);
    let response = tok.decode(&job.ids[start..=p], false)?.trim().to_string();
    let token = tok.decode(&job.ids[p..=p], false)?;
    Ok(SampleOut {
        prompt: spec.prompt.clone(),
        response,
        activation_vector: vector,
        extra: vec![
            ("text_index".into(), ExtraValue::Int(job.index as i64)),
            ("position".into(), ExtraValue::Int(p as i64)),
            ("token".into(), ExtraValue::Str(token)),
            ("layer".into(), ExtraValue::Int(spec.layer as i64)),
        ],
    })
}

/// The texts of a UTF-8 text file: one per line that is not blank, trimmed.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut texts = vec![];
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line).map_err(|e| {
            Error::format(
                path,
                format!(
                    "line {}: not valid UTF-8 (at byte {} of the line)",
                    n + 1,
                    e.valid_up_to()
                ),
            )
        })?;
        let line = line.trim();
        if !line.is_empty() {
            texts.push(line.to_string());
        }
    }
    Ok(texts)
}

/// Splits rows into (train, val) by text: the texts (the `text_index` column; a row without
/// one is a text of its own) are shuffled with `seed` and `round(val_fraction * texts)` of them
/// go to val, at least one when `val_fraction > 0` and never all of them. Rows keep their order
/// on each side, and one text's rows are all on one side.
pub fn split_rows(
    rows: Vec<SampleOut>,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<SampleOut>, Vec<SampleOut>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::invalid(
            "split_rows",
            format!("val_fraction {val_fraction} is not in [0, 1)"),
        ));
    }
    let key = |i: usize, row: &SampleOut| -> i128 {
        let index = row.extra.iter().find_map(|(name, v)| match v {
            ExtraValue::Int(x) if name == "text_index" => Some(*x),
            _ => None,
        });
        // rows without a text index get keys no i64 can take
        index.map_or(-1 - i as i128 + i64::MIN as i128, i128::from)
    };
    let mut texts: Vec<i128> = rows.iter().enumerate().map(|(i, r)| key(i, r)).collect();
    texts.sort_unstable();
    texts.dedup();
    let n = texts.len();
    let mut n_val = (val_fraction * n as f64).round() as usize;
    if val_fraction > 0.0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    } else {
        n_val = n_val.min(n.saturating_sub(1));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let val: std::collections::BTreeSet<i128> = rand::seq::index::sample(&mut rng, n, n_val)
        .into_iter()
        .map(|k| texts[k])
        .collect();
    let (mut train, mut valid) = (vec![], vec![]);
    for (i, row) in rows.into_iter().enumerate() {
        if val.contains(&key(i, &row)) {
            valid.push(row);
        } else {
            train.push(row);
        }
    }
    Ok((train, valid))
}
