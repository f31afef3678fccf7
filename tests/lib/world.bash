# shellcheck shell=bash
# The test world: an "upstream" network namespace holding the registry host 203.0.113.1, a TLS + htpasswd
# docker-registry listening there, and the test images pushed into it. Started once per scripts/test run
# (world_start), described to bats through exported EBX_* variables, torn down by world_stop.
#
# Nothing here touches the machine's own interfaces: the registry is reachable only from namespaces the
# harness creates (pods get a veth into the upstream namespace, see pod.bash).

# shellcheck source=tests/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
# shellcheck source=tests/lib/pod.bash
. "$(dirname "${BASH_SOURCE[0]}")/pod.bash"

EBX_REGISTRY_ADDR=203.0.113.1
EBX_REGISTRY_PORT=5000
EBX_IMAGES_DIR=$EBX_REPO_ROOT/tests/images

# Runs CMD... inside the upstream namespace. nsenter --net (not `ip netns exec`) keeps the caller's /sys.
world_in_upstream() {
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" "$@"
}

# Removes namespaces and pod cgroups left by harness runs that died without tearing down. Names end in
# -<pid of the owning shell>; only those whose owner no longer exists are touched.
world_reap_stale() {
  local ns owner pid
  for ns in $(ip netns list | awk '$1 ~ /^ebx(up|pod)-/ {print $1}'); do
    owner=${ns##*-}
    [[ $owner =~ ^[0-9]+$ ]] || continue
    [[ -d /proc/$owner ]] && continue
    ebx_log "removing stale namespace $ns (owner pid $owner is gone)"
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  local dir
  while read -r dir; do
    owner=${dir##*-}
    [[ $owner =~ ^[0-9]+$ && ! -d /proc/$owner ]] || continue
    ebx_log "removing stale cgroup $dir"
    pod_remove_cgroup_tree "$dir" || true
  done < <(find /sys/fs/cgroup -mindepth 2 -maxdepth 6 -type d -name 'ebxpod-*' 2>/dev/null)
  local pid
  for dir in "${TMPDIR:-/tmp}"/ebx-world-*; do
    [[ -d $dir ]] || continue
    owner=${dir##*/ebx-world-}
    owner=${owner%%.*}
    [[ $owner =~ ^[0-9]+$ && ! -d /proc/$owner ]] || continue
    ebx_log "removing stale world $dir"
    # Its registry, if it outlived the run: only when that pid still runs this world's config.
    pid=$(cat "$dir/registry/pid" 2>/dev/null || true)
    if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/registry/config.yml"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
  done
  # Mountpoint claims of dead pods (see pod_make_mountpoints).
  local claim users dst
  for claim in "$POD_MOUNTPOINT_DIR"/*.users/ebxpod-*; do
    [[ -e $claim ]] || continue
    owner=${claim##*-}
    [[ $owner =~ ^[0-9]+$ && ! -d /proc/$owner ]] || continue
    users=${claim%/*}
    (
      flock 9
      rm -f "$claim"
      if rmdir "$users" 2>/dev/null; then
        dst=$(cat "${users%.users}.created" 2>/dev/null || true)
        [[ -n $dst ]] && rmdir "$dst" 2>/dev/null
        rm -f "${users%.users}.created"
      fi
    ) 9>"$POD_MOUNTPOINT_DIR/.lock"
  done
}

# Prints the OCI layout dir of a cached test image, building it first when the cache has no build of the
# current script. The cache key is the hash of the build script, so editing it rebuilds.
# Usage: world_cached_image NAME BUILD_SCRIPT [ARGS...]
world_cached_image() {
  local name=$1 script=$2 key layout tmp
  shift 2
  key=$(sha256sum "$script" | cut -c1-16)
  layout=$EBX_CACHE_ROOT/images/$name-$key
  mkdir -p "$EBX_CACHE_ROOT/images"
  (
    # One builder at a time per cache, so parallel runs neither race nor build twice.
    flock 9
    if [[ ! -f $layout/index.json ]]; then
      ebx_log "building image $name (cache key $key)"
      tmp=$EBX_CACHE_ROOT/images/.tmp-$name-$$
      rm -rf "$tmp"
      bash "$script" "$tmp" "$@" >&2
      # Older builds of the same image are dead weight once the new one is in place.
      find "$EBX_CACHE_ROOT/images" -mindepth 1 -maxdepth 1 -name "$name-*" -exec rm -rf {} +
      mv "$tmp" "$layout"
    fi
  ) 9>"$EBX_CACHE_ROOT/images/.lock"
  printf '%s\n' "$layout"
}

# Pushes the "img" tag of an OCI layout to the world's registry as REPO:TAG.
world_push_image() {
  local layout=$1 ref=$2
  world_in_upstream skopeo copy -q --dest-creds "$EBX_REG_USER:$EBX_REG_PASS" \
    --dest-cert-dir "$EBX_WORLD_DIR/registry/certdir" \
    "oci:$layout:img" "docker://127.0.0.1:$EBX_REGISTRY_PORT/$ref" </dev/null >&2
}

world_registry_answers() {
  local code
  code=$(world_in_upstream curl -s -o /dev/null -w '%{http_code}' --cacert "$EBX_REG_CA" \
    "https://127.0.0.1:$EBX_REGISTRY_PORT/v2/" 2>/dev/null) || return 1
  [[ $code == 401 ]]
}

world_write_registry_config() {
  local dir=$1 data=${2:-$1/data}
  mkdir -p "$dir"/{certs,data,certdir}
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$EBX_REGISTRY_ADDR" \
    -keyout "$dir/certs/domain.key" -out "$dir/certs/domain.crt" \
    -addext "subjectAltName=IP:$EBX_REGISTRY_ADDR,IP:127.0.0.1,DNS:localhost" 2>/dev/null
  # skopeo --cert-dir takes every *.crt in the directory as a CA.
  cp "$dir/certs/domain.crt" "$dir/certdir/ca.crt"
  htpasswd -Bbn "$EBX_REG_USER" "$EBX_REG_PASS" >"$dir/htpasswd"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $data
  delete:
    enabled: true
http:
  addr: 0.0.0.0:$EBX_REGISTRY_PORT
  secret: envbox-test-only
  tls:
    certificate: $dir/certs/domain.crt
    key: $dir/certs/domain.key
auth:
  htpasswd:
    realm: envbox-test
    path: $dir/htpasswd
EOF
}

# Starts the world and exports its description. Idempotent within one shell: a second call is a no-op.
world_start() {
  [[ -n ${EBX_WORLD_DIR:-} && -d ${EBX_WORLD_DIR:-/nonexistent} ]] && return 0
  [[ -x ${ENVBOX_BIN:-} ]] || ENVBOX_BIN=$("$EBX_REPO_ROOT/scripts/build" </dev/null)
  world_reap_stale

  # The owner's pid in the name lets world_reap_stale and world_leftovers tell dead worlds from live ones.
  EBX_WORLD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ebx-world-$$.XXXXXX")
  # Bundles under pod dirs must be traversable by the workspace's uid 100000.
  chmod 755 "$EBX_WORLD_DIR"
  mkdir -p "$EBX_WORLD_DIR"/{pods,slots}
  EBX_UPSTREAM_NS=ebxup-$$
  EBX_REGISTRY=$EBX_REGISTRY_ADDR:$EBX_REGISTRY_PORT
  EBX_REG_USER=tester
  EBX_REG_PASS=s3cret
  EBX_REG_CA=$EBX_WORLD_DIR/registry/certs/domain.crt
  EBX_PULL_SECRET=$(jq -cn --arg reg "$EBX_REGISTRY" --arg auth "$(printf '%s:%s' "$EBX_REG_USER" "$EBX_REG_PASS" | base64 -w0)" \
    '{auths: {($reg): {auth: $auth}}}')
  export EBX_WORLD_DIR EBX_UPSTREAM_NS EBX_REGISTRY EBX_REG_USER EBX_REG_PASS EBX_REG_CA EBX_PULL_SECRET
  export ENVBOX_BIN EBX_CACHE_ROOT

  ebx_log "world: namespace $EBX_UPSTREAM_NS, dir $EBX_WORLD_DIR"
  ip netns add "$EBX_UPSTREAM_NS"
  ip -n "$EBX_UPSTREAM_NS" link set lo up
  # The registry host address sits on a dummy interface; kernels built without the dummy driver (no
  # modules on the CI VMs) get it on lo instead, which is equivalent for a /32 inside this namespace.
  local hostdev=reghost
  if ! ip -n "$EBX_UPSTREAM_NS" link add "$hostdev" type dummy 2>/dev/null; then
    hostdev=lo
  fi
  ip -n "$EBX_UPSTREAM_NS" addr add "$EBX_REGISTRY_ADDR/32" dev "$hostdev"
  ip -n "$EBX_UPSTREAM_NS" link set "$hostdev" up

  # EBX_REGISTRY_SEED: the storage of a registry another world filled (the VM tier's guest gets the host's),
  # with a pushed-NAME marker per image, so nothing is built or pushed again.
  world_write_registry_config "$EBX_WORLD_DIR/registry" ${EBX_REGISTRY_SEED:+"$EBX_REGISTRY_SEED/data"}
  # A plain command (not the world_in_upstream function), so that $! is the registry itself:
  # bash execs nsenter, which execs docker-registry.
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" docker-registry serve "$EBX_WORLD_DIR/registry/config.yml" \
    </dev/null >"$EBX_WORLD_DIR/registry/registry.log" 2>&1 &
  echo $! >"$EBX_WORLD_DIR/registry/pid"
  ebx_wait_for 20 world_registry_answers || {
    cat "$EBX_WORLD_DIR/registry/registry.log" >&2
    ebx_die "registry did not answer on 127.0.0.1:$EBX_REGISTRY_PORT in $EBX_UPSTREAM_NS"
  }

  local layout
  if [[ -n ${EBX_REGISTRY_SEED:-} ]]; then
    cp "$EBX_REGISTRY_SEED"/pushed-* "$EBX_WORLD_DIR/registry/" 2>/dev/null || true
  else
    layout=$(world_cached_image busybox "$EBX_IMAGES_DIR/busybox.sh")
    world_push_image "$layout" test/busybox:1
  fi
  ebx_log "world: registry $EBX_REGISTRY ready with test/busybox:1"
}

# Builds (once per cache) and pushes (once per world) test/debian:bookworm. Only bats files that need the
# image call this; it costs ~40 s of debootstrap the first time on a machine. Sets EBX_DEBIAN_IMAGE.
ebx_need_debian_image() {
  [[ -n ${EBX_WORLD_DIR:-} ]] || ebx_die "ebx_need_debian_image: no test world (run through scripts/test)"
  local layout
  if [[ ! -f $EBX_WORLD_DIR/registry/pushed-debian ]]; then
    layout=$(world_cached_image debian "$EBX_IMAGES_DIR/debian.sh" "$(ebx_debian_mirror)")
    world_push_image "$layout" test/debian:bookworm
    touch "$EBX_WORLD_DIR/registry/pushed-debian"
  fi
  EBX_DEBIAN_IMAGE=$EBX_REGISTRY/test/debian:bookworm
  export EBX_DEBIAN_IMAGE
}

# Stops the registry, deletes the namespace and the world dir. Safe to call twice and on a half-built world.
world_stop() {
  [[ -n ${EBX_WORLD_DIR:-} ]] || return 0
  local pid slot
  # Pods whose test died before its teardown ran.
  for slot in "$EBX_WORLD_DIR"/slots/*; do
    [[ -d $slot ]] || continue
    ebx_log "world: destroying leftover pod $(cat "$slot/ns" 2>/dev/null || echo "$slot")"
    pod_destroy_slot "$slot" || true
  done
  if [[ -f $EBX_WORLD_DIR/registry/pid ]]; then
    pid=$(<"$EBX_WORLD_DIR/registry/pid")
    kill -TERM "$pid" 2>/dev/null && { wait "$pid" 2>/dev/null || true; }
  fi
  if [[ -e /run/netns/$EBX_UPSTREAM_NS ]]; then
    for pid in $(ip netns pids "$EBX_UPSTREAM_NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$EBX_UPSTREAM_NS"
  fi
  rm -rf "$EBX_WORLD_DIR"
  unset EBX_WORLD_DIR
}

# Prints what harness runs left on the machine (namespaces, cgroups, mounts, dirs) whose owner process is
# gone; empty output means clean. Run after world_stop to prove the teardown complete.
world_leftovers() {
  local ns owner dir
  for ns in $(ip netns list | awk '$1 ~ /^ebx(up|pod)-/ {print $1}'); do
    owner=${ns##*-}
    [[ -d /proc/$owner ]] || echo "network namespace $ns"
  done
  while read -r dir; do
    owner=${dir##*-}
    [[ -d /proc/$owner ]] || echo "cgroup $dir"
  done < <(find /sys/fs/cgroup -mindepth 2 -maxdepth 6 -type d -name 'ebxpod-*' 2>/dev/null)
  for dir in "${TMPDIR:-/tmp}"/ebx-world-*; do
    [[ -e $dir ]] || continue
    owner=${dir##*/ebx-world-}
    owner=${owner%%.*}
    [[ -d /proc/$owner ]] && continue
    echo "directory $dir"
    awk -v d="$dir/" 'index($5, d) == 1 {print "mount " $5}' /proc/self/mountinfo
  done
  return 0
}
