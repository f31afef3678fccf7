# shellcheck shell=bash
# Pod simulation: boots the real envbox binary the way Kubernetes would start a privileged pod, as PID 1 of
# fresh pid/mount/uts/ipc/cgroup namespaces inside a network namespace with an `eth0`.
#
#   pod_create NAME            netns ebxpod-NAME-$$ with eth0 (veth into the upstream ns), POD_DIR with volumes
#   pod_start NAME [VAR=v|-VAR ...]   envbox as the pod's PID 1; VAR=v overrides/adds, -VAR drops a default
#                              (POD_OOM_SCORE_ADJ=N pod_start ...: the pod's oom_score_adj, as a kubelet sets it)
#   pod_wait_ready [timeout]   until a {"type":"done"} line (fails on {"type":"error"} or exit)
#   pod_exec CMD...            CMD in the pod's namespaces
#   pod_workspace_pid          workspace init pid in the pod's pid ns (from state/workspace.json)
#   pod_ws CMD...              CMD in the workspace's namespaces
#   pod_stop [SIGNAL] [timeout]  signal PID 1 and wait: POD_EXIT_STATUS, POD_STOP_SECONDS
#   pod_destroy                kill, unmount, delete netns, cgroups, runc state and dirs (bats teardown)
#
# State is kept in exported POD_* variables (so a pod made in setup_file is usable from the tests) and in
# a slot record under $EBX_WORLD_DIR/slots/<k>, which lets world_stop clean up pods a crashed test left.
# One pod at a time per shell. Do not call pod_start/pod_stop through bats' `run`: they set variables.

# shellcheck source=tests/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"

POD_PATH_DEFAULT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# 198.51.100.0/24 is cut into /30s; slot k uses .4k+1 (upstream side) and .4k+2 (pod eth0).
POD_MAX_SLOT=62

# Claims the lowest free /30 slot of the world; mkdir is atomic, so concurrent pods never share one.
pod_claim_slot() {
  local k
  for ((k = 1; k <= POD_MAX_SLOT; k++)); do
    if mkdir "$EBX_WORLD_DIR/slots/$k" 2>/dev/null; then
      printf '%s\n' "$k"
      return 0
    fi
  done
  ebx_die "no free pod slot (all $POD_MAX_SLOT /30 networks in use)"
}

# Prints "mountpoint fstype superoptions cgrouppath" for each cgroup hierarchy the caller is in, so that a
# pod cgroup can be made under the caller's own cgroup in each hierarchy (as kubelet nests pods).
pod_cgroup_hierarchies() {
  awk '
    NR == FNR { split($0, f, ":"); path[f[2]] = substr($0, length(f[1]) + length(f[2]) + 3); next }
    {
      for (i = 7; $i != "-"; i++) {}
      fstype = $(i + 1); super = $(i + 3)
      if (fstype == "cgroup2") { if ("" in path) print $5, fstype, super, path[""]; next }
      if (fstype != "cgroup") next
      for (c in path) {
        if (c == "") continue
        n = split(c, want, ","); ok = 1
        for (j = 1; j <= n; j++) if (("," super ",") !~ ("," want[j] ",")) ok = 0
        if (ok) { print $5, fstype, super, path[c]; break }
      }
    }' /proc/self/cgroup /proc/self/mountinfo
}

# Enables every controller a v2 cgroup has for its children.
pod_enable_controllers() {
  local c
  for c in $(<"$1/cgroup.controllers"); do echo "+$c" >"$1/cgroup.subtree_control"; done
}

# POD_CGROUP_LAYOUT=kubelet-v2 (cgroup v2 machines only): the pod's cgroup where a kubelet with the systemd
# driver and containerd put a container, controllers enabled down the path, CPU and memory limits on the pod
# slice and the container scope (POD_CPU_MAX, POD_MEMORY_MAX). Sets POD_CGROUP (absolute) and
# POD_CGROUP_REL (as /proc/PID/cgroup of a process outside the pod shows it).
pod_make_kubelet_cgroups() {
  local uid rel p part
  uid=$(tr - _ </proc/sys/kernel/random/uuid)
  rel=kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod$uid.slice
  p=/sys/fs/cgroup
  for part in ${rel//\// }; do
    pod_enable_controllers "$p"
    p=$p/$part
    mkdir -p "$p"
  done
  pod_enable_controllers "$p"
  echo "${POD_CPU_MAX:-200000 100000}" >"$p/cpu.max"
  echo "${POD_MEMORY_MAX:-1610612736}" >"$p/memory.max"
  # The pod slice goes when the pod does; the shared kubepods slices stay, as on a node.
  echo "$p" >"$POD_SLOT_DIR/cgroup-parents"
  echo "/sys/fs/cgroup cgroup2 kubelet" >"$POD_SLOT_DIR/hierarchies"
  pod_make_kubelet_container_cgroup
}

# A new container of the pod (its first, or a restart after the runtime removed the last one): a fresh
# cri-containerd-<id>.scope under the pod slice.
pod_make_kubelet_container_cgroup() {
  local slice id
  slice=$(<"$POD_SLOT_DIR/cgroup-parents")
  id=$(head -c 32 /dev/urandom | sha256sum | cut -c1-64)
  POD_CGROUP=$slice/cri-containerd-$id.scope
  POD_CGROUP_REL=${POD_CGROUP#/sys/fs/cgroup}
  export POD_CGROUP POD_CGROUP_REL
  mkdir "$POD_CGROUP"
  echo "${POD_CPU_MAX:-200000 100000}" >"$POD_CGROUP/cpu.max"
  echo "${POD_MEMORY_MAX:-1610612736}" >"$POD_CGROUP/memory.max"
  echo "$POD_CGROUP" >"$POD_SLOT_DIR/cgroups"
}

# What happens between two containers of one pod on a node: the runtime removes the dead container's cgroup
# tree (children first, as runc does; it fails while any process is left in it), the kubelet makes the next.
pod_kubelet_restart_container() {
  pod_remove_cgroup_tree "$POD_CGROUP" || {
    echo "the runtime cannot remove $POD_CGROUP: $(find "$POD_CGROUP" -name cgroup.procs -exec cat {} +)" >&2
    return 1
  }
  pod_make_kubelet_container_cgroup
}

# Creates the pod's cgroup in every hierarchy and records the dirs (one per line) in the slot record.
pod_make_cgroups() {
  local mp fstype super path dir
  : >"$POD_SLOT_DIR/cgroups"
  : >"$POD_SLOT_DIR/hierarchies"
  if [[ ${POD_CGROUP_LAYOUT:-} == kubelet-v2 ]]; then
    pod_make_kubelet_cgroups
    return
  fi
  while read -r mp fstype super path; do
    dir=$mp${path%/}/$POD_NS
    mkdir "$dir"
    echo "$dir" >>"$POD_SLOT_DIR/cgroups"
    echo "$mp $fstype $super" >>"$POD_SLOT_DIR/hierarchies"
    # A v1 cpuset cgroup starts with no cpus/mems and refuses tasks until they are copied from the parent.
    if [[ -f $dir/cpuset.cpus && -z $(<"$dir/cpuset.cpus") ]]; then
      cat "$(dirname "$dir")/cpuset.cpus" >"$dir/cpuset.cpus"
      cat "$(dirname "$dir")/cpuset.mems" >"$dir/cpuset.mems"
    fi
  done < <(pod_cgroup_hierarchies)
}

pod_create() {
  local name=${1:?usage: pod_create NAME}
  [[ -n ${EBX_WORLD_DIR:-} && -n ${EBX_UPSTREAM_NS:-} ]] || ebx_die "pod_create: no test world (EBX_WORLD_DIR unset)"
  [[ -z ${POD_NAME:-} ]] || ebx_die "pod_create: pod $POD_NAME still exists in this shell"
  local k up_ip pod_ip
  k=$(pod_claim_slot)
  POD_SLOT_DIR=$EBX_WORLD_DIR/slots/$k
  POD_NAME=$name
  POD_NS=ebxpod-$name-$$
  POD_DIR=$(mktemp -d "$EBX_WORLD_DIR/pods/$name.XXXXXX")
  chmod 755 "$POD_DIR"
  mkdir -p "$POD_DIR"/{cache,state,volumes/home,volumes/var-lib-coder}
  POD_VOLUMES=$POD_DIR/volumes/var-lib-coder:/var/lib/coder
  POD_PID="" POD_RUNNER_PID="" POD_EXIT_STATUS="" POD_STOP_SECONDS=""
  export POD_NAME POD_NS POD_DIR POD_SLOT_DIR POD_VOLUMES POD_PID POD_RUNNER_PID POD_EXIT_STATUS POD_STOP_SECONDS
  # The slot record is what pod_destroy (and world_stop, for crashed tests) cleans up from.
  echo "$POD_NS" >"$POD_SLOT_DIR/ns"
  echo "$POD_DIR" >"$POD_SLOT_DIR/dir"

  up_ip=198.51.100.$((4 * k + 1))
  pod_ip=198.51.100.$((4 * k + 2))
  ip netns add "$POD_NS"
  ip -n "$POD_NS" link set lo up
  ip link add eth0 netns "$POD_NS" type veth peer name "ebxv$k" netns "$EBX_UPSTREAM_NS"
  ip -n "$EBX_UPSTREAM_NS" addr add "$up_ip/30" dev "ebxv$k"
  ip -n "$EBX_UPSTREAM_NS" link set "ebxv$k" up
  ip -n "$POD_NS" addr add "$pod_ip/30" dev eth0
  ip -n "$POD_NS" link set eth0 up
  ip -n "$POD_NS" route add default via "$up_ip"
  pod_make_cgroups
}

# Writes the pod's init wrapper: it runs as PID 1 of the new namespaces, gives the pod the view a
# container runtime would (its own cgroup as the root of /sys/fs/cgroup, volumes bind-mounted, hostname),
# then execs its arguments (env -i ... envbox docker), so envbox keeps PID 1.
pod_write_init() {
  local init=$POD_DIR/pod-init.sh mp fstype super link vol
  {
    echo '#!/bin/sh'
    echo 'set -e'
    if [[ ${POD_CGROUP_LAYOUT:-} == kubelet-v2 ]]; then
      # As runc starts a container on a v2 node: PID 1 alone in the container's cgroup (nothing of the
      # runtime stays there), then a cgroup namespace rooted at it, and cgroup2 mounted rw inside that
      # namespace, as containerd mounts it for a privileged container.
      # shellcheck disable=SC2016 # expanded by the pod's init
      echo 'if [ -z "${EBX_POD_CGROUPNS:-}" ]; then'
      echo "  echo \$\$ >'$POD_CGROUP/cgroup.procs'"
      # shellcheck disable=SC2016 # expanded by the pod's init
      echo '  EBX_POD_CGROUPNS=1 exec unshare --cgroup sh "$0" "$@"'
      echo 'fi'
      echo 'umount -l /sys/fs/cgroup'
      echo 'mount -t cgroup2 -o rw,nosuid,nodev,noexec,relatime cgroup2 /sys/fs/cgroup'
    else
      echo 'mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup-view /sys/fs/cgroup'
    fi
    while read -r mp fstype super; do
      [[ $super != kubelet ]] || continue
      echo "mkdir -p '$mp'"
      if [[ $fstype == cgroup2 ]]; then
        echo "mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 '$mp'"
      else
        echo "mount -t cgroup -o 'nosuid,nodev,noexec,$super' cgroup '$mp'"
      fi
    done <"$POD_SLOT_DIR/hierarchies"
    # Aliases such as cpu,cpuacct -> cpu live as symlinks next to the mounts.
    for link in /sys/fs/cgroup/*; do
      [[ -L $link ]] && echo "ln -s '$(readlink "$link")' '$link'"
    done
    local IFS=,
    for vol in $POD_VOLUMES; do
      echo "mount --bind '${vol%%:*}' '${vol#*:}'"
    done
    echo "hostname '$POD_NAME'"
    # What the kubelet (through the container runtime) gives a pod of a given QoS class.
    [[ -n ${POD_OOM_SCORE_ADJ:-} ]] && echo "echo '$POD_OOM_SCORE_ADJ' >/proc/self/oom_score_adj"
    echo 'exec "$@"'
  } >"$init"
}

# Host mountpoints (e.g. /var/lib/coder) are shared by every pod on the machine, including pods of other
# harness runs: a pod's private mount namespace still needs the directory to exist on the host. The first
# pod that needs a missing one creates it; the last pod to leave removes it. Users are tracked under
# POD_MOUNTPOINT_DIR, serialised with flock.
POD_MOUNTPOINT_DIR=/run/envbox-test-mountpoints

pod_make_mountpoints() {
  local vol dst key IFS=,
  mkdir -p "$POD_MOUNTPOINT_DIR"
  for vol in $POD_VOLUMES; do
    dst=${vol#*:}
    key=$POD_MOUNTPOINT_DIR/${dst//\//_}
    (
      flock 9
      if [[ ! -e $dst ]]; then
        mkdir -p "$dst"
        echo "$dst" >"$key.created"
      fi
      # A mountpoint that existed before any pod is the machine's; it is never recorded nor removed.
      if [[ -f $key.created ]]; then
        mkdir -p "$key.users"
        touch "$key.users/$POD_NS"
        echo "$dst" >>"$POD_SLOT_DIR/mountpoints"
      fi
    ) 9>"$POD_MOUNTPOINT_DIR/.lock"
  done
}

# Drops this pod's claim on the mountpoints it used; removes those no other pod uses any more.
pod_release_mountpoints() {
  local slot=$1 ns=$2 dst key
  [[ -f $slot/mountpoints ]] || return 0
  while read -r dst; do
    key=$POD_MOUNTPOINT_DIR/${dst//\//_}
    (
      flock 9
      rm -f "$key.users/$ns"
      if rmdir "$key.users" 2>/dev/null; then
        rmdir "$dst" 2>/dev/null || echo "mountpoint $dst is not empty; left in place" >&2
        rm -f "$key.created"
      fi
    ) 9>"$POD_MOUNTPOINT_DIR/.lock"
  done <"$slot/mountpoints"
}

pod_start() {
  local name=${1:?usage: pod_start NAME [VAR=value|-VAR ...]}
  shift
  [[ $name == "${POD_NAME:-}" ]] || ebx_die "pod_start: no pod $name (pod_create it first)"
  [[ -x $ENVBOX_BIN ]] || ebx_die "pod_start: ENVBOX_BIN=$ENVBOX_BIN is not executable"
  local -A vars=(
    [CODER_INNER_IMAGE]=$EBX_REGISTRY/test/busybox:1
    [CODER_IMAGE_PULL_SECRET]=$EBX_PULL_SECRET
    [CODER_EXTRA_CERTS_PATH]=$EBX_REG_CA
    [CODER_RUNTIME]=runc
    [CODER_CACHE_DIR]=$POD_DIR/cache
    [CODER_STATE_DIR]=$POD_DIR/state
    [CODER_INNER_USERNAME]=coder
    [CODER_MOUNTS]=$POD_DIR/volumes/home:/home/coder
    [PATH]=$POD_PATH_DEFAULT
  )
  local arg envv=()
  for arg in "$@"; do
    case $arg in
      -*) unset "vars[${arg#-}]" ;;
      *=*) vars[${arg%%=*}]=${arg#*=} ;;
      *) ebx_die "pod_start: expected VAR=value or -VAR, got '$arg'" ;;
    esac
  done
  for arg in "${!vars[@]}"; do envv+=("$arg=${vars[$arg]}"); done

  pod_write_init
  pod_make_mountpoints
  rm -f "$POD_DIR/exit-status"
  # The runner joins the pod cgroups, then becomes unshare (nsenter execs it), whose --fork child is the
  # wrapper and then envbox. It records the exit status, which is envbox's (unshare relays it). fd 3 is
  # closed so bats does not wait for the pod's output.
  local cgroupns=(--cgroup)
  # kubelet-v2: the pod's PID 1 joins its cgroup and makes the cgroup namespace itself (pod_write_init).
  [[ ${POD_CGROUP_LAYOUT:-} != kubelet-v2 ]] || cgroupns=()
  (
    if ((${#cgroupns[@]})); then
      while read -r dir; do echo "$BASHPID" >"$dir/cgroup.procs"; done <"$POD_SLOT_DIR/cgroups"
    fi
    rc=0
    nsenter --net="/run/netns/$POD_NS" \
      unshare --pid --fork --mount --uts --ipc "${cgroupns[@]}" --mount-proc --propagation private \
      sh "$POD_DIR/pod-init.sh" env -i "${envv[@]}" "$ENVBOX_BIN" docker || rc=$?
    echo "$rc" >"$POD_DIR/exit-status"
  ) </dev/null >>"$POD_DIR/envbox.log" 2>&1 3>&- &
  POD_RUNNER_PID=$!
  echo "$POD_RUNNER_PID" >"$POD_SLOT_DIR/runner-pid"

  local unshare_pid=""
  POD_PID=""
  # An envbox that exits at once (bad configuration) may be gone before it is seen; that is not an error
  # here, the exit status is in $POD_DIR/exit-status and pod_wait_ready reports it.
  if ! ebx_wait_for 10 pod_exited_or_child "$POD_RUNNER_PID" unshare_pid ||
    ! ebx_wait_for 10 pod_exited_or_child "${unshare_pid:-0}" POD_PID; then
    pod_print_log
    ebx_die "pod_start: the pod's PID 1 did not start"
  fi
  echo "$POD_PID" >"$POD_SLOT_DIR/pid"
  export POD_PID POD_RUNNER_PID
  # Return once the wrapper has exec'd envbox (or already finished), so pod_exec sees the final mounts.
  ebx_wait_for 10 pod_pid1_is_envbox || true
}

# pod_child_of PID VAR: stores the first child of PID in VAR; fails while PID has none.
pod_child_of() {
  local children
  children=$(cat /proc/"$1"/task/*/children 2>/dev/null) || return 1
  [[ -n $children ]] || return 1
  printf -v "$2" '%s' "${children%% *}"
}

# pod_exited_or_child PID VAR: true when the pod already exited, or PID's first child is stored in VAR.
pod_exited_or_child() {
  [[ -f $POD_DIR/exit-status ]] || pod_child_of "$1" "$2"
}

# True once PID 1 runs envbox: its argv no longer starts with the wrapper's sh or env -i (argv is checked
# rather than /proc/PID/exe so that a script standing in for envbox works too).
pod_pid1_is_envbox() {
  [[ -f $POD_DIR/exit-status ]] && return 0
  local argv=()
  mapfile -d '' -t argv <"/proc/$POD_PID/cmdline" 2>/dev/null || return 1
  ((${#argv[@]})) && [[ ${argv[0]} != sh && ${argv[0]} != env && " ${argv[*]} " == *" $ENVBOX_BIN "* ]]
}

pod_running() {
  [[ -n ${POD_DIR:-} && ! -f $POD_DIR/exit-status ]]
}

# Prints the build-log JSON lines of the given type from the pod's log (operator lines are skipped).
pod_log_lines() {
  jq -cR --arg type "$1" 'fromjson? | objects | select(.type? == $type)' "$POD_DIR/envbox.log"
}

pod_print_log() {
  echo "---- $POD_DIR/envbox.log ----" >&2
  cat "$POD_DIR/envbox.log" >&2 || true
  echo "---- end of log ----" >&2
}

pod_wait_ready() {
  local timeout=${1:-120} deadline
  deadline=$((SECONDS + timeout))
  while :; do
    if [[ -n $(pod_log_lines error) ]]; then
      echo "pod_wait_ready: envbox reported an error" >&2
      pod_print_log
      return 1
    fi
    if [[ -n $(pod_log_lines "done") ]]; then
      return 0
    fi
    if [[ -f $POD_DIR/exit-status ]]; then
      echo "pod_wait_ready: envbox exited with status $(<"$POD_DIR/exit-status") before it was ready" >&2
      pod_print_log
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "pod_wait_ready: no done line within ${timeout}s" >&2
      pod_print_log
      return 1
    fi
    sleep 0.2
  done
}

pod_exec() {
  [[ -n ${POD_PID:-} ]] || { echo "pod_exec: the pod has no running PID 1" >&2; return 1; }
  if [[ ${POD_CGROUP_LAYOUT:-} == kubelet-v2 ]]; then
    # As the node's runc places a `kubectl exec` process: into the container's cgroup, or, once that has
    # controllers enabled for children (EBUSY), into the cgroup of the container's PID 1.
    (
      echo "$BASHPID" >"$POD_CGROUP/cgroup.procs" 2>/dev/null ||
        echo "$BASHPID" >"/sys/fs/cgroup$(pod_cgroup_of "$POD_PID")/cgroup.procs"
      exec nsenter -t "$POD_PID" -a "$@"
    )
    return
  fi
  nsenter -t "$POD_PID" -a "$@"
}

# The cgroup v2 path of PID as this shell's cgroup namespace shows it.
pod_cgroup_of() {
  awk -F: '$1 == "0" {print $3}' "/proc/$1/cgroup"
}

pod_workspace_pid() {
  local file=$POD_DIR/state/workspace.json
  [[ -f $file ]] || { echo "pod_workspace_pid: $file does not exist" >&2; return 1; }
  jq -er '.pid' "$file"
}

# Runs CMD in the workspace: enter the pod first (the pid in workspace.json is in the pod's pid ns), then
# every namespace of the workspace's init, including its user namespace.
pod_ws() {
  local ws
  ws=$(pod_workspace_pid) || return 1
  pod_exec nsenter -t "$ws" -a "$@"
}

# Prints the host pids of PID's descendants, depth first.
pod_descendants() {
  local child
  # shellcheck disable=SC2013 # the children files are space-separated pid lists
  for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    echo "$child"
    pod_descendants "$child"
  done
}

# Host pid of the pod process whose pid in the pod's pid namespace is NSPID.
pod_host_pid() {
  local nspid=$1 pid
  for pid in $(pod_descendants "$POD_PID"); do
    if [[ $(awk '$1 == "NSpid:" {print $3}' "/proc/$pid/status" 2>/dev/null) == "$nspid" ]]; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# Identity of a process that survives pid reuse: "pid:starttime".
pod_proc_identity() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # Fields after "comm)" start at field 3; starttime is field 22.
  awk -v pid="$1" '{print pid ":" $20}' <<<"$stat"
}

# Prints identities of every process in the workspace's pid namespace (its init, the bootstrap and anything
# exec'd into it), by host pid. Processes exec'd in are not descendants of the init, hence the ns match.
pod_workspace_processes() {
  local ws host ns proc
  ws=$(pod_workspace_pid) || return 1
  host=$(pod_host_pid "$ws") || return 1
  ns=$(readlink "/proc/$host/ns/pid") || return 1
  for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/ns/pid" 2>/dev/null) == "$ns" ]] && pod_proc_identity "${proc#/proc/}"
  done
  return 0
}

# Succeeds when a process recorded by pod_proc_identity still exists.
pod_proc_alive() {
  local pid=${1%%:*}
  [[ $(pod_proc_identity "$pid" 2>/dev/null) == "$1" ]]
}

pod_stop() {
  local signal=${1:-TERM} timeout=${2:-60} t0 t1
  [[ -n ${POD_RUNNER_PID:-} ]] || ebx_die "pod_stop: pod not started"
  if [[ -f $POD_DIR/exit-status ]]; then
    echo "pod_stop: envbox had already exited with status $(<"$POD_DIR/exit-status")" >&2
    return 1
  fi
  t0=$(date +%s.%N)
  kill -s "$signal" "$POD_PID"
  if ! ebx_wait_for "$timeout" test -f "$POD_DIR/exit-status"; then
    echo "pod_stop: envbox did not exit within ${timeout}s of SIG$signal" >&2
    return 1
  fi
  t1=$(date +%s.%N)
  POD_EXIT_STATUS=$(<"$POD_DIR/exit-status")
  POD_STOP_SECONDS=$(echo "$t1 - $t0" | bc)
  export POD_EXIT_STATUS POD_STOP_SECONDS
}

# Cleans up everything a pod slot recorded. Used by pod_destroy and by world_stop for pods of crashed
# tests. Returns non-zero (after doing all it can) if something could not be removed.
pod_destroy_slot() {
  local slot=$1 ns dir pid runner mp rc=0 wsjson rroot id
  [[ -d $slot ]] || return 0
  ns=$(cat "$slot/ns" 2>/dev/null || true)
  dir=$(cat "$slot/dir" 2>/dev/null || true)

  # PID 1 dying takes the whole pid namespace (and nested ones) with it.
  pid=$(cat "$slot/pid" 2>/dev/null || true)
  if [[ -n $pid && -d /proc/$pid ]]; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  runner=$(cat "$slot/runner-pid" 2>/dev/null || true)
  if [[ -n $runner ]]; then
    ebx_wait_for 10 test ! -d "/proc/$runner" || { echo "pod runner $runner did not exit" >&2; rc=1; }
    wait "$runner" 2>/dev/null || true
  fi
  # Processes that entered the netns from outside (pod_exec leftovers) are not in the pid namespace.
  if [[ -n $ns && -e /run/netns/$ns ]]; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi

  # Mounts live in the pod's private mount namespace and die with it; this catches any that leaked.
  if [[ -n $dir ]]; then
    while read -r mp; do
      umount "$mp" 2>/dev/null || { echo "could not unmount $mp" >&2; rc=1; }
    done < <(awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  fi

  # runc keeps container state under its root; the container is gone with the pod, so only the state dir
  # is left. Removing it directly avoids `runc delete` acting on cgroup paths of the pod's view.
  wsjson=$dir/state/workspace.json
  if [[ -n $dir && -f $wsjson ]]; then
    rroot=$(jq -r '.runtime_root // empty' "$wsjson" 2>/dev/null || true)
    id=$(jq -r '.id // empty' "$wsjson" 2>/dev/null || true)
    if [[ -n $rroot && -n $id && -f $rroot/$id/state.json ]]; then
      rm -rf "${rroot:?}/${id:?}"
      rmdir "$rroot" 2>/dev/null || true
    fi
  fi

  # Cgroups: the pod's cgroup and whatever the runtime made below it, deepest first.
  if [[ -f $slot/cgroups ]]; then
    while read -r mp; do
      [[ -d $mp ]] || continue
      ebx_wait_for 5 pod_remove_cgroup_tree "$mp" || { echo "could not remove cgroup $mp" >&2; rc=1; }
    done <"$slot/cgroups"
  fi
  if [[ -f $slot/cgroup-parents ]]; then
    while read -r mp; do
      [[ ! -d $mp ]] || rmdir "$mp" || { echo "could not remove cgroup $mp" >&2; rc=1; }
    done <"$slot/cgroup-parents"
  fi

  if [[ -n $ns && -e /run/netns/$ns ]]; then
    ip netns del "$ns" || rc=1
  fi
  pod_release_mountpoints "$slot" "$ns"
  [[ -n $dir ]] && rm -rf "$dir"
  rm -rf "$slot"
  return "$rc"
}

# rmdir a cgroup tree bottom-up; fails while a cgroup still has tasks (they may be exiting).
pod_remove_cgroup_tree() {
  find "$1" -depth -type d -exec rmdir {} + 2>/dev/null
  [[ ! -d $1 ]]
}

pod_destroy() {
  [[ -n ${POD_SLOT_DIR:-} ]] || return 0
  local rc=0
  pod_destroy_slot "$POD_SLOT_DIR" || rc=$?
  unset POD_NAME POD_NS POD_DIR POD_SLOT_DIR POD_VOLUMES POD_PID POD_RUNNER_PID
  return "$rc"
}
