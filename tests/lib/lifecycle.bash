# shellcheck shell=bash
# Helpers for tests/bats/lifecycle.bats: slow paths that make a start-up phase last long enough to be
# interrupted (a rate-limited registry path, a runtime whose `create` is slow), a pod whose
# /dev/termination-log is a file the host can read, and checks that a stopped pod left nothing behind.
#
#   lc_start_slow_proxy RATE    TCP forwarder in the upstream ns, 203.0.113.1:<free port> -> registry,
#                               RATE bytes/s per connection; sets LC_PROXY_PID, LC_PROXY_REGISTRY
#   lc_stop_slow_proxy          kills it (by pid)
#   lc_proxy_bytes              bytes the proxy has sent to clients so far
#   lc_secret_for REGISTRY      a pull secret for the test user on REGISTRY
#   lc_slow_runtime SECONDS     writes $POD_DIR/slow-runtime/runc: real runc, `create` delayed; prints it
#   lc_termination_log_wrapper  writes a stand-in for ENVBOX_BIN that gives the pod a private
#                               /dev/termination-log backed by $POD_DIR/termination-log; prints it
#   lc_leftovers                after envbox exited: prints what the pod left on the host (empty: none)
#   lc_pod_zombies              zombies in the pod's pid namespace, as "pid comm"
#   lc_wait_log REGEX [timeout] until a line of the pod's log matches REGEX (extended)
#   lc_start_mount_witness, lc_witness_mounts, lc_stop_mount_witness: see below

LC_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

lc_start_slow_proxy() {
  local rate=${1:?usage: lc_start_slow_proxy RATE}
  local dir=$POD_DIR/slow-proxy
  mkdir -p "$dir"
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" python3 "$LC_LIB_DIR/slow_proxy.py" \
    --listen "${EBX_REGISTRY%:*}:0" --upstream "127.0.0.1:${EBX_REGISTRY##*:}" --rate "$rate" \
    --port-file "$dir/port" --count-file "$dir/count" </dev/null >"$dir/log" 2>&1 3>&- &
  LC_PROXY_PID=$!
  echo "$LC_PROXY_PID" >"$dir/pid"
  ebx_wait_for 10 test -s "$dir/port" || { cat "$dir/log" >&2; echo "slow proxy did not start" >&2; return 1; }
  LC_PROXY_REGISTRY=${EBX_REGISTRY%:*}:$(<"$dir/port")
  export LC_PROXY_PID LC_PROXY_REGISTRY
}

lc_stop_slow_proxy() {
  [[ -n ${LC_PROXY_PID:-} ]] || return 0
  kill -KILL "$LC_PROXY_PID" 2>/dev/null || true
  wait "$LC_PROXY_PID" 2>/dev/null || true
  unset LC_PROXY_PID LC_PROXY_REGISTRY
}

lc_proxy_bytes() {
  cat "$POD_DIR/slow-proxy/count" 2>/dev/null || echo 0
}

lc_secret_for() {
  jq -cn --arg reg "$1" --arg auth "$(printf '%s:%s' "$EBX_REG_USER" "$EBX_REG_PASS" | base64 -w0)" \
    '{auths: {($reg): {auth: $auth}}}'
}

# A runtime named runc (so envbox treats it as runc) that runs the real runc, but announces a `create`
# in $POD_DIR/slow-runtime/create-started and sleeps SECONDS before running it.
lc_slow_runtime() {
  local secs=${1:?usage: lc_slow_runtime SECONDS} real dir=$POD_DIR/slow-runtime
  real=$(command -v runc) || { echo "runc not found" >&2; return 1; }
  mkdir -p "$dir"
  cat >"$dir/runc" <<EOF
#!/bin/sh
for a in "\$@"; do
  if [ "\$a" = create ]; then
    : >'$dir/create-started'
    sleep $secs
    break
  fi
done
exec '$real' "\$@"
EOF
  chmod 755 "$dir/runc"
  printf '%s\n' "$dir/runc"
}

# A runtime named runc (so envbox treats it as runc) that runs the real runc except for `kill` and
# `delete`, which hang for an hour, as behind a wedged sysbox-fs or a dead sysbox-mgr. Each hanging call
# is recorded in $POD_DIR/hanging-runtime/<verb>-called.
lc_hanging_runtime() {
  local real dir=$POD_DIR/hanging-runtime
  real=$(command -v runc) || { echo "runc not found" >&2; return 1; }
  mkdir -p "$dir"
  cat >"$dir/runc" <<EOF
#!/bin/sh
for a in "\$@"; do
  case "\$a" in
    kill | delete)
      : >'$dir/'"\$a"-called
      exec sleep 3600
      ;;
    create | start | exec | state) break ;;
  esac
done
exec '$real' "\$@"
EOF
  chmod 755 "$dir/runc"
  printf '%s\n' "$dir/runc"
}

# Kubernetes bind-mounts a file on /dev/termination-log. In the pod's mount namespace /dev is the host's
# devtmpfs, where creating that file would show on the host (and in every other pod), so the stand-in
# first gives the pod a /dev of its own: a tmpfs whose entries are bind mounts of the host's, plus
# termination-log, a bind mount of $POD_DIR/termination-log. Then it execs the real envbox (PID 1 stays).
lc_termination_log_wrapper() {
  local w=$POD_DIR/envbox-with-termination-log
  : >"$POD_DIR/termination-log"
  mkdir -p "$POD_DIR/old-dev"
  cat >"$w" <<EOF
#!/bin/sh
set -e
old='$POD_DIR/old-dev'
mount --rbind /dev "\$old"
mount -t tmpfs -o mode=755,size=1m pod-dev /dev
for e in "\$old"/* "\$old"/.[!.]*; do
  [ -e "\$e" ] || [ -L "\$e" ] || continue
  n=/dev/\${e##*/}
  if [ -L "\$e" ]; then
    cp -P "\$e" "\$n"
  elif [ -d "\$e" ]; then
    mkdir "\$n" && mount --rbind "\$e" "\$n"
  else
    : >"\$n" && mount --bind "\$e" "\$n"
  fi
done
: >/dev/termination-log
mount --bind '$POD_DIR/termination-log' /dev/termination-log
umount -l "\$old"
exec '$ENVBOX_BIN' "\$@"
EOF
  chmod 755 "$w"
  printf '%s\n' "$w"
}

# What a stopped pod may not leave behind on the host: mounts under its dir (overlay rootfs, binds),
# overlay mounts built from its layers, runc containers, cgroups below the pod's own (the workspace's),
# processes in the pod's cgroups or network namespace.
lc_leftovers() {
  awk -v d="$POD_DIR/" 'index($5, d) == 1 {print "mount " $5}' /proc/self/mountinfo
  awk -v d="$POD_DIR/" '{ for (i = 7; $i != "-"; i++) {} if ($(i + 1) == "overlay" && index($(i + 3), d)) print "overlay mount " $5 }' /proc/self/mountinfo
  local root=$POD_DIR/state/runtime c
  if [[ -d $root ]]; then
    runc --root "$root" list -q 2>/dev/null | sed 's/^/runc container /'
    for c in "$root"/*; do
      [[ -e $c ]] && echo "runc state $c"
    done
  fi
  local cg sub
  while read -r cg; do
    [[ -d $cg ]] || continue
    while read -r sub; do
      # cgroup v2: envbox's own leaf, made when it delegates the pod's cgroup.
      [[ $sub == "$cg/init" ]] && continue
      echo "cgroup $sub"
    done < <(find "$cg" -mindepth 1 -type d)
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sed 's/^/process in the pod cgroup: /'
  done <"$POD_SLOT_DIR/cgroups"
  ip netns pids "$POD_NS" 2>/dev/null | sed 's/^/process in the pod netns: /'
  return 0
}

# Zombies among the processes of the pod's pid namespace (envbox's children it failed to reap).
lc_pod_zombies() {
  local ns proc stat
  ns=$(readlink "/proc/$POD_PID/ns/pid") || return 1
  for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/ns/pid" 2>/dev/null) == "$ns" ]] || continue
    stat=$(cat "$proc/stat" 2>/dev/null) || continue
    [[ ${stat##*) } == Z* ]] && echo "${proc#/proc/} $(cat "$proc/comm" 2>/dev/null)"
  done
  return 0
}

lc_log_has() {
  grep -Eq -- "$1" "$POD_DIR/envbox.log"
}

lc_wait_log() {
  ebx_wait_for "${2:-60}" lc_log_has "$1"
}

# The pod's mount namespace dies with its last process, so mounts envbox leaked there are invisible
# from the host once it exits. A witness (a sleep that joined only the pod's mount namespace, so the
# pod's pid namespace teardown does not kill it) keeps that namespace alive and readable.
#   lc_start_mount_witness   after pod_start; sets LC_WITNESS_PID
#   lc_witness_mounts        envbox's mounts still in the pod's mount namespace: overlays, and
#                            anything under the pod's state and cache dirs
#   lc_stop_mount_witness    kills it (by pid); teardown calls it before pod_destroy
lc_start_mount_witness() {
  nsenter -t "$POD_PID" -m sleep 600 </dev/null >/dev/null 2>&1 3>&- &
  LC_WITNESS_PID=$!
  export LC_WITNESS_PID
  # Joined once its mount namespace is the pod's.
  ebx_wait_for 10 lc_witness_joined || { echo "mount witness did not join the pod" >&2; return 1; }
}

lc_witness_joined() {
  [[ $(readlink "/proc/$LC_WITNESS_PID/ns/mnt" 2>/dev/null) == "$(readlink "/proc/$POD_PID/ns/mnt" 2>/dev/null)" ]] &&
    [[ $(readlink "/proc/$LC_WITNESS_PID/exe" 2>/dev/null) != */nsenter ]]
}

lc_witness_mounts() {
  [[ -n ${LC_WITNESS_PID:-} ]] || return 0
  awk -v d="$POD_DIR/" -v s="$POD_DIR/state/" -v c="$POD_DIR/cache/" '
    { for (i = 7; $i != "-"; i++) {} }
    $(i + 1) == "overlay" && (index($(i + 3), d) || index($5, d) == 1) { print "overlay mount " $5; next }
    index($5 "/", s) == 1 || index($5 "/", c) == 1 { print "mount " $5 }' "/proc/$LC_WITNESS_PID/mountinfo"
}

lc_stop_mount_witness() {
  [[ -n ${LC_WITNESS_PID:-} ]] || return 0
  kill -KILL "$LC_WITNESS_PID" 2>/dev/null || true
  wait "$LC_WITNESS_PID" 2>/dev/null || true
  unset LC_WITNESS_PID
}
