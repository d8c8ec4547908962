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
# The fuzz targets must keep building (they are not run here).
bash fuzz/build.sh --no-asan
cargo test --workspace
# The benchmark must keep working: its smoke test runs every workload
# briefly and checks that the results are sane (no timing assertions). It is
# ignored in a plain `cargo test` because it needs the built usbipd.
cargo test -q -p usbwire-bench --test smoke -- --ignored
