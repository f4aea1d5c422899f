//! Dataset samples as actor and critic training examples, and their collation into batches.
//!
//! Actor (\[O\] AV-SFT): the prompt with each marker text replaced by the marker token,
//! rendered as a user turn plus the generation prompt and tokenised without special tokens; then
//! the response (by default wrapped as `"<explanation>\n{text}\n</explanation>"`) tokenised
//! without special tokens; then the token that ends the assistant turn. The loss covers the
//! response and that end token (\[O\]); `end_in_loss: false` gives \[V\]'s variant, where the
//! final EOS is not a target. The injection sites are the positions of the marker id; their
//! number must equal the number of vectors, and none may be the prompt's first or last token.
//!
//! Critic (\[O\] AR-SFT): `critic_prompt` with `{explanation}` replaced by the explanation (the
//! stripped text inside the first `<tag>...</tag>` of the response, or the whole response when
//! no tag is set), tokenised with special tokens; the target is the sample's vector.
//!
//! Over-long examples follow `truncation`: `error` stops naming the row, `skip` leaves it out
//! (counted by [`SkipCounts`]), `left`/`right` drop tokens from that end, but never a marker
//! (that is an error). Errors about a sample name its file and row.

use std::ops::Range;

use crate::config::{CriticConfig, Truncation};
use crate::data::{RowSource, Sample};
use crate::model::{Batch, Tokenizer};
use crate::{Error, Result};

use super::marker::Marker;
use super::template::ChatTemplate;

/// Why a sample gave no example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Longer than `max_length` under `truncation: skip`.
    TooLong { len: usize, max: usize },
    /// The response has no closed explanation tag (the critic cannot read it).
    Unparseable,
}

/// An example, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Example(T),
    Skipped(Skip),
}

impl<T> Outcome<T> {
    pub fn example(self) -> Option<T> {
        match self {
            Outcome::Example(x) => Some(x),
            Outcome::Skipped(_) => None,
        }
    }
}

/// Samples left out, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipCounts {
    pub too_long: u64,
    pub unparseable: u64,
}

impl SkipCounts {
    /// The example of `outcome`, counting it when skipped.
    pub fn take<T>(&mut self, outcome: Outcome<T>) -> Option<T> {
        match outcome {
            Outcome::Example(x) => Some(x),
            Outcome::Skipped(Skip::TooLong { .. }) => {
                self.too_long += 1;
                None
            }
            Outcome::Skipped(Skip::Unparseable) => {
                self.unparseable += 1;
                None
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.too_long + self.unparseable
    }
}

/// The longest example and what to do with longer ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthLimit {
    pub max_length: usize,
    pub truncation: Truncation,
}

/// How actor examples are made.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorOptions {
    /// The assistant turn is `"<tag>\n{response}\n</tag>"`; None = the raw response.
    pub explanation_tag: Option<String>,
    /// Whether the token ending the assistant turn is a target: true = \[O\], false = \[V\].
    pub end_in_loss: bool,
    pub limit: LengthLimit,
}

impl ActorOptions {
    /// \[O\]'s choices: `<explanation>` tags, end token in the loss.
    pub fn new(limit: LengthLimit) -> Self {
        ActorOptions {
            explanation_tag: Some("explanation".into()),
            end_in_loss: true,
            limit,
        }
    }
}

/// One actor sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorExample {
    /// [N] prompt tokens, then response tokens and the end token (none for a prompt alone)
    pub ids: Vec<u32>,
    /// [N] 1 where token n is a target (predicted at position n-1), else 0
    pub loss_mask: Vec<u8>,
    /// tokens of `ids` that belong to the prompt
    pub prompt_len: usize,
    /// [S] positions of the marker tokens, ascending
    pub sites: Vec<usize>,
    /// [S][A] the k-th vector goes to the k-th site
    pub vectors: Vec<Vec<f32>>,
}

/// Makes actor examples with one tokenizer, chat template and marker.
pub struct ActorEncoder<'a> {
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    marker: &'a Marker,
    end_id: u32,
    opts: ActorOptions,
}

impl<'a> ActorEncoder<'a> {
    pub fn new(
        tok: &'a Tokenizer,
        template: &'a ChatTemplate,
        marker: &'a Marker,
        opts: ActorOptions,
    ) -> Result<Self> {
        let end_id = template.end_of_turn_id(tok)?;
        Ok(ActorEncoder {
            tok,
            template,
            marker,
            end_id,
            opts,
        })
    }

    /// The token that ends the assistant turn (the last token of every example).
    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// The assistant turn's text for `response`.
    pub fn response_text(&self, response: &str) -> String {
        match &self.opts.explanation_tag {
            Some(tag) => format!("<{tag}>\n{response}\n</{tag}>"),
            None => response.to_string(),
        }
    }

    /// The templated prompt's ids: marker text replaced, user turn plus generation prompt.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = self.template.render_prompt(&self.marker.apply(prompt))?;
        self.tok
            .encode(&text, self.template.prompt_special_tokens())
    }

    /// The prompt alone (for generation): no targets.
    pub fn prompt(&self, sample: &Sample) -> Result<Outcome<ActorExample>> {
        self.make(sample, false)
    }

    /// Prompt, response and end token, the loss on the response.
    pub fn example(&self, sample: &Sample) -> Result<Outcome<ActorExample>> {
        self.make(sample, true)
    }

    fn make(&self, sample: &Sample, with_response: bool) -> Result<Outcome<ActorExample>> {
        let src = &sample.source;
        let prompt = sample.prompt.as_deref().ok_or_else(|| {
            row_err(
                src,
                "prompt",
                "no prompt: actor examples need the prompt column",
            )
        })?;
        let mut ids = self.prompt_ids(prompt)?;
        let prompt_len = ids.len();
        let mut loss_mask = vec![0u8; prompt_len];
        if with_response {
            let response = sample
                .response
                .as_deref()
                .ok_or_else(|| row_err(src, "response", "no response: actor examples need one"))?;
            let resp = self.tok.encode(&self.response_text(response), false)?;
            loss_mask.extend(std::iter::repeat_n(1u8, resp.len()));
            loss_mask.push(u8::from(self.opts.end_in_loss));
            ids.extend(resp);
            ids.push(self.end_id);
        }
        let sites: Vec<usize> = (0..ids.len())
            .filter(|&p| ids[p] == self.marker.id)
            .collect();
        if sites.len() != sample.vectors.len() {
            return Err(row_err(
                src,
                "prompt",
                format!(
                    "{} marker token(s) {:?} (id {}) after templating, but {} vector(s): each \
                     marker needs one vector",
                    sites.len(),
                    self.marker.token,
                    self.marker.id,
                    sample.vectors.len()
                ),
            ));
        }
        let edge = |p: usize, r: &Range<usize>| p == r.start || p + 1 >= r.end.min(prompt_len);
        if let Some(&p) = sites
            .iter()
            .find(|&&p| p >= prompt_len || edge(p, &(0..ids.len())))
        {
            return Err(row_err(
                src,
                "prompt",
                format!(
                    "marker token at position {p} of the {prompt_len} prompt tokens: a marker \
                     must lie inside the prompt, neither first nor last"
                ),
            ));
        }
        let keep = match fit(ids.len(), self.opts.limit, src, "prompt")? {
            Fit::All => 0..ids.len(),
            Fit::Skip(s) => return Ok(Outcome::Skipped(s)),
            Fit::Cut(keep) => {
                if let Some(&p) = sites
                    .iter()
                    .find(|&&p| !keep.contains(&p) || edge(p, &keep))
                {
                    return Err(row_err(
                        src,
                        "prompt",
                        format!(
                            "{} tokens, max_length {}: truncation {:?} would cut the marker at \
                             position {p} off (or to the prompt's edge); raise max_length or \
                             use truncation: skip",
                            ids.len(),
                            self.opts.limit.max_length,
                            self.opts.limit.truncation
                        ),
                    ));
                }
                if with_response && loss_mask[keep.clone()].iter().all(|&m| m == 0) {
                    return Err(row_err(
                        src,
                        "response",
                        format!(
                            "{} tokens, max_length {}: truncation {:?} leaves no response token",
                            ids.len(),
                            self.opts.limit.max_length,
                            self.opts.limit.truncation
                        ),
                    ));
                }
                keep
            }
        };
        let shift = keep.start;
        Ok(Outcome::Example(ActorExample {
            ids: ids[keep.clone()].to_vec(),
            loss_mask: loss_mask[keep.clone()].to_vec(),
            prompt_len: prompt_len.clamp(keep.start, keep.end) - shift,
            sites: sites.iter().map(|p| p - shift).collect(),
            vectors: sample.vectors.clone(),
        }))
    }
}

/// How critic examples are made.
#[derive(Clone, Debug, PartialEq)]
pub struct CriticOptions {
    /// With `{explanation}`: the explanation is put there; without: a prefix, tokenised on its
    /// own, followed by the explanation's tokens (\[V\]); None = the explanation alone.
    pub critic_prompt: Option<String>,
    /// The explanation is inside the first `<tag>...</tag>`; None = the whole response.
    pub explanation_tag: Option<String>,
    /// Tokenise the critic input with the tokenizer's special tokens (\[O\]: true).
    pub add_special_tokens: bool,
    pub limit: LengthLimit,
}

impl CriticOptions {
    /// From `model.critic` (`critic_prompt`, `explanation_tag`), with special tokens (\[O\]).
    pub fn from_config(cfg: &CriticConfig, limit: LengthLimit) -> Self {
        CriticOptions {
            critic_prompt: cfg.critic_prompt.clone(),
            explanation_tag: cfg.explanation_tag.clone(),
            add_special_tokens: true,
            limit,
        }
    }
}

/// One critic input and the vector it should reconstruct.
#[derive(Clone, Debug, PartialEq)]
pub struct CriticExample {
    /// [N]
    pub ids: Vec<u32>,
    /// [A]
    pub target: Vec<f32>,
}

/// The explanation in `response`: the stripped text inside the first `<tag>...</tag>`, None when
/// there is no closed tag; with no tag, the whole response.
pub fn extract_explanation<'r>(response: &'r str, tag: Option<&str>) -> Option<&'r str> {
    let Some(tag) = tag else {
        return Some(response);
    };
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = response.find(&open)? + open.len();
    let len = response[start..].find(&close)?;
    Some(response[start..start + len].trim())
}

/// Makes critic inputs with one tokenizer.
pub struct CriticEncoder<'a> {
    tok: &'a Tokenizer,
    opts: CriticOptions,
}

impl<'a> CriticEncoder<'a> {
    pub fn new(tok: &'a Tokenizer, opts: CriticOptions) -> Self {
        CriticEncoder { tok, opts }
    }

    /// The critic's input text for `response`; None when unparseable.
    pub fn text(&self, response: &str) -> Option<String> {
        let expl = extract_explanation(response, self.opts.explanation_tag.as_deref())?;
        Some(match &self.opts.critic_prompt {
            Some(p) if p.contains("{explanation}") => p.replace("{explanation}", expl),
            Some(p) => format!("{p}{expl}"),
            None => expl.to_string(),
        })
    }

    /// The critic's input ids for `response` (a sample's or a generated one), fitted to
    /// `max_length`; `src` names the row in errors.
    pub fn ids(&self, response: &str, src: Option<&RowSource>) -> Result<Outcome<Vec<u32>>> {
        let Some(expl) = extract_explanation(response, self.opts.explanation_tag.as_deref()) else {
            return Ok(Outcome::Skipped(Skip::Unparseable));
        };
        let special = self.opts.add_special_tokens;
        let ids = match &self.opts.critic_prompt {
            Some(p) if p.contains("{explanation}") => self
                .tok
                .encode(&p.replace("{explanation}", expl), special)?,
            Some(p) => {
                let mut ids = self.tok.encode(p, special)?;
                ids.extend(self.tok.encode(expl, false)?);
                ids
            }
            None => self.tok.encode(expl, special)?,
        };
        let fitted = match src {
            Some(src) => fit(ids.len(), self.opts.limit, src, "response")?,
            None => fit_generated(ids.len(), self.opts.limit)?,
        };
        Ok(match fitted {
            Fit::All => Outcome::Example(ids),
            Fit::Cut(keep) => Outcome::Example(ids[keep].to_vec()),
            Fit::Skip(s) => Outcome::Skipped(s),
        })
    }

    /// The critic's input ids for an explanation that may lack the tags (a dataset's response
    /// is the explanation itself, \[O\] AR-SFT): untagged text is read whole, tagged text as a
    /// generated response.
    pub fn text_ids(&self, text: &str, src: Option<&RowSource>) -> Result<Outcome<Vec<u32>>> {
        match &self.opts.explanation_tag {
            Some(tag) if !text.contains(&format!("<{tag}>")) => {
                self.ids(&format!("<{tag}>{text}</{tag}>"), src)
            }
            _ => self.ids(text, src),
        }
    }

    /// The critic example of a sample: its response's input and its one vector.
    pub fn example(&self, sample: &Sample) -> Result<Outcome<CriticExample>> {
        let src = &sample.source;
        let response = sample
            .response
            .as_deref()
            .ok_or_else(|| row_err(src, "response", "no response: critic examples need one"))?;
        let [target] = sample.vectors.as_slice() else {
            return Err(row_err(
                src,
                "activation_vector",
                format!(
                    "a critic example needs exactly one vector, the row has {}",
                    sample.vectors.len()
                ),
            ));
        };
        Ok(match self.text_ids(response, Some(src))? {
            Outcome::Example(ids) => Outcome::Example(CriticExample {
                ids,
                target: target.clone(),
            }),
            Outcome::Skipped(s) => Outcome::Skipped(s),
        })
    }
}

/// A collated actor batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorBatch {
    /// right-padded; position t predicts token t+1; only response targets are in the mask
    pub batch: Batch,
    /// [S] flat row indices b*T + t of the markers, row-major
    pub sites: Vec<u32>,
    /// [S,A]
    pub vecs: Vec<f32>,
    /// A (0 when there are no sites)
    pub a: usize,
}

/// Right-pads `examples` with `pad_id` to `t` tokens (None = the longest example).
pub fn collate_actor(
    examples: &[ActorExample],
    pad_id: u32,
    t: Option<usize>,
) -> Result<ActorBatch> {
    let (b, t) = batch_dims(examples.iter().map(|e| e.ids.len()), t, "actor batch")?;
    let mut batch = Batch {
        b,
        t,
        ids: vec![pad_id; b * t],
        targets: vec![pad_id; b * t],
        mask: vec![0.0; b * t],
    };
    let mut sites = vec![];
    let mut vecs = vec![];
    let a = examples
        .iter()
        .flat_map(|e| e.vectors.first())
        .next()
        .map_or(0, Vec::len);
    for (r, e) in examples.iter().enumerate() {
        let n = e.ids.len();
        if e.sites.len() != e.vectors.len()
            || e.loss_mask.len() != n
            || e.sites.iter().any(|&p| p >= n)
        {
            return Err(Error::invalid(
                "actor batch",
                format!(
                    "row {r}: {n} ids, {} mask values, {} vectors and sites {:?}",
                    e.loss_mask.len(),
                    e.vectors.len(),
                    e.sites
                ),
            ));
        }
        let row = r * t;
        batch.ids[row..row + n].copy_from_slice(&e.ids);
        for p in 0..n.saturating_sub(1) {
            batch.targets[row + p] = e.ids[p + 1];
            batch.mask[row + p] = f32::from(e.loss_mask[p + 1]);
        }
        for (&p, v) in e.sites.iter().zip(&e.vectors) {
            if v.len() != a {
                return Err(Error::invalid(
                    "actor batch",
                    format!("row {r}: a vector of {} values, another of {a}", v.len()),
                ));
            }
            sites.push(flat_index(row + p)?);
            vecs.extend_from_slice(v);
        }
    }
    Ok(ActorBatch {
        batch,
        sites,
        vecs,
        a,
    })
}

/// A collated critic batch.
#[derive(Clone, Debug, PartialEq)]
pub struct CriticBatch {
    pub b: usize,
    pub t: usize,
    /// [B*T] right-padded
    pub ids: Vec<u32>,
    /// [B*T] 1 on real tokens, 0 on padding
    pub mask: Vec<f32>,
    /// [B,A]
    pub targets: Vec<f32>,
    /// A
    pub a: usize,
}

/// Right-pads `examples` with `pad_id` to `t` tokens (None = the longest example).
pub fn collate_critic(
    examples: &[CriticExample],
    pad_id: u32,
    t: Option<usize>,
) -> Result<CriticBatch> {
    let (b, t) = batch_dims(examples.iter().map(|e| e.ids.len()), t, "critic batch")?;
    let a = examples.first().map_or(0, |e| e.target.len());
    let mut out = CriticBatch {
        b,
        t,
        ids: vec![pad_id; b * t],
        mask: vec![0.0; b * t],
        targets: Vec::with_capacity(b * a),
        a,
    };
    for (r, e) in examples.iter().enumerate() {
        if e.ids.is_empty() || e.target.len() != a {
            return Err(Error::invalid(
                "critic batch",
                format!(
                    "row {r}: {} tokens and a target of {} values (row 0: {a})",
                    e.ids.len(),
                    e.target.len()
                ),
            ));
        }
        out.ids[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
        out.mask[r * t..r * t + e.ids.len()].fill(1.0);
        out.targets.extend_from_slice(&e.target);
    }
    Ok(out)
}

/// B and T of a batch of rows of these lengths.
fn batch_dims(
    lens: impl Iterator<Item = usize>,
    t: Option<usize>,
    op: &'static str,
) -> Result<(usize, usize)> {
    let lens: Vec<usize> = lens.collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    if lens.is_empty() || longest == 0 {
        return Err(Error::invalid(op, "needs at least one non-empty row"));
    }
    let t = t.unwrap_or(longest);
    if t < longest {
        return Err(Error::invalid(
            op,
            format!("a row has {longest} tokens, more than T = {t}"),
        ));
    }
    flat_index(lens.len() * t)?;
    Ok((lens.len(), t))
}

fn flat_index(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid("batch", format!("{n} tokens exceed u32 indices")))
}

enum Fit {
    All,
    Cut(Range<usize>),
    Skip(Skip),
}

/// What `limit` does with `len` tokens of the row at `src`.
fn fit(len: usize, limit: LengthLimit, src: &RowSource, column: &str) -> Result<Fit> {
    fit_with(len, limit, |msg| row_err(src, column, msg))
}

/// The same for a generated response.
fn fit_generated(len: usize, limit: LengthLimit) -> Result<Fit> {
    fit_with(len, limit, |msg| Error::invalid("critic input", msg))
}

fn fit_with(len: usize, limit: LengthLimit, err: impl Fn(String) -> Error) -> Result<Fit> {
    let max = limit.max_length;
    if len <= max {
        return Ok(Fit::All);
    }
    Ok(match limit.truncation {
        Truncation::Error => {
            return Err(err(format!(
                "{len} tokens, more than max_length {max} (truncation: error); raise \
                 max_length or choose truncation skip, left or right"
            )))
        }
        Truncation::Skip => Fit::Skip(Skip::TooLong { len, max }),
        Truncation::Left => Fit::Cut(len - max..len),
        Truncation::Right => Fit::Cut(0..max),
    })
}

fn row_err(src: &RowSource, column: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        path: src.file.to_path_buf(),
        row: src.row,
        column: column.into(),
        msg: msg.into(),
    }
}
