#!/usr/bin/env bash
# The inter-block race check over the kernels: every test that runs kernels on the emulator,
# rebuilt with the `racecheck` feature (emu/racecheck.h). Blocks of a launch are unordered on a
# GPU but run one after the other in the emulator, so a race between blocks (a plain `+=` into
# one output from every block, a block writing past its range into its neighbour's) passes every
# emulated test in both block orders; with the check, every launch of the fiber modes records
# which block touched each byte, and a byte written by one block and touched by another fails the
# launch with a message naming both blocks and the kernel parameter. tests/emu.rs proves it on
# the deliberately racy kernels of tests/emu_kernels/emu_race.cu.
#
# Needs what the emulator needs (g++, binutils). Uses the regular target dir: the feature gives
# the library its own build, so the regular one is untouched and the dependencies are shared.
# nvcc is not needed: NVCC and CUDA_HOME are unset for this build.
#
# Usage: scripts/race-check.sh [extra libtest args, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
unset NVCC CUDA_HOME
tests=(kernels_emu_a kernels_emu_b launch_bf16 cuda_ops device_parity bf16_model emu)
targets=()
for t in "${tests[@]}"; do targets+=(--test "$t"); done
echo "== race-check: cargo test --release --features racecheck ${targets[*]}"
cargo test --release --features racecheck "${targets[@]}" -- "$@"
echo "race-check: OK ($((SECONDS - t0)) s)"
