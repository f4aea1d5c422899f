#!/usr/bin/env bash
# ThreadSanitizer over the kernels (tests/tsan.rs): every production kernel family launched in
# EmuMode::Threads (one OS thread per CUDA thread) with the emulator and kernels/*.cu compiled
# with -fsanitize=thread; TSan must report no race, and must report the deliberately racy
# reduction of tests/emu_kernels/emu_tsan.cu.
#
# Needs g++ and gcc's TSan runtime (Debian/Ubuntu: libtsan2 for gcc 12+, which the gcc package
# usually pulls in; `gcc -print-file-name=libtsan.so` must print an existing path).
#
# Builds in its own target dir (${CARGO_TARGET_DIR:-target}/tsan, dev profile), so the regular
# build is untouched. The TSan link flag goes to the test's crates only: `--target <host>` keeps
# RUSTFLAGS off build scripts and proc macros (rustc would dlopen a proc macro linked with
# libtsan). nvcc is not needed: NVCC and CUDA_HOME are unset for this build.
#
# Usage: scripts/tsan-check.sh [extra libtest args, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
libtsan="$(gcc -print-file-name=libtsan.so 2>/dev/null || true)"
if [[ "$libtsan" != /* || ! -e "$libtsan" ]]; then
    echo "tsan-check: gcc's ThreadSanitizer runtime is missing (gcc -print-file-name=libtsan.so" \
        "gives '$libtsan'): install it (Debian/Ubuntu: apt-get install libtsan2)" >&2
    exit 1
fi
host="$(rustc -vV | sed -n 's/^host: //p')"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/tsan"
export CXX=g++  # the objects must match the runtime that the gcc driver links (gcc's libtsan)
export NLA_EMU_CXXFLAGS="-fsanitize=thread -g -O1"
# The gcc driver links the TSan runtime for -fsanitize=thread, first (libtsan_preinit.o and
# --no-as-needed -ltsan ahead of every object), so its interceptors come before libc; but not
# under -nodefaultlibs, which rustc passes unless -C default-linker-libraries=yes.
export RUSTFLAGS="-C default-linker-libraries=yes -C link-arg=-fsanitize=thread"
export NLA_TSAN=1
# TSAN_OPTIONS, if set, adds to the test's defaults (halt_on_error=0 exitcode=0: the test
# judges each child's reports itself, see tests/tsan.rs)
unset NVCC CUDA_HOME

echo "== tsan-check: build (target dir $CARGO_TARGET_DIR, $host, NLA_EMU_CXXFLAGS=$NLA_EMU_CXXFLAGS)"
cargo test --target "$host" --test tsan --no-run
echo "== tsan-check: built in $((SECONDS - t0)) s; run"

# TSan needs the address-space layout it knows; on kernels whose mmap randomisation it cannot
# handle it dies with "unexpected memory mapping" before main: then rerun without ASLR.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run() {
    "$@" cargo test --target "$host" --test tsan -- --nocapture "${extra[@]}" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}
extra=("$@")
status=0
run env || status=$?
if [[ $status -ne 0 ]] && grep -q "unexpected memory mapping\|FATAL: ThreadSanitizer" "$log" \
    && command -v setarch >/dev/null; then
    echo "== tsan-check: TSan could not start with ASLR on: rerunning under setarch -R"
    status=0
    run setarch "$(uname -m)" -R || status=$?
fi

echo "== tsan-check summary ($((SECONDS - t0)) s in all)"
grep -E "^tsan: " "$log" | grep -v "^tsan: child::racy_block_sum: [0-9]" || true
grep -A6 "^tsan: child::racy_block_sum: [0-9]" "$log" || true
grep -E "^test result:" "$log" || true
if [[ $status -ne 0 ]]; then
    echo "tsan-check: FAILED (see the reports above)" >&2
    exit "$status"
fi
echo "tsan-check: OK"
