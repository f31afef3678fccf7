#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# The workspace container (issue #5): config.json, init, environment, mounts, devices, limits, the
# bootstrap and `envbox exec`, end to end: the real binary as a pod's PID 1, a real registry, runc (and
# crun). Every test boots its own pod (setup) and destroys it (teardown).

bats_require_minimum_version 1.5.0

setup() {
  load '../lib/world'
  load '../lib/assert'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable"
  pod_create ws
}

teardown() {
  pod_destroy
}

# Builds (cached by script hash) and pushes an image of tests/images once per world.
# Usage: push_image_once NAME REPO:TAG
push_image_once() {
  local name=$1 ref=$2 layout
  [[ -f $EBX_WORLD_DIR/registry/pushed-$name ]] && return 0
  layout=$(world_cached_image "$name" "$EBX_IMAGES_DIR/$name.sh")
  world_push_image "$layout" "$ref"
  touch "$EBX_WORLD_DIR/registry/pushed-$name"
}

# The environment of a workspace process (pid in the pod's pid namespace), one variable per line.
pod_environ() {
  pod_exec cat "/proc/$1/environ" | tr '\0' '\n'
}

# Fails unless the KEY=VALUE line is in the text. Usage: has_line TEXT LINE WHAT
has_line() {
  grep -qFx -- "$2" <<<"$1" || fail "$3 lacks the line '$2'. It has:"$'\n'"$1"
}

# Fails when a variable NAME is in the text. Usage: lacks_var TEXT NAME WHAT
lacks_var() {
  ! grep -q "^$2=" <<<"$1" || fail "$3 has $2, which must not be passed in"
}

# Waits for a file the bootstrap writes into the home volume.
wait_home_file() {
  ebx_wait_for "${2:-30}" test -s "$POD_DIR/volumes/home/$1" || {
    pod_print_log
    fail "the bootstrap did not write $1 into the home volume"
  }
}

# pid:starttime of a process, like pod_proc_identity but with shell builtins only (fast enough to
# take a hundred of them while they live). Empty when the process is gone.
proc_identity() {
  local stat f
  read -r stat <"/proc/$1/stat" 2>/dev/null || return 0
  # Fields after "comm)": state is the first (field 3), starttime the 20th (field 22).
  read -ra f <<<"${stat##*) }"
  printf '%s:%s\n' "$1" "${f[19]}"
}

# True when none of the processes in the caller's `orphans` array (pid:starttime) is still running:
# each is gone or a zombie.
orphans_exited() {
  local o stat f
  for o in "${orphans[@]}"; do
    read -r stat <"/proc/${o%%:*}/stat" 2>/dev/null || continue
    read -ra f <<<"${stat##*) }"
    [[ ${o#*:} == "${f[19]}" ]] || continue
    [[ ${f[0]} == Z ]] || return 1
  done
  return 0
}

# How many of the caller's `orphans` still exist (zombies included).
orphans_left() {
  local o n=0
  for o in "${orphans[@]}"; do
    [[ $(proc_identity "${o%%:*}") == "$o" ]] && n=$((n + 1))
  done
  echo "$n"
}

# Polls `systemctl is-system-running` in the workspace for up to 60 s until running or degraded (some
# kernel file system mounts fail in a user namespace, sysbox.md §10.6).
wait_systemd_up() {
  local state="" deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    state=$(pod_ws systemctl is-system-running 2>/dev/null || true)
    if [[ $state == running || $state == degraded ]]; then
      echo "# systemctl is-system-running: $state" >&3
      return 0
    fi
    sleep 1
  done
  pod_ws systemctl list-jobs --no-pager >&2 || true
  pod_ws systemctl --failed --no-pager >&2 || true
  fail "systemctl is-system-running: '$state' after 60 s"
}

# The stop of the workspace was clean: envbox logs it at info level.
assert_stopped_cleanly() {
  grep -q "stopped cleanly" "$POD_DIR/envbox.log" || { pod_print_log; fail "envbox did not report a clean stop"; }
}

@test "EnvboxArgs: env filter, TUN/FUSE, home and read-only mounts, bootstrap as the user, limits, hostname" {
  local secrets=$POD_DIR/volumes/secrets before
  mkdir -p "$secrets"
  echo s3cr3t-file >"$secrets/token"
  # World-writable, so that only the read-only mount can stop a write from inside.
  chmod 0777 "$secrets"
  before=$(stat -c '%u:%g %a' "$secrets")
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  local script='id -u > "$HOME/bootstrap-uid"; grep SigBlk /proc/self/status > "$HOME/bootstrap-sigblk"; env > "$HOME/bootstrap-env"; echo agent > "$BINARY_DIR/agent"'
  pod_start ws \
    TEST_VAR=hello=world FOO=bar PFX_ONE=1 PFX_TWO=2 PFXNO=no NOT_PASSED=nope \
    'CODER_INNER_ENVS=TEST_VAR,FOO,PFX_*' \
    CODER_ADD_FUSE=true CODER_ADD_TUN=true \
    "CODER_MOUNTS=$POD_DIR/volumes/home:/home/coder,$secrets:/var/secrets:ro" \
    CODER_MEMORY=1073741824 CODER_CPUS=1.5 CODER_INNER_HOSTNAME=testmepls \
    "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 120

  # Environment: the workspace init's, and the bootstrap's.
  local ws init_env boot_env v
  ws=$(pod_workspace_pid)
  init_env=$(pod_environ "$ws")
  wait_home_file bootstrap-env
  boot_env=$(<"$POD_DIR/volumes/home/bootstrap-env")
  for v in TEST_VAR=hello=world FOO=bar PFX_ONE=1 PFX_TWO=2; do
    has_line "$init_env" "$v" "the workspace init's environment"
    has_line "$boot_env" "$v" "the bootstrap's environment"
  done
  for v in PFXNO NOT_PASSED CODER_INNER_ENVS CODER_MEMORY; do
    lacks_var "$init_env" "$v" "the workspace init's environment"
    lacks_var "$boot_env" "$v" "the bootstrap's environment"
  done

  # Devices: char nodes that open, and a TUN device can be made with them.
  run pod_ws sh -c 'test -c /dev/fuse && test -c /dev/net/tun && exec 3<>/dev/fuse 4<>/dev/net/tun && echo opened'
  assert_status 0
  assert_equal "$output" opened "opening /dev/fuse and /dev/net/tun inside"
  run pod_ws tunctl -t ebxtap0
  assert_status 0
  run pod_ws ip link show ebxtap0
  assert_status 0

  # The home volume belongs to the user (100000+1000) on disk, and the bootstrap, run as uid 1000,
  # wrote into it and into ~/.coder (BINARY_DIR).
  assert_equal "$(stat -c %u:%g "$POD_DIR/volumes/home")" 101000:101000 "owner of the home volume"
  wait_home_file bootstrap-uid
  assert_equal "$(<"$POD_DIR/volumes/home/bootstrap-uid")" 1000 "uid of the bootstrap"
  assert_equal "$(stat -c %u:%g "$POD_DIR/volumes/home/bootstrap-uid")" 101000:101000 "owner of the bootstrap's file"
  wait_home_file .coder/agent
  # envbox reads its signals from a blocked signalfd; none of that mask may reach the workspace.
  wait_home_file bootstrap-sigblk
  assert_equal "$(awk '{print $2}' "$POD_DIR/volumes/home/bootstrap-sigblk")" 0000000000000000 "the bootstrap's blocked signals"
  assert_equal "$(stat -c %u:%g "$POD_DIR/volumes/home/.coder")" 101000:101000 "owner of ~/.coder"

  # Read-only mount: readable, not writable inside (although world-writable), untouched outside.
  run pod_ws cat /var/secrets/token
  assert_status 0
  assert_equal "$output" s3cr3t-file "the read-only mount's file, inside"
  run pod_ws sh -c 'echo x > /var/secrets/new'
  assert_nonzero_status
  assert_contains "$output" "Read-only file system" "writing into the read-only mount"
  assert_equal "$(stat -c '%u:%g %a' "$secrets")" "$before" "owner and mode of the read-only source"
  [[ ! -e $secrets/new ]] || fail "a file appeared in the read-only source"

  # Limits, as the workspace sees its own cgroups.
  run pod_ws cat /sys/fs/cgroup/memory/memory.limit_in_bytes
  assert_status 0
  assert_equal "$output" 1073741824 "memory.limit_in_bytes inside"
  run pod_ws cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us
  assert_status 0
  assert_equal "$output" 150000 "cpu.cfs_quota_us inside"
  run pod_ws cat /sys/fs/cgroup/cpu/cpu.cfs_period_us
  assert_status 0
  assert_equal "$output" 100000 "cpu.cfs_period_us inside"

  run pod_ws hostname
  assert_status 0
  assert_equal "$output" testmepls "hostname inside"
}

@test "CODER_INNER_ENVS='*' passes pod variables but neither the pull secret nor the bootstrap script" {
  local marker=bootstrap-marker-5d1e auth
  auth=$(jq -r '.auths[].auth' <<<"$EBX_PULL_SECRET")
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  pod_start ws 'CODER_INNER_ENVS=*' MY_VISIBLE=yes \
    "CODER_BOOTSTRAP_SCRIPT=env > \"\$HOME/bootstrap-env\" # $marker"
  pod_wait_ready 120
  wait_home_file bootstrap-env
  local init_env boot_env what text
  init_env=$(pod_ws cat /proc/1/environ | tr '\0' '\n')
  boot_env=$(<"$POD_DIR/volumes/home/bootstrap-env")
  for what in init bootstrap; do
    if [[ $what == init ]]; then text=$init_env; else text=$boot_env; fi
    has_line "$text" MY_VISIBLE=yes "the $what's environment"
    lacks_var "$text" CODER_IMAGE_PULL_SECRET "the $what's environment"
    lacks_var "$text" CODER_BOOTSTRAP_SCRIPT "the $what's environment"
    refute_contains "$text" "$auth" "the $what's environment"
    refute_contains "$text" "$marker" "the $what's environment"
  done
}

@test "without systemd, envbox init is PID 1 and reaps 100 orphaned zombies within 2 s of their exit" {
  pod_start ws
  pod_wait_ready 120
  local cmdline
  cmdline=$(pod_ws cat /proc/1/cmdline | tr '\0' ' ')
  [[ $cmdline == "/.envbox/envbox init "* ]] || fail "PID 1 of the workspace: expected envbox init, got '$cmdline'"

  local ws_host
  ws_host=$(pod_host_pid "$(pod_workspace_pid)")
  # Each subshell exits at once, so its `sleep` is orphaned and re-parented to the workspace's PID 1.
  # Their output goes nowhere: nothing waits for them to close a pipe.
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  pod_ws sh -c 'i=0; while [ $i -lt 100 ]; do (sleep 8 &); i=$((i + 1)); done' </dev/null >/dev/null 2>&1 ||
    fail "could not start the orphans"
  # The orphans: sleeps whose parent is the workspace init (host pids), as pid:starttime.
  local pid ppid comm orphans=()
  while read -r pid ppid comm; do
    [[ $ppid == "$ws_host" && $comm == sleep ]] && orphans+=("$(proc_identity "$pid")")
  done < <(ps -e -o pid=,ppid=,comm=)
  ((${#orphans[@]} == 100)) || fail "expected 100 orphaned sleeps under the workspace init, found ${#orphans[@]}"

  # Until every orphan has exited (is a zombie or gone)...
  ebx_wait_for 30 orphans_exited || fail "the orphans did not exit"
  # ... then 2 s later none is left.
  sleep 2
  local left
  left=$(orphans_left)
  ((left == 0)) || fail "$left of the 100 orphans were not reaped 2 s after exiting"
}

@test "a Debian image with systemd: systemd is PID 1 and reaches running or degraded" {
  ebx_need_debian_image
  pod_start ws "CODER_INNER_IMAGE=$EBX_DEBIAN_IMAGE"
  pod_wait_ready 300
  run pod_ws cat /proc/1/comm
  assert_status 0
  assert_equal "$output" systemd "PID 1 of the workspace"
  run pod_ws test -f /etc/machine-id
  assert_status 0

  wait_systemd_up
  run pod_ws cat /etc/machine-id
  assert_status 0
  [[ $output =~ ^[0-9a-f]{32}$ ]] || fail "/etc/machine-id inside: '$output'"

  # SIGRTMIN+3 stops systemd cleanly.
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status after SIGTERM"
  assert_stopped_cleanly
}

@test "a systemd image without /etc/machine-id gets an empty one in the writable layer and boots" {
  ebx_need_debian_image
  if [[ ! -f $EBX_WORLD_DIR/registry/pushed-nomachineid ]]; then
    local layout tmp=$BATS_TEST_TMPDIR/nomid
    layout=$(world_cached_image debian "$EBX_IMAGES_DIR/debian.sh" "$(ebx_debian_mirror)")
    # Blobs are immutable: hard links save copying 500 MB; index.json is rewritten, so it is copied.
    mkdir -p "$tmp/layer/etc"
    cp "$layout/index.json" "$layout/oci-layout" "$tmp/"
    cp -al "$layout/blobs" "$tmp/blobs"
    touch "$tmp/layer/etc/.wh.machine-id"
    tar -C "$tmp/layer" --owner=0 --group=0 -cf "$tmp/whiteout.tar" etc/.wh.machine-id
    umoci raw add-layer --image "$tmp:img" "$tmp/whiteout.tar"
    world_push_image "$tmp" test/debian-nomid:1
    touch "$EBX_WORLD_DIR/registry/pushed-nomachineid"
  fi
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/debian-nomid:1"
  pod_wait_ready 300
  grep -q "no /etc/machine-id; added an empty one" "$POD_DIR/envbox.log" || { pod_print_log; fail "envbox did not add /etc/machine-id"; }
  run pod_ws cat /proc/1/comm
  assert_status 0
  assert_equal "$output" systemd "PID 1 of the workspace"
  wait_systemd_up
  # systemd filled in a transient id; the image's layers are untouched (the file lives in the upper dir).
  run pod_ws cat /etc/machine-id
  assert_status 0
  [[ $output =~ ^[0-9a-f]{32}$ ]] || fail "/etc/machine-id inside: '$output'"
  [[ -f $POD_DIR/state/upper/etc/machine-id ]] || fail "no machine-id in the writable layer $POD_DIR/state/upper"
}

@test "an image with only a static shell (no getent, stat, cat) boots and its user is detected" {
  push_image_once static-shell test/static-shell:1
  # shellcheck disable=SC2016 # expanded by the workspace's shell: builtins only
  local script='while read -r k v rest; do [ "$k" = Uid: ] && echo "$v"; done </proc/self/status >"$HOME/uid"; echo "$HOME" >"$HOME/home"'
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/static-shell:1" CODER_INNER_USERNAME=dev \
    "CODER_MOUNTS=$POD_DIR/volumes/home:/home/dev" "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 120
  assert_contains "$(pod_log_lines info | jq -r .output)" \
    'Detected workspace user "dev" (uid 1234, gid 2345) with home directory "/home/dev"' "info lines"
  wait_home_file uid
  assert_equal "$(<"$POD_DIR/volumes/home/uid")" 1234 "uid of the bootstrap"
  wait_home_file home
  assert_equal "$(<"$POD_DIR/volumes/home/home")" /home/dev "HOME of the bootstrap"
  assert_equal "$(stat -c %u:%g "$POD_DIR/volumes/home/uid")" 101234:102345 "owner of the bootstrap's file"
  run pod_ws /bin/sh -c 'test -e /usr/bin/getent || test -e /bin/cat || test -e /usr/bin/stat'
  assert_nonzero_status
}

@test "envbox exec runs as the workspace user by default and as root with --user root" {
  pod_start ws
  pod_wait_ready 120
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- id
  assert_status 0
  assert_contains "$output" "uid=1000(coder) gid=1000(coder)" "id through envbox exec"
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec --user root -- id -u
  assert_status 0
  assert_equal "$output" 0 "id -u with --user root"
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- sh -c 'echo "$HOME $(pwd)"; touch "$HOME/by-exec"'
  assert_status 0
  assert_equal "$output" "/home/coder /home/coder" "HOME and cwd through envbox exec"
  assert_equal "$(stat -c %u:%g "$POD_DIR/volumes/home/by-exec")" 101000:101000 "owner of a file made through exec"
  # No signal is blocked in the command (envbox itself blocks them all).
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- grep SigBlk /proc/self/status
  assert_status 0
  assert_equal "$(awk '{print $2}' <<<"$output")" 0000000000000000 "blocked signals of a command run through envbox exec"
  # The exit status of the command is envbox exec's.
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- sh -c 'exit 7'
  assert_status 7
}

@test "the image's StopSignal reaches the workspace's processes on stop" {
  local layout tmp
  if [[ ! -f $EBX_WORLD_DIR/registry/pushed-stopsig ]]; then
    layout=$(world_cached_image busybox "$EBX_IMAGES_DIR/busybox.sh")
    tmp=$BATS_TEST_TMPDIR/stopsig
    cp -a "$layout" "$tmp"
    umoci config --image "$tmp:img" --config.stopsignal SIGUSR1
    world_push_image "$tmp" test/stopsig:1
    touch "$EBX_WORLD_DIR/registry/pushed-stopsig"
  fi
  # A daemon that ignores TERM and leaves on USR1, outliving the bootstrap (which envbox stops first,
  # with TERM); it can only end cleanly if the stop signal is the image's.
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  local script='(trap "" TERM; trap "echo usr1 > \"\$HOME/got-signal\"; exit 0" USR1; echo up > "$HOME/daemon-up"; while :; do sleep 0.1; done) >/dev/null 2>&1 &
exec sleep 1000'
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/stopsig:1" CODER_DEBUG=true CODER_SHUTDOWN_TIMEOUT=20 \
    "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 120
  wait_home_file daemon-up
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status after SIGTERM"
  [[ -s $POD_DIR/volumes/home/got-signal ]] || { pod_print_log; fail "the daemon never got SIGUSR1"; }
  assert_equal "$(<"$POD_DIR/volumes/home/got-signal")" usr1 "what the daemon saw"
  # envbox asked the runtime for signal 10 (SIGUSR1), by number.
  grep -Eq "runc .*kill envbox-ws-[0-9]+ 10\$" "$POD_DIR/envbox.log" || { pod_print_log; fail "no 'runc kill <id> 10' in the debug log"; }
  assert_stopped_cleanly
}

@test "a root-owned docker volume with content (as the Go envbox left it) works inside: root's files, writable, shifted once" {
  # What the Go envbox's ID-mapped bind left on the PVC: the inner dockerd's files owned by host root.
  local vol=$POD_DIR/volumes/var-lib-coder/docker
  mkdir -p "$vol/image/overlay2"
  echo '{"Repositories":{}}' >"$vol/image/overlay2/repositories.json"
  chmod 700 "$vol/image"
  pod_start ws
  pod_wait_ready 120
  run pod_ws stat -c %u:%g /var/lib/docker/image/overlay2/repositories.json
  assert_status 0
  assert_equal "$output" 0:0 "owner inside of a file the Go envbox's dockerd wrote"
  run pod_ws sh -c 'cat /var/lib/docker/image/overlay2/repositories.json && echo new >/var/lib/docker/image/overlay2/new'
  assert_status 0
  assert_contains "$output" Repositories "the file read inside"
  assert_contains "$(pod_log_lines info | jq -r .output)" "shifted" "build log"
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }

  # Done once: the next start shifts nothing and the files stay the workspace root's.
  mv "$POD_DIR/envbox.log" "$POD_DIR/envbox.log.1"
  pod_start ws
  pod_wait_ready 120
  refute_contains "$(pod_log_lines info | jq -r .output)" "shifted" "build log of the second start"
  run pod_ws stat -c %u:%g /var/lib/docker/image/overlay2/new
  assert_status 0
  assert_equal "$output" 0:0 "owner inside of the file written by the first start"
}

@test "a restart on the same state dir re-uses the TUN and FUSE nodes" {
  pod_start ws CODER_ADD_TUN=true CODER_ADD_FUSE=true
  pod_wait_ready 120
  run pod_ws sh -c 'exec 3<>/dev/fuse 4<>/dev/net/tun'
  assert_status 0
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status of the first run"
  [[ -n $(find "$POD_DIR/state" -type c -name tun) ]] || fail "the first run left no TUN node in the state dir to re-use"

  mv "$POD_DIR/envbox.log" "$POD_DIR/envbox.log.1"
  pod_start ws CODER_ADD_TUN=true CODER_ADD_FUSE=true
  pod_wait_ready 120
  run pod_ws sh -c 'test -c /dev/fuse && test -c /dev/net/tun && exec 3<>/dev/fuse 4<>/dev/net/tun && echo opened'
  assert_status 0
  assert_equal "$output" opened "opening the devices after the restart"
  run pod_ws tunctl -t ebxtap1
  assert_status 0
}

@test "CODER_RUNTIME=crun boots the workspace on this host's cgroup layout" {
  command -v crun >/dev/null || skip "crun is not installed"
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  pod_start ws CODER_RUNTIME=crun CODER_MEMORY=268435456 'CODER_BOOTSTRAP_SCRIPT=id -u > "$HOME/bootstrap-uid"'
  pod_wait_ready 120
  assert_equal "$(jq -r .runtime "$POD_DIR/state/workspace.json")" "$(command -v crun)" "runtime in workspace.json"
  # On a hybrid host (this VM) envbox runs crun without the cgroup2 mount at /sys/fs/cgroup/unified.
  if [[ $(stat -f -c %T /sys/fs/cgroup 2>/dev/null) != cgroup2fs && $(stat -f -c %T /sys/fs/cgroup/unified 2>/dev/null) == cgroup2fs ]]; then
    grep -q "runs with /sys/fs/cgroup/unified hidden" "$POD_DIR/envbox.log" || { pod_print_log; fail "crun was not run with the hybrid layout's cgroup2 hidden"; }
  fi
  wait_home_file bootstrap-uid
  assert_equal "$(<"$POD_DIR/volumes/home/bootstrap-uid")" 1000 "uid of the bootstrap"
  run pod_ws cat /sys/fs/cgroup/memory/memory.limit_in_bytes
  assert_status 0
  assert_equal "$output" 268435456 "memory.limit_in_bytes inside"
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- id -u
  assert_status 0
  assert_equal "$output" 1000 "id -u through envbox exec"
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status after SIGTERM"
  assert_stopped_cleanly
}

# --- issue 17 ---------------------------------------------------------------------------------------

@test "CODER_AGENT_SUBSYSTEM of the pod is merged into the workspace's as envbox,<theirs> without CODER_INNER_ENVS" {
  pod_start ws CODER_AGENT_SUBSYSTEM=exectrace
  pod_wait_ready 120
  local init_env
  init_env=$(pod_environ "$(pod_workspace_pid)")
  has_line "$init_env" CODER_AGENT_SUBSYSTEM=envbox,exectrace "the workspace init's environment"
}

@test "a CODER_INNER_HOSTNAME with underscores (a Coder workspace name) is the workspace's hostname" {
  pod_start ws CODER_INNER_HOSTNAME=my_work_space
  pod_wait_ready 120
  run pod_ws hostname
  assert_status 0
  assert_equal "$output" my_work_space "hostname inside"
}

@test "an image's own /sbin/init (not systemd, not busybox) is the workspace's PID 1 and the build log names it" {
  push_image_once own-init test/own-init:1
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/own-init:1" CODER_INNER_USERNAME=root -CODER_MOUNTS
  pod_wait_ready 120
  local cmdline
  cmdline=$(pod_exec cat "/proc/$(pod_workspace_pid)/cmdline" | tr '\0' ' ')
  assert_contains "$cmdline" "/sbin/init" "PID 1's command line"
  refute_contains "$cmdline" "envbox" "PID 1's command line"
  ebx_wait_for 10 pod_ws sh -c 'test -s /run/own-init' || fail "the image's init did not run"
  assert_contains "$(pod_ws cat /run/own-init)" "own-init pid 1" "what the image's init wrote"
  assert_contains "$(pod_log_lines info | jq -r .output)" "init: /sbin/init" "info lines"
  pod_stop TERM 30
  assert_equal "$POD_EXIT_STATUS" 0 "exit status after SIGTERM"
}

@test "busybox's /sbin/init stays the exception: envbox's init is PID 1 and the build log says why" {
  pod_start ws
  pod_wait_ready 120
  assert_contains "$(pod_exec cat "/proc/$(pod_workspace_pid)/cmdline" | tr '\0' ' ')" "init --grace" \
    "PID 1's command line"
  assert_contains "$(pod_log_lines info | jq -r .output)" "busybox" "info lines naming the init"
}

@test "the docker shim maps docker exec/ps/logs onto envbox and answers other commands in one line" {
  pod_start ws
  pod_wait_ready 120
  # The outer image installs the shim as /usr/local/bin/docker, a link to /envbox (argv[0] dispatch).
  local docker=$BATS_TEST_TMPDIR/bin/docker
  mkdir -p "${docker%/*}"
  ln -s "$ENVBOX_BIN" "$docker"
  local st="CODER_STATE_DIR=$POD_DIR/state"
  # shellcheck disable=SC2016 # expanded by the workspace's shell
  run pod_exec env "$st" "$docker" exec -i -u root -w /tmp -e FOO=bar -e 'BAZ=a=b' workspace_cvm \
    sh -c 'id -u; pwd; echo "$FOO $BAZ"'
  assert_status 0
  assert_equal "$output" "0"$'\n'"/tmp"$'\n'"bar a=b" "docker exec -u root -w /tmp -e ..."
  # As with the Go envbox's container, docker exec runs as root unless -u says otherwise.
  run pod_exec env "$st" "$docker" exec -it workspace_cvm id -u
  assert_status 0
  assert_equal "$output" 0 "docker exec -it as the default user (root)"
  run pod_exec env "$st" "$docker" exec --user=coder workspace_cvm id -u
  assert_status 0
  assert_equal "$output" 1000 "docker exec --user=coder"
  # Exit statuses come through.
  run pod_exec env "$st" "$docker" exec workspace_cvm sh -c 'exit 7'
  assert_status 7
  run pod_exec env "$st" "$docker" ps
  assert_status 0
  assert_contains "$output" workspace_cvm "docker ps"
  run pod_exec env "$st" "$docker" logs workspace_cvm
  assert_contains "$output" "kubectl logs" "docker logs"
  # Anything else: one line saying there is no dockerd and what to use instead.
  local cmd
  for cmd in "run --rm hello-world" "exec other_container true" "info" ""; do
    # shellcheck disable=SC2086 # split on purpose
    run --separate-stderr pod_exec env "$st" "$docker" $cmd
    assert_nonzero_status
    assert_equal "$(grep -c . <<<"$stderr$output")" 1 "lines for 'docker $cmd'"
    assert_contains "$stderr" "no dockerd" "docker $cmd"
    assert_contains "$stderr" "envbox exec" "docker $cmd"
  done
}

@test "a read-only mount owned outside the workspace's ids is left as is and the build log says it appears as nobody" {
  local ro=$POD_DIR/volumes/ro-data mapped=$POD_DIR/volumes/ro-mapped
  mkdir -p "$ro" "$mapped"
  echo x >"$ro/f"
  chown 101000:101000 "$mapped"
  pod_start ws "CODER_MOUNTS=$POD_DIR/volumes/home:/home/coder,$ro:/data:ro,$mapped:/mapped:ro"
  pod_wait_ready 120
  local info
  info=$(pod_log_lines info | jq -r .output)
  grep -F "$ro" <<<"$info" | grep -F /data | grep -q nobody ||
    fail "no build-log line saying the files of $ro (/data) appear as nobody. Info lines:"$'\n'"$info"
  refute_contains "$info" "$mapped" "info lines (its owner is inside the workspace's ids)"
  run pod_ws stat -c %u /data/f
  assert_status 0
  assert_equal "$output" 65534 "owner of /data/f inside"
  assert_equal "$(stat -c %u:%g "$ro" "$ro/f" | sort -u)" 0:0 "owner of the read-only source outside"
}
