# shellcheck shell=bash
# The outer image under test: built offline from the Containerfile with buildah, then run like a pod.
#
#   img_need_base                   builds (once per cache) tests/images/base.sh and imports it into the harness's
#                                   buildah storage as $IMG_BASE_REF
#   img_build LOG [--build-arg ...] stages a build context (Containerfile, rootfs/, vendor-config/, $ENVBOX_BIN) and
#                                   builds $IMG_REF from it; the whole build log goes to LOG
#   img_rootfs                      prints a cached, unpacked rootfs of $IMG_REF (and writes its entrypoint.json)
#   imgpod_start NAME [VAR=v|-VAR]  boots the image as a privileged pod (pod.bash pod, see below)
#
# Images live in a dedicated containers/storage root under $EBX_CACHE_ROOT (never the machine's default), so
# they survive between runs like the test images: buildah's layer cache makes a warm rebuild take seconds.
# Requires world.bash (world_cached_image, pods).

IMG_STORAGE=$EBX_CACHE_ROOT/containers/storage
# The run root holds only locks and mount state; it must be on a tmpfs that a reboot clears.
IMG_RUNROOT=/run/envbox-test-containers
IMG_REF=localhost/envbox-test/envbox:test
IMG_RUNTIME_REF=localhost/envbox-test/envbox-runtime:cache
IMG_STORAGE_SPEC="containers-storage:[overlay@$IMG_STORAGE+$IMG_RUNROOT]"

img_buildah() {
  buildah --root "$IMG_STORAGE" --runroot "$IMG_RUNROOT" --storage-driver overlay \
    --registries-conf "$EBX_REPO_ROOT/tests/lib/registries-offline.conf" "$@"
}

# Imports the base image (tests/images/base.sh, cached as an OCI layout keyed by the script's hash) into the
# storage under a name that carries the same key. Sets and exports IMG_BASE_REF.
img_need_base() {
  local layout key
  layout=$(world_cached_image base "$EBX_IMAGES_DIR/base.sh" "$(ebx_debian_mirror)")
  key=${layout##*/base-}
  IMG_BASE_REF=localhost/envbox-test/base:$key
  export IMG_BASE_REF
  mkdir -p "$IMG_STORAGE"
  (
    flock 9
    if ! img_buildah inspect --type image "$IMG_BASE_REF" >/dev/null 2>&1; then
      ebx_log "importing $layout into the harness storage as $IMG_BASE_REF"
      skopeo copy -q "oci:$layout:img" "$IMG_STORAGE_SPEC$IMG_BASE_REF" </dev/null >&2
      # Imports of older base.sh versions are dead weight (their layers go with the next prune).
      local old
      for old in $(img_buildah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/envbox-test/base:'); do
        [[ $old == "$IMG_BASE_REF" ]] || img_buildah rmi "$old" >/dev/null 2>&1 || true
      done
    fi
  ) 9>"$EBX_CACHE_ROOT/containers/.lock"
}

# img_build LOG [buildah build args...]: builds $IMG_REF offline (IMG_REF may be overridden by the caller). The context is a fresh directory with only what
# the Containerfile reads (the repository's target/ is gigabytes), plus the static envbox as `envbox`.
img_build() {
  local log=$1 ctx rc=0
  shift
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/ebx-imgctx.XXXXXX")
  cp -a "$EBX_REPO_ROOT/Containerfile" "$EBX_REPO_ROOT/rootfs" "$EBX_REPO_ROOT/vendor-config" "$ctx/"
  cp "$ENVBOX_BIN" "$ctx/envbox"
  # Further files for the context (e.g. a local sysbox .deb), from the array IMG_BUILD_EXTRA.
  local extra
  for extra in "${IMG_BUILD_EXTRA[@]}"; do cp "$extra" "$ctx/"; done
  local common=(
    --layers --force-rm --pull=never --network=host
    # chroot isolation: RUN steps need no OCI runtime or cgroup setup (the CI VMs' hybrid cgroups stop crun).
    --isolation=chroot
    -f "$ctx/Containerfile"
    --build-arg "BASE_IMAGE=$IMG_BASE_REF"
    --build-arg ENVBOX_FROM=context --build-arg ENVBOX_BINARY=envbox
  )
  (
    flock 9
    # The package-installing stage is tagged so that it stays in the layer cache when old images are pruned.
    local brc=0
    img_buildah build "${common[@]}" --target runtime -t "$IMG_RUNTIME_REF" "$@" "$ctx" &&
      img_buildah build "${common[@]}" -t "$IMG_REF" "$@" "$ctx" || brc=$?
    # buildah 1.28 keeps the working containers of stages used by COPY --from; they pin old images.
    img_buildah rm --all >/dev/null 2>&1 || true
    if ((brc == 0)); then
      # Earlier builds of $IMG_REF (untagged now) and their layers; the base and the runtime stage stay.
      img_buildah rmi --prune >/dev/null 2>&1 || true
    fi
    exit "$brc"
  ) 9>"$EBX_CACHE_ROOT/containers/.lock" </dev/null >"$log" 2>&1 || rc=$?
  rm -rf "$ctx"
  return "$rc"
}

# Prints the directory of an unpacked copy of $IMG_REF: DIR/rootfs and DIR/entrypoint.json (Entrypoint + Cmd,
# as a JSON array). Cached by image id under $EBX_CACHE_ROOT/images/outer-<id>; older copies are removed.
img_rootfs() {
  local id dir tmp
  id=$(img_buildah inspect --type image --format '{{.FromImageID}}' "$IMG_REF") || return 1
  dir=$EBX_CACHE_ROOT/images/outer-${id:0:16}
  mkdir -p "$EBX_CACHE_ROOT/images"
  (
    flock 9
    if [[ ! -f $dir/entrypoint.json ]]; then
      tmp=$EBX_CACHE_ROOT/images/.tmp-outer-$$
      rm -rf "$tmp"
      mkdir -p "$tmp"
      skopeo copy -q "$IMG_STORAGE_SPEC$IMG_REF" "oci:$tmp/layout:img" </dev/null >&2
      umoci unpack --image "$tmp/layout:img" "$tmp/bundle" >/dev/null
      mv "$tmp/bundle/rootfs" "$tmp/rootfs"
      # What a runtime takes from the image config: Entrypoint + Cmd, and Env.
      skopeo inspect --config "oci:$tmp/layout:img" >"$tmp/config.json"
      jq -c '.config.Env // []' "$tmp/config.json" >"$tmp/env.json"
      jq -c '(.config.Entrypoint // []) + (.config.Cmd // [])' "$tmp/config.json" >"$tmp/args.json"
      rm -rf "$tmp/bundle" "$tmp/layout"
      mv "$tmp/args.json" "$tmp/entrypoint.json"
      find "$EBX_CACHE_ROOT/images" -mindepth 1 -maxdepth 1 -name 'outer-*' -exec rm -rf {} +
      mv "$tmp" "$dir"
    fi
  ) 9>"$EBX_CACHE_ROOT/images/.lock"
  printf '%s\n' "$dir"
}

# imgpod_write_init ROOTFS_DIR: the second stage of the pod's init (after pod.bash's cgroup view). It does what
# a container runtime does for a privileged container: an overlay of the image as the root, the volumes of the
# stock template (deploy/) bind-mounted from $POD_DIR/volumes, a private /dev with the host's devices, then
# pivot_root and exec of the image's entrypoint, so that envbox is PID 1 with the image as its root.
imgpod_write_init() {
  local image_dir=$1 init=$POD_DIR/image-init.sh
  local r=$POD_DIR/root
  mkdir -p "$r" "$POD_DIR/ovl/upper" "$POD_DIR/ovl/work" "$POD_DIR"/volumes/pvc/{home,cache/docker,cache/containers,envbox/docker,envbox/containers} \
    "$POD_DIR/volumes/sysbox"
  : >"$POD_DIR/termination-log"
  cat >"$init" <<EOF
#!/bin/sh
set -e
R='$r'
mount -t overlay overlay -o 'lowerdir=$image_dir/rootfs,upperdir=$POD_DIR/ovl/upper,workdir=$POD_DIR/ovl/work' "\$R"
mount -t proc proc "\$R/proc"
mount --rbind /sys "\$R/sys"
# /dev: a tmpfs with the host's devices, as runc gives a privileged container.
mount -t tmpfs -o mode=755,nosuid dev "\$R/dev"
for d in null zero full random urandom tty fuse net/tun; do
  [ -e "/dev/\$d" ] || continue
  mkdir -p "\$(dirname "\$R/dev/\$d")"
  touch "\$R/dev/\$d"
  mount --bind "/dev/\$d" "\$R/dev/\$d"
done
mkdir -p "\$R/dev/pts" "\$R/dev/shm" "\$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "\$R/dev/pts"
ln -s pts/ptmx "\$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "\$R/dev/shm"
mount -t mqueue mqueue "\$R/dev/mqueue"
ln -s /proc/self/fd "\$R/dev/fd"
touch "\$R/dev/termination-log"
mount --bind '$POD_DIR/termination-log' "\$R/dev/termination-log"
# The stock template's volumes (deploy/): PVC sub-paths, an emptyDir for sysbox, the node's modules and sources.
mkdir -p "\$R/home/coder"
mount --bind '$POD_DIR/volumes/pvc/home' "\$R/home/coder"
mkdir -p "\$R/var/lib/coder/docker" "\$R/var/lib/coder/containers"
mount --bind '$POD_DIR/volumes/pvc/cache/docker' "\$R/var/lib/coder/docker"
mount --bind '$POD_DIR/volumes/pvc/cache/containers' "\$R/var/lib/coder/containers"
mount --bind '$POD_DIR/volumes/pvc/envbox/docker' "\$R/var/lib/docker"
mount --bind '$POD_DIR/volumes/pvc/envbox/containers' "\$R/var/lib/containers"
mount --bind '$POD_DIR/volumes/sysbox' "\$R/var/lib/sysbox"
for d in /lib/modules /usr/src; do
  [ -d "\$d" ] || continue
  mkdir -p "\$R\$d"
  mount --bind "\$d" "\$R\$d"
  mount -o remount,bind,ro "\$R\$d"
done
# What kubelet writes into every container: the pod's name resolution. And the registry's CA, as a secret would.
cp /etc/resolv.conf "\$R/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n' >"\$R/etc/hosts"
mkdir -p "\$R/etc/envbox-test"
cp '$EBX_REG_CA' "\$R/etc/envbox-test/registry-ca.crt"
cd "\$R"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
# From here on only the image's own files exist.
exec /usr/bin/env sh -c 'umount -l /.oldroot && rmdir /.oldroot && exec "\$@"' sh "\$@"
EOF
}

# imgpod_start NAME [VAR=value|-VAR ...]: like pod_start, but PID 1 is the image's entrypoint + cmd inside the
# image's root. The pod's state dir ($POD_DIR/state, used by pod_ws and pod_destroy) is the PVC's
# envbox/containers/envbox, i.e. envbox's default CODER_STATE_DIR inside the pod.
imgpod_start() {
  local name=${1:?usage: imgpod_start NAME [VAR=value|-VAR ...]}
  shift
  [[ $name == "${POD_NAME:-}" ]] || ebx_die "imgpod_start: no pod $name (pod_create it first)"
  local image_dir
  image_dir=$(img_rootfs) || ebx_die "imgpod_start: no image rootfs"
  local -A vars=()
  local kv
  while read -r kv; do vars[${kv%%=*}]=${kv#*=}; done < <(jq -r '.[]' "$image_dir/env.json")
  vars[CODER_INNER_IMAGE]=$EBX_REGISTRY/test/busybox:1
  vars[CODER_IMAGE_PULL_SECRET]=$EBX_PULL_SECRET
  vars[CODER_EXTRA_CERTS_PATH]=/etc/envbox-test/registry-ca.crt
  vars[CODER_RUNTIME]=runc
  vars[CODER_INNER_USERNAME]=coder
  vars[CODER_MOUNTS]=/home/coder:/home/coder
  local arg envv=() args=()
  for arg in "$@"; do
    case $arg in
      -*) unset "vars[${arg#-}]" ;;
      *=*) vars[${arg%%=*}]=${arg#*=} ;;
      *) ebx_die "imgpod_start: expected VAR=value or -VAR, got '$arg'" ;;
    esac
  done
  for arg in "${!vars[@]}"; do envv+=("$arg=${vars[$arg]}"); done
  mapfile -t args < <(jq -r '.[]' "$image_dir/entrypoint.json")

  # The image's volumes replace the host-path volumes of pod.bash pods.
  POD_VOLUMES=""
  pod_write_init
  imgpod_write_init "$image_dir"
  rm -rf "$POD_DIR/state"
  ln -s volumes/pvc/envbox/containers/envbox "$POD_DIR/state"
  rm -f "$POD_DIR/exit-status"
  (
    while read -r dir; do echo "$BASHPID" >"$dir/cgroup.procs"; done <"$POD_SLOT_DIR/cgroups"
    rc=0
    nsenter --net="/run/netns/$POD_NS" \
      unshare --pid --fork --mount --uts --ipc --cgroup --mount-proc --propagation private \
      sh "$POD_DIR/pod-init.sh" sh "$POD_DIR/image-init.sh" env -i "${envv[@]}" "${args[@]}" || rc=$?
    echo "$rc" >"$POD_DIR/exit-status"
  ) </dev/null >>"$POD_DIR/envbox.log" 2>&1 3>&- &
  POD_RUNNER_PID=$!
  echo "$POD_RUNNER_PID" >"$POD_SLOT_DIR/runner-pid"
  local unshare_pid=""
  POD_PID=""
  if ! ebx_wait_for 10 pod_exited_or_child "$POD_RUNNER_PID" unshare_pid ||
    ! ebx_wait_for 10 pod_exited_or_child "${unshare_pid:-0}" POD_PID; then
    pod_print_log
    ebx_die "imgpod_start: the pod's PID 1 did not start"
  fi
  echo "$POD_PID" >"$POD_SLOT_DIR/pid"
  export POD_PID POD_RUNNER_PID
  IMGPOD_ENTRYPOINT=${args[0]}
  ebx_wait_for 20 imgpod_pid1_is_entrypoint || true
}

# True once PID 1 runs the image's entrypoint (its argv[0]), or the pod already ended.
imgpod_pid1_is_entrypoint() {
  [[ -f $POD_DIR/exit-status ]] && return 0
  local argv=()
  mapfile -d '' -t argv <"/proc/$POD_PID/cmdline" 2>/dev/null || return 1
  ((${#argv[@]})) && [[ ${argv[0]} == "$IMGPOD_ENTRYPOINT" ]]
}
