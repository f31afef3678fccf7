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
