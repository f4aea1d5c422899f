#!/usr/bin/env bash
# Times the training step of benches/small_config.json (batch 4 x 128) in PyTorch eager and in
# nla-engine on the CPU, one right after the other, plus torch's f32 GEMM rate.
# Usage: benches/compare_torch.sh [PYTHON]   (a Python with torch + transformers installed,
# e.g. the venv of tests/reference/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
cargo bench --bench step --no-run
"$py" benches/torch_step.py --config benches/small_config.json --batch 4 --seq 128 --steps 20 --threads 2 --gemm
cargo bench --bench step -- --noplot
