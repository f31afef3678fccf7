#!/usr/bin/env bash
# Builds the test image test/busybox:1 as an OCI layout: a busybox-static rootfs with a root and a
# `coder` (1000:1000) user. Usage: busybox.sh LAYOUT_DIR   (the image is tagged "img" in that layout)
# Only Debian packages are used (busybox-static, umoci); nothing is fetched from a registry.
set -euo pipefail

layout=${1:?usage: busybox.sh LAYOUT_DIR}
busybox_bin=/bin/busybox
if ! "$busybox_bin" --list >/dev/null 2>&1; then
  echo "busybox-static is not installed ($busybox_bin)" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ebx-busybox.XXXXXX")
trap 'rm -rf "$work"' EXIT

umoci init --layout "$layout"
umoci new --image "$layout:img"
umoci unpack --image "$layout:img" "$work/bundle" >/dev/null
root=$work/bundle/rootfs

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,root,home/coder,var/run,run}
install -d -m 1777 "$root/tmp"
cp "$busybox_bin" "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
coder:x:1000:1000:coder:/home/coder:/bin/sh
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
coder:x:1000:
GROUP
# busybox has no os-release of its own; the demo shows this one.
cat >"$root/etc/os-release" <<'OSREL'
ID=busybox
NAME="BusyBox (envbox test image)"
PRETTY_NAME="BusyBox (envbox test image)"
OSREL
# /sbin/init is busybox init: with no inittab it would respawn shells on tty1-4 that do not exist in a
# container. An inittab without respawn entries makes it sit as a quiet, reaping PID 1.
cat >"$root/etc/inittab" <<'INITTAB'
::sysinit:/bin/true
INITTAB
chown 1000:1000 "$root/home/coder"
chmod 755 "$root/home/coder"

umoci repack --image "$layout:img" "$work/bundle"
umoci config --image "$layout:img" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd /bin/sh
umoci gc --layout "$layout"
