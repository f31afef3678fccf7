#!/usr/bin/env bash
# Builds the local base image of the outer-image build (Containerfile's BASE_IMAGE) as an OCI layout:
# `debootstrap --variant=minbase bookworm` from the machine's own apt mirror, nothing else. It stands in for
# docker.io/library/debian:bookworm-slim where no image registry can be reached (CI, the test machines).
# Usage: base.sh LAYOUT_DIR MIRROR   (tagged "img" in the layout; tests/lib/image.bash imports it into the
# harness's buildah storage). Only Debian packages are used; takes ~40-90 s.
set -euo pipefail

layout=${1:?usage: base.sh LAYOUT_DIR MIRROR}
mirror=${2:?usage: base.sh LAYOUT_DIR MIRROR}

work=$(mktemp -d "${TMPDIR:-/tmp}/ebx-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# As in debian:bookworm-slim: apt fetches from the same mirror the machine uses (written by debootstrap),
# keeps no downloaded .debs, and installs no recommends unless asked.
cat >"$root/etc/apt/apt.conf.d/90envbox-base" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT

rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
  "$root"/var/log/* "$root"/tmp/*
# debootstrap copies the build machine's resolv.conf and hostname; an image carries neither.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"

umoci init --layout "$layout"
umoci new --image "$layout:img"
umoci insert --image "$layout:img" "$root" /
umoci config --image "$layout:img" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd /bin/bash
umoci gc --layout "$layout"
