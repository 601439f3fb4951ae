#!/usr/bin/env bash
# `make soak`: builds the release binaries (unless SOAK_BIN_DIR names other ones or
# SOAK_SKIP_BUILD=1), then runs `aspire-bench soak` from them. Its output is also kept in
# $SOAK_DIR/last-run.txt. Every SOAK_* variable is read by aspire-bench itself (see
# `aspire-bench soak --help`); the main ones: SOAK_MINUTES (10), SOAK_CONCURRENCY (8),
# SOAK_LEASE_TTL (10), SOAK_FREEZE_SECONDS (lease TTL + 5), SOAK_DIR (.aspire/soak),
# SOAK_BIN_DIR (target/release). Exits non-zero when the soak fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${SOAK_BIN_DIR:-target/release}
if [ -z "${SOAK_BIN_DIR:-}" ] && [ "${SOAK_SKIP_BUILD:-}" != 1 ]; then
    echo "soak: building release binaries" >&2
    cargo build --release --workspace --bins
fi
for b in aspire-bench aspire-worker aspire-router aspire-discovery aspirectl mnist-export; do
    [ -x "$bin/$b" ] || { echo "soak: $bin/$b is missing; build it (cargo build --release --workspace --bins) or set SOAK_BIN_DIR" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "soak: etcd is not installed; run make setup" >&2; exit 1; }

dir=${SOAK_DIR:-.aspire/soak}
mkdir -p "$dir"
export SOAK_BIN_DIR=$bin
"$bin/aspire-bench" soak 2>&1 | tee "$dir/last-run.txt"
