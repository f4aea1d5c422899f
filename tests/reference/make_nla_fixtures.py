#!/usr/bin/env python3
"""Write the PyTorch reference fixtures of the NLA ops (tests/ops_nla.rs).

Run from the repository root, after make_fixtures.py (which recreates the fixtures folder):

    python tests/reference/make_nla_fixtures.py

It writes, and only touches:

    tests/reference/fixtures/nla.safetensors         per-op inputs, outputs and gradients
    tests/reference/fixtures/models/inject_llama/    tiny Llama + injection at layer 0

Conventions are those of make_fixtures.py (whose helpers this script imports): inputs drawn in
float32, every reference output and gradient computed in float64 and stored as float32, one
torch.Generator per named draw, a deterministic safetensors writer. Keys are
`<op>.<case>.<tensor>`; inputs shared by the cases of an op live under `<op>.inputs.*`.

Semantics follow reference/NLA_SEMANTICS.md ([V] the verl add-on and verl's core algorithms,
[O] the official NLA code); each function below says which.
"""

import copy
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (shared helpers: seeds, writer, float64 Llama)
from make_fixtures import F32, F64, I64, f32, gen, leaf64, randn, scalar  # noqa: E402

SCRIPT = "tests/reference/make_nla_fixtures.py"
FIXTURES = mf.FIXTURES
MAX_BYTES = 300_000


def meta(**extra):
    return mf.base_metadata(script=SCRIPT, **extra)


# --------------------------------------------------------------------------------------------
# inject: rows of h at marker sites replaced by (or added to) the vectors ([O] replace, [V] add)
# --------------------------------------------------------------------------------------------

def op_inject():
    g = gen("nla.inject")
    N, C = 12, 7  # B=3, T=4 flattened to rows
    sites = torch.tensor([1, 5, 6, 11], dtype=I64)  # row-major; the k-th site gets vector k
    h = randn(g, N, C)
    vecs = randn(g, len(sites), C, scale=2.0)
    out = {"inject.inputs.h": h, "inject.inputs.sites": sites, "inject.inputs.vecs": vecs}
    for mode, accumulate in (("replace", False), ("add", True)):
        h64, v64 = leaf64(h), leaf64(vecs)
        y = h64.index_put((sites,), v64, accumulate=accumulate)
        dout = randn(gen(f"nla.inject.{mode}.dout"), N, C)
        y.backward(dout.to(F64))
        out.update({f"inject.{mode}.out": f32(y), f"inject.{mode}.dout": dout,
                    f"inject.{mode}.dh": f32(h64.grad), f"inject.{mode}.dvecs": f32(v64.grad)})
    assert torch.all(out["inject.replace.dh"][sites] == 0)
    return out


# --------------------------------------------------------------------------------------------
# norm_scale: n_s(x) = x * s / max(||x||, 1e-12) over rows ([O] injection_scale and mse_scale)
# --------------------------------------------------------------------------------------------

def n_s(x, s):
    return x * s / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def op_norm_scale():
    out = {}
    g = gen("nla.norm_scale.rows")
    x = mf.randn_rows_varied(g, 6, 9, lo=1e-3, hi=1e3)  # norms from ~1e-3 to ~3e3
    cases = {"rows": (x, 150.0)}
    g = gen("nla.norm_scale.clamp")
    xc = randn(g, 4, 5)
    xc[0] *= 1e-14  # norm ~2e-14: below the clamp, y = x * s / 1e-12
    xc[1] = 0.0     # zero row: y = 0, dx = dy * s / 1e-12
    xc[2] *= 1.5e-12  # norm a few 1e-12: just above the clamp
    cases["clamp"] = (xc, 2.0)
    for case, (x, s) in cases.items():
        x64 = leaf64(x)
        y = n_s(x64, s)
        dout = randn(gen(f"nla.norm_scale.{case}.dout"), *x.shape)
        y.backward(dout.to(F64))
        out.update({f"norm_scale.{case}.x": x, f"norm_scale.{case}.s": scalar(s),
                    f"norm_scale.{case}.out": f32(y), f"norm_scale.{case}.dout": dout,
                    f"norm_scale.{case}.dx": f32(x64.grad)})
    norms = cases["clamp"][0].double().norm(dim=-1)
    assert norms[0] < 1e-12 and norms[1] == 0 and 1e-12 < norms[2] < 1e-11, norms
    return out


# --------------------------------------------------------------------------------------------
# pool: critic pooling with a right-padded mask ([V] critic: last, mean, max; legacy: weighted)
# --------------------------------------------------------------------------------------------

def op_pool():
    g = gen("nla.pool")
    B, T, C, TMAX = 4, 6, 5, 9
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=F32)
    h = randn(g, B, T, C)
    h[mask == 0] = 50.0  # padding holds large values: a pool that reads it is visibly wrong
    h[0, 1, 2] = h[0, 4, 2] = 3.5  # a tie for the max: the first position gets the gradient
    w = randn(g, TMAX, scale=0.5)
    dout = randn(g, B, C)
    out = {"pool.inputs.h": h, "pool.inputs.mask": mask, "pool.inputs.w": w,
           "pool.inputs.dout": dout}
    m64 = mask.double()
    for mode in ("last", "mean", "max", "weighted"):
        h64, w64 = leaf64(h), leaf64(w)
        if mode == "last":
            idx = (m64.sum(1) - 1).long()  # index sum(m) - 1 ([V]); right padding assumed
            y = h64[torch.arange(B), idx]
        elif mode == "mean":
            y = (h64 * m64[..., None]).sum(1) / m64.sum(1, keepdim=True)
        elif mode == "max":
            hm = h64.masked_fill(m64[..., None] == 0, float("-inf"))
            idx = hm.argmax(dim=1)  # the first maximal index
            assert torch.equal(idx, hm.max(dim=1).indices) and idx[0, 2] == 1
            y = h64.gather(1, idx[:, None, :]).squeeze(1)
        else:
            p = torch.softmax(w64[:T], dim=0)
            a = p[None, :] * m64
            a = a / (a.sum(1, keepdim=True) + 1e-8)
            y = (a[..., None] * h64).sum(1)
        y.backward(dout.to(F64))
        out.update({f"pool.{mode}.out": f32(y), f"pool.{mode}.dh": f32(h64.grad)})
        if mode == "weighted":
            assert torch.all(w64.grad[T:] == 0)
            out["pool.weighted.dw"] = f32(w64.grad)
    return out


# --------------------------------------------------------------------------------------------
# policy_loss: verl's clipped surrogate (+ dual clip), KL loss k1/k2/k3, loss aggregation
# --------------------------------------------------------------------------------------------

# The slots of the stats tensor, in the order of the engine's PolicyStat.
STATS = ["loss", "pg_loss", "kl_loss", "clip_frac", "clip_frac_lower", "approx_kl", "ratio_mean"]

POLICY_CASES = {
    # case: (agg, dual_clip, kl_type, kl_coef)
    "token_mean": ("token-mean", None, None, 0.0),
    "seq_mean_token_mean": ("seq-mean-token-mean", None, None, 0.0),
    "seq_mean_token_sum_norm": ("seq-mean-token-sum-norm", None, None, 0.0),
    "dual_clip": ("token-mean", 3.0, None, 0.0),
    "kl_k1": ("token-mean", None, "k1", 0.1),
    "kl_k2": ("token-mean", None, "k2", 0.1),
    "kl_k3": ("token-mean", None, "k3", 0.1),
}
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # asymmetric (clip-higher) so that swapping them shows


def aggregate(x, m, agg):
    S, T = m.shape
    if agg == "token-mean":
        return (x * m).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        cnt = m.sum(-1)
        live = cnt > 0  # sequences without a token are left out (current verl)
        return ((x * m).sum(-1)[live] / cnt[live]).mean()
    assert agg == "seq-mean-token-sum-norm"
    return (x * m).sum() / (S * T)  # Dr.GRPO: mean over sequences of token-sum / T


def kl_term(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    x = (ref - logp).clamp(-20.0, 20.0)
    return (x.exp() - x - 1.0).clamp(-10.0, 10.0)  # verl low_var_kl


def op_policy_loss():
    g = gen("nla.policy_loss")
    S, T = 4, 6
    lengths = [6, 4, 0, 5]  # one sequence has no response token
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=F32)
    adv = torch.tensor([0.9, -1.3, 0.5, -0.7], dtype=F32)[:, None].expand(S, T).contiguous()
    old = (-(randn(g, S, T).abs() * 1.5) - 0.05).to(F32)
    delta = randn(g, S, T, scale=0.4)
    delta[0, 1] = 0.6   # A > 0, ratio 1.82 > 1 + high: clipped above
    delta[1, 2] = 1.5   # A < 0, ratio 4.48 > 3: dual clip
    delta[3, 0] = -0.7  # A < 0, ratio 0.50 < 1 - low: clipped below
    logp = (old + delta).to(F32)
    ref = (logp + randn(g, S, T, scale=0.3)).to(F32)
    ref[0, 3] = logp[0, 3] + 3.0  # k3 = e^3 - 4 > 10: clamped
    ref[3, 2] = logp[3, 2] - 1.2
    out = {"policy_loss.inputs.logp": logp, "policy_loss.inputs.old_logp": old,
           "policy_loss.inputs.adv": adv, "policy_loss.inputs.mask": mask,
           "policy_loss.inputs.ref_logp": ref, "policy_loss.inputs.clip_low": scalar(CLIP_LOW),
           "policy_loss.inputs.clip_high": scalar(CLIP_HIGH)}
    m, A = mask.double(), adv.double()
    lo, hi = float(scalar(CLIP_LOW)), float(scalar(CLIP_HIGH))  # the f32 values the engine sees
    for case, (agg, dual, kind, coef) in POLICY_CASES.items():
        lp = leaf64(logp)
        lr = (lp - old.double()).clamp(-20.0, 20.0)
        ratio = lr.exp()
        pg1 = -A * ratio
        pg2 = -A * ratio.clamp(1 - lo, 1 + hi)
        pg = torch.maximum(pg1, pg2)
        clipped = (pg2 > pg1).double()
        dual_taken = torch.zeros_like(pg)
        if dual is not None:
            pg3 = -A * dual
            dual_taken = ((A < 0) & (pg > pg3)).double()
            pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
        kl = kl_term(lp, ref.double(), kind) if kind else torch.zeros_like(pg)
        pg_loss, kl_loss = aggregate(pg, m, agg), aggregate(kl, m, agg)
        loss = pg_loss + coef * kl_loss
        loss.backward()
        tm = lambda x: float((x * m).sum() / m.sum())  # noqa: E731  (token mean over mask)
        stats = [float(loss.detach()), float(pg_loss.detach()), float(kl_loss.detach()),
                 tm(clipped), tm(dual_taken), tm(-lr.detach()), tm(ratio.detach())]
        assert len(stats) == len(STATS)
        out[f"policy_loss.{case}.stats"] = torch.tensor(stats, dtype=F64).to(F32)
        out[f"policy_loss.{case}.dlogp"] = f32(lp.grad)
        # every case exercises what it is named for
        above = ((A > 0) & (ratio > 1 + hi) & (m > 0)).any()
        below = ((A < 0) & (ratio < 1 - lo) & (m > 0)).any()
        assert above and below and tm(clipped) > 0, case
        if dual is not None:
            assert tm(dual_taken) > 0, case
        if kind == "k3":
            assert ((kl_term(logp.double(), ref.double(), "k3") == 10.0) & (m > 0)).any()
    return out


# --------------------------------------------------------------------------------------------
# inject_llama: replace-injection at layer 0 (a forward hook on the embedding, as [V] and [O])
# --------------------------------------------------------------------------------------------

LLAMA = dict(
    config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64),
    batch=3, seq=8)
MARKER = 5
MARKER_POSITIONS = [(0, 2), (1, 1), (1, 5), (2, 6)]  # row-major; never first or last


def injected_logits(model, ids, sites, vecs):
    """Logits with h[sites] = vecs on the embedding output (flat rows b*T + t)."""
    def hook(module, inputs, output):
        flat = output.reshape(-1, output.shape[-1])
        return flat.index_put((sites,), vecs.to(output.dtype)).reshape(output.shape)

    handle = model.model.embed_tokens.register_forward_hook(hook)
    try:
        return model(ids).logits
    finally:
        handle.remove()


def make_inject_llama():
    name = "inject_llama"
    folder = FIXTURES / "models" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = mf.build_model(name, LLAMA)
    B, T, V = LLAMA["batch"], LLAMA["seq"], LLAMA["config"]["vocab_size"]
    C = LLAMA["config"]["hidden_size"]
    ids = torch.randint(MARKER + 1, V, (B, T), generator=gen(name + ".ids"), dtype=I64)
    for b, t in MARKER_POSITIONS:
        ids[b, t] = MARKER
    sites = torch.tensor([b * T + t for b, t in MARKER_POSITIONS], dtype=I64)
    assert torch.equal(sites, (ids.reshape(-1) == MARKER).nonzero().squeeze(1))
    vecs = randn(gen(name + ".vecs"), len(sites), C, scale=0.5)

    with torch.no_grad():
        logits32 = injected_logits(model, ids, sites, vecs)
        plain32 = model(ids).logits
    model64 = copy.deepcopy(model).to(F64)
    v64 = leaf64(vecs)
    with mf.llama_exact_float64():
        logits64 = injected_logits(model64, ids, sites, v64)
    loss64 = mf.causal_lm_loss(logits64, ids)
    loss64.backward()
    dwte = model64.model.embed_tokens.weight.grad
    # The marker appears only at the sites, whose embedding rows are overwritten: its row of the
    # embedding gradient is exactly zero (replace passes no gradient to h[site]).
    assert torch.all(dwte[MARKER] == 0) and dwte.abs().sum() > 0
    diff = float((logits32.double() - logits64.detach()).abs().max())
    moved = float((logits32 - plain32).abs().max())
    assert moved > 1e-3, "the injection must change the logits"
    print(f"{name}: max |logits f32 - f64| = {diff:.3e}, injection moves logits by {moved:.3f}")

    model.save_pretrained(str(folder))
    mf.check_config_json(folder, LLAMA)
    mf.check_reload(folder, ids, plain32)
    tensors = {"ids": ids, "sites": sites, "marker_id": torch.tensor(MARKER, dtype=I64),
               "vecs": vecs, "logits": f32(logits64), "loss": f32(loss64),
               "grad.vecs": f32(v64.grad), "grad.model.embed_tokens.weight": f32(dwte)}
    mf.write_safetensors(folder / "expected.safetensors", tensors, meta(
        description="replace-injection of vecs at the embedding output rows `sites` (b*T+t): "
                    "float64 logits, causal-LM loss (labels = ids) and its gradients",
        logits_f32_vs_f64_max_abs_diff=f"{diff:.6e}"))
    return folder


# --------------------------------------------------------------------------------------------

def main():
    print(f"torch {torch.__version__}, seed {mf.SEED}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for fn in (op_inject, op_norm_scale, op_pool, op_policy_loss):
        part = fn()
        assert not set(part) & set(tensors)
        tensors.update(part)
    for key, t in tensors.items():
        assert t.dtype in (F32, I64) and torch.isfinite(t.double()).all(), key
    path = FIXTURES / "nla.safetensors"
    mf.write_safetensors(path, tensors, meta(
        description="NLA op inputs, outputs and float64 reference gradients (stored as f32)"))
    print(f"nla.safetensors: {len(tensors)} tensors")
    folder = make_inject_llama()
    total = path.stat().st_size + sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"NLA fixture size: {total / 1e3:.1f} kB")
    assert total < MAX_BYTES, total


if __name__ == "__main__":
    sys.exit(main())
