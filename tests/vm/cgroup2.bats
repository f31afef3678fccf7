#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# shellcheck disable=SC2016 # the bootstrap scripts are expanded inside the workspace
# cgroup v2 (issue #14), inside the qemu guest of tests/vm/run: every pod is made the way a kubelet with
# containerd makes one on a v2 node (POD_CGROUP_LAYOUT=kubelet-v2 in pod.bash): its cgroup deep under
# kubepods.slice with cpu.max and memory.max set, a private cgroup namespace, cgroup2 mounted rw at
# /sys/fs/cgroup inside it. Real envbox, runc and crun, a registry in the guest.

bats_require_minimum_version 1.5.0

DOCKER_IN_BOOTSTRAP='
dockerd >/var/log/dockerd.log 2>&1 &
for i in $(seq 300); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker load -i /images/busybox.tar >/dev/null && echo inner-docker-ready
'

SYSTEMD_DOCKER_BOOTSTRAP='
for i in $(seq 400); do
  case $(systemctl is-system-running 2>/dev/null) in running|degraded) break ;; esac
  sleep 0.5
done
systemctl start docker.service
for i in $(seq 300); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker load -i /images/busybox.tar >/dev/null && echo inner-docker-ready
'

setup() {
  load '../lib/world'
  load '../lib/assert'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through tests/vm/run"
  [[ $(stat -f -c %T /sys/fs/cgroup) == cgroup2fs ]] || fail "not a cgroup v2 machine"
  # One layer cache for the guest's pods: the Debian image is unpacked once under TCG.
  VM_CACHE=/var/lib/ebx-vm-cache
  mkdir -p "$VM_CACHE"
  pod_create v2
}

teardown() {
  pod_destroy
}

# CMD in the workspace through `envbox exec`, as a user's `kubectl exec` runs it: in the workspace's cgroup
# (pod_ws only enters namespaces, its process stays in the pod's cgroup).
ws_exec() {
  pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec --user root -- "$@"
}

ws_host_pid() {
  pod_host_pid "$(pod_workspace_pid)"
}

# The workspace's cgroup directory (its cgroup namespace root), from its init's cgroup.
ws_cgroup_dir() {
  local cg
  cg=$(pod_cgroup_of "$(ws_host_pid)")
  echo "/sys/fs/cgroup${cg%/init.scope}"
}

# Processes left anywhere under the pod's cgroup, one pid per line.
pod_tree_processes() {
  find "$POD_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
}

wait_bootstrap_line() {
  local line=$1 timeout=${2:-400}
  ebx_wait_for "$timeout" bash -c "grep -q '$line' '$POD_DIR/envbox.log' || test -f '$POD_DIR/exit-status'" || true
  grep -q "$line" "$POD_DIR/envbox.log" || {
    pod_print_log
    fail "the bootstrap did not print $line"
  }
}

@test "v2: envbox starts in a kubelet pod, the workspace nests under it and reads its CPU and memory limits" {
  pod_start v2 CODER_CPUS=1.5 CODER_MEMORY=512Mi CODER_CACHE_DIR="$VM_CACHE"
  pod_wait_ready 180

  assert_equal "$(pod_cgroup_of "$POD_PID")" "$POD_CGROUP_REL/init" "envbox's cgroup"
  local wscg
  wscg=$(pod_cgroup_of "$(ws_host_pid)")
  [[ $wscg == "$POD_CGROUP_REL"/*/init.scope ]] ||
    fail "the workspace's init is in $wscg, not in a child of the pod's cgroup $POD_CGROUP_REL"
  assert_equal "$(cat "$POD_CGROUP/cgroup.procs")" "" "processes directly in the pod's cgroup"

  run pod_ws cat /sys/fs/cgroup/cpu.max
  assert_status 0
  assert_equal "$output" "150000 100000" "cpu.max at the workspace's cgroup root"
  run pod_ws cat /sys/fs/cgroup/memory.max
  assert_status 0
  assert_equal "$output" 536870912 "memory.max at the workspace's cgroup root"
  run pod_ws cat /proc/1/cgroup
  assert_equal "$output" "0::/init.scope" "cgroup of the workspace's init (envbox's) inside"
  run pod_ws cat /sys/fs/cgroup/cgroup.subtree_control
  local c
  for c in cpu memory io pids; do
    assert_contains " $output " " $c " "controllers the workspace's children get"
  done

  # Delegated as cgroups(7) says: the workspace places processes, it cannot raise its own limits.
  local dir
  dir=$(ws_cgroup_dir)
  assert_equal "$(stat -c %u "$dir/cgroup.procs")" 100000 "owner of the workspace's cgroup.procs"
  assert_equal "$(stat -c %u "$dir/memory.max")" 0 "owner of the workspace's memory.max"
  run ws_exec sh -c 'echo max >/sys/fs/cgroup/memory.max'
  assert_nonzero_status

  # Past the limit: the kernel kills the workspace's process, not envbox.
  run ws_exec cat /proc/self/cgroup
  assert_equal "$output" "0::/init.scope" "cgroup of a command run through envbox exec"
  # The allocation faults its pages in from user space (awk doubling a string), the common way a program
  # meets its limit; a read() from /dev/zero into a huge buffer would fault them in the kernel instead.
  run timeout -k 5 240 bash -c "$(declare -f pod_exec pod_cgroup_of ws_exec)
    ws_exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'"
  ((status != 124)) || fail "envbox exec of the allocation did not end within 240 s: $(cat "$dir/memory.events")"
  assert_nonzero_status
  local kills
  kills=$(awk '$1 == "oom_kill" {print $2}' "$dir/memory.events")
  ((kills >= 1)) || fail "no OOM kill counted in $dir/memory.events: $(cat "$dir/memory.events")"
  pod_running || fail "envbox exited after the workspace's OOM kill"
  kill -0 "$POD_PID"
}

@test "v2: SIGTERM stops in order within the deadline and leaves a pod cgroup the kubelet can remove" {
  pod_start v2 CODER_CACHE_DIR="$VM_CACHE" CODER_SHUTDOWN_TIMEOUT=20
  pod_wait_ready 180
  pod_stop TERM 40
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"
  (($(echo "$POD_STOP_SECONDS < 20" | bc))) || fail "the stop took ${POD_STOP_SECONDS}s, past CODER_SHUTDOWN_TIMEOUT"
  assert_equal "$(pod_tree_processes)" "" "processes left in the pod's cgroup tree"
  # What the kubelet does once the container is gone: remove the pod's cgroup, children first.
  pod_remove_cgroup_tree "$POD_CGROUP" || fail "the pod's cgroup cannot be removed: $(find "$POD_CGROUP" -type d)"
}

@test "v2: after envbox is killed, the container's cgroup can be removed and the next container starts warm" {
  pod_start v2 CODER_CACHE_DIR="$VM_CACHE"
  pod_wait_ready 180
  kill -KILL "$POD_PID"
  ebx_wait_for 20 test -f "$POD_DIR/exit-status" || fail "the pod did not end after SIGKILL"
  ebx_wait_for 10 test -z "$(pod_tree_processes)" || fail "processes outlived the killed pod: $(pod_tree_processes)"
  pod_kubelet_restart_container || fail "the killed container's cgroup tree could not be removed"

  rm -f "$POD_DIR/exit-status"
  mv "$POD_DIR/envbox.log" "$POD_DIR/envbox.run1.log"
  pod_start v2 CODER_CACHE_DIR="$VM_CACHE"
  pod_wait_ready 180
  grep -q '"Prepared the root filesystem (0 layers unpacked' "$POD_DIR/envbox.log" ||
    fail "the restart unpacked layers again: $(grep -o '"Prepared[^"]*' "$POD_DIR/envbox.log")"
  run pod_ws cat /proc/1/cgroup
  assert_equal "$output" "0::/init.scope" "cgroup of the restarted workspace's init"
  pod_stop TERM 40
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"
}

@test "v2: crun runs the workspace with its limits" {
  pod_start v2 CODER_RUNTIME=crun CODER_MEMORY=256Mi CODER_CACHE_DIR="$VM_CACHE"
  pod_wait_ready 180
  run pod_ws cat /sys/fs/cgroup/memory.max
  assert_status 0
  assert_equal "$output" 268435456 "memory.max under crun"
  run ws_exec cat /proc/self/cgroup
  assert_status 0
  assert_equal "$output" "0::/init.scope" "cgroup of a command run through envbox exec under crun"
  pod_stop TERM 40
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"
}

@test "v2: Docker inside a workspace with envbox's init gets --memory and --cpus; envbox exec lands in a leaf" {
  pod_start v2 CODER_INNER_IMAGE="$EBX_REGISTRY/test/debian:noinit" CODER_INNER_USERNAME=root \
    CODER_CACHE_DIR="$VM_CACHE" CODER_MOUNTS="$EBX_VM_IMAGES:/images:ro" \
    CODER_BOOTSTRAP_SCRIPT="$DOCKER_IN_BOOTSTRAP"
  pod_wait_ready 400
  wait_bootstrap_line inner-docker-ready
  run --separate-stderr pod_ws docker run --rm --memory 64m --cpus 0.5 busybox cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max
  assert_status 0
  assert_equal "$output" $'67108864\n50000 100000' "limits of a container started by the inner dockerd"
  # The inner dockerd's cgroups nest under the workspace's.
  find "$(ws_cgroup_dir)" -mindepth 1 -type d -name 'docker' | grep -q . ||
    fail "no docker cgroup under the workspace's: $(find "$(ws_cgroup_dir)" -maxdepth 2 -type d)"

  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- cat /proc/self/cgroup
  assert_status 0
  assert_equal "$output" "0::/init.scope" "cgroup of a command run through envbox exec"
  pod_stop TERM 60
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"
  assert_equal "$(pod_tree_processes)" "" "processes left in the pod's cgroup tree"
}

@test "v2: a systemd workspace boots, starts units, and gives Docker's containers their limits" {
  pod_start v2 CODER_INNER_IMAGE="$EBX_REGISTRY/test/debian:bookworm" CODER_INNER_USERNAME=root \
    CODER_CACHE_DIR="$VM_CACHE" CODER_MOUNTS="$EBX_VM_IMAGES:/images:ro" \
    CODER_BOOTSTRAP_SCRIPT="$SYSTEMD_DOCKER_BOOTSTRAP"
  pod_wait_ready 400
  wait_bootstrap_line inner-docker-ready
  run pod_ws systemctl is-system-running
  [[ $output == running || $output == degraded ]] || { show_run; fail "systemd is $output"; }
  run pod_ws systemctl --failed --no-legend --plain
  echo "# failed units in the systemd workspace: ${output//$'\n'/, }" >&3
  refute_contains "$output" sys-kernel-debug.mount "failed units"
  refute_contains "$output" sys-kernel-tracing.mount "failed units"
  run pod_ws systemctl is-active docker.service
  assert_equal "$output" active "docker.service"
  run --separate-stderr pod_ws docker run --rm --memory 64m busybox cat /sys/fs/cgroup/memory.max
  assert_status 0
  assert_equal "$output" 67108864 "memory.max of a container under systemd's dockerd"
  pod_stop TERM 60
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"
}
