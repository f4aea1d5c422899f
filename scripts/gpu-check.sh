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
#
# The check runs in parts, the most telling first: parity (tests/device_parity.rs: the whole
# model on the GPU against the CPU, graph capture included), decode (batch-1 decode with and
# without CUDA graphs), step (the llama-1b preset: SFT step and rollout), attention (its kernel
# benches), ops (tests/cuda_ops.rs), bf16 (tests/bf16_model.rs), kernels (every kernel bench),
# select (tests/device_select.rs), layout (tests/activation_layout.rs cuda_*: shared buffers),
# presets (the other end-to-end benches), sanitizer, racecheck, synccheck (compute-sanitizer's
# memcheck, racecheck and synccheck of the model's GPU tests).
# Environment:
#   GPU_CHECK_PARTS=parity,decode    only these parts (default: all)
#   GPU_CHECK_BUDGET=540             seconds for the whole check: each part's time limit is cut
#                                    to what is left, and parts that would start with under 30 s
#                                    left are skipped and listed in the report (default: none)
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
# the f32 CPU (whole model, critic, generation), and ops on buffers that share one allocation.
gpu_tests=(device_parity cuda_ops device_select bf16_model activation_layout)

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
cublaslt_note="${cublaslt_dir:-found by the loader}"
if [ -n "$cublaslt_dir" ]; then
    export LD_LIBRARY_PATH="$cublaslt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
elif ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so'; then
    cublaslt_note="not found (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
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
    # run_test TEST SECONDS [FILTER], run_bench SECONDS [FILTER]
    run_test() { limit "$2" "$b/test-$1" --test-threads=1 --nocapture ${3:+"$3"}; }
    run_bench() { (cd "$built" && limit "$1" "$root/$b/bench-cuda" --bench --noplot ${2:+"$2"}); }
    nvcc_used="(bundled build)"
else
    NVCC="$(find_nvcc)"
    export NVCC
    commit="$(git rev-parse HEAD)$(git diff --quiet || echo '+changes')"
    cargo build --release
    nla=target/release/nla-engine
    run_test() { limit "$2" cargo test --release --test "$1" -- --test-threads=1 --nocapture ${3:+"$3"}; }
    run_bench() { limit "$1" cargo bench --bench cuda -- --noplot ${2:+"$2"}; }
    nvcc_used="$("$NVCC" --version | tail -n1)"
fi

status=0
budget="${GPU_CHECK_BUDGET:-0}"
parts="${GPU_CHECK_PARTS:-all}"
case "$budget" in '' | *[!0-9]*) echo "gpu-check: GPU_CHECK_BUDGET=$budget: expected seconds" >&2; exit 2 ;; esac
start=$SECONDS
skipped=()
{
    echo "# GPU check: $gpu"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $commit"
    echo "- GPU: $gpu, $mem, driver $driver"
    echo "- nvcc: $nvcc_used"
    echo "- cuBLASLt: $cublaslt_note"
    echo "- parts: $parts; time budget: $([ "$budget" -gt 0 ] && echo "$budget s" || echo none)"
    echo "- devices:"; "$nla" devices 2>&1 | sed "s/^/  - /" || true
    echo
} > "$report"

# wanted PART: whether the check runs PART (GPU_CHECK_PARTS)
wanted() { [ "$parts" = all ] || [[ ",$parts," == *",$1,"* ]]; }
# time_for PART SECONDS: sets t to the part's time limit, cut to what is left of the budget;
# false, with PART noted as skipped, when under 30 s are left
time_for() {
    t="$2"
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - (SECONDS - start)))
        if [ "$left" -lt 30 ]; then
            [[ " ${skipped[*]} " == *" $1 "* ]] || skipped+=("$1")
            return 1
        fi
        if [ "$left" -lt "$t" ]; then t="$left"; fi
    fi
    return 0
}
# one line per result: sed, not head, reads all of grep's output (under pipefail a SIGPIPE
# would end the script)
excerpt() { { grep -E "$1" "$2" || true; } | sed -n "1,${3}p"; }
# section TITLE: a section of the report, its body (standard input) in a code block
section() { { echo "## $1"; echo; echo '```'; cat; echo '```'; echo; } >> "$report"; }

# test_part PART TEST [FILTER]: a test file against the CPU twins (FILTER: only the tests whose
# name contains it)
test_part() {
    wanted "$1" && time_for "$1" 600 || return 0
    if run_test "$2" "$t" ${3:+"$3"} > "$log/test-$2.txt" 2>&1; then r=passed; else r="FAILED (exit $?)"; status=1; fi
    excerpt "^test |test result|err|GB/s|max|worst|panicked|GPU|cuBLASLt|graph" \
        "$log/test-$2.txt" 120 | section "tests/$2.rs${3:+ ($3*)}: $r"
}

# kernel_part PART [FILTER]: the criterion benches of benches/cuda.rs (FILTER: those whose
# name contains it)
kernel_part() {
    wanted "$1" && time_for "$1" 900 || return 0
    if run_bench "$t" "${2:-}" > "$log/bench-$1.txt" 2>&1; then r=ran; else r="FAILED (exit $?)"; status=1; fi
    excerpt "^copy:|^[a-z_]+/|time:|thrpt:|fraction|panicked|GPU" "$log/bench-$1.txt" 400 |
        section "benches/cuda.rs${2:+ ($2)} (criterion; kernels timed with CUDA events): $r"
}

# bench_part PART GRAPHS PRESET [FLAGS...]: nla-engine bench on the GPU (GRAPHS: NLA_GRAPHS)
bench_part() {
    local part="$1" graphs="$2"
    shift 2
    wanted "$part" && time_for "$part" 600 || return 0
    local name
    name="$(echo "$*" | tr -cs 'a-zA-Z0-9' '_')$graphs"
    if limit "$t" env NLA_GRAPHS="$graphs" "$nla" bench --device cuda --preset "$@" \
        > "$log/bench-$name.txt" 2>&1; then
        r=ran
    else
        r="FAILED (exit $?)"
        status=1
    fi
    tail -n 40 "$log/bench-$name.txt" |
        section "nla-engine bench --device cuda --preset $* (NLA_GRAPHS=$graphs): $r"
}

# compute-sanitizer, where installed (and the machine lets it run), over the whole model on
# the GPU (forward, backward, training steps, generation: tests/device_parity.rs cuda_*): memcheck
# (out-of-bounds and misaligned accesses, other faults the tests cannot see), racecheck (shared
# memory races: the tensor-core attention never runs on the emulator) and synccheck (barriers)
# sanitizer_part PART TOOL
sanitizer_part() {
    command -v compute-sanitizer >/dev/null || return 0
    wanted "$1" && time_for "$1" 600 || return 0
    local cs=(limit "$t" compute-sanitizer --tool "$2" --target-processes all --error-exitcode 86)
    if [ "$mode" = run-bundle ]; then
        cmd=("${cs[@]}" "$b/test-device_parity" --test-threads=1 cuda_)
    else
        cmd=("${cs[@]}" cargo test --release --test device_parity -- --test-threads=1 cuda_)
    fi
    if "${cmd[@]}" > "$log/$1.txt" 2>&1; then r=clean; else r="FAILED (exit $?)"; status=1; fi
    excerpt "^test |test result|=========|panicked|GPU" "$log/$1.txt" 80 |
        section "compute-sanitizer $2, tests/device_parity.rs cuda_*: $r"
}

# batch-1 decode (the target: 70 % of the weight-streaming bound), its steps replayed as CUDA
# graphs and, to measure what they gain, without; each preset in bf16, the GPU's default working
# dtype; the llama-1b step in f32 (the parity path: what bf16 gains) and with the memory options
# (vocabulary chunks of 8192 and block recompute: their cost in step time)
decode1=(llama-1b --only rollout --prompts 1 --samples 1 --new-tokens 256)
test_part parity device_parity
bench_part decode 1 "${decode1[@]}"
bench_part decode 0 "${decode1[@]}"
bench_part step 1 llama-1b
kernel_part attention attention
test_part ops cuda_ops
test_part bf16 bf16_model
kernel_part kernels
test_part select device_select
test_part layout activation_layout cuda_
bench_part presets 1 small
bench_part presets 1 llama-1b --only step --precision f32
bench_part presets 1 llama-1b --only step --logits-chunk 8192 --recompute
sanitizer_part sanitizer memcheck
sanitizer_part racecheck racecheck
sanitizer_part synccheck synccheck

if [ "${#skipped[@]}" -gt 0 ]; then
    printf '## skipped (time budget of %s s spent)\n\n%s\n' "$budget" "${skipped[*]}" >> "$report"
    status=1
fi
echo "gpu-check: report $report (logs in $log), $((SECONDS - start)) s" >&2
cat "$report"
exit "$status"
