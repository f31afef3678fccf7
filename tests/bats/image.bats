#!/usr/bin/env bats
# The outer image (Containerfile, rootfs/, deploy/): built offline with buildah from a local Debian base, checked
# for what it must and must not contain, then run as a privileged pod that boots a workspace from the test
# registry with CODER_RUNTIME=runc. Warm (base, runtime stage and rootfs cached): well under a minute plus the boot.

bats_require_minimum_version 1.5.0

setup_file() {
  load '../lib/world'
  load '../lib/image'
  img_need_base
  # One build for the whole file: no sysbox package (SYSBOX_FROM=none) and Debian's runc for the test boot.
  local rc=0
  img_build "$BATS_FILE_TMPDIR/build.log" --build-arg SYSBOX_FROM=none --build-arg WITH_RUNC=true || rc=$?
  echo "$rc" >"$BATS_FILE_TMPDIR/build.rc"
  if ((rc == 0)); then
    img_rootfs >"$BATS_FILE_TMPDIR/image-dir"
  fi
}

setup() {
  load '../lib/world'
  load '../lib/image'
  load '../lib/assert'
  IMG_DIR=$(cat "$BATS_FILE_TMPDIR/image-dir" 2>/dev/null || true)
  ROOT=$IMG_DIR/rootfs
}

teardown() {
  pod_destroy
}

build_ok() {
  if [[ $(cat "$BATS_FILE_TMPDIR/build.rc") != 0 ]]; then
    tail -n 40 "$BATS_FILE_TMPDIR/build.log" >&2
    fail "the image build failed (log above)"
  fi
}

@test "image builds offline from the local base; without a sysbox package the sysbox stage is left out" {
  build_ok
  local log=$BATS_FILE_TMPDIR/build.log
  # Every FROM of the build is the local base or a stage of the file; nothing was pulled.
  run grep -E 'Trying to pull|Resolving|Pulling|docker\.io|rust:1' "$log"
  assert_status 1
  run grep -c "FROM $IMG_BASE_REF" "$log"
  assert_status 0
  # The build log says that sysbox is left out, and the sysbox stages were never built.
  run grep -F 'SYSBOX_FROM=none: the sysbox stage is left out' "$log"
  assert_status 0
  run grep -E 'AS sysbox-(deb-download|unpacked)' "$log"
  assert_status 1
  run img_buildah inspect --type image --format '{{index .OCIv1.Config.Labels "dev.envbox.sysbox"}}' "$IMG_REF"
  assert_status 0
  assert_equal "$output" none
}

@test "image: envbox as entrypoint, sysbox's run-time needs, OCI labels; no package manager or container engine" {
  build_ok
  [[ -d $ROOT ]] || fail "no unpacked rootfs"
  assert_equal "$(cat "$IMG_DIR/entrypoint.json")" '["/envbox","docker"]'
  # The binary under test, unchanged and static.
  cmp "$ROOT/envbox" "$ENVBOX_BIN" || fail "/envbox differs from $ENVBOX_BIN"
  run ldd "$ROOT/envbox"
  [[ $output != *"=>"* ]] || fail "/envbox is dynamically linked: $output"
  # What sysbox-mgr/-fs exec (sysbox.md §1) and envbox's iptables, resolved inside the image.
  local tool
  for tool in sh rsync modprobe iptables iptables-save fusermount runc; do
    run chroot "$ROOT" /bin/sh -c "command -v $tool"
    assert_status 0
  done
  run chroot "$ROOT" iptables --version
  assert_status 0
  [[ -s $ROOT/etc/ssl/certs/ca-certificates.crt ]] || fail "no CA bundle"
  assert_equal "$(cat "$ROOT/etc/subuid")" "sysbox:165536:65536"
  assert_equal "$(cat "$ROOT/etc/subgid")" "sysbox:165536:65536"
  local d
  for d in /var/lib/sysbox /var/lib/coder /var/lib/docker /var/lib/containers; do
    [[ -d $ROOT$d ]] || fail "missing directory $d"
  done
  # Left out: package manager, container engine, and (SYSBOX_FROM=none) sysbox itself.
  for tool in apt apt-get dpkg perl dockerd containerd sysbox-runc sysbox-mgr sysbox-fs; do
    # dash's `command -v` exits 127 for a command it cannot find.
    run -127 chroot "$ROOT" /bin/sh -c "command -v $tool"
  done
  # `docker` is envbox's shim (operators' `docker exec … workspace_cvm` habit), not a Docker client.
  assert_equal "$(readlink "$ROOT/usr/local/bin/docker")" /envbox "the docker shim"
  run chroot "$ROOT" /bin/sh -c 'docker info'
  assert_status 1
  assert_equal "$(grep -c . <<<"$output")" 1 "lines of 'docker info'"
  assert_contains "$output" "no dockerd" "docker info"
  [[ ! -e $ROOT/var/lib/apt && ! -e $ROOT/etc/apt && ! -e $ROOT/var/cache/apt ]] || fail "apt state left in the image"
  [[ -s $ROOT/var/lib/dpkg/status ]] || fail "dpkg status (for image scanners) missing"
  run img_buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.title"}} {{index .OCIv1.Config.Labels "org.opencontainers.image.licenses"}}' "$IMG_REF"
  assert_equal "$output" "envbox Apache-2.0"
  # One layer per source (runtime file system, rootfs/, sysbox, envbox): deletions really shrink the image.
  run img_buildah inspect --type image --format '{{len .OCIv1.RootFS.DiffIDs}}' "$IMG_REF"
  assert_equal "$output" 4
}

@test "image runs as a privileged pod: envbox is PID 1 and boots a workspace from the test registry" {
  build_ok
  pod_create image
  imgpod_start image CODER_INNER_HOSTNAME=from-image
  pod_wait_ready 120
  # PID 1 of the pod is the image's /envbox, with the image as its root.
  run cat "/proc/$POD_PID/cmdline"
  assert_equal "$(tr '\0' ' ' <"/proc/$POD_PID/cmdline")" "/envbox docker "
  run pod_exec cat /etc/os-release
  assert_contains "$output" "bookworm"
  run pod_ws hostname
  assert_status 0
  assert_equal "$output" from-image
  run pod_ws cat /etc/os-release
  assert_contains "$output" "ID=busybox"
  # The image cache is at its default, on the template's PVC sub-path envbox/docker.
  [[ -n $(find "$POD_DIR/volumes/pvc/envbox/docker/envbox" -mindepth 1 -maxdepth 1 2>/dev/null) ]] ||
    fail "no cache under the PVC's envbox/docker/envbox"
  pod_stop TERM 60
  assert_equal "$POD_EXIT_STATUS" 0
}

@test "image: a local sysbox package (SYSBOX_FROM=local) is checked against SYSBOX_SHA and gives the three binaries" {
  build_ok
  # A stand-in for sysbox-ce's .deb (the real one cannot be downloaded here): same name, same file layout.
  local pkg=$BATS_TEST_TMPDIR/pkg sha
  mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/usr/share/doc/sysbox-ce"
  printf 'Package: sysbox-ce\nVersion: 0.0.0-test\nArchitecture: amd64\nMaintainer: envbox tests\nDescription: stand-in\n' \
    >"$pkg/DEBIAN/control"
  for b in sysbox-runc sysbox-mgr sysbox-fs; do
    printf '#!/bin/sh\necho %s stand-in\n' "$b" >"$pkg/usr/bin/$b"
    chmod 755 "$pkg/usr/bin/$b"
  done
  echo stand-in >"$pkg/lib/systemd/system/sysbox.service"
  echo "stand-in licence" >"$pkg/usr/share/doc/sysbox-ce/copyright"
  dpkg-deb --build --root-owner-group "$pkg" "$BATS_TEST_TMPDIR/sysbox-ce.deb" >/dev/null
  sha=$(sha256sum "$BATS_TEST_TMPDIR/sysbox-ce.deb" | cut -d' ' -f1)

  local IMG_REF=localhost/envbox-test/envbox:local-sysbox
  # A wrong digest fails the build.
  local IMG_BUILD_EXTRA=("$BATS_TEST_TMPDIR/sysbox-ce.deb")
  run img_build "$BATS_TEST_TMPDIR/bad.log" --build-arg SYSBOX_FROM=local --build-arg SYSBOX_DEB=sysbox-ce.deb \
    --build-arg SYSBOX_SHA="${sha//[0-9]/0}" --build-arg WITH_RUNC=true
  assert_nonzero_status
  run grep -F 'FAILED' "$BATS_TEST_TMPDIR/bad.log"
  assert_status 0
  # The right one: the binaries land in /usr/bin, nothing else of the package does.
  run img_build "$BATS_TEST_TMPDIR/good.log" --build-arg SYSBOX_FROM=local --build-arg SYSBOX_DEB=sysbox-ce.deb \
    --build-arg SYSBOX_SHA="$sha" --build-arg WITH_RUNC=true
  assert_status 0
  run grep -F 'left out' "$BATS_TEST_TMPDIR/good.log"
  assert_status 1
  local ctr mnt
  ctr=$(img_buildah from --pull=never "$IMG_REF")
  mnt=$(img_buildah mount "$ctr")
  for b in sysbox-runc sysbox-mgr sysbox-fs; do
    [[ -x $mnt/usr/bin/$b ]] || { img_buildah rm "$ctr" >/dev/null; fail "no /usr/bin/$b"; }
  done
  run test -e "$mnt/lib/systemd/system/sysbox.service"
  img_buildah rm "$ctr" >/dev/null
  img_buildah rmi "$IMG_REF" >/dev/null
  assert_status 1
}

@test "deploy/: the Kubernetes manifest and the Coder template are consistent and complete" {
  run python3 "$EBX_REPO_ROOT/tests/lib/check_deploy.py" "$EBX_REPO_ROOT/deploy"
  assert_status 0
}

@test "deploy/kubernetes: every manifest is valid against the schemas of Kubernetes 1.30 to 1.35 (strict)" {
  local v f
  for v in 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0; do
    for f in "$EBX_REPO_ROOT"/deploy/kubernetes/*.yaml; do
      run ebx_kubernetes_validate --strict --quiet -k "$v" "$f"
      assert_status 0
    done
  done
  # The validator itself must refuse a misspelt field, or this test proves nothing.
  sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecond:/' \
    "$EBX_REPO_ROOT/deploy/kubernetes/workspace.yaml" >"$BATS_TEST_TMPDIR/typo.yaml"
  run ebx_kubernetes_validate --strict --quiet -k 1.33.0 "$BATS_TEST_TMPDIR/typo.yaml"
  assert_nonzero_status
}

@test "Containerfile: sysbox 0.7.1 is the default (0.7.0 has the sysbox-fs deadlock upstream moved away from)" {
  run grep -x 'ARG SYSBOX_VERSION=0.7.1' "$EBX_REPO_ROOT/Containerfile"
  assert_status 0
}
