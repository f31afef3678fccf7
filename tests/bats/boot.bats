#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Boot: envbox as a pod's PID 1 pulls test/busybox:1 from the TLS + htpasswd registry, runs it with runc
# in a user namespace (0 -> 100000), runs the bootstrap script as the image user, and stops cleanly on
# SIGTERM. Every test boots its own pod (setup) and destroys it (teardown).

bats_require_minimum_version 1.5.0

setup() {
  load '../lib/world'
  load '../lib/assert'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable"
  pod_create boot
}

teardown() {
  pod_destroy
}

# Waits for envbox to exit on its own (failure paths) and sets POD_EXIT_STATUS.
wait_for_exit() {
  ebx_wait_for "${1:-60}" test -f "$POD_DIR/exit-status" || { pod_print_log; fail "envbox did not exit"; }
  POD_EXIT_STATUS=$(<"$POD_DIR/exit-status")
}

# Collapses runs of blanks, as /proc/<pid>/uid_map pads its columns.
squeeze() {
  awk '{$1 = $1} 1' <<<"$1"
}

pull_secret_for() {
  jq -cn --arg reg "$EBX_REGISTRY" --arg auth "$(printf '%s' "$1" | base64 -w0)" '{auths: {($reg): {auth: $auth}}}'
}

@test "boots the busybox image with runc: startup complete, exactly one done line, workspace.json" {
  pod_start boot
  pod_wait_ready 90
  local infos dones
  infos=$(pod_log_lines info | jq -r .output)
  assert_contains "$infos" "Envbox startup complete!" "info lines"
  dones=$(pod_log_lines "done" | grep -c . || true)
  assert_equal "$dones" 1 "number of done lines"

  local ws="$POD_DIR/state/workspace.json"
  [[ -f $ws ]] || fail "$ws was not written"
  run jq -e '(.id | type == "string" and length > 0) and (.pid | type == "number" and . > 1)
             and (.runtime | test("(^|/)runc$")) and (.runtime_root | type == "string") and (.bundle | type == "string")' "$ws"
  [[ $status == 0 ]] || fail "unexpected workspace.json: $(cat "$ws")"
  run pod_exec test -d "$(jq -r .bundle "$ws")"
  assert_status 0
}

@test "the workspace runs in a user namespace mapping 0 to 100000 (65536 ids)" {
  pod_start boot
  pod_wait_ready 90
  local ws
  ws=$(pod_workspace_pid)
  run pod_exec cat "/proc/$ws/uid_map"
  assert_status 0
  assert_equal "$(squeeze "$output")" "0 100000 65536" "uid_map of workspace init (pod pid $ws)"
  run pod_exec cat "/proc/$ws/gid_map"
  assert_status 0
  assert_equal "$(squeeze "$output")" "0 100000 65536" "gid_map of workspace init (pod pid $ws)"
  # Seen from inside, it is root of its own namespace.
  run pod_ws id -u
  assert_status 0
  assert_equal "$output" 0 "uid inside the workspace"
}

@test "the bootstrap script runs as uid 1000 and writes into the mounted home (101000 on disk)" {
  # Single quotes: $HOME must be expanded by the workspace shell, not here.
  # shellcheck disable=SC2016
  pod_start boot 'CODER_BOOTSTRAP_SCRIPT=id -u > "$HOME/bootstrap-ran"; echo hello-from-bootstrap'
  pod_wait_ready 90
  local marker=$POD_DIR/volumes/home/bootstrap-ran
  ebx_wait_for 30 test -s "$marker" || { pod_print_log; fail "bootstrap did not write $marker"; }
  assert_equal "$(<"$marker")" 1000 "uid recorded by the bootstrap script"
  assert_equal "$(stat -c %u:%g "$marker")" 101000:101000 "on-disk owner of $marker"
}

@test "SIGTERM: envbox exits 0 within CODER_SHUTDOWN_TIMEOUT and no workspace process remains" {
  # A bootstrap that never ends on its own, like a Coder agent.
  # shellcheck disable=SC2016
  pod_start boot CODER_SHUTDOWN_TIMEOUT=10 'CODER_BOOTSTRAP_SCRIPT=echo up > "$HOME/started"; exec sleep 1000'
  pod_wait_ready 90
  ebx_wait_for 30 test -s "$POD_DIR/volumes/home/started" || { pod_print_log; fail "bootstrap did not start"; }

  local procs
  mapfile -t procs < <(pod_workspace_processes)
  ((${#procs[@]} >= 2)) || fail "expected the workspace init and the bootstrap, found: ${procs[*]}"

  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status after SIGTERM"
  # The spec's deadline is CODER_SHUTDOWN_TIMEOUT; one more second covers this harness's 0.1 s polling
  # and the kernel tearing down the pod's pid namespace after envbox's exit.
  (($(echo "$POD_STOP_SECONDS <= 11" | bc))) || fail "shutdown took ${POD_STOP_SECONDS}s (limit 10s)"

  local p alive=()
  for p in "${procs[@]}"; do
    pod_proc_alive "$p" && alive+=("$p")
  done
  ((${#alive[@]} == 0)) || fail "workspace processes still alive (pid:starttime): ${alive[*]}"
}

@test "a wrong registry password fails start-up with exit 1, an error line and a done line" {
  local bad_pass=wrong-pass-7f3a
  pod_start boot "CODER_IMAGE_PULL_SECRET=$(pull_secret_for "$EBX_REG_USER:$bad_pass")"
  wait_for_exit 90
  assert_equal "$POD_EXIT_STATUS" 1 "exit status with bad credentials"
  [[ -n $(pod_log_lines error) ]] || { pod_print_log; fail "no {\"type\":\"error\"} line"; }
  assert_equal "$(pod_log_lines "done" | grep -c . || true)" 1 "number of done lines"
  refute_contains "$(<"$POD_DIR/envbox.log")" "$bad_pass" "envbox log"
}

@test "the agent token never appears in the envbox log, through start-up and shutdown" {
  local token=tok-SECRET-123
  pod_start boot "CODER_AGENT_TOKEN=$token" 'CODER_BOOTSTRAP_SCRIPT=echo bootstrap-done'
  pod_wait_ready 90
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  [[ -s $POD_DIR/envbox.log ]] || fail "empty envbox log"
  refute_contains "$(<"$POD_DIR/envbox.log")" "$token" "envbox log"
}

@test "the agent token reaches the workspace environment" {
  local token=tok-SECRET-123
  pod_start boot "CODER_AGENT_TOKEN=$token"
  pod_wait_ready 90
  local ws
  ws=$(pod_workspace_pid)
  local environ
  environ=$(pod_exec cat "/proc/$ws/environ" | tr '\0' '\n')
  grep -qFx "CODER_AGENT_TOKEN=$token" <<<"$environ" || fail "CODER_AGENT_TOKEN not in the workspace init's environment"
}
