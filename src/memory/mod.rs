//! Memory is planned, not allocated (DESIGN.md, core idea 4).
//!
//! - [`planner`]: buffers (name, dtype, elements, arena, lifetime in op indices) in, an offset
//!   for each in its arena out, reusing memory of buffers whose lifetimes do not intersect;
//!   each arena's size and the peak (their sum). [`Arena`] allocates a plan on the host.
//! - [`step`]: the buffers of a training step (actor, critic, reference; rollout, forward,
//!   backward, optimizer) for a dtype policy, activation recompute, ZeRO sharding over G GPUs
//!   and chunked logits.
//! - [`run`]: a run config's step ([`RunShape`]), its report, and when it does not fit the
//!   changes that would make it fit (what `nla-engine plan` prints).

pub mod planner;
pub mod run;
pub mod step;

pub use planner::{
    Arena, ArenaKind, ArenaPlan, BufferDecl, BufferId, Dtype, Fit, MemoryPlan, Placement,
    PlanOptions, Planner, ALIGN,
};
pub use run::{check_fits, remedies, report, Remedy, RunShape};
pub use step::{
    plan_step, plan_step_with, DtypePolicy, ModelKind, ModelSpec, ModelSummary, Phase, Recompute,
    StepOptions, StepPlan,
};

use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB with two decimals ("12.34 GiB").
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// A memory size: a number and a unit, e.g. `80GiB`, `80 GB`, `81920MiB`, `1.5TiB`.
/// Binary units: KiB, MiB, GiB, TiB (also Ki, Mi, Gi, Ti); decimal: KB, MB, GB, TB; B or no
/// unit: bytes. Case is ignored. A bare K/M/G/T is refused as ambiguous.
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let bad = |why: &str| {
        Error::invalid(
            "size",
            format!("`{text}`: {why} (write e.g. 80GiB, 80GB or 81920MiB)"),
        )
    };
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let x: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "ki" => 1024.0,
        "mib" | "mi" => 1024f64.powi(2),
        "gib" | "gi" => 1024f64.powi(3),
        "tib" | "ti" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "m" | "g" | "t" => {
            return Err(bad(&format!(
                "`{unit}` is ambiguous: say {unit}iB (binary) or {unit}B (decimal)"
            )))
        }
        _ => return Err(bad(&format!("unknown unit `{unit}`"))),
    };
    let bytes = (x * mult).round();
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as u64)
}
