#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# PID 1 lifecycle: SIGTERM in every phase of start-up and after it, the ordered stop (bootstrap first,
# then the workspace's PID 1, deadlines), signals that must change nothing, a second SIGTERM, unexpected
# exits, reaping, cgroup placement, and what a stopped pod leaves behind (nothing). Every test boots its
# own pod (setup) and destroys it (teardown). The slow paths (a rate-limited registry path, a runtime
# whose `create` is slow) are in tests/lib/lifecycle.bash.

bats_require_minimum_version 1.5.0

setup() {
  load '../lib/world'
  load '../lib/assert'
  load '../lib/lifecycle'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable"
  pod_create lc
}

teardown() {
  lc_stop_mount_witness
  lc_stop_slow_proxy
  pod_destroy
}

# pod_start, then a witness that keeps the pod's mount namespace readable after envbox exits.
start_pod() {
  pod_start "$@"
  lc_start_mount_witness || fail "cannot watch the pod's mount namespace"
}

# Waits for envbox to exit on its own and sets POD_EXIT_STATUS.
wait_for_exit() {
  ebx_wait_for "${1:-60}" test -f "$POD_DIR/exit-status" || { pod_print_log; fail "envbox did not exit"; }
  POD_EXIT_STATUS=$(<"$POD_DIR/exit-status")
}

# SIGTERM, then: exit 0 within CODER_SHUTDOWN_TIMEOUT (plus one second for this harness's 0.1 s polling
# and the kernel's teardown of the pod's pid namespace), as the specification's deadline.
stop_within() {
  local timeout=$1
  pod_stop TERM $((timeout + 30)) || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  [[ $POD_EXIT_STATUS == 0 ]] || { pod_print_log; fail "exit status after SIGTERM: $POD_EXIT_STATUS (expected 0)"; }
  (($(echo "$POD_STOP_SECONDS <= $timeout + 1" | bc))) || {
    pod_print_log
    fail "shutdown took ${POD_STOP_SECONDS}s (CODER_SHUTDOWN_TIMEOUT=$timeout)"
  }
}

# Nothing of the pod may remain visible from the host once envbox has exited (processes in its cgroups
# go with its pid namespace, which takes the kernel a moment, hence the short wait), nor may envbox's
# mounts (overlay root filesystem, anything under the state and cache dirs) remain in the pod's mount
# namespace, which the witness keeps alive.
assert_no_leftovers() {
  local left
  ebx_wait_for 5 test -z "$(lc_leftovers)" || true
  left=$(lc_leftovers; lc_witness_mounts)
  [[ -z $left ]] || { pod_print_log; fail "the pod left behind:"$'\n'"$left"; }
}

assert_one_done_no_error() {
  assert_equal "$(pod_log_lines "done" | grep -c . || true)" 1 "number of done lines"
  [[ -z $(pod_log_lines error) ]] || { pod_print_log; fail "unexpected error line: $(pod_log_lines error)"; }
}

infos() {
  pod_log_lines info | jq -r .output
}

# Every blob in the cache has the digest its name says: an interrupted pull publishes nothing half-done.
assert_cache_verified() {
  local f bad=()
  for f in "$POD_DIR"/cache/blobs/sha256/*; do
    [[ -f $f ]] || continue
    [[ $(sha256sum "$f" | cut -d' ' -f1) == "${f##*/}" ]] || bad+=("$f")
  done
  ((${#bad[@]} == 0)) || fail "cache blobs whose content does not match their digest: ${bad[*]}"
}

proc_gone() {
  ! pod_proc_alive "$1"
}

proxy_sent_more_than() {
  (($(lc_proxy_bytes) > $1))
}

# Bootstrap scripts are fed to /bin/sh -s in the workspace; $HOME is the mounted $POD_DIR/volumes/home.
# shellcheck disable=SC2016
AGENT_LIKE='echo up > "$HOME/up"; exec sleep 1000'

@test "SIGTERM while pulling (rate-limited registry path): exit 0 within the deadline, nothing left, no partial blob published" {
  lc_start_slow_proxy 32768
  start_pod lc "CODER_INNER_IMAGE=$LC_PROXY_REGISTRY/test/busybox:1" \
    "CODER_IMAGE_PULL_SECRET=$(lc_secret_for "$LC_PROXY_REGISTRY")" CODER_SHUTDOWN_TIMEOUT=10
  lc_wait_log '"output":"Pulling image' 60 || { pod_print_log; fail "no Pulling line"; }
  # Manifest and config are a few KiB: beyond 64 KiB the layer blob is in flight.
  ebx_wait_for 60 proxy_sent_more_than 65536 || { pod_print_log; fail "no layer bytes went through the proxy"; }
  ! lc_log_has '"output":"Pulled ' || fail "the pull finished before SIGTERM; the phase was missed"
  stop_within 10
  assert_one_done_no_error
  assert_contains "$(infos)" "Stopped before the workspace started" "info lines"
  refute_contains "$(infos)" "Pulled " "info lines"
  assert_cache_verified
  assert_no_leftovers
}

@test "SIGTERM while unpacking the Debian image: exit 0 within the deadline, nothing left; the next start boots" {
  ebx_need_debian_image
  start_pod lc "CODER_INNER_IMAGE=$EBX_DEBIAN_IMAGE" CODER_SHUTDOWN_TIMEOUT=10
  lc_wait_log '"output":"Pulled ' 300 || { pod_print_log; fail "the pull did not finish"; }
  stop_within 10
  refute_contains "$(infos)" "Prepared the root filesystem" "info lines (SIGTERM must land while unpacking)"
  assert_contains "$(infos)" "Stopped before the workspace started" "info lines"
  assert_one_done_no_error
  assert_no_leftovers

  # The abandoned unpack is never used half-done: the next start on the same volumes unpacks it again.
  : >"$POD_DIR/envbox.log"
  lc_stop_mount_witness
  start_pod lc "CODER_INNER_IMAGE=$EBX_DEBIAN_IMAGE" CODER_SHUTDOWN_TIMEOUT=20
  pod_wait_ready 300
  run pod_ws test -f /etc/debian_version
  assert_status 0
  stop_within 20
  assert_no_leftovers
}

@test "SIGTERM while \`runc create\` is in flight: exit 0 within the deadline, the container is deleted" {
  local rt
  rt=$(lc_slow_runtime 3)
  start_pod lc "CODER_RUNTIME=$rt" CODER_SHUTDOWN_TIMEOUT=10
  ebx_wait_for 90 test -f "$POD_DIR/slow-runtime/create-started" || { pod_print_log; fail "create never started"; }
  stop_within 10
  refute_contains "$(infos)" "Envbox startup complete!" "info lines"
  assert_contains "$(infos)" "Stopped before the workspace started" "info lines"
  assert_one_done_no_error
  assert_no_leftovers
}

@test "SIGTERM after start: exit 0 within the deadline, clean stop, no process, runc state, cgroup or mount left" {
  start_pod lc CODER_SHUTDOWN_TIMEOUT=10 "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  local procs
  mapfile -t procs < <(pod_workspace_processes)
  ((${#procs[@]} >= 2)) || fail "expected the workspace init and the bootstrap, found: ${procs[*]}"
  # The witness sees envbox's overlay root filesystem while it runs, so its empty view later counts.
  [[ $(lc_witness_mounts) == *"overlay mount "* ]] ||
    fail "the mount witness does not see the workspace's overlay: $(lc_witness_mounts)"

  stop_within 10
  assert_one_done_no_error
  lc_log_has 'stopped cleanly' || { pod_print_log; fail "no 'stopped cleanly' line"; }
  local p alive=()
  for p in "${procs[@]}"; do
    pod_proc_alive "$p" && alive+=("$p")
  done
  ((${#alive[@]} == 0)) || fail "workspace processes still alive (pid:starttime): ${alive[*]}"
  assert_no_leftovers
}

# Lowering an oom_score_adj below the pod's needs CAP_SYS_RESOURCE (which root lacks on some nodes).
host_can_lower_oom_score() {
  local eff
  eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
  (((0x$eff >> 24) & 1))
}

@test "OOM order: the workspace's init gets the pod's oom_score_adj (500), envbox never more; one notice without CAP_SYS_RESOURCE" {
  POD_OOM_SCORE_ADJ=500 start_pod lc "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  local ws host envbox notices
  ws=$(pod_workspace_pid)
  host=$(pod_host_pid "$ws") || fail "no host pid for workspace pid $ws"
  assert_equal "$(<"/proc/$host/oom_score_adj")" 500 "the workspace init's oom_score_adj"
  envbox=$(<"/proc/$POD_PID/oom_score_adj")
  notices=$(infos | grep -c 'oom_score_adj' || true)
  if host_can_lower_oom_score; then
    ((envbox < 500)) || fail "envbox's oom_score_adj is $envbox, not below the workspace's 500"
    assert_equal "$notices" 0 "oom_score_adj notices with CAP_SYS_RESOURCE"
  else
    assert_equal "$envbox" 500 "envbox's oom_score_adj without CAP_SYS_RESOURCE (the pod's)"
    assert_equal "$notices" 1 "oom_score_adj notices without CAP_SYS_RESOURCE"
    infos | grep 'oom_score_adj' | grep -q CAP_SYS_RESOURCE || fail "the notice does not name CAP_SYS_RESOURCE: $(infos | grep oom_score_adj)"
  fi
  stop_within 25
}

@test "one pod per state dir: a second pod on the same CODER_STATE_DIR fails at once with a clear message; the first keeps running" {
  start_pod lc "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  local state=$POD_DIR/state out=$POD_DIR/second-pod procs p
  mapfile -t procs < <(pod_workspace_processes)
  mkdir "$out"
  # The second pod is a pod of its own (network, cgroups, volumes), made in a subshell so that this
  # shell's pod variables stay the first's; it records what happened in $out and destroys itself.
  (
    unset POD_NAME POD_NS POD_DIR POD_SLOT_DIR POD_VOLUMES POD_PID POD_RUNNER_PID
    pod_create lc2
    pod_start lc2 "CODER_STATE_DIR=$state"
    ebx_wait_for 30 test -f "$POD_DIR/exit-status" && cp "$POD_DIR/exit-status" "$out/"
    cp "$POD_DIR/envbox.log" "$out/"
    pod_destroy
  )
  [[ -f $out/exit-status ]] || fail "the second pod did not exit within 30 s; its log:"$'\n'"$(cat "$out/envbox.log")"
  assert_equal "$(<"$out/exit-status")" 1 "the second pod's exit status"
  assert_contains "$(<"$out/envbox.log")" "is in use by another envbox" "the second pod's log"
  pod_running || { pod_print_log; fail "the first pod exited"; }
  for p in "${procs[@]}"; do
    pod_proc_alive "$p" || fail "workspace process $p of the first pod is gone"
  done
  run pod_ws test -x /bin/sh
  assert_status 0
  stop_within 25
  assert_one_done_no_error
  assert_no_leftovers
}

@test "the agent token: 0600 files while running, none in the state dir after stop, and a SIGKILLed run's are removed at the next start" {
  local token=tok-STATE-4711 token2=tok-STATE-0815 files f
  start_pod lc "CODER_AGENT_TOKEN=$token" "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  mapfile -t files < <(grep -rlF "$token" "$POD_DIR/state" || true)
  ((${#files[@]} > 0)) || fail "no file of the state dir has the token while running: nothing to check"
  for f in "${files[@]}"; do
    assert_equal "$(stat -c %a "$f")" 600 "mode of $f"
  done
  stop_within 25
  assert_equal "$(grep -rlF "$token" "$POD_DIR/state" || true)" "" "files with the token in the state dir after stop"

  # A run that never gets to stop (SIGKILL, a lost node) leaves its files; the next start removes them,
  # also the one it does not write again (no bootstrap that time).
  pod_start lc "CODER_AGENT_TOKEN=$token" "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -f "$POD_DIR/state/bootstrap.pid" || { pod_print_log; fail "bootstrap did not start"; }
  kill -KILL "$POD_PID"
  wait_for_exit 30
  [[ -n $(grep -rlF "$token" "$POD_DIR/state" || true) ]] || fail "a SIGKILLed run left no token file: nothing to check"
  pod_start lc "CODER_AGENT_TOKEN=$token2"
  pod_wait_ready 90
  assert_equal "$(grep -rlF "$token" "$POD_DIR/state" || true)" "" "files with the first run's token after the next start"
  stop_within 25
}

@test "a runtime that hangs on kill and delete: envbox still stops within CODER_SHUTDOWN_TIMEOUT, exits 0, no workspace process left" {
  local rt procs p alive=()
  rt=$(lc_hanging_runtime)
  start_pod lc "CODER_RUNTIME=$rt" CODER_SHUTDOWN_TIMEOUT=10 "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  mapfile -t procs < <(pod_workspace_processes)
  ((${#procs[@]} >= 2)) || fail "expected the workspace init and the bootstrap, found: ${procs[*]}"
  stop_within 10
  [[ -f $POD_DIR/hanging-runtime/delete-called ]] || fail "the stand-in's delete was never called"
  for p in "${procs[@]}"; do
    pod_proc_alive "$p" && alive+=("$p")
  done
  ((${#alive[@]} == 0)) || fail "workspace processes still alive (pid:starttime): ${alive[*]}"
  assert_one_done_no_error
}

@test "the workspace's cgroups nest under the pod's in every hierarchy, belong to its root, and go with the stop" {
  start_pod lc "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  local ws host id line hier path envbox_path checked=0
  ws=$(pod_workspace_pid)
  host=$(pod_host_pid "$ws") || fail "no host pid for workspace pid $ws"
  id=$(jq -r .id "$POD_DIR/state/workspace.json")
  while IFS= read -r line; do
    hier=${line%:*}
    path=${line##*:}
    envbox_path=$(grep -F "$hier:" "/proc/$POD_PID/cgroup" | head -1)
    envbox_path=${envbox_path##*:}
    # On cgroup v2 envbox moves itself into the leaf init; the pod's cgroup is its parent.
    envbox_path=${envbox_path%/init}
    [[ $path == "$envbox_path/"* ]] || fail "workspace cgroup $line is not under the pod's $envbox_path"
    [[ $path == *"/$id"* ]] || fail "workspace cgroup $line is not the workspace's own ($id)"
    checked=$((checked + 1))
  done < <(grep -v '::/$' "/proc/$host/cgroup" | grep -v ':name=systemd:' || true)
  ((checked > 0)) || fail "no cgroup lines checked in /proc/$host/cgroup: $(cat "/proc/$host/cgroup")"
  # Delegated to the workspace's root (host uid 100000), so an inner dockerd or systemd can use it.
  local cg owned=0
  while read -r cg; do
    [[ -d $cg/$id ]] || continue
    assert_equal "$(stat -c %u "$cg/$id")" 100000 "owner of $cg/$id"
    owned=$((owned + 1))
  done <"$POD_SLOT_DIR/cgroups"
  ((owned > 0)) || fail "no workspace cgroup directory $id under the pod's cgroups"
  stop_within 25
  assert_no_leftovers
}

@test "bootstrap that traps TERM gets to write its file; it is on the mounted volume after envbox exits" {
  local script
  # shellcheck disable=SC2016
  script='trap '\''echo trapped > "$HOME/trapped"; exit 0'\'' TERM
echo up > "$HOME/up"
while :; do sleep 1; done'
  start_pod lc CODER_SHUTDOWN_TIMEOUT=20 "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  stop_within 20
  [[ -f $POD_DIR/volumes/home/trapped ]] || { pod_print_log; fail "the bootstrap's TERM trap did not write its file"; }
  assert_equal "$(<"$POD_DIR/volumes/home/trapped")" trapped "content written by the trap"
  lc_log_has 'stopped cleanly' || { pod_print_log; fail "no 'stopped cleanly' line"; }
  assert_no_leftovers
}

# Spends 5 s writing a file after TERM: five lines a second apart, then "complete".
# shellcheck disable=SC2016
SLOW_FLUSH='i=1; while [ $i -le 5 ]; do echo "line $i" >> "$HOME/FILE"; sleep 1; i=$((i + 1)); done; echo complete >> "$HOME/FILE"; exit 0'
EXPECTED_FLUSH=$'line 1\nline 2\nline 3\nline 4\nline 5\ncomplete'

@test "slow flush: a bootstrap that spends 5 s writing to the volume after TERM finishes before envbox exits" {
  local script
  script="trap '${SLOW_FLUSH//FILE/flush}' TERM
echo up > \"\$HOME/up\"
while :; do sleep 1; done"
  start_pod lc CODER_SHUTDOWN_TIMEOUT=30 "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  stop_within 30
  [[ -f $POD_DIR/volumes/home/flush ]] || { pod_print_log; fail "nothing was flushed"; }
  assert_equal "$(<"$POD_DIR/volumes/home/flush")" "$EXPECTED_FLUSH" "the flushed file"
  lc_log_has 'stopped cleanly' || { pod_print_log; fail "no 'stopped cleanly' line"; }
  assert_no_leftovers
}

@test "slow flush: envbox init forwards TERM to a workspace process and waits 5 s for it to finish writing" {
  # The bootstrap starts a TERM-trapping process and exits: the process is reparented to the workspace's
  # init (envbox init), so only the init's forwarding of the stop signal can reach it.
  local script
  script="( trap '${SLOW_FLUSH//FILE/flush-bg}' TERM; while :; do sleep 1; done ) </dev/null >/dev/null 2>&1 &
echo up > \"\$HOME/up\""
  start_pod lc CODER_SHUTDOWN_TIMEOUT=30 "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 90
  lc_wait_log 'The bootstrap script ended' 30 || { pod_print_log; fail "the bootstrap did not end"; }
  local procs
  mapfile -t procs < <(pod_workspace_processes)
  ((${#procs[@]} >= 2)) || fail "expected the workspace init and the background process, found: ${procs[*]}"
  stop_within 30
  [[ -f $POD_DIR/volumes/home/flush-bg ]] || { pod_print_log; fail "nothing was flushed"; }
  assert_equal "$(<"$POD_DIR/volumes/home/flush-bg")" "$EXPECTED_FLUSH" "the flushed file"
  lc_log_has 'stopped cleanly' || { pod_print_log; fail "no 'stopped cleanly' line"; }
  assert_no_leftovers
}

@test "SIGWINCH, SIGHUP, SIGUSR1 and SIGUSR2 change nothing: envbox and the workspace keep running" {
  start_pod lc CODER_DEBUG=true "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  local procs sig p
  mapfile -t procs < <(pod_workspace_processes)
  ((${#procs[@]} >= 2)) || fail "expected the workspace init and the bootstrap, found: ${procs[*]}"
  for sig in WINCH HUP USR1 USR2; do
    kill -s "$sig" "$POD_PID"
    # envbox logs each ignored signal at debug level: once it is logged, the signal was handled.
    lc_wait_log "ignoring signal $(kill -l "$sig")\$" 10 || { pod_print_log; fail "SIG$sig was not seen by envbox"; }
  done
  pod_running || { pod_print_log; fail "envbox exited after an ignored signal"; }
  for p in "${procs[@]}"; do
    pod_proc_alive "$p" || fail "workspace process $p died after ignored signals"
  done
  ! lc_log_has 'stopping the workspace' || fail "an ignored signal started a stop"
  stop_within 25
  assert_no_leftovers
}

@test "a second SIGTERM forces a fast stop of a bootstrap that ignores TERM, well before the deadline" {
  local script
  script="trap '' TERM
echo up > \"\$HOME/up\"
while :; do sleep 1; done"
  start_pod lc CODER_SHUTDOWN_TIMEOUT=60 "CODER_BOOTSTRAP_SCRIPT=$script"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  kill -TERM "$POD_PID"
  lc_wait_log 'stopping the bootstrap' 10 || { pod_print_log; fail "the first SIGTERM did not start the stop"; }
  pod_running || { pod_print_log; fail "envbox exited although the bootstrap ignores TERM"; }
  local t0 t1
  t0=$(date +%s.%N)
  kill -TERM "$POD_PID"
  wait_for_exit 60
  t1=$(date +%s.%N)
  assert_equal "$POD_EXIT_STATUS" 0 "exit status of a requested (forced) stop"
  # The deadline is 60 s; "fast" is within a sixth of it.
  (($(echo "$t1 - $t0 <= 10" | bc))) || { pod_print_log; fail "exit took $(echo "$t1 - $t0" | bc)s after the second SIGTERM"; }
  lc_log_has 'again: stopping fast' || { pod_print_log; fail "no 'stopping fast' line"; }
  lc_log_has 'stopped with force' || { pod_print_log; fail "no 'stopped with force' line"; }
  assert_one_done_no_error
  assert_no_leftovers
}

@test "the workspace's PID 1 killed: envbox reports it with its last output, exits 1, writes /dev/termination-log" {
  local wrapper
  wrapper=$(lc_termination_log_wrapper)
  ENVBOX_BIN=$wrapper start_pod lc "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/up" || { pod_print_log; fail "bootstrap did not start"; }
  local ws host
  ws=$(pod_workspace_pid)
  # Last words on the init's stderr (the runtime's pipe, which envbox drains). Written from the pod:
  # inside the workspace's user namespace the pipe, owned by the pod's root, cannot be opened.
  run pod_exec sh -c "echo last-words-7q3 > /proc/$ws/fd/2"
  assert_status 0
  host=$(pod_host_pid "$ws") || fail "no host pid for workspace pid $ws"
  kill -KILL "$host"
  wait_for_exit 30
  assert_equal "$POD_EXIT_STATUS" 1 "exit status after the workspace's init died"
  local err
  err=$(pod_log_lines error | jq -r .output)
  assert_contains "$err" "ended unexpectedly" "error line"
  assert_contains "$err" "last-words-7q3" "error line"
  assert_equal "$(pod_log_lines "done" | grep -c . || true)" 1 "number of done lines"
  assert_contains "$(<"$POD_DIR/termination-log")" "ended unexpectedly" "termination log"
  assert_contains "$(<"$POD_DIR/termination-log")" "last-words-7q3" "termination log"
  assert_no_leftovers
}

@test "the bootstrap's runc exec client and orphans in the pod are reaped: no zombie stays" {
  start_pod lc 'CODER_BOOTSTRAP_SCRIPT=echo bootstrap-done'
  pod_wait_ready 90
  lc_wait_log 'The bootstrap script ended' 30 || { pod_print_log; fail "the bootstrap did not end"; }
  # An orphan of the pod: its parent exits at once, so envbox (the pod's PID 1) inherits it.
  local nspid host id
  nspid=$(pod_exec sh -c 'sleep 1 </dev/null >/dev/null 2>&1 & echo $!')
  host=$(pod_host_pid "$nspid") || fail "orphan $nspid not found under envbox"
  id=$(pod_proc_identity "$host") || fail "orphan $nspid already gone"
  ebx_wait_for 15 proc_gone "$id" ||
    fail "the orphan $id was not reaped (state: $(awk '{print $3}' "/proc/$host/stat" 2>/dev/null))"
  run lc_pod_zombies
  assert_equal "$output" "" "zombies in the pod"
  stop_within 25
  assert_no_leftovers
}

@test "sysbox daemons are not started with CODER_RUNTIME=runc (sysbox not installed on CI)" {
  start_pod lc "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 90
  refute_contains "$(infos)" "Waiting for sysbox processes" "info lines"
  local ns proc comms=()
  ns=$(readlink "/proc/$POD_PID/ns/pid")
  for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/ns/pid" 2>/dev/null) == "$ns" ]] && comms+=("$(cat "$proc/comm" 2>/dev/null)")
  done
  refute_contains "${comms[*]}" "sysbox" "processes of the pod"
  stop_within 25
  assert_no_leftovers
}

@test "sysbox-runc lifecycle: daemons ready before create, stopped after delete (skipped: sysbox not installed on CI)" {
  command -v sysbox-runc >/dev/null && command -v sysbox-mgr >/dev/null && command -v sysbox-fs >/dev/null ||
    skip "sysbox is not installable on these machines"
  start_pod lc -CODER_RUNTIME "CODER_BOOTSTRAP_SCRIPT=$AGENT_LIKE"
  pod_wait_ready 120
  assert_contains "$(infos)" "Waiting for sysbox processes" "info lines"
  lc_log_has 'sysbox-mgr is ready' || fail "sysbox-mgr never became ready"
  lc_log_has 'sysbox-fs is ready' || fail "sysbox-fs never became ready"
  stop_within 25
  assert_no_leftovers
}
