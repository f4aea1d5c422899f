#!/usr/bin/env python3
"""Write the PyTorch / HF transformers reference fixtures for the Rust test suite.

Run from the repository root:

    python tests/reference/make_fixtures.py

Everything goes under tests/reference/fixtures/ (these outputs are replaced; the other fixture
scripts' files there are left alone):

    ops.safetensors                per-op inputs, outputs and gradients
    models/gqa_untied/             tiny Llama, GQA, untied embeddings (+ tokenizer)
    models/gqa_untied_sharded/     the same weights, saved as 3 shards + index
    models/mqa_tied/               tiny Llama, MQA, tied embeddings, head_dim*heads != hidden

Conventions
-----------
* Inputs are drawn in float32 (that is what the Rust engine sees), converted to float64, and every
  reference output / gradient is computed in float64, then stored as float32. The fixtures hold
  the exact answer rounded once to f32, not the answer of some other f32 implementation.
* Every random draw uses its own torch.Generator seeded from SEED and a fixed name, so the
  fixtures are reproducible and changing one op does not change the others.
* Fixture safetensors files are written by a small writer below (sorted keys, sorted metadata)
  so that regenerating gives byte-identical files. Each records in its metadata: seed,
  torch_version, transformers_version, script.
"""

import contextlib
import copy
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

SEED = 20240611
SCRIPT = "tests/reference/make_fixtures.py"
HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

F32, F64, I64 = torch.float32, torch.float64, torch.int64

# One thread, deterministic kernels: float64 reductions then give the same bits on every run.
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def base_metadata(**extra):
    meta = {
        "seed": str(SEED),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "script": SCRIPT,
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def gen(name):
    """A generator seeded from SEED and a name (crc32 is stable across runs and platforms)."""
    return torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))


def randn(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F32) * scale).to(F32)


def randn_rows_varied(g, rows, cols, lo=0.1, hi=10.0):
    """Normal draws whose rows have log-uniform scales in [lo, hi]: exercises varied magnitudes."""
    x = torch.randn(rows, cols, generator=g, dtype=F32)
    u = torch.rand(rows, 1, generator=g, dtype=F32)
    scales = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return (x * scales).to(F32)


def f32(t):
    """Round a (float64) result once to float32 for storage."""
    return t.detach().to(F32).contiguous()


def leaf64(t):
    """float32 input -> float64 leaf that records gradients."""
    return t.detach().to(F64).requires_grad_(True)


_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path, tensors, metadata):
    """Write a safetensors file with a deterministic layout.

    safetensors.torch.save_file writes metadata in hash-map order, so its bytes change from run
    to run; this writer sorts metadata and tensor names (the format itself is unchanged: u64 LE
    header length, JSON header padded with spaces to 8 bytes, raw little-endian data).
    """
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not stored in fixtures")
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)
    # Read it back with the safetensors library: same names, dtypes, values and metadata.
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for name in f.keys():
            back = f.get_tensor(name)
            assert back.dtype == tensors[name].dtype and torch.equal(back, tensors[name].cpu()), name


def backward(out, g):
    """Draw a random upstream gradient dout for `out` and backpropagate it."""
    dout = randn(g, *out.shape)
    out.backward(dout.to(F64))
    return dout


def scalar(v):
    return torch.tensor(v, dtype=F32)


# --------------------------------------------------------------------------------------------
# Per-op fixtures (ops.safetensors)
# --------------------------------------------------------------------------------------------

def op_embedding():
    g = gen("embedding")
    V, C, N = 23, 13, 31
    wte = randn(g, V, C)
    # N > V guarantees repeated ids (their gradient rows accumulate); some ids may be unused
    # (zero gradient rows). Force a few explicit repeats as well.
    ids = torch.randint(0, V, (N,), generator=g, dtype=I64)
    ids[5] = ids[0]
    ids[17] = ids[0]
    ids[N - 1] = V - 1  # the last row of the table
    w = leaf64(wte)
    out = w[ids]
    dout = backward(out, g)
    return {"embedding.wte": wte, "embedding.ids": ids, "embedding.out": f32(out),
            "embedding.dout": dout, "embedding.dwte": f32(w.grad)}


def op_rmsnorm():
    g = gen("rmsnorm")
    N, C = 19, 37
    eps = scalar(1e-5)
    x = randn_rows_varied(g, N, C)
    x[3] *= 1e-3  # mean(x^2) of this row is comparable to eps: eps handling matters
    w = (1.0 + 0.1 * randn(g, C)).to(F32)
    x64, w64 = leaf64(x), leaf64(w)
    # HF LlamaRMSNorm: x * rsqrt(mean(x^2, -1) + eps) * w   (here entirely in float64)
    out = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + float(eps)) * w64
    dout = backward(out, g)
    return {"rmsnorm.x": x, "rmsnorm.w": w, "rmsnorm.eps": eps, "rmsnorm.out": f32(out),
            "rmsnorm.dout": dout, "rmsnorm.dx": f32(x64.grad), "rmsnorm.dw": f32(w64.grad)}


def hf_rope_angles(theta, head_size, T):
    """RoPE angles exactly as transformers computes them for LlamaRotaryEmbedding (float32).

    inv_freq comes from transformers' own compute_default_rope_parameters, i.e.
    1 / (theta ** (arange(0, HS, 2, float32) / HS)) in float32; the angles are
    float32(position) * inv_freq in float32, duplicated to HS columns (cat(freqs, freqs)).
    """
    cfg = LlamaConfig(hidden_size=head_size, num_attention_heads=1, head_dim=head_size,
                      rope_theta=theta)
    inv_freq, scaling = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    assert inv_freq.dtype == F32 and scaling == 1.0
    pos = torch.arange(T)[None, :]
    freqs = pos[..., None].float() * inv_freq.to(dtype=torch.float)  # [1, T, HS/2] float32
    return torch.cat((freqs, freqs), dim=-1)[0]  # [T, HS] float32


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def op_rope():
    g = gen("rope")
    B, T, H, HS = 2, 7, 3, 10  # HS/2 = 5 is odd
    theta = scalar(100000.0)
    x = randn(g, B, T, H, HS)
    # What this fixture tests: the angles are the float32 values transformers computes (see
    # hf_rope_angles); only then are cos/sin and the rotation evaluated in float64. So an
    # implementation that forms the angles the same way in f32 should match to f32 rounding of
    # the final result; angle rounding itself is not what is being measured.
    ang = hf_rope_angles(float(theta), HS, T).to(F64)  # [T, HS]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]  # broadcast over B, H
    x64 = leaf64(x)
    out = x64 * cos + rotate_half(x64) * sin  # HF "rotate_half" convention, layout [B,T,H,HS]
    dout = backward(out, g)
    # Cross-check against transformers' apply_rotary_pos_emb (float32, HF layout [B,H,T,HS]).
    cos32, sin32 = ang.to(F32).cos()[None], ang.to(F32).sin()[None]
    hf_q, _ = modeling_llama.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos32, sin32)
    assert torch.allclose(hf_q.transpose(1, 2).double(), out.detach(), atol=1e-5, rtol=1e-5)
    return {"rope.x": x, "rope.theta": theta, "rope.out": f32(out), "rope.dout": dout,
            "rope.dx": f32(x64.grad)}


def op_attention():
    g = gen("attention")
    B, T, NH, NKV, HS = 2, 9, 4, 2, 8
    q = randn(g, B, T, NH, HS, scale=1.5)  # larger scale: softmax far from uniform
    k = randn(g, B, T, NKV, HS, scale=1.5)
    v = randn(g, B, T, NKV, HS)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    rep = NH // NKV  # query head h uses KV head h // rep (HF repeat_kv)
    qh = q64.transpose(1, 2)                                # [B, NH, T, HS]
    kh = k64.transpose(1, 2).repeat_interleave(rep, dim=1)  # [B, NH, T, HS]
    vh = v64.transpose(1, 2).repeat_interleave(rep, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(HS)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                   # [B, NH, T]
    out = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)  # [B, T, NH, HS]
    dout = backward(out, g)
    # Cross-check against torch SDPA (causal, GQA) in float64.
    ref = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().transpose(1, 2),
                                         v.double().transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert torch.allclose(ref, out.detach(), atol=1e-12, rtol=1e-12)
    return {"attention.q": q, "attention.k": k, "attention.v": v, "attention.out": f32(out),
            "attention.lse": f32(lse), "attention.dout": dout, "attention.dq": f32(q64.grad),
            "attention.dk": f32(k64.grad), "attention.dv": f32(v64.grad)}


def op_swiglu():
    g = gen("swiglu")
    N, Fd = 17, 29
    gate = randn(g, N, Fd, scale=2.5)  # covers both tails of silu
    up = randn(g, N, Fd)
    g64, u64 = leaf64(gate), leaf64(up)
    out = F.silu(g64) * u64
    dout = backward(out, g)
    return {"swiglu.gate": gate, "swiglu.up": up, "swiglu.out": f32(out), "swiglu.dout": dout,
            "swiglu.dgate": f32(g64.grad), "swiglu.dup": f32(u64.grad)}


def op_matmul():
    g = gen("matmul")
    M, K, N = 13, 17, 11
    a = randn_rows_varied(g, M, K)
    b = randn(g, N, K)
    a64, b64 = leaf64(a), leaf64(b)
    out = a64 @ b64.T  # nn.Linear convention: b is [out_features, in_features]
    dout = backward(out, g)
    return {"matmul.a": a, "matmul.b": b, "matmul.out": f32(out), "matmul.dout": dout,
            "matmul.da": f32(a64.grad), "matmul.db": f32(b64.grad)}


def op_residual():
    g = gen("residual")
    n = 37
    a, b = randn(g, n, scale=3.0), randn(g, n)
    return {"residual.a": a, "residual.b": b, "residual.out": f32(a.double() + b.double())}


def op_cross_entropy():
    g = gen("cross_entropy")
    N, V = 21, 31
    logits = randn(g, N, V, scale=3.0)
    logits[7] += 100.0  # a row of large logits: a correct CE must subtract the row max
    targets = torch.randint(0, V, (N,), generator=g, dtype=I64)
    mask = torch.ones(N, dtype=F32)
    mask[[0, 4, 11, 12, 20]] = 0.0  # some masked positions, including the first and last
    x64 = leaf64(logits)
    ce = F.cross_entropy(x64, targets, reduction="none")
    m64 = mask.double()
    losses = m64 * ce
    loss = losses.sum() / m64.sum()
    loss.backward()
    return {"cross_entropy.logits": logits, "cross_entropy.targets": targets,
            "cross_entropy.mask": mask, "cross_entropy.losses": f32(losses),
            "cross_entropy.loss": f32(loss), "cross_entropy.dlogits": f32(x64.grad)}


def op_softmax():
    g = gen("softmax")
    N, V = 15, 27
    x = randn(g, N, V, scale=2.0)
    x[2] += 100.0  # exp would overflow f32 without subtracting the row max
    x64 = leaf64(x)
    out = torch.softmax(x64, dim=-1)
    dout = backward(out, g)
    return {"softmax.x": x, "softmax.out": f32(out), "softmax.dout": dout,
            "softmax.dx": f32(x64.grad)}


def op_adamw():
    """Three steps of torch.optim.AdamW (float64) from zero state.

    torch's AdamW step t: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """
    g = gen("adamw")
    n = 100
    hp = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    # The Rust engine holds hyper-parameters as f32: use the f32 values in the f64 reference.
    hp = {k: float(scalar(v)) for k, v in hp.items()}
    p0 = randn(g, n)
    grads = [randn(g, n, scale=s) for s in (1.0, 0.3, 3.0)]
    grads[0][:3] = torch.tensor([1e-6, -1e-6, 0.0])  # tiny/zero gradients: eps matters
    p = p0.double().clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], foreach=False)
    out = {"adamw.p0": p0}
    for i, gr in enumerate(grads, start=1):
        p.grad = gr.double().clone()
        opt.step()
        out[f"adamw.g{i}"] = gr
        out[f"adamw.p{i}"] = f32(p)
    out.update({f"adamw.{k}": scalar(v) for k, v in hp.items()})
    return out


def make_ops():
    tensors = {}
    for fn in (op_embedding, op_rmsnorm, op_rope, op_attention, op_swiglu, op_matmul,
               op_residual, op_cross_entropy, op_softmax, op_adamw):
        part = fn()
        assert not set(part) & set(tensors)
        tensors.update(part)
    for name, t in tensors.items():
        if t.dtype == F32 and t.numel() > 1 and name.split(".")[1] not in ("mask",):
            assert torch.isfinite(t).all() and t.abs().max() > 0, name
    write_safetensors(FIXTURES / "ops.safetensors", tensors, base_metadata(
        description="per-op inputs, outputs and float64 reference gradients (stored as f32)"))
    print(f"ops.safetensors: {len(tensors)} tensors")


# --------------------------------------------------------------------------------------------
# Whole-model fixtures
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def llama_exact_float64():
    """Make transformers' Llama compute everything in the dtype of its inputs.

    Even after model.double(), transformers computes a few things in float32: LlamaRMSNorm
    normalises in float32, the eager attention softmax runs in float32, and the rotary cos/sin
    are evaluated in float32. Inside this block those three are replaced by versions that keep
    the input dtype (the RoPE angles themselves stay float32, as in transformers, so angle
    rounding is the same as in the per-op rope fixture). For float32 inputs the replacements
    compute exactly what transformers computes; make_model() asserts that bit-for-bit.
    """
    rms, rot, attn = (modeling_llama.LlamaRMSNorm.forward,
                      modeling_llama.LlamaRotaryEmbedding.forward,
                      modeling_llama.eager_attention_forward)

    def rms_forward(self, h):
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.variance_epsilon))

    def rot_forward(self, x, position_ids):
        assert self.rope_type == "default"
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def attn_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    modeling_llama.LlamaRMSNorm.forward = rms_forward
    modeling_llama.LlamaRotaryEmbedding.forward = rot_forward
    modeling_llama.eager_attention_forward = attn_forward
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = rms
        modeling_llama.LlamaRotaryEmbedding.forward = rot
        modeling_llama.eager_attention_forward = attn


def causal_lm_loss(logits, ids):
    """HF causal-LM loss with labels = ids: position t predicts t+1, mean over B*(T-1)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


MODELS = {
    "gqa_untied": dict(
        config=dict(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64),
        batch=2, seq=12),
    "mqa_tied": dict(
        config=dict(vocab_size=80, hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                    rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    max_position_embeddings=64),
        batch=3, seq=10),
}


def build_model(name, spec):
    cfg = LlamaConfig(initializer_range=0.1, attn_implementation="eager", **spec["config"])
    torch.manual_seed(SEED + zlib.crc32(name.encode()))  # transformers' init uses the global RNG
    model = LlamaForCausalLM(cfg).to(F32).eval()
    g = gen(name + ".norms")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # input/post_attention layernorms and the final norm
                p.copy_(1.0 + 0.1 * randn(g, *p.shape))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def check_config_json(folder, spec):
    saved = json.loads((folder / "config.json").read_text())
    c = spec["config"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "tie_word_embeddings", "max_position_embeddings"):
        assert saved[key] == c[key], (folder, key, saved.get(key), c[key])
    # transformers 5 writes rope_theta inside rope_parameters (not at the top level).
    theta = saved.get("rope_theta", saved.get("rope_parameters", {}).get("rope_theta"))
    assert theta == c["rope_theta"], (folder, theta)
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32", saved


def weight_names(folder):
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    names = {}
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():
                assert f.get_tensor(k).dtype == F32, (fname, k)
                names[k] = fname
    return names, files


def check_reload(folder, ids, logits32):
    """transformers loads the folder back and gives the same float32 logits."""
    back = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                            dtype=F32).eval()
    with torch.no_grad():
        again = back(ids).logits
    assert torch.equal(again, logits32), (folder, (again - logits32).abs().max())


def make_model(name, spec):
    folder = FIXTURES / "models" / name
    folder.mkdir(parents=True)
    model = build_model(name, spec)
    V, B, T = spec["config"]["vocab_size"], spec["batch"], spec["seq"]
    ids = torch.randint(0, V, (B, T), generator=gen(name + ".ids"), dtype=I64)

    # float32 transformers as shipped (reference for tolerances, and for the reload check).
    with torch.no_grad():
        out32 = model(ids, labels=ids)
        logits32, loss32 = out32.logits, out32.loss
        with llama_exact_float64():  # the replacements are bit-identical in float32
            assert torch.equal(model(ids).logits, logits32)
    model.zero_grad()
    causal_lm_loss(model(ids).logits, ids).backward()
    grads32 = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    # float64 reference.
    model64 = copy.deepcopy(model).to(F64)
    with torch.no_grad():
        out_hf64 = model64(ids, labels=ids)  # transformers' own double path (some f32 inside)
    with llama_exact_float64():
        logits64 = model64(ids).logits
    # HF's loss function casts logits to float32 first; compute the same loss in float64.
    loss64 = causal_lm_loss(logits64, ids)
    assert abs(loss64.item() - out_hf64.loss.item()) < 1e-5, (loss64.item(), out_hf64.loss.item())
    loss64.backward()
    grads = {k: p.grad for k, p in model64.named_parameters()}
    if spec["config"]["tie_word_embeddings"]:
        assert "lm_head.weight" not in grads  # one shared parameter, gradient of both uses

    diff_logits = float((logits32.double() - logits64.detach()).abs().max())
    diff_hf64 = float((out_hf64.logits - logits64.detach()).abs().max())
    diff_loss = abs(loss32.item() - loss64.item())
    diff_grad = max(float((grads32[k].double() - g).abs().max() / g.abs().max())
                    for k, g in grads.items())
    print(f"{name}: max |logits f32 - f64| = {diff_logits:.3e}   |loss f32 - f64| = {diff_loss:.3e}"
          f"   max over params of max|grad f32 - f64| / max|grad f64| = {diff_grad:.3e}"
          f"   (transformers' own double path vs exact f64: {diff_hf64:.3e})")

    # Weights and config, written by transformers.
    model.save_pretrained(str(folder))
    check_config_json(folder, spec)
    names, files = weight_names(folder)
    assert files == ["model.safetensors"]
    assert set(names) == set(grads) | ({"lm_head.weight"} if "lm_head.weight" in grads else set())
    if spec["config"]["tie_word_embeddings"]:
        assert "lm_head.weight" not in names
    check_reload(folder, ids, logits32)

    (folder / "ids.json").write_text(json.dumps(ids.tolist()) + "\n")
    tensors = {"ids": ids, "logits": f32(logits64), "loss": f32(loss64)}
    tensors.update({f"grad.{k}": f32(g) for k, g in grads.items()})
    write_safetensors(folder / "expected.safetensors", tensors, base_metadata(
        description="float64 logits, causal-LM loss (labels = ids) and parameter gradients",
        logits_f32_vs_f64_max_abs_diff=f"{diff_logits:.6e}",
        loss_f32_vs_f64_abs_diff=f"{diff_loss:.6e}",
        grad_f32_vs_f64_max_rel_diff=f"{diff_grad:.6e}",
        hf_double_path_vs_exact_f64_logits_max_abs_diff=f"{diff_hf64:.6e}"))
    return model, ids, logits32


def make_sharded(model, ids, logits32, spec):
    folder = FIXTURES / "models" / "gqa_untied_sharded"
    # ~216 KB of float32 weights; 100 kB shards give 3 files. Shard contents follow
    # transformers' own splitting.
    model.save_pretrained(str(folder), max_shard_size="100kB")
    check_config_json(folder, spec)
    names, files = weight_names(folder)
    assert 2 <= len(files) <= 3, files
    assert set(names) == {k for k, _ in model.named_parameters()}
    check_reload(folder, ids, logits32)
    print(f"gqa_untied_sharded: {len(files)} shards")


# --------------------------------------------------------------------------------------------
# Tokenizer fixture (models/gqa_untied/tokenizer.json + tokenizer_cases.json)
# --------------------------------------------------------------------------------------------

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads the text and writes a short summary of what it saw.",
    "The cat sat on the mat, and the dog sat on the log.",
    "We train the reader and the writer together, one step at a time.",
    "Every sentence here is plain English with a few common words.",
    "She said: \"It is not the size of the model, it is the data.\"",
    "Numbers like 12, 345 and 2024 appear now and then.",
    "The café on the corner opens at 7 in the morning.",
    "Questions? Answers! Lists; pauses - and other marks.",
    "Jack quietly moved up front and seized the big ball of wax.",
]

TOKENIZER_CASES = [
    "The quick brown fox jumps over the lazy dog.",
    "the model writes a summary of the text",
    "We sat at the café, and the cat said: \"the data!\"",
    "  Two spaces, then 12345 and 2024.",
    "Every reader, every writer; one step - then another?",
]


def make_tokenizer():
    """A byte-level BPE (the Llama-3 / GPT-2 scheme) with a vocabulary of at most 96 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Special tokens at ids 0, 1, 2 match the model config's bos_token_id=1, eos_token_id=2.
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    # Like Llama tokenizers, a template adds <s> when special tokens are requested.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    assert tok.get_vocab_size() <= 96, tok.get_vocab_size()

    folder = FIXTURES / "models" / "gqa_untied"
    tok.save(str(folder / "tokenizer.json"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        with_special = tok.encode(text, add_special_tokens=True).ids
        assert ids and max(ids) < 96 and with_special == [1] + ids
        assert tok.decode(ids) == text, (tok.decode(ids), text)  # every byte is covered
        cases.append({"text": text, "ids": ids, "ids_with_special_tokens": with_special})
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]  # one case per line
    (folder / "tokenizer_cases.json").write_text("[\n" + ",\n".join(lines) + "\n]\n")
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(cases)} cases")


# --------------------------------------------------------------------------------------------

# What this script writes; the other fixture scripts (make_nla_fixtures.py,
# make_critic_fixtures.py) own the rest of fixtures/, which is left alone.
OUTPUTS = ["ops.safetensors", "models/gqa_untied", "models/gqa_untied_sharded", "models/mqa_tied"]


def main():
    for out in OUTPUTS:
        path = FIXTURES / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy "
          f"{np.__version__}, seed {SEED}")
    make_ops()
    model, ids, logits32 = make_model("gqa_untied", MODELS["gqa_untied"])
    make_sharded(model, ids, logits32, MODELS["gqa_untied"])
    make_model("mqa_tied", MODELS["mqa_tied"])
    make_tokenizer()
    total = sum(p.stat().st_size for out in OUTPUTS for p in [FIXTURES / out, *(FIXTURES / out).rglob("*")]
                if p.is_file())
    print(f"size of this script's fixtures: {total / 1e6:.3f} MB")
    assert total < 2.5e6


if __name__ == "__main__":
    sys.exit(main())
