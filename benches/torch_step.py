#!/usr/bin/env python3
"""PyTorch baseline for the end-to-end training-step bench (CPU, float32).

Builds the HF Llama described by a config.json (default: benches/small_config.json, the same
"small config" the Rust step bench uses) and times one training step:

    forward + HF causal-LM loss (labels = ids) + backward + torch.optim.AdamW step

once with eager attention and once with SDPA attention. After --warmup untimed steps it times
--steps steps and prints one JSON line per variant (median ms/step and tokens/s, tokens = B*T).

With --gemm it also times torch.mm in float32 (C[M,N] = A[M,K] @ B[K,N], 2*M*N*K flops, median
over repeats) on 1024x1024x1024 and 2048x576x1536 (MxNxK) and prints GFLOP/s: the rate of a
tuned BLAS on this machine, to compare the engine's CPU GEMM against.

Example (from the repository root):

    python benches/torch_step.py --config benches/small_config.json \
        --batch 4 --seq 128 --steps 20 --threads 2 --gemm
"""

import argparse
import json
import os
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="benches/small_config.json", help="HF Llama config.json")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--attn", default="eager,sdpa", help="comma-separated attention variants")
    p.add_argument("--gemm", action="store_true", help="also time float32 torch.mm")
    p.add_argument("--gemm-repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


args = parse_args()
# Thread counts must be fixed before torch starts its thread pools.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)


def common_fields():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "dtype": "float32", "device": "cpu"}


def time_train_step(attn):
    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = attn
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32).train()
    assert model.config._attn_implementation == attn
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss  # position t predicts t+1, mean
        loss.backward()
        opt.step()
        return loss.item()  # .item() also waits for all work of the step

    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    return {"bench": "train_step", "attn": attn, "config": args.config, "params": n_params,
            "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
            "median_ms": round(med * 1e3, 2), "min_ms": round(min(times) * 1e3, 2),
            "max_ms": round(max(times) * 1e3, 2), "tokens_per_s": round(tokens / med, 1),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
            **common_fields()}


def time_gemm(m, n, k):
    g = torch.Generator().manual_seed(args.seed)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    c = torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(args.gemm_repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"bench": "gemm", "op": "torch.mm", "m": m, "n": n, "k": k,
            "median_ms": round(med * 1e3, 3), "gflops": round(2 * m * n * k / med / 1e9, 1),
            "repeats": args.gemm_repeats, **common_fields()}


def main():
    for attn in args.attn.split(","):
        print(json.dumps(time_train_step(attn.strip())), flush=True)
    if args.gemm:
        for m, n, k in ((1024, 1024, 1024), (2048, 576, 1536)):
            print(json.dumps(time_gemm(m, n, k)), flush=True)


if __name__ == "__main__":
    main()
