#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Unpacking (issue #4) end to end: what only a real image, a real unpack into the layer cache and a
# real user-namespaced workspace can show. The entry-by-entry and adversarial cases are cargo tests
# (src/image/unpack.rs, tests/unpack_*.rs).

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

# The busybox test image plus a layer holding a copy of busybox named `cat` with cap_net_raw set by
# setcap, as Debian ships ping: a version 2 file capability written by the node's root.
push_caps_image() {
  [[ -f $EBX_WORLD_DIR/registry/pushed-caps ]] && return 0
  local base tmp=$BATS_TEST_TMPDIR/caps
  base=$(world_cached_image busybox "$EBX_IMAGES_DIR/busybox.sh")
  mkdir -p "$tmp/layer/usr/local/bin"
  cp "$base/index.json" "$base/oci-layout" "$tmp/"
  cp -al "$base/blobs" "$tmp/blobs"
  cp /bin/busybox "$tmp/layer/usr/local/bin/cat"
  chmod 755 "$tmp/layer/usr/local/bin/cat"
  setcap cap_net_raw+ep "$tmp/layer/usr/local/bin/cat"
  tar -C "$tmp/layer" --xattrs --xattrs-include='security.capability' --owner=0 --group=0 \
    -cf "$tmp/caps.tar" usr
  umoci raw add-layer --image "$tmp:img" "$tmp/caps.tar"
  world_push_image "$tmp" test/caps:1
  touch "$EBX_WORLD_DIR/registry/pushed-caps"
}

@test "a file capability set by setcap survives the unpack and is effective for the user inside the workspace" {
  push_caps_image
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/caps:1"
  pod_wait_ready 120
  # In the layer cache: owned by the container's root and stored as a namespaced capability.
  local cached
  cached=$(find "$POD_DIR/cache/layers" -path '*/t/usr/local/bin/cat' | head -1)
  [[ -n $cached ]] || fail "no unpacked usr/local/bin/cat under $POD_DIR/cache/layers"
  assert_equal "$(stat -c %u:%g "$cached")" 100000:100000 "owner of the unpacked file"
  run getcap "$cached"
  assert_contains "$output" cap_net_raw
  # Inside, as uid 1000: the process started from that file holds CAP_NET_RAW (bit 13) effective.
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- /usr/local/bin/cat /proc/self/status
  assert_status 0
  assert_contains "$output" "Uid:	1000"
  local capeff
  capeff=$(awk '/^CapEff:/ {print $2}' <<<"$output")
  (( (16#$capeff & 0x2000) != 0 )) || fail "CapEff of the capable binary inside is $capeff (no CAP_NET_RAW)"
  # The same user running a plain binary has no capability at all: CAP_NET_RAW came from the file.
  run pod_exec env "CODER_STATE_DIR=$POD_DIR/state" "$ENVBOX_BIN" exec -- sh -c 'grep CapEff /proc/self/status'
  assert_status 0
  assert_contains "$output" "0000000000000000"
}

@test "a layer whose content does not match its diff_id is refused and not kept in the cache" {
  local tmp=$BATS_TEST_TMPDIR/baddiff base cfg_digest
  base=$(world_cached_image busybox "$EBX_IMAGES_DIR/busybox.sh")
  mkdir -p "$tmp"
  cp -a "$base/." "$tmp/"
  # Rewrite the config's first diff_id, then re-point manifest and index at the new blobs.
  python3 - "$tmp" <<'PY'
import hashlib, json, os, sys
root = sys.argv[1]
def blob(d): return os.path.join(root, "blobs", *d.split(":"))
def put(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob(d), "wb") as f: f.write(data)
    return d, len(data)
index = json.load(open(os.path.join(root, "index.json")))
mdesc = index["manifests"][0]
manifest = json.load(open(blob(mdesc["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))
config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
manifest["config"]["digest"], manifest["config"]["size"] = put(json.dumps(config).encode())
mdesc["digest"], mdesc["size"] = put(json.dumps(manifest).encode())
json.dump(index, open(os.path.join(root, "index.json"), "w"))
PY
  world_push_image "$tmp" test/baddiff:1
  pod_start ws "CODER_INNER_IMAGE=$EBX_REGISTRY/test/baddiff:1"
  ebx_wait_for 120 test -f "$POD_DIR/exit-status" || { pod_print_log; fail "envbox did not exit"; }
  assert_equal "$(<"$POD_DIR/exit-status")" 1 "exit status"
  grep -q '"type":"error"' "$POD_DIR/envbox.log" || { pod_print_log; fail "no error line"; }
  grep -qi "diff_id\|diff id" "$POD_DIR/envbox.log" || { pod_print_log; fail "the error does not name the diff_id"; }
  run find "$POD_DIR/cache/layers" -mindepth 1 -maxdepth 1 ! -name '.*'
  assert_equal "$output" "" "published layers in the cache"
}
