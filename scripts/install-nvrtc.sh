#!/usr/bin/env bash
# Installs NVRTC, CUDA's runtime compiler library (libnvrtc.so.13, no GPU needed), and the CUDA
# headers the kernels include (cuda_bf16.h and what it pulls in), from the pinned Python wheels of
# CUDA 13.0, into the virtual environment .venv-cuda at the repository root (git-ignored; the one
# scripts/install-nvcc.sh uses, with the same pins for the wheels both install). Used by
# tests/nvrtc.rs, which compiles every kernels/*.cu with NVRTC for sm_80 and sm_90.
# Idempotent: when .venv-cuda already holds these pins, nothing is downloaded.
# Prints two shell lines on stdout (and nothing else), to eval:
#     export NLA_CUDA_INCLUDE=<.venv-cuda/.../nvidia/cu13/include>
#     export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}<.venv-cuda/.../nvidia/cu13/lib>
# e.g.
#     eval "$(bash scripts/install-nvrtc.sh)"
#     NLA_REQUIRE_NVRTC=1 cargo test --release --test nvrtc -- --nocapture
# Under `set -e`, capture the output first, as .ci/run does (eval of a failed command
# substitution succeeds): vars="$(bash scripts/install-nvrtc.sh)"; eval "$vars"
# Downloads about 92 MB (the nvrtc wheel is 90 MB; the other two are already there after
# scripts/install-nvcc.sh) and installs about 230 MB.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=".venv-cuda"
pins=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
)
stamp="$venv/.nla-nvrtc-pins"

find_nvrtc() {
    ls "$venv"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null | head -n1
}

lib="$(find_nvrtc || true)"
if [ -z "$lib" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
    echo "install-nvrtc: installing ${pins[*]} into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
    lib="$(find_nvrtc || true)"
    if [ -z "$lib" ]; then
        echo "install-nvrtc: the wheels installed, but there is no libnvrtc.so.13 under" \
            "$venv/lib/python3*/site-packages/nvidia/cu13/lib" >&2
        exit 1
    fi
    echo "${pins[*]}" > "$stamp"
else
    echo "install-nvrtc: $venv already holds ${pins[*]}" >&2
fi
cu13="$(cd "$(dirname "$lib")/.." && pwd)"
if [ ! -f "$cu13/include/cuda_bf16.h" ]; then
    echo "install-nvrtc: no cuda_bf16.h in $cu13/include" >&2
    exit 1
fi
printf 'export NLA_CUDA_INCLUDE=%q\n' "$cu13/include"
printf 'export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}%q\n' "$cu13/lib"
