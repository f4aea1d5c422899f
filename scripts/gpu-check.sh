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
# Besides the report, REPORT_DIR gets <date>-<gpu>-logs.tgz: every part's whole output,
# repacked after each part (git-ignored under docs/gpu-runs; the report holds the excerpts).
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
    # a build without the kernels would fail every part on the GPU machine
    if target/release/nla-engine devices 2>&1 | grep -c 'no CUDA kernels' >/dev/null; then
        echo "gpu-check: the build has no CUDA kernels (NVCC=$NVCC)" >&2
        exit 1
    fi
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
    echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo '+changes')" > .gpu-bundle/commit
    "$NVCC" --version | tail -n1 > .gpu-bundle/nvcc
    du -sh .gpu-bundle/* >&2
    tar -czf .gpu-bundle.tgz .gpu-bundle
    rm -rf .gpu-bundle
    echo "bundle: .gpu-bundle.tgz ($(du -sh .gpu-bundle.tgz | cut -f1)); on the GPU machine:" \
        "bash scripts/gpu-check.sh run-bundle" >&2
    exit 0
fi


# cuBLASLt is not part of the driver: cudarc loads libcublasLt.so(.13) at run time. Find it (the
# loader's cache, a CUDA toolkit, or the nvidia-cublas wheel of a Python environment) and put
# its folder on LD_LIBRARY_PATH.
# (grep -c, not -q: -q stops reading, and under pipefail ldconfig's SIGPIPE would read as "not
# there"; the 13.x library, as cudarc's bindings are for CUDA 13.0)
in_ld_cache() { ldconfig -p 2>/dev/null | grep -c 'libcublasLt\.so\.13' >/dev/null; }
find_cublaslt() {
    if in_ld_cache; then return; fi
    local d
    for d in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 \
        /usr/local/cuda/targets/x86_64-linux/lib; do
        if compgen -G "$d/libcublasLt.so.13*" >/dev/null; then echo "$d"; return; fi
    done
    for py in python3 /opt/torch/.venv/bin/python3; do
        command -v "$py" >/dev/null || continue
        d="$("$py" -c 'import glob, os, sys
for p in sys.path:
    for f in glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcublasLt.so.13*")):
        print(os.path.dirname(f)); sys.exit()' 2>/dev/null || true)"
        if [ -n "$d" ]; then echo "$d"; return; fi
    done
}
cublaslt_dir="$(find_cublaslt || true)"
cublaslt_note="${cublaslt_dir:-found by the loader}"
if [ -n "$cublaslt_dir" ]; then
    export LD_LIBRARY_PATH="$cublaslt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
elif ! in_ld_cache; then
    cublaslt_note="not found (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
    echo "gpu-check: libcublasLt.so not found (no CUDA toolkit, no nvidia-cublas wheel): the" \
        "CUDA device needs it for matmuls; install one or set LD_LIBRARY_PATH" >&2
fi

# every part runs under a time limit (a hung kernel leaves the rest of the report)
limit() { local s="$1"; shift; timeout -k 10 "$s" "$@"; }
# nvidia-smi's answer, or "unknown" (the report is written either way)
smi() { { nvidia-smi --query-gpu="$1" --format=csv,noheader 2>/dev/null || true; } | sed -n 1p | grep . || echo unknown; }
gpu="$(smi name)"
driver="$(smi driver_version)"
mem="$(smi memory.total)"
slug="$(echo "$gpu" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')"
mkdir -p "$report_dir"
report="$report_dir/$(date -u +%Y-%m-%d)-$slug.md"
logs_tgz="$report_dir/$(date -u +%Y-%m-%d)-$slug-logs.tgz"
log="$(mktemp -d)"
# every part's whole output, repacked after each part (what is left if the check is cut off)
pack_logs() { tar -czf "$logs_tgz" -C "$log" . 2>/dev/null || true; }
export NLA_REQUIRE_GPU=1

if [ "$mode" = run-bundle ]; then
    b=.gpu-bundle
    if [ -f "$b.tgz" ]; then rm -rf "$b" && tar -xzf "$b.tgz"; fi
    [ -x "$b/nla-engine" ] || { echo "gpu-check: no $b/nla-engine: run 'bash scripts/gpu-check.sh bundle' first" >&2; exit 1; }
    # the tests find their fixtures here (tests/common: repo_dir), not where they were built
    export NLA_REPO_DIR="$root"
    commit="$(cat "$b/commit")"
    nla="$b/nla-engine"
    # run_test TEST SECONDS [ARGS...] (libtest's filter and --skip), run_bench SECONDS [FILTER]
    run_test() { local t="$1" s="$2"; shift 2; limit "$s" "$b/test-$t" --test-threads=1 --nocapture "$@"; }
    run_bench() { limit "$1" "$b/bench-cuda" --bench --noplot ${2:+"$2"}; }
    nvcc_used="$(cat "$b/nvcc" 2>/dev/null || echo unknown) (bundled build)"
else
    NVCC="$(find_nvcc)"
    export NVCC
    commit="$(git rev-parse HEAD)$(git diff --quiet || echo '+changes')"
    cargo build --release
    nla=target/release/nla-engine
    run_test() { local t="$1" s="$2"; shift 2; limit "$s" cargo test --release --test "$t" -- --test-threads=1 --nocapture "$@"; }
    run_bench() { limit "$1" cargo bench --bench cuda -- --noplot ${2:+"$2"}; }
    nvcc_used="$("$NVCC" --version | tail -n1)"
fi

status=0
budget="${GPU_CHECK_BUDGET:-0}"
parts="${GPU_CHECK_PARTS:-all}"
case "$budget" in '' | *[!0-9]*) echo "gpu-check: GPU_CHECK_BUDGET=$budget: expected seconds" >&2; exit 2 ;; esac
start=$SECONDS
skipped=()
devs="$("$nla" devices 2>&1 || true)"
{
    echo "# GPU check: $gpu"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $commit"
    echo "- GPU: $gpu, $mem, driver $driver; kernel $(uname -r)"
    echo "- nvcc: $nvcc_used"
    echo "- cuBLASLt: $cublaslt_note"
    echo "- parts: $parts; time budget: $([ "$budget" -gt 0 ] && echo "$budget s" || echo none)"
    echo "- devices:"; sed "s/^/  - /" <<< "$devs"
    echo
} > "$report"
# without a usable CUDA device every part would fail: say so once and stop (`devices` prints
# "cuda:N: NAME (... GiB free)" per GPU it opened, else "cuda: no: WHY" or "cannot open")
if ! grep -E '^cuda:[0-9]+: ' <<< "$devs" | grep -vc 'cannot open' >/dev/null; then
    echo "**No usable CUDA device (devices above): nothing was run.**" >> "$report"
    echo "gpu-check: no usable CUDA device; report $report" >&2
    cat "$report"
    exit 1
fi

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
# outcome EXIT: a part's result word from its exit status (124 and 137: the time limit)
outcome() {
    case "$1" in
        0) echo "$2" ;;
        124 | 137) echo "TIMED OUT after $t s (exit $1)" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}
# begin PART: noted in the report before it runs (a check cut off shows where), timed
begin() { echo "_running $1 (limit $t s, $((SECONDS - start)) s into the check)_" >> "$report"; part_start=$SECONDS; }
# took: the part's seconds, for its section title
took() { echo "$((SECONDS - part_start)) s"; }
# section TITLE: a section of the report, its body (standard input) in a code block
section() { { echo "## $1"; echo; echo '```'; cat; echo '```'; echo; } >> "$report"; }

# test_part PART SECONDS TEST [ARGS...]: a test file against the CPU twins (ARGS: libtest's
# name filter and --skip, so that the emulator's tests, which CI runs, are left out)
test_part() {
    local part="$1" secs="$2" test="$3"
    shift 3
    wanted "$part" && time_for "$part" "$secs" || return 0
    begin "$part"
    local e=0
    run_test "$test" "$t" "$@" > "$log/test-$test.txt" 2>&1 || e=$?
    r="$(outcome "$e" passed)"
    [ "$e" = 0 ] || status=1
    pack_logs
    # with --nocapture a test's "ok" or "FAILED" may stand on a line of its own
    {
        excerpt "^test |^(ok|FAILED|ignored)$|test result|err|GB/s|max|worst|panicked|GPU|cuBLASLt|graph" \
            "$log/test-$test.txt" 300
        sed -n '/^failures:$/,$p' "$log/test-$test.txt" | sed -n 1,60p
    } | section "tests/$test.rs${1:+ ($*)}: $r, $(took)"
}

# kernel_part PART SECONDS [FILTER]: the criterion benches of benches/cuda.rs (FILTER: a
# regex over their names)
kernel_part() {
    wanted "$1" && time_for "$1" "$2" || return 0
    begin "$1"
    local e=0
    run_bench "$t" "${3:-}" > "$log/bench-$1.txt" 2>&1 || e=$?
    r="$(outcome "$e" ran)"
    [ "$e" = 0 ] || status=1
    pack_logs
    excerpt "^copy:|^[a-z_]+/|time:|thrpt:|fraction|panicked|GPU" "$log/bench-$1.txt" 400 |
        section "benches/cuda.rs${3:+ ($3)} (criterion; kernels timed with CUDA events): $r, $(took)"
}

# bench_part PART SECONDS GRAPHS PRESET [FLAGS...]: nla-engine bench on the GPU (GRAPHS:
# NLA_GRAPHS)
bench_part() {
    local part="$1" secs="$2" graphs="$3"
    shift 3
    wanted "$part" && time_for "$part" "$secs" || return 0
    begin "$part"
    local name e=0
    name="$(echo "$*" | tr -cs 'a-zA-Z0-9' '_')$graphs"
    limit "$t" env NLA_GRAPHS="$graphs" "$nla" bench --device cuda --preset "$@" \
        > "$log/bench-$name.txt" 2>&1 || e=$?
    r="$(outcome "$e" ran)"
    [ "$e" = 0 ] || status=1
    pack_logs
    tail -n 40 "$log/bench-$name.txt" |
        section "nla-engine bench --device cuda --preset $* (NLA_GRAPHS=$graphs): $r, $(took)"
}

# compute-sanitizer, where installed (and the machine lets it run), over the whole model on
# the GPU (forward, backward, training steps, generation: tests/device_parity.rs cuda_*): memcheck
# (out-of-bounds and misaligned accesses, other faults the tests cannot see), racecheck (shared
# memory races: the tensor-core attention never runs on the emulator) and synccheck (barriers)
# sanitizer_part PART SECONDS TOOL
sanitizer_part() {
    wanted "$1" && time_for "$1" "$2" || return 0
    local cs_bin
    cs_bin="$(command -v compute-sanitizer || true)"
    for d in "${CUDA_HOME:-/nonexistent}/bin" /usr/local/cuda/bin; do
        [ -n "$cs_bin" ] || [ ! -x "$d/compute-sanitizer" ] || cs_bin="$d/compute-sanitizer"
    done
    if [ -z "$cs_bin" ]; then
        echo "skipped: compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)" |
            section "compute-sanitizer $3"
        return 0
    fi
    begin "$1"
    local cs=(limit "$t" "$cs_bin" --tool "$3" --target-processes all --error-exitcode 86) e=0
    if [ "$mode" = run-bundle ]; then
        cmd=("${cs[@]}" "$b/test-device_parity" --test-threads=1 cuda_)
    else
        cmd=("${cs[@]}" cargo test --release --test device_parity -- --test-threads=1 cuda_)
    fi
    "${cmd[@]}" > "$log/$1.txt" 2>&1 || e=$?
    r="$(outcome "$e" clean)"
    [ "$e" = 0 ] || status=1
    pack_logs
    excerpt "^test |^(ok|FAILED|ignored)$|test result|=========|panicked|GPU" "$log/$1.txt" 80 |
        section "compute-sanitizer $3, tests/device_parity.rs cuda_*: $r, $(took)"
}

# batch-1 decode (the target: 70 % of the weight-streaming bound), its steps replayed as CUDA
# graphs and, to measure what they gain, without; each preset in bf16, the GPU's default working
# dtype; the llama-1b step in f32 (the parity path: what bf16 gains) and with the memory options
# (vocabulary chunks of 8192 and block recompute: their cost in step time)
# Each part's limit is about three times what it should take, so that one hang cannot spend
# the whole budget. The emulator's tests (CI runs them) are left out: `cuda_` and `--skip emu`.
decode1=(llama-1b --only rollout --prompts 1 --samples 1 --new-tokens 256)
test_part parity 150 device_parity cuda_
bench_part decode 90 1 "${decode1[@]}"
bench_part decode 90 0 "${decode1[@]}"
bench_part step 120 1 llama-1b
kernel_part attention 90 attention
test_part ops 120 cuda_ops cuda_ --skip emu
test_part bf16 120 bf16_model cuda_
# every bench but attention's (above)
kernel_part kernels 180 '^(?:[^a]|a[^t])'
test_part select 60 device_select cuda_
test_part layout 60 activation_layout cuda_
bench_part presets 90 1 small
bench_part presets 90 1 llama-1b --only step --precision f32
bench_part presets 90 1 llama-1b --only step --logits-chunk 8192 --recompute
sanitizer_part sanitizer 120 memcheck
sanitizer_part racecheck 120 racecheck
sanitizer_part synccheck 120 synccheck

# the figures against the issue's targets, gathered from the parts above
{
    echo "batch-1 decode: target above 70 % of the weight-streaming bound"
    # each figure after its log's name (bench-PRESET_FLAGS_GRAPHS.txt)
    { grep -H "of the weight-streaming bound" "$log"/bench-*.txt 2>/dev/null || echo "  (no figure)"; } |
        sed "s|^$log/||"
    echo "SFT step, ~1B Llama at 2048: target above 50 % MFU"
    { grep -H "MFU" "$log"/bench-*.txt 2>/dev/null || echo "  (no figure)"; } | sed "s|^$log/||"
    echo "attention forward, hs 128, causal, 4k: target above 350 TFLOP/s (GFLOP/s below; the"
    echo "  launcher's pick, then the other kernel by name: 64 or 128 query rows per block)"
    { grep -h "^attention/fwd_bf16_t4096.*fraction" "$log/bench-attention.txt" 2>/dev/null ||
        echo "(no figure)"; } | sed 's/^/  /'
    echo "memory-bound kernels: target above 80 % of the measured copy bandwidth (per kernel:"
    echo "  fraction, time per launch, bandwidth). Not held to it: reward_advantage and policy_loss"
    echo "  (one block, once per step), inject (256 KiB: bound by the launch), pool (one block per"
    echo "  sequence: 64 blocks), sample (several passes over each row; bytes count one)"
    { grep -h "^copy:\|fraction of measured copy bandwidth" "$log/bench-kernels.txt" 2>/dev/null ||
        echo "(no figure)"; } |
        sed -E 's/: ([0-9.]+ ms), ([0-9.]+ GB\/s), fraction of measured copy bandwidth: ([0-9.]+ %)$/: \3 (\1, \2)/; s/^/  /'
} | section "summary against the targets"

if [ "${#skipped[@]}" -gt 0 ]; then
    printf '## skipped (time budget of %s s spent)\n\n%s\n' "$budget" "${skipped[*]}" >> "$report"
    status=1
fi
pack_logs
echo "gpu-check: report $report (logs in $log and $logs_tgz), $((SECONDS - start)) s" >&2
cat "$report"
exit "$status"
