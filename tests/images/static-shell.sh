#!/usr/bin/env bash
# Builds the test image test/static-shell:1 as an OCI layout: nothing but a static shell at /bin/sh
# (busybox-static, copied under the name `sh`), /etc/passwd, /etc/group and the user's home. There is
# no getent, stat, cat, /sbin/init or os-release: envbox must learn the user from the image's files, not
# by running tools inside it. (Debian's busybox runs its applets for commands that are not on PATH, so
# the bootstrap's `mkdir` still works; no other file is in the image.)
# Usage: static-shell.sh LAYOUT_DIR   (the image is tagged "img" in that layout)
set -euo pipefail

layout=${1:?usage: static-shell.sh LAYOUT_DIR}
busybox_bin=/bin/busybox
if ! "$busybox_bin" --list >/dev/null 2>&1; then
  echo "busybox-static is not installed ($busybox_bin)" >&2
  exit 1
fi
if ldd "$busybox_bin" >/dev/null 2>&1; then
  echo "$busybox_bin is dynamically linked; the image needs a static shell" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ebx-static-shell.XXXXXX")
trap 'rm -rf "$work"' EXIT

umoci init --layout "$layout"
umoci new --image "$layout:img"
umoci unpack --image "$layout:img" "$work/bundle" >/dev/null
root=$work/bundle/rootfs

mkdir -p "$root"/{bin,etc,home/dev}
cp "$busybox_bin" "$root/bin/sh"
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
dev:x:1234:2345:static shell user:/home/dev:/bin/sh
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
dev:x:2345:
GROUP
chown 1234:2345 "$root/home/dev"
chmod 755 "$root/home/dev"

umoci repack --image "$layout:img" "$work/bundle"
umoci gc --layout "$layout"
