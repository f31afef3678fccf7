# shellcheck shell=bash
# Helpers of scripts/bench: samples, timing, a second "network pod" for the tools that are not envbox,
# the Go envbox's dockerd path (dockerd --userns-remap in a namespace of its own), memory sampling.
# Sourced after tests/lib/world.bash; defines functions only. Nothing here changes the host: dockerd runs
# in a private mount namespace whose /etc is an overlay (coder user, subuid/subgid, registry CA), its data
# and exec roots live under the world dir, and its cgroups nest under a pod cgroup of the harness.

BENCH_POD_VARS=(POD_NAME POD_NS POD_DIR POD_SLOT_DIR POD_VOLUMES POD_PID POD_RUNNER_PID POD_EXIT_STATUS POD_STOP_SECONDS)
BENCH_MARKER=.ebx-bench-started
# The bootstrap both paths run: it stamps the moment it starts, then stays (like `exec ./coder agent`).
# shellcheck disable=SC2016 # expanded by the workspace's shell
BENCH_BOOTSTRAP='date +%s.%N >"$HOME/.ebx-bench-tmp" && mv "$HOME/.ebx-bench-tmp" "$HOME/.ebx-bench-started"; exec sleep 100000'

bench_now() { printf '%s\n' "$EPOCHREALTIME"; }

# bench_sub A B: B - A with millisecond precision.
bench_sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", b - a }'; }

# bench_record METRIC VALUE [RUN]: one sample (seconds, KiB or a count) into samples.jsonl.
bench_record() {
  local metric=$1 value=$2
  [[ -n $value ]] || { ebx_log "bench: no value for $metric"; return 0; }
  value=$(awk -v v="$value" 'BEGIN { print v + 0 }')
  printf '{"metric":"%s","value":%s,"run":%s,"t":%s}\n' "$metric" "$value" "${BENCH_RUN:-0}" "$EPOCHREALTIME" \
    >>"$BENCH_OUT/samples.jsonl"
  ebx_log "  $metric = $value"
}

# bench_fact KEY VALUE: a string fact for the JSON (versions, sizes, notes).
bench_fact() {
  jq -cn --arg k "$1" --arg v "$2" '{key: $k, value: $v}' >>"$BENCH_OUT/facts.jsonl"
}

bench_load() { awk '{print $1}' /proc/loadavg; }

# Runs a step of a comparison, rotating the order so that no system always runs first.
# bench_rotate I NAME... prints the names rotated by I.
bench_rotate() {
  local i=$1 n k
  shift
  n=$#
  local arr=("$@")
  for ((k = 0; k < n; k++)); do printf '%s\n' "${arr[$(((i + k) % n))]}"; done
}

# Moves each PATH into a graveyard under the bench dir instead of deleting it; the graveyard goes at the end
# (world_stop). Deleting a tree right before a run distorts it: on ext4 without a journal (these VMs' root
# file system), the inode allocator checks every free inode it considers for a recent deletion (60 s, 360 s
# while the inode table block is dirty; fs/ext4/ialloc.c recently_deleted()), and after an `rm -rf` of a
# 10k-file tree, perf showed recently_deleted() and its buffer lookups at >50% of an unpack's CPU time.
# With BENCH_PURGE=1 (set when the disk is short of space) paths are deleted instead.
bench_bury() {
  local p
  for p in "$@"; do
    [[ -e $p ]] || continue
    if [[ ${BENCH_PURGE:-} == 1 ]]; then
      rm -rf "$p"
    else
      mkdir -p "$BENCH_TMP/graveyard"
      mv "$p" "$(mktemp -d "$BENCH_TMP/graveyard/XXXXXX")/"
    fi
  done
}

# --- juggling pods: tests/lib/pod.bash keeps one pod per shell in POD_* variables ----------------------

bench_pod_stash() {
  local key=$1 v n
  for v in "${BENCH_POD_VARS[@]}"; do
    n=BENCH_${key}_$v
    printf -v "$n" '%s' "${!v-}"
    unset "$v"
  done
}

bench_pod_unstash() {
  local key=$1 v n
  for v in "${BENCH_POD_VARS[@]}"; do
    n=BENCH_${key}_$v
    printf -v "$v" '%s' "${!n-}"
    export "${v?}"
    unset "$n"
  done
}

# The network pod: a harness pod (netns with eth0 into the upstream namespace, pod cgroups) that is never
# started; skopeo, `envbox pull` and dockerd run in its network namespace, dockerd in its cgroups.
bench_net_create() {
  [[ -z ${BENCH_NET_NS:-} ]] || return 0
  local saved=0
  if [[ -n ${POD_NAME:-} ]]; then bench_pod_stash OUTER; saved=1; fi
  pod_create bnet
  BENCH_NET_NS=$POD_NS BENCH_NET_SLOT=$POD_SLOT_DIR
  bench_pod_stash NET
  ((saved == 0)) || bench_pod_unstash OUTER
}

bench_net_destroy() {
  [[ -n ${BENCH_NET_NS:-} ]] || return 0
  local saved=0
  if [[ -n ${POD_NAME:-} ]]; then bench_pod_stash OUTER; saved=1; fi
  bench_pod_unstash NET
  pod_destroy || true
  ((saved == 0)) || bench_pod_unstash OUTER
  unset BENCH_NET_NS BENCH_NET_SLOT
}

bench_in_net() { nsenter --net="/run/netns/$BENCH_NET_NS" "$@"; }

# Counts the registry's blob requests so far (access-log lines of GET/HEAD .../blobs/...).
bench_blob_requests() {
  grep -cE '"(GET|HEAD) /v2/[^" ]*/blobs/' "$EBX_WORLD_DIR/registry/registry.log" || true
}

# The test image's layer blobs (OCI layout of the harness' image cache), base first.
bench_layer_blobs() {
  local layout=$1 manifest
  manifest=$(jq -r '.manifests[0].digest' "$layout/index.json")
  jq -r '.layers[].digest' "$layout/blobs/sha256/${manifest#sha256:}" |
    while read -r d; do echo "$layout/blobs/sha256/${d#sha256:}"; done
}

# tar floor: every layer blob in sequence into an empty directory (no id shift, no verification), under
# /usr/bin/time. Records PREFIX_s, PREFIX_user_s, PREFIX_sys_s (tar and its gzip child).
bench_tar_floor() {
  local prefix=$1 dest=$2 t0 t1 tv=$BENCH_TMP/time-tar.txt
  shift 2
  mkdir -p "$dest"
  sync
  t0=$(bench_now)
  # shellcheck disable=SC2016 # expanded by the inner bash
  /usr/bin/time -o "$tv" -f '%U %S' bash -c 'd=$1; shift; for b; do tar --numeric-owner -xzf "$b" -C "$d"; done' \
    sh "$dest" "$@" 2> >(grep -v 'Removing leading' >&2)
  t1=$(bench_now)
  bench_record "${prefix}_s" "$(bench_sub "$t0" "$t1")"
  bench_record "${prefix}_user_s" "$(awk '{print $1}' "$tv")"
  bench_record "${prefix}_sys_s" "$(awk '{print $2}' "$tv")"
}

# --- memory -----------------------------------------------------------------------------------------------

# bench_smaps PID FIELD: kB of Rss/Pss from /proc/PID/smaps_rollup (0 when gone).
bench_smaps() {
  awk -v f="$2:" '$1 == f {print $2; found = 1} END {if (!found) print 0}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0
}

# bench_mem PREFIX PID...: records PREFIX_rss and PREFIX_pss summed over the pids, and lists them.
bench_mem() {
  local prefix=$1 pid rss=0 pss=0 r p list=""
  shift
  for pid in "$@"; do
    [[ -r /proc/$pid/smaps_rollup ]] || continue
    r=$(bench_smaps "$pid" Rss) p=$(bench_smaps "$pid" Pss)
    rss=$((rss + r)) pss=$((pss + p))
    list+="$(cat "/proc/$pid/comm" 2>/dev/null)($pid):${r}/${p}kB "
  done
  bench_record "${prefix}_rss_kib" "$rss"
  bench_record "${prefix}_pss_kib" "$pss"
  ebx_log "  $prefix processes (rss/pss): $list"
  bench_fact "${prefix}_processes" "$list"
}

# Host pids of the processes in a network namespace (the pod side: envbox and its helpers, or dockerd,
# containerd and the shims; the workspace has a network namespace of its own).
bench_netns_pids() { ip netns pids "$1" 2>/dev/null | sort -n; }

# envbox (the pod's PID 1) and its descendants outside the workspace: those still in the pod's network
# namespace (e.g. the runc exec that holds the bootstrap). The harness' `unshare` above it is left out.
bench_pod_side_pids() {
  local net pid
  net=$(readlink "/proc/$POD_PID/ns/net") || return 0
  echo "$POD_PID"
  for pid in $(pod_descendants "$POD_PID"); do
    [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "$net" ]] && echo "$pid"
  done
  return 0
}

# --- the Go envbox's path: dockerd --userns-remap ------------------------------------------------------

BENCH_DOCKER_BIN=/usr/bin/docker

bench_docker_prepare() {
  BENCH_DKR=$BENCH_TMP/docker
  mkdir -p "$BENCH_DKR"/{etc-upper,etc-work,client,exec,root,home,vlc/docker,vlc/containers}
  local up=$BENCH_DKR/etc-upper
  cp /etc/passwd /etc/group "$up/"
  grep -q '^coder:' "$up/passwd" || echo 'coder:x:1000:1000:coder:/home/coder:/bin/sh' >>"$up/passwd"
  grep -q '^coder:' "$up/group" || echo 'coder:x:1000:' >>"$up/group"
  # As in the Go envbox's image: every shifted id is 100000 + id.
  echo 'coder:100000:65536' >"$up/subuid"
  echo 'coder:100000:65536' >"$up/subgid"
  mkdir -p "$up/docker/certs.d/$EBX_REGISTRY"
  cp "$EBX_REG_CA" "$up/docker/certs.d/$EBX_REGISTRY/ca.crt"
  printf '%s\n' "$EBX_PULL_SECRET" >"$BENCH_DKR/client/config.json"
  # /sys/fs/cgroup/*/docker dirs that exist now are someone else's; those that appear are ours.
  BENCH_DOCKER_CGROUPS_BEFORE=$(ls -d /sys/fs/cgroup/*/docker 2>/dev/null || true)
}

bench_dk() {
  DOCKER_HOST="unix://$BENCH_DKR/docker.sock" DOCKER_CONFIG="$BENCH_DKR/client" "$BENCH_DOCKER_BIN" "$@"
}

bench_dockerd_pings() {
  [[ $(curl -s -m 1 --unix-socket "$BENCH_DKR/docker.sock" http://docker/_ping 2>/dev/null) == OK ]]
}

# Starts dockerd as the Go envbox does (cli/docker.go:853): --userns-remap=coder, overlay2, the pod's MTU,
# --bip from CODER_DOCKER_BRIDGE_CIDR, debug logs. Returns once it answers /_ping (polled every 50 ms; the
# Go envbox polls every 250 ms, so the baseline is not penalised by the poll).
bench_dockerd_start() {
  [[ -z ${BENCH_DOCKERD_PID:-} ]] || ebx_die "dockerd already running ($BENCH_DOCKERD_PID)"
  local mtu
  mtu=$(ip -n "$BENCH_NET_NS" -o link show eth0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')
  (
    while read -r dir; do echo "$BASHPID" >"$dir/cgroup.procs"; done <"$BENCH_NET_SLOT/cgroups"
    # shellcheck disable=SC2016 # expanded by the inner sh
    exec nsenter --net="/run/netns/$BENCH_NET_NS" unshare --mount --propagation private sh -c '
      mount -t overlay -o "lowerdir=/etc,upperdir=$1/etc-upper,workdir=$1/etc-work" ebx-bench-etc /etc
      shift
      exec "$@"' sh "$BENCH_DKR" \
      dockerd --debug --log-level=debug --mtu="${mtu:-1500}" --userns-remap=coder --storage-driver=overlay2 \
      --bip=172.19.0.1/30 --data-root "$BENCH_DKR/root" --exec-root "$BENCH_DKR/exec" \
      --pidfile "$BENCH_DKR/dockerd.pid" -H "unix://$BENCH_DKR/docker.sock" \
      --containerd-namespace ebxbench --containerd-plugins-namespace ebxbench-plugins \
      --cgroup-parent docker
  ) </dev/null >>"$BENCH_DKR/dockerd.log" 2>&1 &
  BENCH_DOCKERD_PID=$!
  local deadline=$((SECONDS + 60))
  until bench_dockerd_pings; do
    if ! kill -0 "$BENCH_DOCKERD_PID" 2>/dev/null || ((SECONDS > deadline)); then
      tail -n 30 "$BENCH_DKR/dockerd.log" >&2
      bench_dockerd_stop
      ebx_die "dockerd did not start"
    fi
    sleep 0.05
  done
}

bench_dockerd_stop() {
  [[ -n ${BENCH_DOCKERD_PID:-} ]] || return 0
  local pid=$BENCH_DOCKERD_PID
  kill -TERM "$pid" 2>/dev/null || true
  if ! ebx_wait_for 60 bash -c "! kill -0 $pid 2>/dev/null"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  unset BENCH_DOCKERD_PID
  # containerd and shims exit with dockerd; anything left in the network namespace was started by it.
  local left
  for left in $(bench_netns_pids "$BENCH_NET_NS"); do
    ebx_wait_for 5 bash -c "! kill -0 $left 2>/dev/null" || kill -KILL "$left" 2>/dev/null || true
  done
}

# Removes the /sys/fs/cgroup/*/docker dirs dockerd made (only empty ones that did not exist before).
bench_docker_cgroups_cleanup() {
  [[ -n ${BENCH_DKR:-} ]] || return 0
  local d
  for d in /sys/fs/cgroup/*/docker; do
    [[ -d $d ]] || continue
    grep -qxF "$d" <<<"${BENCH_DOCKER_CGROUPS_BEFORE:-}" && continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || ebx_log "bench: could not remove $d"
  done
}

bench_docker_wipe() {
  [[ -z ${BENCH_DOCKERD_PID:-} ]] || ebx_die "bench_docker_wipe with dockerd running"
  bench_bury "$BENCH_DKR/root" "$BENCH_DKR/exec"
  mkdir -p "$BENCH_DKR/root" "$BENCH_DKR/exec"
}

# What the Go envbox does once dockerd answers (runDockerCVM, envbox-behaviour.md §3.3): pull, a throwaway
# container to read the image's facts, create and start the workspace container, mkdir ~/.coder as the
# user, exec the bootstrap. Mounts, env and limits as envbox gets them in bench_envbox_vars.
bench_docker_workspace() {
  local image=$1 meta=ebx-bench-meta
  bench_dk pull -q "$image" >/dev/null
  bench_dk create --name "$meta" --runtime runc --entrypoint sleep "$image" infinity >/dev/null
  bench_dk start "$meta" >/dev/null
  bench_dk exec "$meta" stat /sbin/init >/dev/null
  bench_dk exec "$meta" getent passwd coder >/dev/null
  bench_dk exec "$meta" cat /etc/os-release >/dev/null
  bench_dk rm -f "$meta" >/dev/null
  # The Go envbox runs /sbin/init when the image has one, but systemd cannot boot in a plain (non-sysbox)
  # userns-remapped Docker container (it exits 255 at once), so the baseline runs the Go envbox's other
  # entrypoint, `sleep infinity`: a lighter PID 1 than envbox's workspace, which boots systemd. A stop is
  # a SIGKILL, as the Go envbox never stops the workspace in order (envbox-behaviour.md §5).
  bench_dk create --name workspace_cvm --rm --runtime runc --entrypoint sleep --user root \
    --hostname workspace --stop-signal SIGKILL \
    --cpus "$BENCH_CPUS" --memory "$BENCH_MEMORY" \
    -v "$BENCH_DKR/vlc/docker:/var/lib/docker" -v "$BENCH_DKR/vlc/containers:/var/lib/containers" \
    -v "$BENCH_DKR/home:/home/coder" "$image" infinity >/dev/null
  bench_dk start workspace_cvm >/dev/null
  bench_dk exec -u 1000:1000 workspace_cvm mkdir -p /home/coder/.coder
  bench_dk exec -d -u 1000:1000 -e HOME=/home/coder -e BINARY_DIR=/home/coder/.coder \
    workspace_cvm /bin/sh -c "$BENCH_BOOTSTRAP"
}

# bench_wait_marker FILE TIMEOUT: waits for the bootstrap's stamp, prints it.
bench_wait_marker() {
  local file=$1 timeout=$2
  ebx_wait_for "$timeout" test -s "$file" || return 1
  cat "$file"
}

# bench_docker_run MODE(cold|warm): one start of the dockerd path; records MODE.dockerd (and the shutdown).
bench_docker_run() {
  local mode=$1 t0 t1 t2 stamp
  if [[ $mode == cold ]]; then bench_docker_wipe; fi
  rm -f "$BENCH_DKR/home/$BENCH_MARKER"
  chown 101000:101000 "$BENCH_DKR/home"
  sync
  t0=$(bench_now)
  bench_dockerd_start
  bench_docker_workspace "$BENCH_IMAGE"
  stamp=$(bench_wait_marker "$BENCH_DKR/home/$BENCH_MARKER" 120) || {
    tail -n 30 "$BENCH_DKR/dockerd.log" >&2
    ebx_die "dockerd path: the bootstrap never started"
  }
  bench_record "$mode.dockerd_s" "$(bench_sub "$t0" "$stamp")"
  if [[ $mode == cold ]]; then
    sleep "$BENCH_SETTLE"
    # shellcheck disable=SC2046 # pid list
    bench_mem mem.dockerd $(bench_netns_pids "$BENCH_NET_NS")
  fi
  # docker stop (SIGKILL, see above) and dockerd's own exit; the Go envbox SIGKILLs dockerd instead.
  t1=$(bench_now)
  bench_dk stop -t 25 workspace_cvm >/dev/null
  bench_dockerd_stop
  t2=$(bench_now)
  bench_record "stop.dockerd_$mode"_s "$(bench_sub "$t1" "$t2")"
}

# --- envbox ---------------------------------------------------------------------------------------------

# Settings both paths get: the Debian image, the bootstrap above, limits.
bench_envbox_vars() {
  printf '%s\n' "CODER_INNER_IMAGE=$BENCH_IMAGE" "CODER_BOOTSTRAP_SCRIPT=$BENCH_BOOTSTRAP" \
    "CODER_CPUS=$BENCH_CPUS" "CODER_MEMORY=$BENCH_MEMORY"
  if [[ ${BENCH_SYSBOX:-} == 1 ]]; then echo CODER_RUNTIME=sysbox-runc; fi
}

# Seconds of a "... in X s" build-log line whose output matches REGEX.
bench_log_seconds() {
  jq -rR --arg re "$2" 'fromjson? | objects | select(.type? == "info" and (.output | test($re))) | .output' "$1" |
    sed -n 's/.* in \([0-9.]*\) s$/\1/p' | tail -n 1
}

# Epoch seconds of the build log's done line.
bench_done_epoch() {
  local t
  t=$(jq -rR 'fromjson? | objects | select(.type? == "done") | .time' "$1" | tail -n 1)
  [[ -n $t ]] && date -d "$t" +%s.%N
}

# bench_envbox_start MODE: starts the current pod (cold: empty cache; warm: restart on the same volumes),
# records MODE.envbox_s (to the bootstrap's stamp), MODE.envbox_done_s and the phases the log reports.
bench_envbox_start() {
  local mode=$1 t0 stamp log=$POD_DIR/envbox.log vars
  # A restart appends to the same log; keep the previous start's lines apart so the done line is new.
  [[ -f $log ]] && mv "$log" "$POD_DIR/envbox.$(date +%s%N).log"
  rm -f "$POD_DIR/volumes/home/$BENCH_MARKER"
  mapfile -t vars < <(bench_envbox_vars)
  sync
  t0=$(bench_now)
  pod_start "$POD_NAME" "${vars[@]}"
  stamp=$(bench_wait_marker "$POD_DIR/volumes/home/$BENCH_MARKER" 180) || {
    pod_print_log
    ebx_die "envbox: the bootstrap never started"
  }
  pod_wait_ready 60 || ebx_die "envbox: no done line"
  bench_record "$mode.envbox_s" "$(bench_sub "$t0" "$stamp")"
  bench_record "$mode.envbox_done_s" "$(bench_sub "$t0" "$(bench_done_epoch "$log")")"
  bench_record "$mode.envbox_reported_s" "$(bench_log_seconds "$log" '^Workspace started in')"
  local phase secs
  while read -r phase secs; do
    bench_record "$mode.envbox_phase_${phase}_s" "$secs"
  done < <(python3 "$EBX_REPO_ROOT/scripts/lib/bench_phases.py" "$log" "$t0" "$stamp")
}

# One cold and one warm start of envbox on a fresh pod, memory once running, the shutdown of each.
bench_envbox_run() {
  pod_create bcold
  bench_envbox_start cold
  sleep "$BENCH_SETTLE"
  bench_mem mem.envbox_pid1 "$POD_PID"
  # shellcheck disable=SC2046 # pid list
  bench_mem mem.envbox $(bench_pod_side_pids)
  pod_stop TERM 60 || ebx_die "envbox did not stop"
  bench_record stop.envbox_debian_s "$POD_STOP_SECONDS"
  bench_envbox_start warm
  pod_stop TERM 60 || ebx_die "envbox did not stop"
  bench_record stop.envbox_debian_s "$POD_STOP_SECONDS"
  mkdir -p "$BENCH_OUT/logs"
  cat "$POD_DIR"/envbox*.log >"$BENCH_OUT/logs/envbox-run${BENCH_RUN:-0}.log" 2>/dev/null || true
  bench_bury "$POD_DIR/cache"
  local t0
  t0=$(bench_now)
  pod_destroy
  ebx_log "  (pod_destroy took $(bench_sub "$t0" "$(bench_now)") s)"
}

# envbox pull into CACHE from the network pod, under /usr/bin/time -v. Records PREFIX_s and
# PREFIX_peak_rss_kib.
bench_envbox_pull() {
  local prefix=$1 cache=$2 t0 t1 tv=$BENCH_TMP/time-v.txt
  mkdir -p "$cache"
  sync
  t0=$(bench_now)
  bench_in_net /usr/bin/time -v -o "$tv" env -i PATH="$POD_PATH_DEFAULT" \
    CODER_IMAGE_PULL_SECRET="$EBX_PULL_SECRET" CODER_EXTRA_CERTS_PATH="$EBX_REG_CA" CODER_CACHE_DIR="$cache" \
    "$ENVBOX_BIN" pull "$BENCH_IMAGE" >"$BENCH_TMP/pull.log" 2>&1 || {
    cat "$BENCH_TMP/pull.log" >&2
    ebx_die "envbox pull failed"
  }
  t1=$(bench_now)
  bench_record "${prefix}_s" "$(bench_sub "$t0" "$t1")"
  bench_record "${prefix}_peak_rss_kib" "$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tv")"
  bench_record "${prefix}_user_s" "$(awk -F': ' '/User time/ {print $2}' "$tv")"
  bench_record "${prefix}_sys_s" "$(awk -F': ' '/System time/ {print $2}' "$tv")"
}

bench_skopeo_copy() {
  local dir=$1
  bench_in_net skopeo copy -q --src-creds "$EBX_REG_USER:$EBX_REG_PASS" \
    --src-cert-dir "$BENCH_DKR/etc-upper/docker/certs.d/$EBX_REGISTRY" \
    "docker://$BENCH_IMAGE" "oci:$dir:img" </dev/null >/dev/null
}

bench_umoci_unpack() {
  umoci unpack --image "$1:img" --uid-map 0:100000:65536 --gid-map 0:100000:65536 "$2" >/dev/null
}
