#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS seconds each (default 60).
#
#   scripts/fuzz.sh [SECONDS]
#
# Works on the stable toolchain: cargo-fuzz passes -Zsanitizer=address and other -Z
# flags, which stable rustc accepts with RUSTC_BOOTSTRAP=1 (the ASan runtime ships in
# rust-std for x86_64-unknown-linux-gnu). Needs a C++ compiler for libFuzzer
# (Debian: apt-get install build-essential).
#
# Environment:
#   FUZZ_TARGETS    space-separated targets (default: all in fuzz/fuzz_targets)
#   FUZZ_SANITIZER  address (default) or none; falls back to none if ASan cannot build
#   FUZZ_CORPUS     corpus root outside the repo (default /var/tmp/fsva-fuzz-corpus)
#
# Crash inputs go to fuzz/artifacts/<target>/ (git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s address <target> fuzz/artifacts/<target>/crash-...
# Exits nonzero if any target crashed (or failed to build/run).
set -euo pipefail

SECONDS_PER_TARGET="${1:-60}"
case "$SECONDS_PER_TARGET" in
'' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
CORPUS_ROOT="${FUZZ_CORPUS:-/var/tmp/fsva-fuzz-corpus}"
SANITIZER="${FUZZ_SANITIZER:-address}"

# -Z flags on stable. Scoped to this script's cargo invocations.
export RUSTC_BOOTSTRAP=1
# Cargo caches rustc's target-info probe in target/.rustc_info.json without keying it
# on RUSTC_BOOTSTRAP: one `cargo fuzz build` run without it poisons the cache and every
# later run fails with "the option `Z` is only accepted on the nightly compiler".
export CARGO_CACHE_RUSTC_INFO=0

if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
    echo "fuzz.sh: no C++ compiler found (libFuzzer is C++); install build-essential" >&2
    exit 1
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a TARGETS <<<"$FUZZ_TARGETS"
else
    TARGETS=()
    for f in "$FUZZ_DIR"/fuzz_targets/*.rs; do
        t="$(basename "$f" .rs)"
        TARGETS+=("$t")
    done
fi

cd "$ROOT"
fuzz=(cargo fuzz)
build_flags=(--fuzz-dir "$FUZZ_DIR" -s "$SANITIZER")

echo "fuzz.sh: building fuzz targets (sanitizer: $SANITIZER)" >&2
if ! "${fuzz[@]}" build "${build_flags[@]}" >&2; then
    if [ "$SANITIZER" = none ]; then
        exit 1
    fi
    echo "fuzz.sh: build with -s $SANITIZER failed; retrying with -s none" >&2
    SANITIZER=none
    build_flags=(--fuzz-dir "$FUZZ_DIR" -s none)
    "${fuzz[@]}" build "${build_flags[@]}" >&2
fi

status=0
summary=()
for t in "${TARGETS[@]}"; do
    corpus="$CORPUS_ROOT/$t"
    artifacts="$FUZZ_DIR/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "$FUZZ_DIR/seeds/$t" ]; then
        cp -n "$FUZZ_DIR/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    before="$(find "$artifacts" -type f | wc -l)"
    log="$(mktemp "${TMPDIR:-/tmp}/fsva-fuzz-$t.XXXXXX.log")"
    echo "fuzz.sh: running $t for ${SECONDS_PER_TARGET}s (corpus $corpus, log $log)" >&2
    rc=0
    libfuzzer_flags=(-max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1)
    "${fuzz[@]}" run "${build_flags[@]}" "$t" "$corpus" -- "${libfuzzer_flags[@]}" >"$log" 2>&1 || rc=$?
    after="$(find "$artifacts" -type f | wc -l)"
    crashes=$((after - before))
    runs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        # Crashed before writing an artifact, or failed to start at all.
        crashes=1
    fi
    if [ "$crashes" -ne 0 ]; then
        status=1
        echo "fuzz.sh: $t FAILED (exit $rc); tail of $log:" >&2
        grep -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|Test unit written|SUMMARY" "$log" >&2 || tail -n 40 "$log" >&2
        echo "fuzz.sh: reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s $SANITIZER $t fuzz/artifacts/$t/<crash-file>" >&2
    fi
    if [ "$crashes" -eq 0 ]; then
        rm -f "$log"
    fi
    summary+=("fuzz $t: ${runs:-0} runs, $crashes crashes${rate:+ ($rate exec/s)}")
done

printf '%s\n' "${summary[@]}"
exit "$status"
