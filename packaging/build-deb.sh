#!/usr/bin/env bash
# Builds the usbwire Debian package with Debian's own tools (dpkg-deb,
# dpkg-shlibdeps): usbipd and usbip in /usr/sbin (they replace Debian's
# `usbip` package), the systemd units, the default /etc/usbwire/usbipd.toml,
# and the man pages and shell completions that `usbwire-docs` generates
# from the clap definitions.
#
#   packaging/build-deb.sh                 # cargo build --release, then package
#   packaging/build-deb.sh --bins DIR      # package the usbipd, usbip and
#                                          # usbwire-docs already built in DIR
#   ... --out DIR                          # where the .deb goes (default target/debian)
#   ... --fast                             # gzip -1 instead of xz -6: for tests,
#                                          # where xz of unoptimised binaries takes a minute
#
# Prints the path of the .deb on its last line. Everything it makes goes
# under target/ (or --out); nothing generated is committed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
bins=""
out="$repo/target/debian"
compress=(-Zxz)
while [ $# -gt 0 ]; do
    case "$1" in
        --bins) bins="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --fast) compress=(-Zgzip -z1); shift ;;
        *) echo "usage: $0 [--bins DIR] [--out DIR] [--fast]" >&2; exit 2 ;;
    esac
done
if [ -z "$bins" ]; then
    cargo build --release --locked -p usbwire-cli --bins --manifest-path "$repo/Cargo.toml" >&2
    bins="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
for b in usbipd usbip usbwire-docs; do
    [ -x "$bins/$b" ] || { echo "$0: $bins/$b is missing or not executable" >&2; exit 1; }
done

name=usbwire
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)"
arch="$(dpkg --print-architecture)"
# The changelog's date is the commit's, so that one commit packages alike.
epoch="$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)"
export SOURCE_DATE_EPOCH="$epoch"

mkdir -p "$out"
work="$(mktemp -d "$out/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
doc="$root/usr/share/doc/$name"
install -d -m 0755 "$root/DEBIAN" "$root/usr/sbin" "$root/etc/usbwire" "$root/etc/usbwire/attach" \
    "$root/lib/systemd/system" "$root/usr/share/man/man8" "$doc" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"

for b in usbipd usbip; do
    # Debian ships binaries stripped (the debug info belongs in a -dbgsym).
    install -m 0755 "$bins/$b" "$root/usr/sbin/$b"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/sbin/$b"
done
install -m 0644 "$here/systemd/usbipd.service" "$here/systemd/usbipd.socket" \
    "$here/systemd/usbip-attach@.service" "$root/lib/systemd/system/"
install -m 0644 "$here/usbipd.toml" "$root/etc/usbwire/usbipd.toml"
echo /etc/usbwire/usbipd.toml >"$root/DEBIAN/conffiles"

"$bins/usbwire-docs" "$work/docs" >&2
for page in "$work/docs/man/"*.8; do
    gzip -9n <"$page" >"$root/usr/share/man/man8/$(basename "$page").gz"
done
install -m 0644 "$work/docs/completions/bash/usbipd.bash" "$root/usr/share/bash-completion/completions/usbipd"
install -m 0644 "$work/docs/completions/bash/usbip.bash" "$root/usr/share/bash-completion/completions/usbip"
install -m 0644 "$work/docs/completions/zsh/_usbipd" "$work/docs/completions/zsh/_usbip" \
    "$root/usr/share/zsh/vendor-completions/"
install -m 0644 "$work/docs/completions/fish/usbipd.fish" "$work/docs/completions/fish/usbip.fish" \
    "$root/usr/share/fish/vendor_completions.d/"

install -m 0644 "$here/copyright" "$doc/copyright"
{
    printf '%s (%s) unstable; urgency=medium\n\n' "$name" "$version"
    printf '  * Built from the usbwire sources by packaging/build-deb.sh.\n\n'
    printf ' -- usbwire developers <usbwire@users.noreply.github.com>  %s\n' "$(date -u -R -d "@$epoch")"
} | gzip -9n >"$doc/changelog.gz"

for script in postinst postrm; do
    install -m 0755 "$here/$script" "$root/DEBIAN/$script"
done

# The shared libraries the binaries link, as dpkg-shlibdeps finds them
# (it wants a debian/control to read).
mkdir -p "$work/src/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" >"$work/src/debian/control"
depends="$(cd "$work/src" && dpkg-shlibdeps -O -e"$root/usr/sbin/usbipd" -e"$root/usr/sbin/usbip" |
    sed -n 's/^shlibs:Depends=//p')"
[ -n "$depends" ] || { echo "$0: dpkg-shlibdeps found no dependency" >&2; exit 1; }

installed_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat >"$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: usbwire developers <usbwire@users.noreply.github.com>
Installed-Size: $installed_kib
Depends: $depends
Suggests: linux-image-amd64 | linux-image, usb.ids
Conflicts: usbip
Replaces: usbip
Provides: usbip
Section: admin
Priority: optional
Description: USB/IP server and client, wire-compatible with Linux's usbip
 usbwire's usbipd exports USB devices over the network with the USB/IP
 protocol: local devices (through the kernel's usbip-host or its own usbfs
 export), emulated ones (disk, keyboard, serial port) and gadgets on
 usbip-vudc, optionally over mutual TLS. Its usbip attaches remote devices
 to the kernel's vhci-hcd. Both take the flags of the C usbip tools, which
 they replace.
 .
 The package has systemd units for the server (usbipd.socket,
 usbipd.service) and for keeping a remote device attached
 (usbip-attach@.service); none is enabled on installation.
CONTROL

# debsums and dpkg --verify check the installed files against these.
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"

deb="$out/${name}_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >&2
echo "$deb"
