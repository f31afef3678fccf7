#!/usr/bin/env bash
# Builds the test image test/debian:bookworm as an OCI layout: debootstrap minbase with docker.io, systemd
# and a `coder` user (uid 1000, home /home/coder). Usage: debian.sh LAYOUT_DIR MIRROR
# The mirror comes from the machine's apt configuration (never hard-coded); takes about 40 s.
set -euo pipefail

layout=${1:?usage: debian.sh LAYOUT_DIR MIRROR}
mirror=${2:?usage: debian.sh LAYOUT_DIR MIRROR}

work=$(mktemp -d "${TMPDIR:-/tmp}/ebx-debian.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

debootstrap --variant=minbase \
  --include=docker.io,iptables,ca-certificates,procps,iproute2,sudo,systemd,systemd-sysv \
  bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

chroot "$root" useradd --create-home --uid 1000 --user-group --shell /bin/bash coder
# Smaller image: package lists and downloaded .debs are not needed at run time.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb

umoci init --layout "$layout"
umoci new --image "$layout:img"
umoci insert --image "$layout:img" "$root" /
umoci config --image "$layout:img" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd /sbin/init
umoci gc --layout "$layout"
