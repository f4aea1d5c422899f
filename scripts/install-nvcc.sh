#!/usr/bin/env bash
# Installs the CUDA compiler (nvcc, ptxas, cicc, the CUDA headers) without a CUDA install: the
# pinned Python wheels of CUDA 13.0 in a virtual environment .venv-cuda at the
# repository root (git-ignored). All five are pinned to one release: nvcc does not pin its own
# dependencies, and a newer cicc emits PTX that ptxas 13.0 and the 580 driver reject.
# Idempotent: when .venv-cuda already holds these pins, nothing is downloaded.
# Prints the absolute path of nvcc (the only line on stdout), e.g.
#     NVCC="$(bash scripts/install-nvcc.sh)" cargo build --release
# nvcc also needs a host C++ compiler (g++) on PATH.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=".venv-cuda"
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
stamp="$venv/.nla-pins"

find_nvcc() {
    ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1
}

nvcc="$(find_nvcc || true)"
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
    echo "install-nvcc: installing ${pins[*]} into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
    nvcc="$(find_nvcc || true)"
    if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
        echo "install-nvcc: the wheels installed, but there is no nvcc under" \
            "$venv/lib/python3*/site-packages/nvidia/cu13/bin" >&2
        exit 1
    fi
    echo "${pins[*]}" > "$stamp"
else
    echo "install-nvcc: $venv already holds ${pins[*]}" >&2
fi
if ! command -v g++ >/dev/null; then
    echo "install-nvcc: warning: no g++ on PATH; nvcc needs a host C++ compiler" >&2
fi
"$nvcc" --version | tail -n2 >&2
echo "$(cd "$(dirname "$nvcc")" && pwd)/nvcc"
