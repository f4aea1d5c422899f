//! The memory planner: buffers with lifetimes in, offsets in a few arenas out.
//!
//! A step is a numbered sequence of ops (0, 1, 2, ...). Every buffer the step needs is declared
//! up front with its name, dtype, element count, arena and lifetime `[first, last]`: the first
//! and the last op that touch it (inclusive). Two buffers *conflict* when they are in the same
//! arena and their lifetimes intersect; conflicting buffers must not overlap in memory, and
//! buffers that do not conflict may share it.
//!
//! # Algorithm (greedy by size, best fit)
//!
//! Each arena is planned on its own:
//! 1. every buffer's size is its byte count rounded up to the alignment ([`ALIGN`] = 256 bytes),
//!    so every offset is a multiple of it;
//! 2. buffers are taken largest first (ties: earlier `first`, then declaration order);
//! 3. for a buffer, the already placed buffers that conflict with it are collected and sorted
//!    by offset; walking them from offset 0 gives the free gaps between them (a gap starts at
//!    the highest end seen so far, since conflicting buffers may themselves overlap when they
//!    do not conflict with each other) and, above the last one, an unbounded top gap;
//! 4. best fit: the buffer goes into the smallest gap that holds it; if none does, at the start
//!    of the top gap. ([`Fit::First`] takes the lowest gap that holds it instead.)
//! 5. the arena's size is the highest end of its buffers; the plan's peak is the sum of the
//!    arena sizes (each arena is allocated once, at that size).
//!
//! This is the "greedy by size" offset assignment of TFLite's arena planner (Pisarchyk & Lee,
//! "Efficient memory management for deep neural net inference", 2020). It is O(n^2) in the
//! buffers of an arena (a few thousand for a 7B step: milliseconds). It is not optimal (the
//! problem is NP-hard), but it is never worse than no reuse, never below the largest number of
//! bytes live at one op (the lower bound every layout must meet), and meets that bound for
//! chains and other interval graphs whose buffers have equal sizes.
//!
//! With [`PlanOptions::reuse`] off every buffer of an arena conflicts with every other one: the
//! arena is the sum of its buffers (what allocating each buffer on its own would cost).
//!
//! [`MemoryPlan::check`] verifies a plan's invariants (alignment, bounds, no overlap between
//! conflicting buffers); [`Arena`] allocates a plan's arenas on the host and hands out each
//! buffer's bytes at its planned offset.

use std::fmt;

use crate::{Error, Result};

/// Offsets and sizes within an arena are multiples of this many bytes (what cuBLASLt, vector
/// loads and `cuMemAlloc`'s base alignment all satisfy).
pub const ALIGN: usize = 256;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    U32,
    U8,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::U32 => "u32",
            Dtype::U8 => "u8",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The arenas a step's memory is split into. Buffers share memory only within an arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArenaKind {
    /// Model weights in the compute dtype (the flat parameter buffers, or their shards).
    Params,
    /// Parameter gradients (accumulated over the micro-batches of a step).
    Grads,
    /// AdamW moments and the f32 master weights.
    Optimizer,
    /// Everything a pass makes and drops: activations, their gradients, logits, batch inputs.
    Activations,
    /// Keys and values of the rollout.
    KvCache,
    /// Communication buffers (ZeRO gathers and gradient buckets) and small reductions.
    Scratch,
}

impl ArenaKind {
    pub const ALL: [ArenaKind; 6] = [
        ArenaKind::Params,
        ArenaKind::Grads,
        ArenaKind::Optimizer,
        ArenaKind::Activations,
        ArenaKind::KvCache,
        ArenaKind::Scratch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ArenaKind::Params => "params",
            ArenaKind::Grads => "grads",
            ArenaKind::Optimizer => "optimizer",
            ArenaKind::Activations => "activations",
            ArenaKind::KvCache => "kv_cache",
            ArenaKind::Scratch => "scratch",
        }
    }
}

impl fmt::Display for ArenaKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One buffer of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferDecl {
    pub name: String,
    pub dtype: Dtype,
    pub elements: usize,
    pub arena: ArenaKind,
    /// First op that touches the buffer.
    pub first: usize,
    /// Last op that touches the buffer (inclusive).
    pub last: usize,
}

impl BufferDecl {
    /// Bytes of its elements.
    pub fn bytes(&self) -> usize {
        self.elements * self.dtype.size()
    }

    /// Whether both are live at some op.
    pub fn overlaps_in_time(&self, other: &BufferDecl) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Index of a declared buffer, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub usize);

/// Where a buffer lives in its arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offset: usize,
    /// Bytes reserved: the buffer's bytes rounded up to the alignment.
    pub size: usize,
}

/// Placement strategy among the free gaps (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The smallest gap that holds the buffer.
    Best,
    /// The lowest gap that holds the buffer.
    First,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Let buffers whose lifetimes do not intersect share memory.
    pub reuse: bool,
    pub fit: Fit,
    /// Offset alignment in bytes (a power of two).
    pub align: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            reuse: true,
            fit: Fit::Best,
            align: ALIGN,
        }
    }
}

/// Collects buffer declarations; [`Planner::plan`] lays them out.
#[derive(Clone, Debug, Default)]
pub struct Planner {
    decls: Vec<BufferDecl>,
}

fn invalid(msg: String) -> Error {
    Error::invalid("memory plan", msg)
}

fn align_up(x: usize, align: usize) -> Option<usize> {
    x.checked_add(align - 1).map(|y| y & !(align - 1))
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a buffer of `elements` x `dtype` in `arena`, live from op `first` to op `last`
    /// (inclusive).
    pub fn declare(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        elements: usize,
        arena: ArenaKind,
        first: usize,
        last: usize,
    ) -> Result<BufferId> {
        let name = name.into();
        if first > last {
            return Err(invalid(format!(
                "buffer `{name}`: lifetime [{first}, {last}] ends before it starts"
            )));
        }
        if elements.checked_mul(dtype.size()).is_none() {
            return Err(invalid(format!(
                "buffer `{name}`: {elements} {dtype} elements overflow the address space"
            )));
        }
        self.decls.push(BufferDecl {
            name,
            dtype,
            elements,
            arena,
            first,
            last,
        });
        Ok(BufferId(self.decls.len() - 1))
    }

    pub fn decls(&self) -> &[BufferDecl] {
        &self.decls
    }

    pub fn decl(&self, id: BufferId) -> &BufferDecl {
        &self.decls[id.0]
    }

    pub fn len(&self) -> usize {
        self.decls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decls.is_empty()
    }

    /// Lays the buffers out with the default options (reuse, best fit, 256-byte alignment).
    pub fn plan(&self) -> Result<MemoryPlan> {
        self.plan_with(&PlanOptions::default())
    }

    pub fn plan_with(&self, opts: &PlanOptions) -> Result<MemoryPlan> {
        let align = opts.align;
        if align == 0 || !align.is_power_of_two() {
            return Err(invalid(format!("alignment {align} is not a power of two")));
        }
        let mut placements = Vec::with_capacity(self.decls.len());
        for d in &self.decls {
            let size = align_up(d.bytes(), align)
                .ok_or_else(|| invalid(format!("buffer `{}` is too large", d.name)))?;
            placements.push(Placement { offset: 0, size });
        }
        let mut arenas = vec![];
        for kind in ArenaKind::ALL {
            let mut ids: Vec<usize> = (0..self.decls.len())
                .filter(|&i| self.decls[i].arena == kind)
                .collect();
            if ids.is_empty() {
                continue;
            }
            // largest first; ties: earlier first use, then declaration order
            ids.sort_by(|&a, &b| {
                placements[b]
                    .size
                    .cmp(&placements[a].size)
                    .then(self.decls[a].first.cmp(&self.decls[b].first))
                    .then(a.cmp(&b))
            });
            let mut placed: Vec<usize> = Vec::with_capacity(ids.len());
            let mut size = 0usize;
            let mut conflicts: Vec<(usize, usize)> = vec![];
            for &i in &ids {
                let s = placements[i].size;
                if s == 0 {
                    continue;
                }
                let d = &self.decls[i];
                conflicts.clear();
                conflicts.extend(
                    placed
                        .iter()
                        .filter(|&&j| !opts.reuse || d.overlaps_in_time(&self.decls[j]))
                        .map(|&j| {
                            (
                                placements[j].offset,
                                placements[j].offset + placements[j].size,
                            )
                        }),
                );
                conflicts.sort_unstable();
                let offset = choose_offset(&conflicts, s, opts.fit);
                let end = offset
                    .checked_add(s)
                    .ok_or_else(|| invalid(format!("arena {kind} overflows")))?;
                placements[i].offset = offset;
                size = size.max(end);
                placed.push(i);
            }
            let decls: Vec<&BufferDecl> = ids.iter().map(|&i| &self.decls[i]).collect();
            let sizes: Vec<usize> = ids.iter().map(|&i| placements[i].size).collect();
            arenas.push(ArenaPlan {
                kind,
                size,
                buffers: ids.len(),
                declared: sizes.iter().sum(),
                max_live: max_live(&decls, &sizes).0,
            });
        }
        let peak = arenas.iter().map(|a| a.size).sum();
        Ok(MemoryPlan {
            decls: self.decls.clone(),
            placements,
            arenas,
            peak,
            align,
        })
    }
}

/// The offset for a buffer of `size` bytes given the (offset, end) intervals it must avoid,
/// sorted by offset. All values are multiples of the alignment.
fn choose_offset(conflicts: &[(usize, usize)], size: usize, fit: Fit) -> usize {
    let mut cursor = 0usize;
    let mut best: Option<(usize, usize)> = None; // (gap size, offset)
    for &(off, end) in conflicts {
        if off > cursor {
            let gap = off - cursor;
            if gap >= size {
                match fit {
                    Fit::First => return cursor,
                    Fit::Best => {
                        if best.is_none_or(|(g, _)| gap < g) {
                            best = Some((gap, cursor));
                        }
                    }
                }
            }
        }
        cursor = cursor.max(end);
    }
    best.map_or(cursor, |(_, off)| off)
}

/// The largest sum of `sizes` over buffers live at one op, and the first op where it occurs.
fn max_live(decls: &[&BufferDecl], sizes: &[usize]) -> (usize, usize) {
    // +size at `first`, -size after `last`; at equal times the releases come first
    let mut events: Vec<(usize, bool, usize)> = Vec::with_capacity(decls.len() * 2);
    for (d, &s) in decls.iter().zip(sizes) {
        events.push((d.first, true, s));
        events.push((d.last + 1, false, s));
    }
    events.sort_unstable_by_key(|&(t, add, _)| (t, add));
    let (mut live, mut best, mut at) = (0usize, 0usize, 0usize);
    for (t, add, s) in events {
        if add {
            live += s;
            if live > best {
                best = live;
                at = t;
            }
        } else {
            live -= s;
        }
    }
    (best, at)
}

/// One arena of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaPlan {
    pub kind: ArenaKind,
    /// Bytes allocated for it.
    pub size: usize,
    /// Buffers in it.
    pub buffers: usize,
    /// Sum of its buffers' (aligned) sizes: its size without reuse.
    pub declared: usize,
    /// Largest sum of the sizes of its buffers live at one op: no layout is smaller.
    pub max_live: usize,
}

/// The planned layout: each buffer's arena offset, each arena's size, the peak.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub decls: Vec<BufferDecl>,
    /// By [`BufferId`].
    pub placements: Vec<Placement>,
    /// The arenas that hold buffers, in [`ArenaKind::ALL`] order.
    pub arenas: Vec<ArenaPlan>,
    /// Sum of the arena sizes: the bytes the step allocates.
    pub peak: usize,
    pub align: usize,
}

impl MemoryPlan {
    pub fn placement(&self, id: BufferId) -> Placement {
        self.placements[id.0]
    }

    pub fn arena(&self, kind: ArenaKind) -> Option<&ArenaPlan> {
        self.arenas.iter().find(|a| a.kind == kind)
    }

    /// Bytes of an arena (0 when it holds no buffer).
    pub fn arena_size(&self, kind: ArenaKind) -> usize {
        self.arena(kind).map_or(0, |a| a.size)
    }

    /// Sum of all buffers' (aligned) sizes: the peak without any reuse.
    pub fn declared(&self) -> usize {
        self.placements.iter().map(|p| p.size).sum()
    }

    /// The largest sum of (aligned) sizes of the buffers live at one op, over all arenas, and
    /// the first op where it is reached: a lower bound of the peak.
    pub fn max_live(&self) -> (usize, usize) {
        let decls: Vec<&BufferDecl> = self.decls.iter().collect();
        let sizes: Vec<usize> = self.placements.iter().map(|p| p.size).collect();
        max_live(&decls, &sizes)
    }

    /// Number of ops the buffers' lifetimes span (the highest `last` + 1).
    pub fn ops(&self) -> usize {
        self.decls.iter().map(|d| d.last + 1).max().unwrap_or(0)
    }

    /// The buffers live at op `op`.
    pub fn live_at(&self, op: usize) -> Vec<BufferId> {
        (0..self.decls.len())
            .filter(|&i| self.decls[i].first <= op && op <= self.decls[i].last)
            .map(BufferId)
            .collect()
    }

    /// Checks the invariants: every offset aligned, every buffer inside its arena, and no two
    /// buffers of one arena with intersecting lifetimes sharing a byte.
    pub fn check(&self) -> Result<()> {
        for (i, (d, p)) in self.decls.iter().zip(&self.placements).enumerate() {
            if p.offset % self.align != 0 || p.size % self.align != 0 {
                return Err(invalid(format!(
                    "buffer {i} `{}` at offset {} size {} is not {}-byte aligned",
                    d.name, p.offset, p.size, self.align
                )));
            }
            if p.size < d.bytes() {
                return Err(invalid(format!(
                    "buffer {i} `{}` got {} bytes for {}",
                    d.name,
                    p.size,
                    d.bytes()
                )));
            }
            if p.offset + p.size > self.arena_size(d.arena) {
                return Err(invalid(format!(
                    "buffer {i} `{}` [{}, {}) is outside arena {} of {} bytes",
                    d.name,
                    p.offset,
                    p.offset + p.size,
                    d.arena,
                    self.arena_size(d.arena)
                )));
            }
        }
        for kind in ArenaKind::ALL {
            let mut ids: Vec<usize> = (0..self.decls.len())
                .filter(|&i| self.decls[i].arena == kind && self.placements[i].size > 0)
                .collect();
            ids.sort_by_key(|&i| self.placements[i].offset);
            // sweep by offset: compare each buffer with the earlier ones still reaching it
            let mut open: Vec<usize> = vec![];
            for &i in &ids {
                let off = self.placements[i].offset;
                open.retain(|&j| self.placements[j].offset + self.placements[j].size > off);
                if let Some(&j) = open
                    .iter()
                    .find(|&&j| self.decls[i].overlaps_in_time(&self.decls[j]))
                {
                    return Err(invalid(format!(
                        "buffers `{}` and `{}` are live together and overlap in arena {kind}",
                        self.decls[j].name, self.decls[i].name
                    )));
                }
                open.push(i);
            }
        }
        let sum: usize = self.arenas.iter().map(|a| a.size).sum();
        if sum != self.peak {
            return Err(invalid(format!(
                "peak {} is not the sum of the arenas {sum}",
                self.peak
            )));
        }
        Ok(())
    }
}

/// A plan's arenas allocated on the host: one `Vec<u8>` of exactly the planned size per arena,
/// and each buffer's bytes at its planned offset.
///
/// (The base of a `Vec<u8>` is not 256-byte aligned; on a device the arena base comes from the
/// device allocator, which is.)
pub struct Arena {
    mem: Vec<(ArenaKind, Vec<u8>)>,
    /// Per buffer: (index into `mem`, offset, bytes).
    slots: Vec<(usize, usize, usize)>,
}

impl Arena {
    /// Allocates every arena of `plan` (zeroed). An allocation failure is an error, not an
    /// abort.
    pub fn new(plan: &MemoryPlan) -> Result<Self> {
        let mut mem = Vec::with_capacity(plan.arenas.len());
        for a in &plan.arenas {
            let mut v: Vec<u8> = Vec::new();
            v.try_reserve_exact(a.size).map_err(|e| {
                invalid(format!(
                    "cannot allocate arena {} of {} bytes: {e}",
                    a.kind, a.size
                ))
            })?;
            v.resize(a.size, 0);
            mem.push((a.kind, v));
        }
        let mut slots = Vec::with_capacity(plan.decls.len());
        for (d, p) in plan.decls.iter().zip(&plan.placements) {
            let k = mem
                .iter()
                .position(|(kind, _)| *kind == d.arena)
                .ok_or_else(|| invalid(format!("no arena {} for `{}`", d.arena, d.name)))?;
            slots.push((k, p.offset, d.bytes()));
        }
        Ok(Arena { mem, slots })
    }

    /// Bytes allocated, over all arenas.
    pub fn allocated_bytes(&self) -> usize {
        self.mem.iter().map(|(_, v)| v.len()).sum()
    }

    /// The arenas and their sizes.
    pub fn sizes(&self) -> Vec<(ArenaKind, usize)> {
        self.mem.iter().map(|(k, v)| (*k, v.len())).collect()
    }

    /// The bytes of buffer `id`.
    pub fn slice(&self, id: BufferId) -> &[u8] {
        let (k, off, len) = self.slots[id.0];
        &self.mem[k].1[off..off + len]
    }

    pub fn slice_mut(&mut self, id: BufferId) -> &mut [u8] {
        let (k, off, len) = self.slots[id.0];
        &mut self.mem[k].1[off..off + len]
    }

    /// Mutable bytes of several buffers at once (e.g. those live at one op), in the order of
    /// `ids`. An error if two of them share a byte (or an id repeats).
    pub fn slices_mut(&mut self, ids: &[BufferId]) -> Result<Vec<&mut [u8]>> {
        let mut out: Vec<Option<&mut [u8]>> = (0..ids.len()).map(|_| None).collect();
        for (k, (kind, mem)) in self.mem.iter_mut().enumerate() {
            let mut want: Vec<(usize, usize, usize)> = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| self.slots[id.0].0 == k)
                .map(|(pos, id)| (self.slots[id.0].1, self.slots[id.0].2, pos))
                .collect();
            want.sort_unstable();
            let mut rest: &mut [u8] = mem.as_mut_slice();
            let mut base = 0usize;
            for (off, len, pos) in want {
                if off < base {
                    return Err(invalid(format!(
                        "buffer {} overlaps another requested buffer in arena {kind}",
                        ids[pos].0
                    )));
                }
                let tail = std::mem::take(&mut rest);
                let (_, from_off) = tail.split_at_mut(off - base);
                let (mine, after) = from_off.split_at_mut(len);
                out[pos] = Some(mine);
                rest = after;
                base = off + len;
            }
        }
        Ok(out.into_iter().map(|s| s.unwrap_or_default()).collect())
    }
}
