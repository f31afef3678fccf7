#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Registry client against real registries: `envbox pull` runs in a pod's network namespace (the registry
# host 203.0.113.1 is reached through the pod's eth0) against the world's TLS + htpasswd docker-registry,
# a second docker-registry with token auth and the harness's token issuer, and the harness's
# fault-injecting proxy. Requests are counted in the registries' access logs or the proxy's log.
# The cache garbage collection case boots a pod with `envbox docker`.

bats_require_minimum_version 1.5.0

setup_file() {
  load '../lib/world'
  load '../lib/assert'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  export REG_STATE_DIR=$BATS_FILE_TMPDIR/reg
  export REG_PIDS_DIR=$REG_STATE_DIR/pids
  mkdir -p "$REG_STATE_DIR"
  load '../lib/registry'
  # Multi-arch: amd64 and arm64 with a marker each; this machine's image has a gzip, a zstd and an
  # uncompressed layer.
  reg_make_image test/multi:1 \
    "amd64=gzip:marker-amd64=amd64+zstd:zstd-file=from-zstd-layer+tar:plain-file=from-plain-layer" \
    "arm64=gzip:marker-arm64=arm64+zstd:zstd-file=arm64-zstd+tar:plain-file=arm64-plain" >/dev/null
  reg_start_token_registry
}

teardown_file() {
  load '../lib/world'
  load '../lib/registry'
  reg_stop_service token-registry
  reg_stop_service token-issuer
}

setup() {
  load '../lib/world'
  load '../lib/assert'
  load '../lib/registry'
  pod_create reg
}

teardown() {
  reg_stop_service proxy
  [[ -n ${REG_BG_PIDS:-} ]] && for pid in $REG_BG_PIDS; do kill -KILL "$pid" 2>/dev/null || true; done
  pod_destroy
}

# Machine arch as OCI names it.
host_arch() {
  case $(uname -m) in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) uname -m ;;
  esac
}

other_arch() {
  [[ $(host_arch) == arm64 ]] && echo amd64 || echo arm64
}

# Files named NAME under the unpacked layers of the pod's cache.
layer_files() {
  find "$POD_DIR/cache/layers" -path '*/t/*' -name "$1" 2>/dev/null
}

@test "basic auth over TLS: envbox pull fetches, verifies and unpacks the image" {
  run pull_in_pod "$EBX_REGISTRY/test/busybox:1"
  assert_status 0
  assert_contains "$output" "Pulled and unpacked $EBX_REGISTRY/test/busybox:1"
  [[ -n $(layer_files busybox) ]] || fail "no busybox binary among the unpacked layers"
  local d n=0
  while read -r d; do
    assert_equal "sha256:$(sha256sum "$d" | cut -d' ' -f1)" "sha256:${d##*/}" "digest of $d"
    n=$((n + 1))
  done < <(find "$POD_DIR/cache/blobs/sha256" -type f)
  ((n >= 3)) || fail "only $n blobs in the cache"
}

@test "bearer token auth: token issuer and a token-auth registry" {
  local reg=$EBX_REGISTRY_ADDR:$REG_TOKEN_PORT
  run pull_in_pod CODER_IMAGE_PULL_SECRET="$(reg_secret "$reg" "$EBX_REG_USER:$EBX_REG_PASS")" "$reg/test/busybox:1"
  assert_status 0
  assert_contains "$output" "Pulled and unpacked $reg/test/busybox:1"
  # The registry asked for a token and the issuer gave one to the credentials.
  grep -q '"GET /token?.*scope=repository%3Atest%2Fbusybox%3Apull.* 200 -' "$REG_STATE_DIR/token-registry/issuer.log" ||
    grep -q '"GET /token?.*scope=repository:test/busybox:pull.* 200 -' "$REG_STATE_DIR/token-registry/issuer.log" ||
    fail "no successful token request in the issuer log: $(cat "$REG_STATE_DIR/token-registry/issuer.log")"
  local reqs
  reqs=$(reg_requests_since "$REG_STATE_DIR/token-registry/registry.log" 0)
  assert_contains "$reqs" "/v2/test/busybox/manifests/1 200" "token registry requests"

  # Without credentials the issuer grants nothing and the pull is refused.
  rm -rf "$POD_DIR/cache"
  run pull_in_pod -CODER_IMAGE_PULL_SECRET "$reg/test/busybox:1"
  assert_status 1
  assert_contains "$output" "authentication failed for registry $reg"
}

@test "a wrong password says authentication failed for that registry" {
  run pull_in_pod CODER_IMAGE_PULL_SECRET="$(reg_secret "$EBX_REGISTRY" "$EBX_REG_USER:wrong")" "$EBX_REGISTRY/test/busybox:1"
  assert_status 1
  assert_contains "$output" "authentication failed for registry $EBX_REGISTRY"
  refute_contains "$output" "retrying"
}

@test "a missing tag says it was not found" {
  run pull_in_pod "$EBX_REGISTRY/test/busybox:no-such-tag"
  assert_status 1
  assert_contains "$output" "not found"
  assert_contains "$output" "test/busybox:no-such-tag"
}

@test "an unknown CA fails fast without retrying; with CODER_EXTRA_CERTS_PATH the pull succeeds" {
  local t0 t1
  t0=$(date +%s)
  run pull_in_pod -CODER_EXTRA_CERTS_PATH "$EBX_REGISTRY/test/busybox:1"
  t1=$(date +%s)
  assert_status 1
  assert_contains "$output" "TLS certificate of registry $EBX_REGISTRY is not trusted"
  assert_contains "$output" "CODER_EXTRA_CERTS_PATH"
  refute_contains "$output" "retrying"
  # The retry budget is 180 s; an error that is not retried takes well under 10.
  (((t1 - t0) < 10)) || fail "took $((t1 - t0)) s"

  run pull_in_pod "$EBX_REGISTRY/test/busybox:1"
  assert_status 0
}

@test "a multi-arch index resolves to this machine's platform; zstd and uncompressed layers unpack" {
  run pull_in_pod "$EBX_REGISTRY/test/multi:1"
  assert_status 0
  local f
  f=$(layer_files "marker-$(host_arch)")
  [[ -n $f ]] || fail "marker-$(host_arch) was not unpacked"
  assert_equal "$(cat "$f")" "$(host_arch)"
  [[ -z $(layer_files "marker-$(other_arch)") ]] || fail "the $(other_arch) image was unpacked"
  f=$(layer_files zstd-file)
  assert_equal "$(cat "$f")" "from-zstd-layer" "zstd layer"
  f=$(layer_files plain-file)
  assert_equal "$(cat "$f")" "from-plain-layer" "uncompressed layer"
  # No blob of the other platform's image was fetched.
  local d
  for d in $(reg_layer_digests test/multi:1); do
    [[ -f $POD_DIR/cache/blobs/sha256/${d#sha256:} ]] || fail "blob $d of this platform is missing"
  done
  assert_equal "$(find "$POD_DIR/cache/blobs/sha256" -type f | wc -l)" 6 "blobs: index, manifest, config, 3 layers"
}

@test "a blob corrupted on the registry's disk is rejected and nothing of it stays in the cache" {
  reg_make_image test/corrupt:1 "$(host_arch)=gzip:payload=random:200000" >/dev/null
  local layer hex data
  layer=$(reg_layer_digests test/corrupt:1 | tail -n 1)
  hex=${layer#sha256:}
  data=$EBX_WORLD_DIR/registry/data/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data
  [[ -f $data ]] || fail "registry blob $data not found"
  # Same size, different bytes.
  printf 'CORRUPTED' | dd of="$data" bs=1 seek=1000 conv=notrunc status=none
  run pull_in_pod "$EBX_REGISTRY/test/corrupt:1"
  assert_status 1
  assert_contains "$output" "digest mismatch"
  assert_contains "$output" "$layer"
  [[ ! -e $POD_DIR/cache/blobs/sha256/$hex ]] || fail "the corrupt blob is in the store"
  local left
  left=$(find "$POD_DIR/cache/blobs" "$POD_DIR/cache/tmp" -name "*$hex*")
  [[ -z $left ]] || fail "left in the cache: $left"
}

@test "a connection reset in the middle of a blob resumes with Range and completes" {
  reg_make_image test/reset:1 "$(host_arch)=tar:payload=random:2000000" >/dev/null
  local layer hex reg=$EBX_REGISTRY_ADDR:$REG_PROXY_PORT
  layer=$(reg_layer_digests test/reset:1 | tail -n 1)
  hex=${layer#sha256:}
  reg_start_proxy --reset-after 300000 --reset-match "$hex"
  run pull_in_pod CODER_IMAGE_PULL_SECRET="$(reg_secret "$reg" "$EBX_REG_USER:$EBX_REG_PASS")" "$reg/test/reset:1"
  assert_status 0
  local log
  log=$(grep -F "$hex" "$REG_STATE_DIR/proxy.log")
  # The first GET was cut after 300000 bytes; the next one asked for the rest.
  awk -F'\t' 'NR == 1 && $1 == "GET" && $4 == 200 && $5 == "reset" && $6 == 300000 {ok = 1} END {exit !ok}' <<<"$log" ||
    fail "first blob request was not the reset one:"$'\n'"$log"
  awk -F'\t' '$1 == "GET" && $3 == "bytes=300000-" && $4 == 206 && $5 == "pass" {ok = 1} END {exit !ok}' <<<"$log" ||
    fail "no resumed (Range) request:"$'\n'"$log"
  assert_equal "$(grep -c . <<<"$log")" 2 "blob requests"
  assert_equal "sha256:$(sha256sum "$POD_DIR/cache/blobs/sha256/$hex" | cut -d' ' -f1)" "$layer" "stored blob"
}

@test "two 503 answers followed by a 200 succeed" {
  local reg=$EBX_REGISTRY_ADDR:$REG_PROXY_PORT
  reg_start_proxy --fail-status 503 --fail-times 2 --fail-match /manifests/
  run pull_in_pod CODER_IMAGE_PULL_SECRET="$(reg_secret "$reg" "$EBX_REG_USER:$EBX_REG_PASS")" "$reg/test/busybox:1"
  assert_status 0
  local statuses
  statuses=$(awk -F'\t' '$2 ~ /\/manifests\// {print $4}' "$REG_STATE_DIR/proxy.log" | tr '\n' ' ')
  [[ $statuses == "503 503 "*200* ]] || fail "manifest answers: $statuses"
}

@test "two envbox pull runs on one cache both succeed and download each blob once" {
  reg_make_image test/concurrent:1 \
    "$(host_arch)=gzip:a=random:1500000+gzip:b=random:1500000+gzip:c=random:1500000" >/dev/null
  local mark pid1 pid2 rc1=0 rc2=0
  mark=$(reg_log_mark "$REG_MAIN_LOG")
  pull_in_pod "$EBX_REGISTRY/test/concurrent:1" >"$BATS_TEST_TMPDIR/pull1.log" &
  pid1=$!
  pull_in_pod "$EBX_REGISTRY/test/concurrent:1" >"$BATS_TEST_TMPDIR/pull2.log" &
  pid2=$!
  REG_BG_PIDS="$pid1 $pid2"
  wait "$pid1" || rc1=$?
  wait "$pid2" || rc2=$?
  REG_BG_PIDS=""
  ((rc1 == 0 && rc2 == 0)) || fail "exit statuses $rc1 and $rc2:"$'\n'"$(cat "$BATS_TEST_TMPDIR"/pull*.log)"
  local reqs d n
  reqs=$(reg_requests_since "$REG_MAIN_LOG" "$mark")
  for d in $(reg_layer_digests test/concurrent:1); do
    n=$(awk -v d="$d" '$1 == "GET" && $2 ~ ("/blobs/" d "$") && ($3 == 200 || $3 == 206)' <<<"$reqs" | grep -c . || true)
    assert_equal "$n" 1 "GETs of blob $d"$'\n'"$reqs"
  done
}

@test "warm start: a tag makes at most one manifest request and no blob request; a digest makes none" {
  local top
  top=$(reg_make_image test/warm:1 "$(host_arch)=gzip:w=random:100000+tar:x=hello")
  run pull_in_pod "$EBX_REGISTRY/test/warm:1"
  assert_status 0
  local mark reqs
  mark=$(reg_log_mark "$REG_MAIN_LOG")
  run pull_in_pod "$EBX_REGISTRY/test/warm:1"
  assert_status 0
  reqs=$(reg_requests_since "$REG_MAIN_LOG" "$mark")
  # A 401 challenge may come first (a new process has no token yet); one manifest request is answered.
  assert_equal "$(awk '$2 ~ /\/manifests\// && $3 ~ /^2/' <<<"$reqs" | grep -c . || true)" 1 "answered manifest requests"$'\n'"$reqs"
  assert_equal "$(awk '$2 ~ /\/manifests\// && $3 != 401' <<<"$reqs" | grep -c . || true)" 1 "manifest requests"$'\n'"$reqs"
  assert_equal "$(awk '$2 ~ /\/blobs\//' <<<"$reqs" | grep -c . || true)" 0 "blob requests"$'\n'"$reqs"

  mark=$(reg_log_mark "$REG_MAIN_LOG")
  run pull_in_pod "$EBX_REGISTRY/test/warm@$top"
  assert_status 0
  reqs=$(reg_requests_since "$REG_MAIN_LOG" "$mark")
  assert_equal "$reqs" "" "requests of a warm pull by digest"
}

@test "CODER_CACHE_MAX_SIZE is validated (exit 2, names the variable)" {
  run env -i PATH="$POD_PATH_DEFAULT" CODER_CACHE_MAX_SIZE=lots "$ENVBOX_BIN" pull "$EBX_REGISTRY/test/busybox:1"
  assert_status 2
  assert_contains "$output" "CODER_CACHE_MAX_SIZE"
  assert_contains "$output" "lots"
}

# Apparent size in bytes of the cache's blobs and unpacked layers (what CODER_CACHE_MAX_SIZE bounds).
cache_bytes() {
  du -sb --apparent-size "$POD_DIR/cache/blobs" "$POD_DIR/cache/layers" | awk '{n += $1} END {print n}'
}

@test "cache GC: a budget smaller than two images keeps the one in use and removes the idle one" {
  reg_make_image test/idle:1 "$(host_arch)=gzip:idle=random:3000000" >/dev/null
  local idle_layer busy_size total budget
  idle_layer=$(reg_layer_digests test/idle:1 | tail -n 1)
  run pull_in_pod "$EBX_REGISTRY/test/busybox:1"
  assert_status 0
  busy_size=$(cache_bytes)
  run pull_in_pod "$EBX_REGISTRY/test/idle:1"
  assert_status 0
  total=$(cache_bytes)
  # More than the busybox image alone, less than both.
  budget=$((busy_size + (total - busy_size) / 2))
  [[ -f $POD_DIR/cache/blobs/sha256/${idle_layer#sha256:} ]] || fail "idle image not pulled"

  pod_start reg CODER_CACHE_MAX_SIZE="$budget"
  pod_wait_ready 90
  ebx_wait_for 30 grep -q "cache GC" "$POD_DIR/envbox.log" || { pod_print_log; fail "no cache GC line"; }
  [[ ! -e $POD_DIR/cache/blobs/sha256/${idle_layer#sha256:} ]] || { pod_print_log; fail "the idle image's layer blob was kept"; }
  [[ -z $(layer_files idle) ]] || fail "the idle image's unpacked layer was kept"
  [[ -n $(layer_files busybox) ]] || fail "the busybox layer in use was removed"
  (($(cache_bytes) <= budget)) || fail "cache is $(cache_bytes) bytes, over the budget of $budget"

  # A pull with a budget smaller than both images: the running workspace's image stays.
  run pull_in_pod CODER_CACHE_MAX_SIZE=1Ki "$EBX_REGISTRY/test/idle:1"
  assert_status 0
  [[ -n $(layer_files busybox) ]] || fail "the busybox layer in use was removed by the pull's GC"
  [[ -n $(layer_files idle) ]] || fail "the image just pulled was removed by its own pull"
  run pod_ws /bin/busybox true
  assert_status 0
}
