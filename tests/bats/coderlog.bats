#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Start-up progress in the Coder dashboard: envbox sends its build-log lines to a fake Coder
# (tests/lib/fake_coder.py, HTTPS in the upstream namespace on 203.0.113.1:7443), and a rejected token,
# a refusing server or a hanging one never holds start-up or shutdown back.
#
# Timing comparisons are made side by side in the same test: a pod without CODER_AGENT_URL, then the
# same pod with it, each reading envbox's own "Workspace started in X s".

bats_require_minimum_version 1.5.0

CODER_ADDR=203.0.113.1
CODER_PORT=7443
CODER_URL=https://$CODER_ADDR:$CODER_PORT
CODER_TOKEN=tok-CODER-5b1e9c
LOG_SOURCE_PATH=/api/v2/workspaceagents/me/log-source
LOGS_PATH=/api/v2/workspaceagents/me/logs
# Coder's request timeout in envbox (coderlog::REQUEST_TIMEOUT).
REQUEST_TIMEOUT=5

setup_file() {
  # One fake Coder port, and timings compared side by side: this file's tests run one at a time.
  export BATS_NO_PARALLELIZE_WITHIN_FILE=true
  load '../lib/world'
  [[ -n ${EBX_WORLD_DIR:-} ]] || return 0
  # The fake Coder's self-signed certificate, and a CODER_EXTRA_CERTS_PATH directory trusting both it
  # and the registry's.
  CODER_CERT_DIR=$BATS_FILE_TMPDIR/coder-tls
  CODER_CERTS_PATH=$BATS_FILE_TMPDIR/extra-certs
  mkdir -p "$CODER_CERT_DIR" "$CODER_CERTS_PATH"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$CODER_ADDR" \
    -keyout "$CODER_CERT_DIR/key.pem" -out "$CODER_CERT_DIR/cert.pem" \
    -addext "subjectAltName=IP:$CODER_ADDR" 2>/dev/null
  cp "$CODER_CERT_DIR/cert.pem" "$CODER_CERTS_PATH/coder.pem"
  cp "$EBX_REG_CA" "$CODER_CERTS_PATH/registry.pem"
  export CODER_CERT_DIR CODER_CERTS_PATH
}

setup() {
  load '../lib/world'
  load '../lib/assert'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable"
  CODER_RECORD=$BATS_TEST_TMPDIR/coder-requests.jsonl
  CODER_PID=""
}

teardown() {
  coder_stop
  pod_destroy
}

# coder_start MODE: the fake Coder in the upstream namespace (ok|401|hang|down), recording accepted
# requests to CODER_RECORD.
coder_start() {
  local ready=$BATS_TEST_TMPDIR/coder-ready
  rm -f "$ready" "$CODER_RECORD"
  # nsenter (not the world_in_upstream function, which would fork a subshell) so that $! is the server.
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" python3 "$EBX_REPO_ROOT/tests/lib/fake_coder.py" \
    --listen "$CODER_ADDR:$CODER_PORT" --cert "$CODER_CERT_DIR/cert.pem" --key "$CODER_CERT_DIR/key.pem" \
    --token "$CODER_TOKEN" --record "$CODER_RECORD" --mode "$1" --ready "$ready" \
    </dev/null >>"$BATS_TEST_TMPDIR/coder.log" 2>&1 3>&- &
  CODER_PID=$!
  ebx_wait_for 10 test -s "$ready" || { cat "$BATS_TEST_TMPDIR/coder.log" >&2; fail "fake Coder did not start"; }
}

coder_stop() {
  [[ -n ${CODER_PID:-} ]] || return 0
  kill -TERM "$CODER_PID" 2>/dev/null || true
  wait "$CODER_PID" 2>/dev/null || true
  CODER_PID=""
}

# The pod environment that turns the Coder log on.
coder_env() {
  echo "CODER_AGENT_URL=$CODER_URL"
  echo "CODER_AGENT_TOKEN=$CODER_TOKEN"
  echo "CODER_EXTRA_CERTS_PATH=$CODER_CERTS_PATH"
}

# Outputs of the entries Coder accepted, one JSON string per line, in arrival order.
coder_outputs() {
  jq -c --arg p "$LOGS_PATH" 'select(.path == $p) | .body.logs[] | .output' "$CODER_RECORD" 2>/dev/null
}

# Outputs of envbox's info and error build-log lines, one JSON string per line.
pod_outputs() {
  jq -cR 'fromjson? | objects | select(.type? == "info" or .type? == "error") | .output' "$POD_DIR/envbox.log"
}

# pod_outputs, up to envbox's done line: what Coder is sent.
pod_outputs_until_done() {
  jq -rR 'fromjson? | objects | select(.type? == "info" or .type? == "error" or .type? == "done") |
    if .type == "done" then "DONE" else (.output | tojson) end' "$POD_DIR/envbox.log" | sed '/^DONE$/,$d'
}

# The X of envbox's "Workspace started in X s".
started_seconds() {
  jq -rR 'fromjson? | objects | select(.type? == "info") | .output
          | capture("^Workspace started in (?<s>[0-9.]+) s$") | .s' "$POD_DIR/envbox.log" | head -n1
}

# boot_measured NAME [VAR=value ...]: boots a pod until ready, stops it with SIGTERM and destroys it.
# Sets BOOT_SECONDS (envbox-reported start-up), BOOT_WALL (pod_start to done line) and STOP_SECONDS;
# keeps the log as $BATS_TEST_TMPDIR/NAME.log.
boot_measured() {
  local name=$1 t0 t1
  shift
  pod_create "$name"
  t0=$(date +%s.%N)
  pod_start "$name" CODER_SHUTDOWN_TIMEOUT=10 "$@"
  pod_wait_ready 90 || fail "pod $name did not become ready"
  t1=$(date +%s.%N)
  BOOT_WALL=$(echo "$t1 - $t0" | bc)
  BOOT_SECONDS=$(started_seconds)
  [[ -n $BOOT_SECONDS ]] || { pod_print_log; fail "no 'Workspace started in X s' line"; }
  # Stopped after its sender has had time to run into the server (or give up on it).
  sleep "${BOOT_LINGER:-0}"
  pod_stop TERM 30 || { pod_print_log; fail "pod $name did not exit after SIGTERM"; }
  STOP_SECONDS=$POD_STOP_SECONDS
  cp "$POD_DIR/envbox.log" "$BATS_TEST_TMPDIR/$name.log"
  pod_destroy
  echo "# $name: started in ${BOOT_SECONDS}s, ready after ${BOOT_WALL}s wall, stopped in ${STOP_SECONDS}s" >&3
}

# assert_below A B LIMIT WHAT: A - B < LIMIT (seconds).
assert_delay_below() {
  local d
  d=$(echo "$1 - $2" | bc)
  (($(echo "$d < $3" | bc))) || fail "$4: ${1}s vs ${2}s without Coder (+${d}s, limit +${3}s)"
}

@test "start-up lines reach Coder in order under a registered envbox source; bootstrap output after done stays in the pod log" {
  coder_start ok
  local env
  mapfile -t env < <(coder_env)
  pod_create coder
  pod_start coder "${env[@]}" 'CODER_BOOTSTRAP_SCRIPT=echo bootstrap-one; sleep 3; echo bootstrap-late; exec sleep 1000'
  pod_wait_ready 90
  ebx_wait_for 15 grep -q '"Workspace started in ' "$CODER_RECORD" || {
    pod_print_log
    cat "$CODER_RECORD" >&2
    fail "start-up lines did not reach Coder"
  }
  # The bootstrap's output after the done line (the agent's, for its whole life) would use up the
  # agent's start-up log budget on Coder: it is only in the pod log.
  ebx_wait_for 30 grep -q bootstrap-late "$POD_DIR/envbox.log" || { pod_print_log; fail "no bootstrap-late line in the pod log"; }
  [[ -z $(pod_outputs_until_done | grep bootstrap-late) ]] || fail "bootstrap-late came before the done line: nothing to check"
  if ebx_wait_for 5 grep -q bootstrap-late "$CODER_RECORD"; then
    fail "bootstrap output after the done line reached Coder"
  fi
  assert_equal "$(coder_outputs)" "$(pod_outputs_until_done)" "Coder's lines: the pod's up to the done line"

  # Registration first, once, with a UUID, then every PATCH under that source.
  run jq -sc 'map(.method + " " + .path)' "$CODER_RECORD"
  [[ $(jq -r '.[0]' <<<"$output") == "POST $LOG_SOURCE_PATH" ]] || fail "first request was not the log-source registration: $output"
  assert_equal "$(jq -c --arg p "$LOG_SOURCE_PATH" 'select(.path == $p)' "$CODER_RECORD" | grep -c .)" 1 "registrations"
  local source
  source=$(jq -r --arg p "$LOG_SOURCE_PATH" 'select(.path == $p) | .body.id' "$CODER_RECORD")
  assert_equal "$(jq -r --arg p "$LOG_SOURCE_PATH" 'select(.path == $p) | .body.display_name' "$CODER_RECORD")" envbox "display name"
  run jq -r --arg p "$LOGS_PATH" --arg s "$source" 'select(.path == $p and .body.log_source_id != $s) | .body.log_source_id' "$CODER_RECORD"
  assert_equal "$output" "" "PATCHes under another source"

  # Every build-log line, in order, none missing: what Coder holds is a prefix of the pod's lines.
  local coder pod n
  coder=$(coder_outputs)
  n=$(grep -c . <<<"$coder")
  pod=$(pod_outputs | head -n "$n")
  [[ $coder == "$pod" ]] || {
    diff <(echo "$pod") <(echo "$coder") >&2 || true
    fail "Coder's lines (right) differ from envbox's (left)"
  }
  assert_contains "$coder" '"Pulling image ' "Coder lines"
  assert_contains "$coder" '"Envbox startup complete!"' "Coder lines"
  assert_contains "$coder" '"Workspace started in ' "Coder lines"
  # Levels: all of these are info.
  run jq -r --arg p "$LOGS_PATH" 'select(.path == $p) | .body.logs[] | .level' "$CODER_RECORD"
  assert_equal "$(sort -u <<<"$output")" info "levels"

  refute_contains "$(<"$POD_DIR/envbox.log")" "$CODER_TOKEN" "envbox log"
}

@test "a failed start (missing image tag) sends its error line to Coder before envbox exits" {
  coder_start ok
  local env
  mapfile -t env < <(coder_env)
  pod_create coderfail
  pod_start coderfail "${env[@]}" "CODER_INNER_IMAGE=$EBX_REGISTRY/test/busybox:no-such-tag"
  ebx_wait_for 90 test -f "$POD_DIR/exit-status" || { pod_print_log; fail "envbox did not exit"; }
  # Read at once: whatever Coder holds now arrived before envbox's exit.
  local record
  record=$(cat "$CODER_RECORD")
  assert_equal "$(<"$POD_DIR/exit-status")" 1 "exit status"
  local err
  err=$(pod_log_lines error | jq -c .output | head -n1)
  [[ -n $err ]] || { pod_print_log; fail "no error line"; }
  run jq -c --arg p "$LOGS_PATH" 'select(.path == $p) | .body.logs[] | select(.level == "error") | .output' <<<"$record"
  assert_contains "$output" "$err" "error entries Coder received before the exit"
  assert_contains "$output" "no-such-tag" "error entries"
  refute_contains "$(<"$POD_DIR/envbox.log")" "$CODER_TOKEN" "envbox log"
}

@test "a Coder that rejects the token: start-up grows by less than 1 s, one warning, no token in the log" {
  local env
  mapfile -t env < <(coder_env)
  boot_measured base "CODER_EXTRA_CERTS_PATH=$CODER_CERTS_PATH"
  local base=$BOOT_SECONDS
  coder_start 401
  BOOT_LINGER=1 boot_measured rejected "${env[@]}"
  assert_delay_below "$BOOT_SECONDS" "$base" 1 "start-up with a 401 Coder"

  local log
  log=$(<"$BATS_TEST_TMPDIR/rejected.log")
  refute_contains "$log" "$CODER_TOKEN" "envbox log"
  assert_equal "$(grep -c 'rejected the agent token' <<<"$log")" 1 "token-rejected warnings"
  assert_equal "$(grep -c . "$CODER_RECORD" || true)" 0 "requests Coder accepted"
}

@test "a Coder that is down: start-up grows by less than 1 s and the sender gives up with one warning" {
  local env
  mapfile -t env < <(coder_env)
  boot_measured base "CODER_EXTRA_CERTS_PATH=$CODER_CERTS_PATH"
  local base=$BOOT_SECONDS
  coder_start down
  # Refused connections: 4 attempts with back-off take about 3.5 s; linger so the give-up is logged.
  BOOT_LINGER=5 boot_measured down "${env[@]}"
  assert_delay_below "$BOOT_SECONDS" "$base" 1 "start-up with Coder down"

  local log
  log=$(<"$BATS_TEST_TMPDIR/down.log")
  refute_contains "$log" "$CODER_TOKEN" "envbox log"
  assert_equal "$(grep -c 'coder log: giving up' <<<"$log")" 1 "give-up warnings"
}

@test "a Coder that hangs: start-up is not held beyond the request timeout and shutdown is not delayed" {
  local env
  mapfile -t env < <(coder_env)
  boot_measured base "CODER_EXTRA_CERTS_PATH=$CODER_CERTS_PATH" 'CODER_BOOTSTRAP_SCRIPT=exec sleep 1000'
  local base=$BOOT_SECONDS base_wall=$BOOT_WALL base_stop=$STOP_SECONDS
  coder_start hang
  # SIGTERM half a second after the done line, while the registration still hangs and inside the
  # flush's 2 s deadline: the flush must already have stopped waiting on the stalled request.
  BOOT_LINGER=0.5 boot_measured hang "${env[@]}" 'CODER_BOOTSTRAP_SCRIPT=exec sleep 1000'
  assert_delay_below "$BOOT_SECONDS" "$base" "$REQUEST_TIMEOUT" "start-up with a hanging Coder"
  assert_delay_below "$BOOT_WALL" "$base_wall" "$REQUEST_TIMEOUT" "time to the done line with a hanging Coder"
  assert_delay_below "$STOP_SECONDS" "$base_stop" 1 "SIGTERM to exit with a hanging Coder"
  refute_contains "$(<"$BATS_TEST_TMPDIR/hang.log")" "$CODER_TOKEN" "envbox log"
}

# --- issue 17: the Go suite's SelfSignedCerts (old Coder, PATCH only) and InvalidCoderCert ------------

@test "a Coder without the log-source endpoint (404) gets the start-up lines through PATCH logs alone" {
  coder_start nosource
  local env
  mapfile -t env < <(coder_env)
  pod_create oldcoder
  pod_start oldcoder "${env[@]}"
  pod_wait_ready 90
  ebx_wait_for 15 grep -q 'Envbox startup complete!' "$CODER_RECORD" || {
    pod_print_log
    cat "$CODER_RECORD" >&2
    fail "'Envbox startup complete!' did not reach an old Coder"
  }
  # Only PATCHes were accepted, all under the nil ("External") source.
  run jq -r '.method + " " + .path' "$CODER_RECORD"
  assert_equal "$(sort -u <<<"$output")" "PATCH $LOGS_PATH" "requests the old Coder accepted"
  run jq -r '.body.log_source_id' "$CODER_RECORD"
  assert_equal "$(sort -u <<<"$output")" 00000000-0000-0000-0000-000000000000 "log source ids"
  assert_contains "$(coder_outputs)" '"Envbox startup complete!"' "Coder lines"
  refute_contains "$(<"$POD_DIR/envbox.log")" "$CODER_TOKEN" "envbox log"
}

@test "a Coder whose certificate is not trusted: start-up unaffected, nothing sent, one warning" {
  coder_start ok
  # CODER_EXTRA_CERTS_PATH trusts the registry only, not the fake Coder's self-signed certificate.
  boot_measured base "CODER_EXTRA_CERTS_PATH=$EBX_REG_CA" 'CODER_BOOTSTRAP_SCRIPT=exec sleep 1000'
  local base=$BOOT_SECONDS
  pod_create untrusted
  pod_start untrusted CODER_SHUTDOWN_TIMEOUT=10 "CODER_AGENT_URL=$CODER_URL" "CODER_AGENT_TOKEN=$CODER_TOKEN" \
    "CODER_EXTRA_CERTS_PATH=$EBX_REG_CA" 'CODER_BOOTSTRAP_SCRIPT=exec sleep 1000'
  pod_wait_ready 90
  assert_delay_below "$(started_seconds)" "$base" 1 "start-up with an untrusted Coder certificate"
  run pod_ws echo hello
  assert_status 0
  assert_equal "$output" hello "echo hello in the workspace"
  sleep 1
  assert_equal "$(grep -c . "$CODER_RECORD" || true)" 0 "requests Coder accepted"
  local warnings
  warnings=$(grep -i 'warn' "$POD_DIR/envbox.log" | grep -i 'coder log' || true)
  assert_equal "$(grep -c . <<<"$warnings")" 1 "coder log warnings: $warnings"
  assert_contains "$warnings" "not trusted" "the warning"
  assert_contains "$warnings" "CODER_EXTRA_CERTS_PATH" "what to do"
  refute_contains "$(<"$POD_DIR/envbox.log")" "$CODER_TOKEN" "envbox log"
}
