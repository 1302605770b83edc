#!/usr/bin/env bash
# Runs every fsva test: formatting and lints, unit and end-to-end tests (real FUSE
# mounts, real appliance processes), and the decoder fuzz target for a bounded time.
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test-tools
start=$(date +%s)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (unit and end-to-end)"
# The end-to-end tests mount FUSE file systems and need the binaries built first.
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2

if [[ -x scripts/suites/run-all.sh ]]; then
  echo "== external suites"
  scripts/suites/ci.sh
fi
if [[ -x scripts/fuzz.sh ]]; then
  echo "== fuzzing the request decoder"
  scripts/fuzz.sh "${FSVA_FUZZ_SECONDS:-30}"
fi
echo "== all tests passed in $(( $(date +%s) - start )) s"
