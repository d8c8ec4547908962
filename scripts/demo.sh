#!/usr/bin/env bash
# Builds usbipd and runs it on the embedded demo devices (a 64 MiB scratch
# disk, a keyboard, a serial echo port and the test device) on TCP port
# 3240. The build needs protoc and the well-known .proto files (etcd-client,
# for the fleet): installed from Debian's packages when missing. Extra
# arguments go to usbipd.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null || [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
    pkgs=(protobuf-compiler libprotobuf-dev)
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    elif command -v sudo >/dev/null; then
        sudo apt-get update -q && sudo apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    else
        echo "usbipd's build needs protoc: install ${pkgs[*]} (Debian/Ubuntu) and run this again" >&2
        exit 1
    fi
fi
exec cargo run --release --bin usbipd -- --demo "$@"
