#!/usr/bin/env bash
# Where usbipd's user-space CPU goes, per URB: runs one bench workload with
# usbipd under callgrind, then prints instructions per URB and the
# functions that cost most. Instruction counts do not depend on what else
# the machine is doing, so two builds can be compared on a busy machine.
#
#   scripts/profile.sh [WORKLOAD] [USBIPD]
#   scripts/profile.sh usbwire:bulk-out-512-k32
#   scripts/profile.sh usbwire:ctrl /path/to/other/usbipd     # compare builds
#
# Kernel time is not in these counts; for system calls and context
# switches per URB, attach `perf stat -e 'syscalls:sys_enter_*'` to usbipd.
set -euo pipefail
cd "$(dirname "$0")/.."
workload=${1:-usbwire:bulk-out-512-k32}
usbipd=${2:-$PWD/target/release/usbipd}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release --bins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat >"$out/usbipd" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.out "$usbipd" "\$@"
EOF
chmod +x "$out/usbipd"
./target/release/usbwire-bench --duration 2 --filter "$workload" --usbipd "$out/usbipd" \
    --json-only >/dev/null
# usbipd writes the profile when it exits on the bench's SIGTERM.
for _ in $(seq 100); do [ -s "$out/callgrind.out" ] && break; sleep 0.1; done
total=$(callgrind_annotate "$out/callgrind.out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
# Every URB ends in exactly one Session::complete; callgrind counts calls.
urbs=$(callgrind_annotate --tree=caller "$out/callgrind.out" |
    grep -A1 -E '< .*Session::pump \(' | grep -B1 -E '\* .*Session::complete \[' |
    sed -nE 's/.*\(([0-9,]+)x\).*/\1/p' | tr -d , | head -n1)
if [ -z "$urbs" ] || [ "$urbs" -eq 0 ]; then
    echo "no URB completed under callgrind" >&2
    exit 1
fi
echo "workload $workload: $urbs URBs, $total instructions in usbipd, $((total / urbs)) per URB"
echo "top functions (self cost):"
callgrind_annotate "$out/callgrind.out" | sed -n '/^Ir  *file:function/,$p' | sed -n '3,17p' |
    sed -E 's#/rustc/[0-9a-f]+/library/#std/#; s#/root/.cargo/registry/src/[^/]+/##' | cut -c1-150
