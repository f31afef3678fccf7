#!/usr/bin/env bash
# Runs in the cgroup v2 guest (tests/vm/run): a test world whose registry starts from the host's registry
# storage, then bats on the files named in /share/bats-files. TAP goes to stdout (the host counts it).
set -uo pipefail
export EBX_REPO_ROOT=/share/repo EBX_CACHE_ROOT=/var/cache/envbox-test TMPDIR=/var/tmp
export ENVBOX_BIN=/share/envbox EBX_REGISTRY_SEED=/share/seed EBX_VM_IMAGES=/share/images
export POD_CGROUP_LAYOUT=kubelet-v2
cd "$EBX_REPO_ROOT" || exit 125
# shellcheck source=tests/lib/world.bash
. tests/lib/world.bash
echo "# guest: kernel $(uname -r), $(nproc) vCPUs, cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
world_start >/var/tmp/world.log 2>&1 || { echo "# the guest's test world did not start:"; sed 's/^/# /' /var/tmp/world.log; exit 1; }
mapfile -t files </share/bats-files
# A test that hangs fails on its own (with what it printed so far) instead of running the guest into the
# host's timeout, which would report nothing; each test needs 1–3 min under TCG.
export BATS_TEST_TIMEOUT=${EBX_VM_TEST_TIMEOUT:-480}
rc=0
bats --tap "${files[@]}" || rc=$?
world_stop >>/var/tmp/world.log 2>&1 || echo "# the guest's world teardown had errors"
left=$(world_leftovers)
[[ -z $left ]] || { echo "# the guest tests left behind: $left"; rc=1; }
exit "$rc"
