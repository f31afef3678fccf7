#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Configuration: every bad CODER_* value is rejected up front (exit 2, one stderr line naming the
# variable, nothing created), help lists every variable, secrets are never echoed.
#
# envbox runs here as PID 1 of private pid/mount/net/uts/ipc namespaces with an empty network, so a
# validation gap can neither reach a registry nor leave mounts on the machine.

bats_require_minimum_version 1.5.0

# Every CODER_* variable envbox accepts (docs: envbox-behaviour.md §2.2, plus the runtime/cache/state/
# shutdown settings of this implementation).
CODER_VARS=(
  CODER_INNER_IMAGE CODER_INNER_USERNAME CODER_AGENT_TOKEN CODER_AGENT_URL CODER_INNER_ENVS
  CODER_INNER_WORK_DIR CODER_INNER_HOSTNAME CODER_IMAGE_PULL_SECRET CODER_DOCKER_BRIDGE_CIDR
  CODER_BOOTSTRAP_SCRIPT CODER_MOUNTS CODER_USR_LIB_DIR CODER_INNER_USR_LIB_DIR CODER_DOCKER_CONFIG
  CODER_ADD_TUN CODER_ADD_FUSE CODER_ADD_GPU CODER_CPUS CODER_MEMORY CODER_DISABLE_IDMAPPED_MOUNT
  CODER_EXTRA_CERTS_PATH CODER_DEBUG CODER_RUNTIME CODER_CACHE_DIR CODER_STATE_DIR CODER_SHUTDOWN_TIMEOUT
)

setup() {
  load '../lib/common'
  load '../lib/assert'
  : "${ENVBOX_BIN:=$EBX_REPO_ROOT/target/release/envbox}"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable (cargo build --release)"
  # Children of the test's own temp dir that must still not exist after a rejected configuration.
  CACHE_DIR=$BATS_TEST_TMPDIR/cache
  STATE_DIR=$BATS_TEST_TMPDIR/state
}

# run_envbox_docker [VAR=value ...]: `envbox docker` with a valid base configuration plus the given
# variables (later ones win), nothing else in its environment.
run_envbox_docker() {
  run --separate-stderr timeout -k 5 60 \
    unshare --pid --fork --mount --net --uts --ipc --mount-proc --propagation private \
    env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CODER_INNER_IMAGE="${EBX_REGISTRY:-203.0.113.1:5000}/test/busybox:1" \
    CODER_INNER_USERNAME=coder \
    CODER_RUNTIME=runc \
    CODER_CACHE_DIR="$CACHE_DIR" \
    CODER_STATE_DIR="$STATE_DIR" \
    "$@" \
    "$ENVBOX_BIN" docker
}

# assert_config_error VAR VALUE: exit 2, exactly one stderr line, naming VAR, and no cache/state dir.
assert_config_error() {
  local var=$1 value=$2
  run_envbox_docker "$var=$value"
  assert_status 2
  assert_contains "$stderr" "$var" "stderr"
  local nlines
  nlines=$(grep -c . <<<"$stderr" || true)
  [[ $nlines == 1 ]] || { show_run; fail "expected one stderr line, got $nlines"; }
  [[ ! -e $CACHE_DIR ]] || fail "CODER_CACHE_DIR $CACHE_DIR was created: $(ls -la "$CACHE_DIR")"
  [[ ! -e $STATE_DIR ]] || fail "CODER_STATE_DIR $STATE_DIR was created: $(ls -la "$STATE_DIR")"
}

@test "CODER_CPUS=abc is rejected" {
  assert_config_error CODER_CPUS abc
}

@test "CODER_CPUS=-1 is rejected" {
  assert_config_error CODER_CPUS -1
}

@test "CODER_MEMORY=12XB is rejected" {
  assert_config_error CODER_MEMORY 12XB
}

@test "a boolean that is not a boolean (CODER_ADD_TUN=yes) is rejected" {
  assert_config_error CODER_ADD_TUN yes
}

@test "CODER_DOCKER_BRIDGE_CIDR=10.0.0.0/31 (no room for a bridge and a container) is rejected" {
  assert_config_error CODER_DOCKER_BRIDGE_CIDR 10.0.0.0/31
}

@test "CODER_DOCKER_BRIDGE_CIDR=fe80::/64 (IPv6) is rejected" {
  assert_config_error CODER_DOCKER_BRIDGE_CIDR fe80::/64
}

@test "CODER_DOCKER_BRIDGE_CIDR=nonsense is rejected" {
  assert_config_error CODER_DOCKER_BRIDGE_CIDR nonsense
}

@test "CODER_MOUNTS with a relative source (relative:/x) is rejected" {
  assert_config_error CODER_MOUNTS relative:/x
}

@test "CODER_MOUNTS without a destination (/a) is rejected" {
  assert_config_error CODER_MOUNTS /a
}

@test "CODER_SHUTDOWN_TIMEOUT=soon is rejected" {
  assert_config_error CODER_SHUTDOWN_TIMEOUT soon
}

# assert_help_lists_all_vars: the last run's stdout+stderr names every CODER_* variable.
assert_help_lists_all_vars() {
  local var missing=()
  for var in "${CODER_VARS[@]}"; do
    [[ $output == *"$var"* ]] || missing+=("$var")
  done
  ((${#missing[@]} == 0)) || { show_run; fail "help does not mention: ${missing[*]}"; }
}

@test "envbox docker --help lists every CODER_* variable" {
  run "$ENVBOX_BIN" docker --help
  assert_status 0
  assert_help_lists_all_vars
}

@test "envbox run is an alias of envbox docker" {
  run "$ENVBOX_BIN" run --help
  assert_status 0
  assert_help_lists_all_vars
}

@test "envbox version prints the crate version" {
  local version
  version=$(awk -F'"' '/^version *=/ {print $2; exit}' "$EBX_REPO_ROOT/Cargo.toml")
  run "$ENVBOX_BIN" version
  assert_status 0
  assert_contains "$output" "$version" "envbox version output"
}

@test "a malformed pull secret is rejected without echoing it" {
  local secret='SECRET-PULL-VALUE-42'
  run_envbox_docker "CODER_IMAGE_PULL_SECRET={\"auths\":{\"203.0.113.1:5000\":{\"auth\":\"$secret\""
  assert_nonzero_status
  assert_contains "$stderr" CODER_IMAGE_PULL_SECRET "stderr"
  refute_contains "$output" "$secret" "stdout"
  refute_contains "$stderr" "$secret" "stderr"
}

@test "an undecodable auth in a well-formed pull secret is never echoed" {
  local secret='!!not-base64-SECRET-PULL-VALUE-43'
  run_envbox_docker "CODER_IMAGE_PULL_SECRET={\"auths\":{\"203.0.113.1:5000\":{\"auth\":\"$secret\"}}}"
  assert_nonzero_status
  refute_contains "$output" "$secret" "stdout"
  refute_contains "$stderr" "$secret" "stderr"
}

# --- issue 17: what the Go envbox accepted is accepted (or refused with a reason) ---------------------

# refute_config_rejects VAR VALUE: the value passes validation. In this empty network namespace envbox
# then stops at the missing eth0 (or later), but never on VAR.
refute_config_rejects() {
  local var=$1 value=$2
  run_envbox_docker "$var=$value"
  if [[ $stderr == *"$var"* ]]; then
    show_run
    fail "$var=$value was rejected"
  fi
}

@test "booleans take every form of Go's strconv.ParseBool (t, T, f, F, TRUE, False, ...)" {
  local v
  for v in 1 t T TRUE true True 0 f F FALSE false False; do
    refute_config_rejects CODER_ADD_TUN "$v"
  done
  run_envbox_docker CODER_ADD_FUSE=yes
  assert_status 2
  assert_contains "$stderr" "t, T, TRUE" "the accepted forms in the error"
}

@test "every flag of the Go envbox's CLI is accepted; the ones without effect say so in --help" {
  run "$ENVBOX_BIN" docker --image x --username coder --agent-token t --coder-url https://c.example \
    --envs A,B --work-dir /w --hostname h --image-secret '{}' --bridge-cidr 172.19.0.1/30 \
    --boostrap-script 'echo' --mounts /a:/b --usr-lib-dir /u --inner-usr-lib-dir /v \
    --docker-config /c.json --add-tun --add-fuse=true --add-gpu=false --cpus 1 --memory 1073741824 \
    --disable-idmapped-mount --extra-certs-path /e --debug --no-startup-log --ethlink eth0 --help
  assert_status 0
  local help=$output
  assert_contains "$help" "--no-startup-log" "help"
  # The no-op flags are marked as such in their help line.
  grep -A3 -e '--no-startup-log' <<<"$help" | grep -qi 'no effect' ||
    fail "--no-startup-log's help does not say it has no effect: $(grep -A3 -e '--no-startup-log' <<<"$help")"
}

@test "a CODER_MOUNTS option other than ro/rw is read-write, as in the Go envbox, with a warning" {
  mkdir -p "$BATS_TEST_TMPDIR/src"
  run_envbox_docker "CODER_MOUNTS=$BATS_TEST_TMPDIR/src:/data:rx"
  if [[ $stderr == *"invalid CODER_MOUNTS"* ]]; then
    show_run
    fail "CODER_MOUNTS with option rx was rejected"
  fi
  grep -i 'warn' <<<"$stderr" | grep -F 'CODER_MOUNTS' | grep -F '"rx"' | grep -qi 'read-write' ||
    { show_run; fail "no warning naming CODER_MOUNTS, the option and read-write"; }
}

@test "CODER_INNER_HOSTNAME with underscores (Coder workspace names) is accepted" {
  refute_config_rejects CODER_INNER_HOSTNAME my_work_space
  refute_config_rejects CODER_INNER_HOSTNAME Dev_Box-1
}

@test "a CODER_INNER_HOSTNAME the kernel cannot take is refused with the reason" {
  assert_config_error CODER_INNER_HOSTNAME "$(printf 'a%.0s' {1..65})"
  assert_contains "$stderr" "64" "the reason (the kernel's limit)"
  assert_config_error CODER_INNER_HOSTNAME "my host"
  assert_contains "$stderr" "'_'" "the accepted characters"
}

@test "CODER_AGENT_URL forms Go accepted work; a URL without a scheme is refused saying why" {
  refute_config_rejects CODER_AGENT_URL HTTPS://coder.example.com
  refute_config_rejects CODER_AGENT_URL https://coder.example.com:8443/prefix/
  assert_config_error CODER_AGENT_URL coder.example.com
  assert_contains "$stderr" "scheme" "the reason"
}

@test "a relative CODER_INNER_WORK_DIR is refused saying why it cannot work" {
  assert_config_error CODER_INNER_WORK_DIR project
  assert_contains "$stderr" "relative" "the reason"
}

# --- issue 17: the pull secret is checked with the rest of the configuration ------------------------

@test "a pull secret that is not JSON exits 2 before anything is created, without echoing it" {
  assert_config_error CODER_IMAGE_PULL_SECRET 'SECRET-NOT-JSON-44'
  refute_contains "$stderr" "SECRET-NOT-JSON-44" "stderr"
}

@test "a pull secret that is not a JSON object exits 2 before anything is created" {
  assert_config_error CODER_IMAGE_PULL_SECRET '["SECRET-ARRAY-45"]'
  refute_contains "$stderr" "SECRET-ARRAY-45" "stderr"
}

@test "a pull secret without auths exits 2 before anything is created" {
  assert_config_error CODER_IMAGE_PULL_SECRET '{}'
  assert_contains "$stderr" "auths" "what is expected"
}

@test "a pull secret whose auth is not base64 of user:password exits 2, without echoing it" {
  local secret='!!not-base64-SECRET-PULL-VALUE-46'
  assert_config_error CODER_IMAGE_PULL_SECRET "{\"auths\":{\"203.0.113.1:5000\":{\"auth\":\"$secret\"}}}"
  refute_contains "$stderr" "$secret" "stderr"
  local nocolon
  nocolon=$(printf 'SECRET-NO-COLON-47' | base64)
  assert_config_error CODER_IMAGE_PULL_SECRET "{\"auths\":{\"203.0.113.1:5000\":{\"auth\":\"$nocolon\"}}}"
  refute_contains "$stderr" "SECRET-NO-COLON-47" "stderr"
  refute_contains "$stderr" "$nocolon" "stderr"
}
