#!/usr/bin/env bash
# The GPU check: the CUDA device against the CPU twins, the CUDA kernel benches and the
# end-to-end bench, and a report with the figures, the GPU, the driver and the commit.
#
#   bash scripts/gpu-check.sh [REPORT_DIR]
#       On a machine with an NVIDIA GPU, a Rust toolchain and the crates (or a warm cargo
#       cache): builds with nvcc (NVCC, CUDA_HOME/bin, PATH, else the pinned wheels of
#       scripts/install-nvcc.sh), runs everything, writes REPORT_DIR/<date>-<gpu>.md
#       (default docs/gpu-runs).
#
#   bash scripts/gpu-check.sh bundle
#       On a build machine without a GPU: builds the binary, the test and bench executables
#       with the kernels, strips them and packs them into .gpu-bundle.tgz (~25 MB, git-ignored),
#       for a GPU machine that has no Rust toolchain or no registry access.
#   bash scripts/gpu-check.sh run-bundle [REPORT_DIR]
#       On that GPU machine, in a copy of the repository holding .gpu-bundle.tgz: unpacks it
#       and runs the bundled executables instead of building.
#
# Tests that need a GPU skip without one; here NLA_REQUIRE_GPU=1 makes a missing GPU a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
mode="${1:-full}"
case "$mode" in
    bundle | run-bundle) shift ;;
    *) mode=full ;;
esac
report_dir="${1:-docs/gpu-runs}"

# The GPU tests: device parity (whole model: forward, backward, training steps, generation),
# per-op parity at realistic sizes, device selection, and the bf16 working precision against
# the f32 CPU (whole model, critic, generation).
gpu_tests=(device_parity cuda_ops device_select bf16_model)

find_nvcc() {
    if [ -n "${NVCC:-}" ]; then echo "$NVCC"; return; fi
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
    if command -v nvcc >/dev/null; then command -v nvcc; return; fi
    bash scripts/install-nvcc.sh
}

if [ "$mode" = bundle ]; then
    NVCC="$(find_nvcc)"
    export NVCC
    rm -rf .gpu-bundle
    mkdir -p .gpu-bundle
    cargo build --release
    cp target/release/nla-engine .gpu-bundle/
    for t in "${gpu_tests[@]}"; do
        exe="$(cargo test --release --test "$t" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -n1)"
        cp "$exe" ".gpu-bundle/test-$t"
    done
    exe="$(cargo bench --bench cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])' | tail -n1)"
    cp "$exe" .gpu-bundle/bench-cuda
    strip .gpu-bundle/*
    # the executables find fixtures through the path they were built in
    echo "$root" > .gpu-bundle/built-in
    git rev-parse HEAD > .gpu-bundle/commit
    du -sh .gpu-bundle/* >&2
    tar -czf .gpu-bundle.tgz .gpu-bundle
    rm -rf .gpu-bundle
    echo "bundle: .gpu-bundle.tgz ($(du -sh .gpu-bundle.tgz | cut -f1)); on the GPU machine:" \
        "bash scripts/gpu-check.sh run-bundle" >&2
    exit 0
fi

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: not a GPU machine" >&2; exit 1; }
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)"
mem="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader | head -n1)"
slug="$(echo "$gpu" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')"
mkdir -p "$report_dir"
report="$report_dir/$(date -u +%Y-%m-%d)-$slug.md"
log="$(mktemp -d)"
export NLA_REQUIRE_GPU=1

if [ "$mode" = run-bundle ]; then
    b=.gpu-bundle
    [ -d "$b" ] || [ ! -f "$b.tgz" ] || tar -xzf "$b.tgz"
    [ -x "$b/nla-engine" ] || { echo "gpu-check: no $b/nla-engine: run 'bash scripts/gpu-check.sh bundle' first" >&2; exit 1; }
    built="$(cat "$b/built-in")"
    if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
    fi
    commit="$(cat "$b/commit")"
    nla="$b/nla-engine"
    run_test() { "$b/test-$1" --test-threads=1 --nocapture; }
    run_bench() { (cd "$built" && "$root/$b/bench-cuda" --bench --noplot); }
    nvcc_used="(bundled build)"
else
    NVCC="$(find_nvcc)"
    export NVCC
    commit="$(git rev-parse HEAD)$(git diff --quiet || echo '+changes')"
    cargo build --release
    nla=target/release/nla-engine
    run_test() { cargo test --release --test "$1" -- --test-threads=1 --nocapture; }
    run_bench() { cargo bench --bench cuda -- --noplot; }
    nvcc_used="$("$NVCC" --version | tail -n1)"
fi

status=0
{
    echo "# GPU check: $gpu"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $commit"
    echo "- GPU: $gpu, $mem, driver $driver"
    echo "- nvcc: $nvcc_used"
    echo "- devices:"; "$nla" devices 2>&1 | sed "s/^/  - /" || true
    echo
} > "$report"

for t in "${gpu_tests[@]}"; do
    if run_test "$t" > "$log/test-$t.txt" 2>&1; then r=passed; else r=FAILED; status=1; fi
    {
        echo "## tests/$t.rs: $r"
        echo
        echo '```'
        grep -E "^test |test result|err|GB/s|max|worst" "$log/test-$t.txt" | head -n 80
        echo '```'
        echo
    } >> "$report"
done

if run_bench > "$log/bench-cuda.txt" 2>&1; then r=ran; else r=FAILED; status=1; fi
{
    echo "## benches/cuda.rs (criterion; kernels timed with CUDA events): $r"
    echo
    echo '```'
    grep -E "^[a-z_]+/|time:|thrpt:|fraction" "$log/bench-cuda.txt" | head -n 400
    echo '```'
    echo
} >> "$report"

# each preset as it is (bf16, the GPU's default working dtype); the llama-1b step in f32 (the
# parity path: what bf16 gains); the llama-1b step with the memory options (vocabulary chunks of
# 8192 and block recompute: their cost in step time against the plain step); batch-1 decode
# (the target: 70 % of the weight-streaming bound)
for run in "small" "llama-1b" "llama-1b --only step --precision f32" \
    "llama-1b --only step --logits-chunk 8192 --recompute" \
    "llama-1b --only rollout --prompts 1 --samples 1 --new-tokens 256"; do
    name="$(echo "$run" | tr -cs 'a-z0-9' '_')"
    # shellcheck disable=SC2086 # $run is a preset and flags, split on purpose
    if "$nla" bench --device cuda --preset $run > "$log/bench-$name.txt" 2>&1; then r=ran; else r=FAILED; status=1; fi
    {
        echo "## nla-engine bench --device cuda --preset $run: $r"
        echo
        echo '```'
        tail -n 40 "$log/bench-$name.txt"
        echo '```'
        echo
    } >> "$report"
done

echo "gpu-check: report $report (logs in $log)" >&2
cat "$report"
exit "$status"
