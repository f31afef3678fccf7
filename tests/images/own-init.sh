#!/usr/bin/env bash
# Builds the test image test/own-init:1 as an OCI layout: a static shell (busybox-static, copied as
# /bin/busybox with sh and sleep links) and an /sbin/init of its own, a shell script, like images that
# bring s6-overlay, tini, openrc or a script as their init. The Go envbox ran any /sbin/init as the
# workspace's PID 1, so envbox must too. The init records its pid and command line, and exits on
# SIGTERM (the image has no StopSignal). User root only.
# Usage: own-init.sh LAYOUT_DIR   (the image is tagged "img" in that layout)
set -euo pipefail

layout=${1:?usage: own-init.sh LAYOUT_DIR}
busybox_bin=/bin/busybox
if ! "$busybox_bin" --list >/dev/null 2>&1 || ldd "$busybox_bin" >/dev/null 2>&1; then
  echo "a static busybox (busybox-static) is needed at $busybox_bin" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ebx-own-init.XXXXXX")
trap 'rm -rf "$work"' EXIT

umoci init --layout "$layout"
umoci new --image "$layout:img"
umoci unpack --image "$layout:img" "$work/bundle" >/dev/null
root=$work/bundle/rootfs

mkdir -p "$root"/{bin,sbin,etc,root,tmp,run}
chmod 1777 "$root/tmp"
cp "$busybox_bin" "$root/bin/busybox"
for applet in sh sleep cat echo; do
  ln -s busybox "$root/bin/$applet"
done
cat >"$root/sbin/init" <<'INIT'
#!/bin/sh
# The image's own init: says who it is, then idles until SIGTERM.
echo "own-init pid $$" >/run/own-init
trap 'echo stopped >>/run/own-init; exit 0' TERM INT
while :; do
  sleep 1 &
  wait $!
done
INIT
chmod 755 "$root/sbin/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
echo 'ID=owninit' >"$root/etc/os-release"

umoci repack --image "$layout:img" "$work/bundle"
umoci config --image "$layout:img" --config.env PATH=/bin:/sbin
umoci gc --layout "$layout"
