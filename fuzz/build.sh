#!/bin/sh
# Builds the cargo-fuzz targets (the codec's decoders, the server's session core)
# on a stable toolchain.
#
#   fuzz/build.sh            AddressSanitizer build (the cargo-fuzz default)
#   fuzz/build.sh --no-asan  coverage-instrumented build without a sanitizer
#
# cargo-fuzz passes `-Zsanitizer=address`, a nightly-only flag; with no
# nightly available, RUSTC_BOOTSTRAP=1 lets the stable compiler accept it.
# `-s none` needs no unstable flag at all and is the fallback.
# Then run a target with e.g.:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run urb_command -- -max_total_time=60
# (from fuzz/ or the workspace root; add `-s none` for a --no-asan build).
# scripts/test.sh (CI) runs every target for 30 s this way, `-s none`.
set -eu

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

if [ "${1:-}" = "--no-asan" ]; then
    exec cargo fuzz build -s none
fi

if ! RUSTC_BOOTSTRAP=1 cargo fuzz build; then
    echo "ASan build failed; falling back to a build without sanitizer" >&2
    exec cargo fuzz build -s none
fi
