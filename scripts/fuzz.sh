#!/usr/bin/env bash
# Runs each fuzz target of fuzz/ for SECONDS with cargo-fuzz (libFuzzer), installing
# cargo-fuzz first if it is missing. Usage: scripts/fuzz.sh SECONDS TARGET...
#
# Stable Rust: cargo-fuzz passes nightly-only -Z flags, which RUSTC_BOOTSTRAP=1 allows;
# no sanitizer (ASan needs a nightly runtime), but debug assertions are on, so integer
# overflow panics. Seeds are in fuzz/corpus/<target>/ (committed, small); what libFuzzer
# finds on top goes to fuzz/target/corpus/<target>/ and crashes to fuzz/artifacts/.
set -euo pipefail

seconds=${1:?usage: scripts/fuzz.sh SECONDS TARGET...}
shift
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# The fuzz build has its own flags, hence its own target folder.
unset CARGO_TARGET_DIR
flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${flags[@]}"

failed=()
for target in "$@"; do
    work=fuzz/target/corpus/$target
    mkdir -p "$work"
    echo "== $target: ${seconds}s"
    # New inputs go to the first folder; the seeds are only read.
    if ! cargo fuzz run "${flags[@]}" "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1; then
        failed+=("$target")
    fi
done
if ((${#failed[@]})); then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/; replay one with" \
        "RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --debug-assertions TARGET FILE)" >&2
    exit 1
fi
echo "fuzzing found nothing in ${#} target(s), ${seconds}s each"
