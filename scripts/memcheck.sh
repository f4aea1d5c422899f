#!/usr/bin/env bash
# The memory check over the kernels: every test that runs kernels on the emulator, rebuilt with
# the `memcheck` feature (emu/memcheck.h). Each access of each launch (fiber modes) is checked
# for what a GPU would fault on or race on but plain C++ on x86 does not:
# - out of bounds: outside every buffer passed to the kernel (a GPU reads garbage or faults);
# - misaligned: a 2/4/8/16-byte typed access at an address not a multiple of its size;
# - races between blocks: a byte written by one block and touched by another in the same launch.
#   Blocks run one after the other in the emulator, so such a race (a plain `+=` into one output
#   from every block) passes every emulated test in any block order;
# - uninitialised shared memory: a read of a shared byte no thread of the block has written (the
#   NaN poisoning shows it only when the value reaches an output: fmaxf(x, NaN) is x).
# The first problem fails the launch with a message naming the block, the thread and the kernel
# parameter. tests/emu.rs proves each check on the broken kernels of
# tests/emu_kernels/emu_memcheck.cu.
#
# Needs what the emulator needs (g++, binutils). Uses the regular target dir: the feature gives
# the library its own build, so the regular one is untouched and the dependencies are shared.
# nvcc is not needed: NVCC and CUDA_HOME are unset for this build.
#
# Usage: scripts/memcheck.sh [extra libtest args, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
unset NVCC CUDA_HOME
tests=(kernels_emu_a kernels_emu_b launch_bf16 cuda_ops device_parity bf16_model train_nla emu activation_layout)
targets=()
for t in "${tests[@]}"; do targets+=(--test "$t"); done
echo "== memcheck: cargo test --release --features memcheck ${targets[*]}"
cargo test --release --features memcheck "${targets[@]}" -- "$@"
echo "memcheck: OK ($((SECONDS - t0)) s)"
