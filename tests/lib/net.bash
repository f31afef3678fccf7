# shellcheck shell=bash
# Helpers for tests/bats/network.bats: an HTTP server in the upstream namespace (the pod's "internet"),
# the pod's addresses and rules as seen from the test, and the busybox tarball the inner Docker loads.
# Everything here acts only in namespaces the harness made; processes are stopped by pid.

# Starts `python3 -m http.server` on 203.0.113.1 (a free port chosen by the kernel) in the upstream
# namespace, serving DIR. Sets NET_HTTP_PID, NET_HTTP_PORT and NET_HTTP_LOG (its access log: one line per
# request, client address first).
net_http_start() {
  local dir=${1:?usage: net_http_start DIR}
  NET_HTTP_LOG=$dir.log
  NET_HTTP_PORT=""
  # nsenter execs python, so $! is the server itself. -u: the "Serving HTTP on ... port N" line is
  # printed at once, which is how the port is learned.
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" python3 -u -m http.server 0 --bind "$EBX_REGISTRY_ADDR" \
    --directory "$dir" </dev/null >"$NET_HTTP_LOG" 2>&1 3>&- &
  NET_HTTP_PID=$!
  export NET_HTTP_PID NET_HTTP_LOG
  if ! ebx_wait_for 20 grep -q '^Serving HTTP on .* port [0-9]' "$NET_HTTP_LOG"; then
    cat "$NET_HTTP_LOG" >&2
    net_http_stop
    echo "net_http_start: the upstream HTTP server did not start" >&2
    return 1
  fi
  NET_HTTP_PORT=$(sed -n 's/^Serving HTTP on .* port \([0-9]*\).*/\1/p' "$NET_HTTP_LOG" | head -n1)
  export NET_HTTP_PORT
}

net_http_stop() {
  [[ -n ${NET_HTTP_PID:-} ]] || return 0
  kill -TERM "$NET_HTTP_PID" 2>/dev/null || true
  wait "$NET_HTTP_PID" 2>/dev/null || true
  unset NET_HTTP_PID
}

# URL of PATH on the upstream server.
net_http_url() {
  printf 'http://%s:%s/%s\n' "$EBX_REGISTRY_ADDR" "$NET_HTTP_PORT" "${1#/}"
}

# Client addresses of the access-log lines that requested PATH.
net_http_clients_of() {
  awk -v p="\"GET /${1#/} " 'index($0, p) {print $1}' "$NET_HTTP_LOG"
}

# The IPv4 address (no prefix) of the pod's eth0.
net_pod_eth0_addr() {
  ip -n "$POD_NS" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]; exit}'
}

# The pod's eth0 network, e.g. 198.51.100.4/30.
net_pod_eth0_network() {
  local cidr addr prefix
  cidr=$(ip -n "$POD_NS" -4 -o addr show dev eth0 | awk '{print $4; exit}')
  addr=${cidr%/*} prefix=${cidr#*/}
  python3 -c 'import ipaddress, sys; print(ipaddress.ip_interface(sys.argv[1]).network)' "$addr/$prefix"
}

# iptables rules tagged by envbox in the pod's network namespace (iptables -S lines).
net_pod_envbox_rules() {
  {
    nsenter --net="/run/netns/$POD_NS" iptables -w -t nat -S POSTROUTING
    nsenter --net="/run/netns/$POD_NS" iptables -w -t filter -S FORWARD
  } | grep -e '--comment envbox' || true
}

# Writes the test busybox image as a `docker load` tarball (tag busybox:latest) to FILE.
net_busybox_tarball() {
  local file=${1:?usage: net_busybox_tarball FILE} layout
  layout=$(world_cached_image busybox "$EBX_IMAGES_DIR/busybox.sh")
  mkdir -p "$(dirname "$file")"
  skopeo copy -q "oci:$layout:img" "docker-archive:$file:busybox:latest" </dev/null
}

# Keeps the log of an earlier envbox run of the same pod aside, so that pod_wait_ready only sees the
# next run's lines.
net_rotate_pod_log() {
  local n=1
  while [[ -e $POD_DIR/envbox.run$n.log ]]; do n=$((n + 1)); done
  mv "$POD_DIR/envbox.log" "$POD_DIR/envbox.run$n.log"
}
