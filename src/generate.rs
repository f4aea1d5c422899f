//! Batched sampling with a KV cache (the RL rollout): every prompt x N samples in one batch,
//! one prefill, then one decode step per new token.

use rand::{Rng, SeedableRng};

use crate::device::{Device, SampleSpec, View, ViewMut};
use crate::model::{KvCache, Model};
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
    let mut cache = KvCache::new(dev, &model.cfg, &starts, tp + spec.max_new_tokens, tp)?;
    cache.step(dev, model, &dev.upload_ids(&ids)?, tp)?;

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
    let mut next = dev.upload_ids(&vec![0; b])?;
    let mut logp = dev.alloc(b)?;
    for step in 0..spec.max_new_tokens {
        let u: Vec<f32> = rngs.iter_mut().map(|r| r.random::<f32>()).collect();
        let u = dev.upload(&u)?;
        dev.sample_fwd(
            &mut next,
            ViewMut::all(&mut logp),
            cache.logits(),
            View::all(&u),
            b,
            v,
            &spec.sample,
        )?;
        let (tok, lp) = (dev.download_ids(&next)?, dev.download(View::all(&logp))?);
        for r in 0..b {
            if done[r] {
                continue;
            }
            let s = &mut out[r];
            s.tokens.push(tok[r]);
            s.logps.push(lp[r]);
            if spec.eos_ids.contains(&tok[r]) {
                (done[r], s.stop) = (true, StopReason::Eos);
            } else if stop(&s.tokens) {
                (done[r], s.stop) = (true, StopReason::Stop);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == spec.max_new_tokens {
            break;
        }
        cache.step(dev, model, &next, 1)?;
    }
    Ok(out)
}
