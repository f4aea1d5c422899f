#!/usr/bin/env python3
"""Write the PyTorch reference fixtures of the NLA critic (tests/critic.rs).

Run from the repository root, after make_fixtures.py (which recreates the fixtures folder):

    python tests/reference/make_critic_fixtures.py

It writes, and only touches:

    tests/reference/fixtures/critic_llama/        a tiny 3-layer Llama saved by transformers
    tests/reference/fixtures/critic.safetensors   inputs, predictions, losses and gradients

Conventions are those of make_fixtures.py (whose helpers this script imports): inputs drawn in
float32, every reference output and gradient computed in float64 and stored as float32, one
torch.Generator per named draw, a deterministic safetensors writer.

The critic ([O], reference/NLA_SEMANTICS.md section 2): blocks 0..K of the Llama, prediction =
HF hidden_states[K+1] (the residual after block K, no final norm) pooled over the sequence, then
value_head = Linear(C, A, bias=False). Loss ([O], section 3): mse_b = mean_a (n_s(pred_b) -
n_s(target_b))^2 with n_s(x) = x s / max(||x||, 1e-12) (or raw vectors when s is None), loss =
sum of mse over valid samples / divisor (the global batch size).
"""

import copy
import math
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (shared helpers: seeds, writer, float64 Llama)
from make_fixtures import F32, F64, I64, f32, gen, randn, scalar  # noqa: E402

SCRIPT = "tests/reference/make_critic_fixtures.py"
FIXTURES = mf.FIXTURES
MAX_BYTES = 300_000

LLAMA = dict(
    config=dict(vocab_size=48, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64),
    batch=3, seq=8)
K = 1  # blocks 0..K kept
LENGTHS = [8, 5, 2]  # right padding
A = 24
TMAX = 10  # weighted pooling: w [TMAX], T <= TMAX

# name -> (pooling, head ("random" [A,C] or "identity" [C,C]), mse_scale, valid, divisor)
CASES = {
    "last_random_scaled": ("last", "random", math.sqrt(A), [1, 1, 1], 3),
    "mean_identity_raw": ("mean", "identity", None, [1, 0, 1], 3),
    "weighted_random_scaled": ("weighted", "random", math.sqrt(A), [1, 1, 1], 5),
}


def n_s(x, s):
    if s is None:
        return x
    return x * s / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pool(h, mask, mode, w):
    if mode == "last":
        idx = mask.sum(1).long() - 1
        return h[torch.arange(h.shape[0]), idx]
    if mode == "mean":
        return (mask[..., None] * h).sum(1) / mask.sum(1, keepdim=True)
    assert mode == "weighted"  # [V] legacy: alpha = softmax(w[:T]) m, renormalised
    p = torch.softmax(w[: h.shape[1]], dim=0)
    alpha = p[None, :] * mask
    alpha = alpha / (alpha.sum(1, keepdim=True) + 1e-8)
    return (alpha[..., None] * h).sum(1)


def main():
    print(f"torch {torch.__version__}, seed {mf.SEED}")
    folder = FIXTURES / "critic_llama"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = mf.build_model("critic_llama", LLAMA)
    cfg = LLAMA["config"]
    B, T, V, C = LLAMA["batch"], LLAMA["seq"], cfg["vocab_size"], cfg["hidden_size"]
    ids = torch.randint(0, V, (B, T), generator=gen("critic.ids"), dtype=I64)
    mask = torch.zeros(B, T, dtype=F32)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0
    target = mf.randn_rows_varied(gen("critic.target"), B, A, lo=0.5, hi=5.0)
    target_c = mf.randn_rows_varied(gen("critic.target_c"), B, C, lo=0.5, hi=5.0)
    head = randn(gen("critic.head"), A, C, scale=1.0 / math.sqrt(C))
    w = randn(gen("critic.pool_w"), TMAX, scale=0.5)
    model.save_pretrained(str(folder))
    mf.check_config_json(folder, LLAMA)

    kept = ["model.embed_tokens.weight"] + [
        n for n, _ in model.named_parameters() if any(n.startswith(f"model.layers.{i}.")
                                                   for i in range(K + 1))]
    tensors = {"ids": ids, "mask": mask, "target": target, "target_c": target_c,
               "head": head, "pool_w": w, "k": torch.tensor(K, dtype=I64)}
    for case, (mode, head_kind, s, valid, divisor) in CASES.items():
        model64 = copy.deepcopy(model).to(F64)
        W = (torch.eye(C) if head_kind == "identity" else head).to(F64).requires_grad_(True)
        w64 = w.to(F64).requires_grad_(True)
        g = (target_c if head_kind == "identity" else target).to(F64)
        with mf.llama_exact_float64():
            out = model64(ids, attention_mask=mask.to(I64), output_hidden_states=True)
        h = out.hidden_states[K + 1]  # the residual after block K; no final norm
        pooled = pool(h, mask.to(F64), mode, w64)
        pred = pooled @ W.T
        mse = ((n_s(pred, s) - n_s(g, s)) ** 2).mean(-1)
        loss = (mse * torch.tensor(valid, dtype=F64)).sum() / divisor
        loss.backward()
        params = dict(model64.named_parameters())
        for n, p in params.items():
            if n not in kept:
                assert p.grad is None or torch.all(p.grad == 0), n
        p = f"{case}."
        tensors.update({p + "pred": f32(pred), p + "mse": f32(mse), p + "loss": f32(loss),
                        p + "valid": torch.tensor(valid, dtype=F32),
                        p + "divisor": scalar(divisor),
                        p + "mse_scale": scalar(s if s is not None else 0.0),
                        p + "grad.value_head.weight": f32(W.grad)})
        if mode == "weighted":
            tensors[p + "grad.pool_w"] = f32(w64.grad)
        for n in kept:
            tensors[p + "grad." + n] = f32(params[n].grad)
        print(f"{case}: loss {loss.item():.6f}, mse {mse.tolist()}")

    path = FIXTURES / "critic.safetensors"
    mf.write_safetensors(path, tensors, mf.base_metadata(
        script=SCRIPT, k=K, lengths=LENGTHS,
        description="NLA critic: float64 predictions, per-sample mse, loss and gradients"))
    total = path.stat().st_size + sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"critic fixture size: {total / 1e3:.1f} kB")
    assert total < MAX_BYTES, total


if __name__ == "__main__":
    sys.exit(main())
