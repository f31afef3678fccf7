#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# CODER_PERSIST_ROOTFS (issue #19): the workspace's writable layer kept on CODER_STATE_DIR across stops,
# set aside when the image changes, reused after a kill. The real binary as a pod's PID 1, runc, the
# world's registry; every test boots its own pod.

bats_require_minimum_version 1.5.0

setup() {
  load '../lib/world'
  load '../lib/assert'
  load '../lib/net'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  pod_create persist
}

teardown() {
  pod_destroy
}

push_static_shell_once() {
  [[ -f $EBX_WORLD_DIR/registry/pushed-static-shell ]] && return 0
  world_push_image "$(world_cached_image static-shell "$EBX_IMAGES_DIR/static-shell.sh")" test/static-shell:1
  touch "$EBX_WORLD_DIR/registry/pushed-static-shell"
}

# Starts (again) on the same pod volumes; the earlier run's log is kept aside.
restart() {
  [[ ! -f $POD_DIR/envbox.log ]] || net_rotate_pod_log
  rm -f "$POD_DIR/exit-status"
  pod_start persist "$@"
  pod_wait_ready 120
}

write_user_files() {
  run pod_ws sh -c 'mkdir -p /opt/app /usr/local/bin && echo kept >/opt/app/file && echo tool >/usr/local/bin/tool && sync'
  assert_status 0
}

@test "persisted: files under /opt and /usr/local survive a stop and a start, and a SIGKILL of envbox" {
  pod_start persist CODER_PERSIST_ROOTFS=true
  pod_wait_ready 120
  write_user_files
  pod_stop TERM 40
  assert_equal "$POD_EXIT_STATUS" 0 "envbox's exit status"

  restart CODER_PERSIST_ROOTFS=true
  run pod_ws cat /opt/app/file /usr/local/bin/tool
  assert_status 0
  assert_equal "$output" $'kept\ntool' "files written before the stop"
  pod_log_lines info | grep -q 'Writable layer reused' || { pod_print_log; fail "no 'Writable layer reused' line"; }

  # Killed mid-run (node crash, OOM of PID 1): what was synced is there at the next start.
  run pod_ws sh -c 'echo before-kill >/opt/app/synced && sync'
  assert_status 0
  kill -KILL "$POD_PID"
  ebx_wait_for 20 test -f "$POD_DIR/exit-status" || fail "envbox did not die"
  restart CODER_PERSIST_ROOTFS=1
  run pod_ws cat /opt/app/synced
  assert_status 0
  assert_equal "$output" before-kill "a file synced before the SIGKILL"
}

@test "not persisted (the default): the next start has a fresh writable layer" {
  pod_start persist
  pod_wait_ready 120
  write_user_files
  pod_stop TERM 40
  restart
  run pod_ws test -e /opt/app/file
  assert_nonzero_status
}

@test "persisted, new image: a fresh root, the old layer kept aside and named; keep-on-image-change reuses it" {
  push_static_shell_once
  pod_start persist CODER_PERSIST_ROOTFS=true
  pod_wait_ready 120
  write_user_files
  pod_stop TERM 40

  restart CODER_PERSIST_ROOTFS=true "CODER_INNER_IMAGE=$EBX_REGISTRY/test/static-shell:1" CODER_INNER_USERNAME=dev
  [[ ! -e $POD_DIR/state/upper/opt/app/file ]] || fail "the new image got the old image's writable layer"
  local line kept
  line=$(pod_log_lines info | grep 'previous writable layer is kept at') || { pod_print_log; fail "the kept-aside layer is not named"; }
  kept=$(sed -n 's/.*is kept at \([^;]*\);.*/\1/p' <<<"$(jq -r .output <<<"$line")")
  assert_equal "$(cat "$kept/opt/app/file")" kept "the file in the layer kept aside at $kept"
  pod_stop TERM 40

  # Back on busybox with keep-on-image-change: the static-shell start's layer is reused as it is.
  echo note >"$POD_DIR/state/upper/note-from-static-shell-start"
  restart CODER_PERSIST_ROOTFS=keep-on-image-change
  run pod_ws cat /note-from-static-shell-start
  assert_status 0
  assert_equal "$output" note "a file of the layer made on the other image"
  pod_log_lines info | grep -q 'CODER_PERSIST_ROOTFS=keep-on-image-change' || { pod_print_log; fail "the reuse on a new image is not said"; }
}

@test "persisted: a kept layer of another id range is refused with what to do" {
  pod_start persist CODER_PERSIST_ROOTFS=true
  pod_wait_ready 120
  pod_stop TERM 40
  chown 0:0 "$POD_DIR/state/upper"
  [[ ! -f $POD_DIR/envbox.log ]] || net_rotate_pod_log
  rm -f "$POD_DIR/exit-status"
  pod_start persist CODER_PERSIST_ROOTFS=true
  ebx_wait_for 60 test -f "$POD_DIR/exit-status" || fail "envbox did not exit"
  assert_equal "$(<"$POD_DIR/exit-status")" 1 "envbox's exit status"
  run pod_log_lines error
  assert_contains "$output" "belongs to uid 0, not to the workspace's id range starting at 100000"
  assert_contains "$output" "CODER_PERSIST_ROOTFS=false"
}

@test "CODER_PERSIST_ROOTFS with a value that is neither a boolean nor keep-on-image-change exits 2" {
  pod_start persist CODER_PERSIST_ROOTFS=forever
  ebx_wait_for 30 test -f "$POD_DIR/exit-status" || fail "envbox did not exit"
  assert_equal "$(<"$POD_DIR/exit-status")" 2 "envbox's exit status"
  assert_contains "$(cat "$POD_DIR/envbox.log")" "CODER_PERSIST_ROOTFS"
  assert_contains "$(cat "$POD_DIR/envbox.log")" "keep-on-image-change"
}
