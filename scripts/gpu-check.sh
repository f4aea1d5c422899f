#!/usr/bin/env bash
# The GPU check: the CUDA device against the CPU twins, the CUDA kernel benches and the
# end-to-end bench, the whole model under compute-sanitizer where it is installed, and a report
# with the figures, the GPU, the driver and the commit.
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

# cuBLASLt is not part of the driver: cudarc loads libcublasLt.so(.13) at run time. Find it (the
# loader's cache, a CUDA toolkit, or the nvidia-cublas wheel of a Python environment) and put
# its folder on LD_LIBRARY_PATH.
find_cublaslt() {
    if ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so'; then return; fi
    local d
    for d in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 \
        /usr/local/cuda/targets/x86_64-linux/lib; do
        if compgen -G "$d/libcublasLt.so*" >/dev/null; then echo "$d"; return; fi
    done
    for py in python3 /opt/torch/.venv/bin/python3; do
        command -v "$py" >/dev/null || continue
        d="$("$py" -c 'import glob, os, sys
for p in sys.path:
    for f in glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcublasLt.so*")):
        print(os.path.dirname(f)); sys.exit()' 2>/dev/null || true)"
        if [ -n "$d" ]; then echo "$d"; return; fi
    done
}
cublaslt_dir="$(find_cublaslt || true)"
if [ -n "$cublaslt_dir" ]; then
    export LD_LIBRARY_PATH="$cublaslt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
elif ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so'; then
    echo "gpu-check: libcublasLt.so not found (no CUDA toolkit, no nvidia-cublas wheel): the" \
        "CUDA device needs it for matmuls; install one or set LD_LIBRARY_PATH" >&2
fi

# every part runs under a time limit (a hung kernel leaves the rest of the report)
limit() { local s="$1"; shift; timeout -k 10 "$s" "$@"; }
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
    if [ -f "$b.tgz" ]; then rm -rf "$b" && tar -xzf "$b.tgz"; fi
    [ -x "$b/nla-engine" ] || { echo "gpu-check: no $b/nla-engine: run 'bash scripts/gpu-check.sh bundle' first" >&2; exit 1; }
    built="$(cat "$b/built-in")"
    if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" 2>/dev/null && ln -s "$root" "$built" ||
            echo "gpu-check: cannot link $built to $root: tests that read fixtures may fail" >&2
    fi
    commit="$(cat "$b/commit")"
    nla="$b/nla-engine"
    run_test() { limit 600 "$b/test-$1" --test-threads=1 --nocapture; }
    run_bench() { (cd "$built" && limit 900 "$root/$b/bench-cuda" --bench --noplot); }
    nvcc_used="(bundled build)"
else
    NVCC="$(find_nvcc)"
    export NVCC
    commit="$(git rev-parse HEAD)$(git diff --quiet || echo '+changes')"
    cargo build --release
    nla=target/release/nla-engine
    run_test() { limit 600 cargo test --release --test "$1" -- --test-threads=1 --nocapture; }
    run_bench() { limit 900 cargo bench --bench cuda -- --noplot; }
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
    echo "- cuBLASLt: ${cublaslt_dir:-found by the loader}"
    echo "- devices:"; "$nla" devices 2>&1 | sed "s/^/  - /" || true
    echo
} > "$report"

for t in "${gpu_tests[@]}"; do
    if run_test "$t" > "$log/test-$t.txt" 2>&1; then r=passed; else r="FAILED (exit $?)"; status=1; fi
    {
        echo "## tests/$t.rs: $r"
        echo
        echo '```'
        # sed, not head, reads all of grep's output: under pipefail a SIGPIPE would end the script
        { grep -E "^test |test result|err|GB/s|max|worst|panicked|GPU|cuBLASLt" "$log/test-$t.txt" || true; } |
            sed -n '1,120p'
        echo '```'
        echo
    } >> "$report"
done

if run_bench > "$log/bench-cuda.txt" 2>&1; then r=ran; else r="FAILED (exit $?)"; status=1; fi
{
    echo "## benches/cuda.rs (criterion; kernels timed with CUDA events): $r"
    echo
    echo '```'
    { grep -E "^copy:|^[a-z_]+/|time:|thrpt:|fraction|panicked|GPU" "$log/bench-cuda.txt" || true; } |
        sed -n '1,400p'
    echo '```'
    echo
} >> "$report"

# each preset as it is (bf16, the GPU's default working dtype); the llama-1b step in f32 (the
# parity path: what bf16 gains); the llama-1b step with the memory options (vocabulary chunks of
# 8192 and block recompute: their cost in step time against the plain step); batch-1 decode
# (the target: 70 % of the weight-streaming bound), with its decode steps replayed as CUDA
# graphs and, to measure what they gain, without (NLA_GRAPHS=0)
decode1="llama-1b --only rollout --prompts 1 --samples 1 --new-tokens 256"
for run in "small" "llama-1b" "llama-1b --only step --precision f32" \
    "llama-1b --only step --logits-chunk 8192 --recompute" "$decode1" "NLA_GRAPHS=0 $decode1"; do
    name="$(echo "$run" | tr -cs 'a-zA-Z0-9' '_')"
    graphs=1
    case "$run" in NLA_GRAPHS=0*) graphs=0 run="${run#NLA_GRAPHS=0 }" ;; esac
    # shellcheck disable=SC2086 # $run is a preset and flags, split on purpose
    if limit 600 env NLA_GRAPHS=$graphs "$nla" bench --device cuda --preset $run \
        > "$log/bench-$name.txt" 2>&1; then
        r=ran
    else
        r="FAILED (exit $?)"
        status=1
    fi
    {
        echo "## nla-engine bench --device cuda --preset $run (NLA_GRAPHS=$graphs): $r"
        echo
        echo '```'
        tail -n 40 "$log/bench-$name.txt"
        echo '```'
        echo
    } >> "$report"
done

# last, where the GPU's memory checker is installed (and the machine lets it run): the whole
# model on the GPU (forward, backward, training steps, generation) under compute-sanitizer,
# which reports out-of-bounds and misaligned accesses and other faults the tests cannot see
if command -v compute-sanitizer >/dev/null; then
    sanitize() {
        if [ "$mode" = run-bundle ]; then
            limit 600 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 86 \
                "$b/test-device_parity" --test-threads=1 cuda_
        else
            limit 600 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 86 \
                cargo test --release --test device_parity -- --test-threads=1 cuda_
        fi
    }
    if sanitize > "$log/sanitizer.txt" 2>&1; then r=clean; else r="FAILED (exit $?)"; status=1; fi
    {
        echo "## compute-sanitizer memcheck, tests/device_parity.rs cuda_*: $r"
        echo
        echo '```'
        { grep -E "^test |test result|=========|panicked|GPU" "$log/sanitizer.txt" || true; } |
            sed -n '1,80p'
        echo '```'
        echo
    } >> "$report"
fi

echo "gpu-check: report $report (logs in $log)" >&2
cat "$report"
exit "$status"
