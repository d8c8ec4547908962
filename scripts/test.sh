#!/usr/bin/env bash
# Runs the whole usbwire test suite on a fresh Debian machine: installs the
# real peers the tests talk to (Debian's C usbip tools, qemu and a Debian
# kernel for the kernel interop tests), then checks formatting and lints,
# and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    bash .ci/install-deps
elif command -v sudo >/dev/null; then
    sudo bash .ci/install-deps
else
    echo "warning: not root and no sudo: assuming the Debian packages in .ci/install-deps are installed" >&2
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# Every fuzz target runs briefly, without a sanitizer, from an empty
# corpus, so that a property which breaks within seconds fails here and not
# only in a long run. A failing input is kept in fuzz/artifacts/TARGET/.
bash fuzz/build.sh --no-asan
# Each run is one single-threaded process: two at a time, one per core.
fuzz_one() {
    local target=$1 corpus log
    corpus="$PWD/fuzz/target/ci-corpus/$target"
    log="$PWD/fuzz/target/ci-$target.log"
    rm -rf "$corpus" && mkdir -p "$corpus"
    if (cd fuzz && cargo fuzz run "$target" -s none "$corpus" -- \
        -max_total_time="${FUZZ_SECONDS:-30}" -print_final_stats=1) >"$log" 2>&1; then
        echo "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$log")"
    else
        tail -n 60 "$log"
        echo "fuzz $target failed (full output: $log)" >&2
        return 1
    fi
}
export -f fuzz_one
(cd fuzz && cargo fuzz list) | xargs -P 2 -I{} bash -c 'fuzz_one "$@"' _ {}
# cargo-nextest (on the machine with the toolchain) runs each test in a
# process of its own and tests of different binaries side by side, with at
# most two qemu guests at a time (.config/nextest.toml): the kernel tests
# overlap instead of queueing binary after binary. Doc tests are cargo's.
# The kernel tests put our binaries into their guests (kernel::cargo_bin);
# built here, once, and not in the middle of the tests that wait for them
# (USBWIRE_BINS_PREBUILT: the tests take them as they are; cargo's test
# build relinks them with the same sources before any test starts).
cargo build --workspace --bins
export USBWIRE_BINS_PREBUILT=1
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace
    cargo test --workspace --doc
else
    echo "warning: cargo-nextest not found: running the tests one binary at a time" >&2
    cargo test --workspace
fi
# The benchmark must keep working: its smoke test runs every workload
# briefly and checks that the results are sane (no timing assertions). It is
# ignored in a plain `cargo test` because it needs the built usbipd.
cargo test -q -p usbwire-bench --test smoke -- --ignored
