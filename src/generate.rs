//! Batched sampling with a KV cache (the RL rollout): every prompt x N samples in one batch,
//! one prefill, then one decode step per new token. Vectors may be injected into the
//! prompts' residual stream at prefill ([`generate_with`]).

use rand::{Rng, SeedableRng};

use crate::device::{Device, InjectMode, SampleSpec, View, ViewMut};
use crate::model::{Injection, KvCache, Model};
use crate::{Error, Result};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenSpec {
    /// samples per prompt (the GRPO group size)
    pub n: usize,
    pub max_new_tokens: usize,
    pub sample: SampleSpec,
    /// a sample ends after any of these tokens (included in its tokens)
    pub eos_ids: Vec<u32>,
    /// the uniforms of sample s of prompt p come from a stream seeded by (seed, p, s) only, so a
    /// sample does not depend on what else is in the batch
    pub seed: u64,
}

/// Why a sample ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    /// the caller's stop check (e.g. a stop string) matched
    Stop,
    /// `max_new_tokens` reached: the sample is truncated
    Length,
}

/// One generated sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub prompt: usize,
    /// index within the prompt's group, 0..N
    pub index: usize,
    /// generated tokens (the stopping EOS included)
    pub tokens: Vec<u32>,
    /// log-probability of each token under softmax(logits / temperature)
    pub logps: Vec<f32>,
    pub stop: StopReason,
}

/// Vectors written into the residual stream at positions of each prompt (the NLA actor's
/// input), at prefill only: every sample of prompt p gets prompt p's vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptInjection {
    /// where: 0 = the embedding output, i > 0 = the residual stream after block i-1 (i <= L)
    pub layers: Vec<usize>,
    pub mode: InjectMode,
    /// per prompt [S_p]: distinct positions within that prompt (the k-th gets vector k)
    pub sites: Vec<Vec<usize>>,
    /// per prompt [S_p,C]: what is written (already projected and rescaled)
    pub vecs: Vec<Vec<f32>>,
}

/// Generates `spec.n` samples for each prompt (token ids, at least one each). `stop(tokens)`
/// is asked after every new token of a sample (e.g. to look for stop strings in its text).
/// Samples come back prompt-major: prompt 0's N samples, then prompt 1's, ...
pub fn generate<D: Device>(
    dev: &D,
    model: &Model<D>,
    prompts: &[Vec<u32>],
    spec: &GenSpec,
    stop: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Sample>> {
    let _range = crate::profile::range("rollout");
    generate_with(dev, model, prompts, spec, None, stop)
}

/// [`generate`] with `inj`'s vectors written at its prompt positions during the prefill.
pub fn generate_with<D: Device>(
    dev: &D,
    model: &Model<D>,
    prompts: &[Vec<u32>],
    spec: &GenSpec,
    inj: Option<&PromptInjection>,
    stop: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Sample>> {
    let v = model.cfg.vocab_size;
    if spec.n == 0 || prompts.is_empty() {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::invalid("generate", format!("prompt {i} is empty")));
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&t) = p.iter().find(|&&t| t as usize >= v) {
            return Err(Error::invalid(
                "generate",
                format!("prompt {i} has token id {t}, not below the vocabulary size {v}"),
            ));
        }
    }
    let tp = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let rows: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|p| (0..spec.n).map(move |s| (p, s)))
        .collect();
    let b = rows.len();
    // left padding: row r's prompt ends at position tp - 1
    let starts: Vec<u32> = rows
        .iter()
        .map(|&(p, _)| (tp - prompts[p].len()) as u32)
        .collect();
    let mut ids = Vec::with_capacity(b * tp);
    for &(p, _) in &rows {
        ids.extend(std::iter::repeat_n(0u32, tp - prompts[p].len()));
        ids.extend_from_slice(&prompts[p]);
    }
    let injection = match inj {
        Some(i) => prefill_injection(dev, model, i, prompts, &rows, tp)?,
        None => None,
    };
    let mut cache = KvCache::new(dev, &model.cfg, &starts, tp + spec.max_new_tokens, tp)?;
    cache.step_with(dev, model, &dev.upload_ids(&ids)?, tp, injection.as_ref())?;

    let mut rngs: Vec<rand::rngs::StdRng> = rows
        .iter()
        .map(|&(p, s)| {
            let stream = (p as u64) << 32 | s as u64;
            rand::rngs::StdRng::seed_from_u64(
                spec.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
        })
        .collect();
    let mut out: Vec<Sample> = rows
        .iter()
        .map(|&(prompt, index)| Sample {
            prompt,
            index,
            tokens: vec![],
            logps: vec![],
            stop: StopReason::Length,
        })
        .collect();
    let mut done = vec![false; b];
    let steps = spec.max_new_tokens;
    // every row's uniform draws for every step [STEPS,B], step-major, uploaded once: the s-th
    // draw of row r is the s-th of its own stream, as if drawn step by step
    let mut draws = vec![0f32; steps * b];
    for step in draws.chunks_exact_mut(b) {
        for (d, rng) in step.iter_mut().zip(&mut rngs) {
            *d = rng.random::<f32>();
        }
    }
    let u = dev.upload(&draws)?;
    // the sampled tokens' log-probabilities [STEPS,B], downloaded once at the end: a decode
    // step waits on the GPU only for the tokens the stop checks need
    let mut logp = dev.alloc(steps * b)?;
    let mut next = dev.upload_ids(&vec![0; b])?;
    let mut ran = 0;
    for step in 0..steps {
        dev.sample_fwd(
            &mut next,
            ViewMut::range(&mut logp, step * b, b),
            cache.logits(),
            View::range(&u, step * b, b),
            b,
            v,
            &spec.sample,
        )?;
        ran = step + 1;
        let tok = dev.download_ids(&next)?;
        for r in 0..b {
            if done[r] {
                continue;
            }
            let s = &mut out[r];
            s.tokens.push(tok[r]);
            if spec.eos_ids.contains(&tok[r]) {
                (done[r], s.stop) = (true, StopReason::Eos);
            } else if stop(&s.tokens) {
                (done[r], s.stop) = (true, StopReason::Stop);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == steps {
            break;
        }
        cache.step(dev, model, &next, 1)?;
    }
    // sample r's k-th token was drawn at step k
    let lp = dev.download(View::range(&logp, 0, ran * b))?;
    for (r, s) in out.iter_mut().enumerate() {
        s.logps = (0..s.tokens.len()).map(|k| lp[k * b + r]).collect();
    }
    Ok(out)
}

/// The injection of the left-padded prefill batch [B*TP]: row r (prompt p) gets prompt p's
/// vectors at sites r*TP + (TP - len_p) + pos. None when there are no sites.
fn prefill_injection<D: Device>(
    dev: &D,
    model: &Model<D>,
    inj: &PromptInjection,
    prompts: &[Vec<u32>],
    rows: &[(usize, usize)],
    tp: usize,
) -> Result<Option<Injection<D>>> {
    let (np, c, nl) = (
        prompts.len(),
        model.cfg.hidden_size,
        model.cfg.num_hidden_layers,
    );
    if let Some(l) = inj.layers.iter().find(|&&l| l > nl) {
        return Err(Error::invalid(
            "generate",
            format!(
                "injection layer {l} is past the last block's output (the model has {nl} blocks)"
            ),
        ));
    }
    if inj.sites.len() != np || inj.vecs.len() != np {
        return Err(Error::invalid(
            "generate",
            format!(
                "injection has sites for {} and vectors for {} prompts, need {np}",
                inj.sites.len(),
                inj.vecs.len()
            ),
        ));
    }
    for (p, (sites, vecs)) in inj.sites.iter().zip(&inj.vecs).enumerate() {
        let len = prompts[p].len();
        if vecs.len() != sites.len() * c {
            return Err(Error::invalid(
                "generate",
                format!(
                    "prompt {p}: {} injection sites need {} vector elements (C = {c}), got {}",
                    sites.len(),
                    sites.len() * c,
                    vecs.len()
                ),
            ));
        }
        if let Some(&pos) = sites.iter().find(|&&pos| pos >= len) {
            return Err(Error::invalid(
                "generate",
                format!("prompt {p}: injection site {pos} is past the prompt's {len} tokens"),
            ));
        }
        let mut sorted = sites.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                "generate",
                format!("prompt {p}: injection site {} appears twice", w[0]),
            ));
        }
    }
    let s: usize = rows.iter().map(|&(p, _)| inj.sites[p].len()).sum();
    if s == 0 {
        return Ok(None);
    }
    let mut sites = Vec::with_capacity(s);
    let mut vecs = Vec::with_capacity(s * c);
    for (r, &(p, _)) in rows.iter().enumerate() {
        let base = r * tp + tp - prompts[p].len();
        sites.extend(inj.sites[p].iter().map(|&pos| (base + pos) as u32));
        vecs.extend_from_slice(&inj.vecs[p]);
    }
    Injection::new(dev, inj.layers.clone(), inj.mode, &sites, &vecs, c).map(Some)
}
