#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154 # bats sets output/stderr/status inside run
# Workspace networking (issue #7): the veth pair between the pod and the workspace, NAT through the
# pod's eth0, the pod's MTU inside (also for the inner Docker), CODER_DOCKER_BRIDGE_CIDR, a restart on
# the same volumes and a start after envbox was SIGKILLed. Docker inside runs in test/debian:bookworm
# (systemd, docker.io), as root.
#
# Each test makes its own pod (setup) and an HTTP server in the upstream namespace when it needs one;
# teardown stops the server by pid and destroys the pod.

bats_require_minimum_version 1.5.0

POD_MTU=1450

setup_file() {
  load '../lib/world'
  [[ -n ${EBX_WORLD_DIR:-} ]] || return 0
  # Built once per machine (~2 min), pushed once per world; the Docker tests need it.
  ebx_need_debian_image
}

setup() {
  load '../lib/world'
  load '../lib/assert'
  load '../lib/net'
  [[ -n ${EBX_WORLD_DIR:-} ]] || fail "no test world: run through scripts/test"
  [[ -x $ENVBOX_BIN ]] || fail "ENVBOX_BIN=$ENVBOX_BIN is not executable"
  pod_create net
  # A pod network with a smaller MTU than the usual 1500, as on overlay networks.
  ip -n "$POD_NS" link set eth0 mtu "$POD_MTU"
}

teardown() {
  net_http_stop
  pod_destroy
}

# Starts the upstream HTTP server with an index.html and a nested.html.
start_upstream() {
  local www=$POD_DIR/www
  mkdir -p "$www"
  echo hello-from-upstream >"$www/index.html"
  echo hello-nested >"$www/nested.html"
  net_http_start "$www"
}

wait_for_exit() {
  ebx_wait_for "${1:-60}" test -f "$POD_DIR/exit-status" || { pod_print_log; fail "envbox did not exit"; }
  POD_EXIT_STATUS=$(<"$POD_DIR/exit-status")
}

# The bootstrap script of the Docker tests, run as root. The image's init is systemd, which owns
# docker.service (enabled by the Debian package): the script waits until systemd answers, starts
# the unit and waits for the daemon.
# shellcheck disable=SC2016 # expanded by the workspace's shell
DOCKER_BOOTSTRAP='
for i in $(seq 240); do
  case $(systemctl is-system-running 2>/dev/null) in running|degraded) break ;; esac
  sleep 0.5
done
systemctl start docker.service
for i in $(seq 240); do
  docker info >/dev/null 2>&1 && break
  systemctl is-failed -q docker.service && break
  sleep 0.5
done
docker info >/dev/null && echo inner-docker-ready
'

start_docker_pod() {
  mkdir -p "$POD_DIR/volumes/images"
  [[ -f $POD_DIR/volumes/images/busybox.tar ]] || net_busybox_tarball "$POD_DIR/volumes/images/busybox.tar"
  pod_start net CODER_INNER_IMAGE="$EBX_DEBIAN_IMAGE" CODER_INNER_USERNAME=root \
    CODER_MOUNTS="$POD_DIR/volumes/images:/images:ro" CODER_BOOTSTRAP_SCRIPT="$DOCKER_BOOTSTRAP"
  pod_wait_ready 240
}

docker_answers() {
  pod_ws docker info >/dev/null 2>&1
}

docker_answers_or_bootstrap_ended() {
  docker_answers || pod_log_lines info | grep -q '"The bootstrap script ended'
}

# Waits for the inner dockerd (the bootstrap script gives up when systemd does); on failure shows why,
# from the workspace's journal.
wait_for_inner_docker() {
  ebx_wait_for 240 docker_answers_or_bootstrap_ended || true
  if ! docker_answers; then
    pod_print_log
    echo "---- journalctl -u docker (workspace) ----" >&2
    pod_ws journalctl -u docker --no-pager 2>&1 | grep -v 'module=grpc' | tail -n 25 >&2 || true
    fail "the inner dockerd does not answer"
  fi
}

@test "the workspace reaches an upstream server through the pod's NAT, with the pod's MTU" {
  start_upstream
  pod_start net
  pod_wait_ready 90

  run pod_ws wget -qO- "$(net_http_url index.html)"
  assert_status 0
  assert_equal "$output" hello-from-upstream "page fetched from the workspace"
  # MASQUERADE: upstream sees the pod's address, not the workspace's 172.19.0.2.
  local pod_addr
  pod_addr=$(net_pod_eth0_addr)
  assert_equal "$(net_http_clients_of index.html)" "$pod_addr" "client address in the upstream access log"

  run pod_ws cat /sys/class/net/eth0/mtu
  assert_status 0
  assert_equal "$output" "$POD_MTU" "MTU of the workspace's eth0"
  assert_equal "$(ip -n "$POD_NS" -o link show envbox0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')" "$POD_MTU" \
    "MTU of the pod side (envbox0)"
  run pod_ws ip -4 route show default
  assert_status 0
  assert_contains "$output" "default via 172.19.0.1 dev eth0"
}

@test "NAT through a second pod interface: traffic routed out of eth1 (Multus) is masqueraded too" {
  start_upstream
  # A second interface, as Multus adds one: a veth into the upstream namespace on its own /30 (192.0.2.0/24
  # is cut like the pod slots), with the upstream server's address routed through it instead of eth0.
  local k up2 pod2
  k=${POD_SLOT_DIR##*/}
  up2=192.0.2.$((4 * k + 1)) pod2=192.0.2.$((4 * k + 2))
  ip link add eth1 netns "$POD_NS" type veth peer name "ebxw$k" netns "$EBX_UPSTREAM_NS"
  ip -n "$EBX_UPSTREAM_NS" addr add "$up2/30" dev "ebxw$k"
  ip -n "$EBX_UPSTREAM_NS" link set "ebxw$k" up
  ip -n "$POD_NS" addr add "$pod2/30" dev eth1
  ip -n "$POD_NS" link set eth1 up
  ip -n "$POD_NS" route add "$EBX_REGISTRY_ADDR/32" via "$up2" dev eth1
  # The pod's registry traffic goes through eth1 now as well; the image pull proves that route works.
  pod_start net
  pod_wait_ready 90

  # busybox's own timeout: its wget -T crashes (SIGSEGV) in Debian's busybox-static.
  run pod_ws timeout 20 wget -qO- "$(net_http_url index.html)"
  assert_status 0
  assert_equal "$output" hello-from-upstream "page fetched from the workspace through eth1"
  # Upstream saw eth1's address: the workspace's own 172.19.0.2 has no route back.
  assert_equal "$(net_http_clients_of index.html)" "$pod2" "client address in the upstream access log"
  pod_stop TERM 60 || { pod_print_log; fail "envbox did not exit after SIGTERM"; }
  assert_equal "$(net_pod_envbox_rules)" "" "envbox rules left after stop"
}

@test "Docker inside: dockerd starts, loads busybox, runs it, reaches upstream, builds, uses the pod's MTU" {
  start_upstream
  start_docker_pod
  wait_for_inner_docker
  run pod_ws pgrep -x dockerd
  assert_status 0

  run pod_ws docker load -i /images/busybox.tar
  assert_status 0
  assert_contains "$output" "Loaded image: busybox:latest"
  run pod_ws docker run --rm busybox echo hi
  assert_status 0
  assert_equal "$output" hi "output of docker run"

  # Inner docker0 NAT -> workspace eth0 -> pod envbox0 -> pod MASQUERADE -> upstream.
  run pod_ws docker run --rm busybox wget -qO- "$(net_http_url nested.html)"
  assert_status 0
  assert_equal "$output" hello-nested "page fetched from a container inside the workspace"
  assert_equal "$(net_http_clients_of nested.html)" "$(net_pod_eth0_addr)" "client address of the nested request"

  run pod_ws sh -c 'mkdir -p /tmp/ebx-ctx && printf "FROM busybox\nRUN echo built-in-workspace > /built\n" > /tmp/ebx-ctx/Dockerfile && docker build -q -t ebx-built /tmp/ebx-ctx'
  assert_status 0
  run pod_ws docker run --rm ebx-built cat /built
  assert_status 0
  assert_equal "$output" built-in-workspace "file written by the RUN step"

  # envbox gave the inner dockerd the pod's MTU through /etc/docker/daemon.json.
  run pod_ws cat /etc/docker/daemon.json
  assert_status 0
  assert_equal "$(jq -c . <<<"$output")" "{\"mtu\":$POD_MTU}" "/etc/docker/daemon.json in the workspace"
  run pod_ws docker network inspect bridge --format '{{index .Options "com.docker.network.driver.mtu"}}'
  assert_status 0
  assert_equal "$output" "$POD_MTU" "MTU of the inner default bridge"
  run pod_ws docker run --rm busybox cat /sys/class/net/eth0/mtu
  assert_status 0
  assert_equal "$output" "$POD_MTU" "eth0 MTU of an inner container"
}

@test "a restart on the same volumes keeps the inner Docker's images and containers" {
  start_docker_pod
  wait_for_inner_docker
  run pod_ws docker load -i /images/busybox.tar
  assert_status 0
  run pod_ws docker run --name keeper busybox echo kept-from-first-run
  assert_status 0
  assert_equal "$output" kept-from-first-run
  run pod_ws sh -c 'mkdir -p /tmp/ebx-ctx && printf "FROM busybox\nRUN echo built-in-first-run > /built\n" > /tmp/ebx-ctx/Dockerfile && docker build -q -t ebx-built /tmp/ebx-ctx'
  assert_status 0

  pod_stop TERM 120 || { pod_print_log; fail "envbox did not stop"; }
  assert_equal "$POD_EXIT_STATUS" 0 "exit status of the first run"
  # The inner Docker's data is on the pod's volume, owned by the workspace's root.
  assert_equal "$(stat -c %u "$POD_DIR/volumes/var-lib-coder/docker")" 100000 "owner of /var/lib/coder/docker"

  net_rotate_pod_log
  start_docker_pod
  wait_for_inner_docker
  run pod_ws docker images --format '{{.Repository}}:{{.Tag}}'
  assert_status 0
  assert_contains "$output" busybox:latest
  assert_contains "$output" ebx-built:latest
  run pod_ws docker ps -a --format '{{.Names}}'
  assert_status 0
  assert_contains "$output" keeper
  run pod_ws docker start -a keeper
  assert_status 0
  assert_equal "$output" kept-from-first-run "output of the first run's container, started again"
  run pod_ws docker run --rm ebx-built cat /built
  assert_status 0
  assert_equal "$output" built-in-first-run "image built in the first run"
}

@test "CODER_DOCKER_BRIDGE_CIDR=10.213.0.0/30 addresses both ends and the NAT rule" {
  start_upstream
  pod_start net CODER_DOCKER_BRIDGE_CIDR=10.213.0.0/30
  pod_wait_ready 90

  run pod_ws ip -4 -o addr show dev eth0
  assert_status 0
  assert_contains "$output" "inet 10.213.0.2/30"
  run pod_ws ip -4 route show default
  assert_status 0
  assert_contains "$output" "default via 10.213.0.1 dev eth0"
  run ip -n "$POD_NS" -4 -o addr show dev envbox0
  assert_status 0
  assert_contains "$output" "inet 10.213.0.1/30"
  run net_pod_envbox_rules
  assert_contains "$output" "-A POSTROUTING -s 10.213.0.0/30 ! -o envbox0 -m comment --comment envbox -j MASQUERADE"
  refute_contains "$output" "172.19.0."

  run pod_ws wget -qO- "$(net_http_url index.html)"
  assert_status 0
  assert_equal "$output" hello-from-upstream
  assert_equal "$(net_http_clients_of index.html)" "$(net_pod_eth0_addr)" "client address upstream"
}

@test "an invalid CODER_DOCKER_BRIDGE_CIDR exits 2 before touching the pod's network" {
  local bad
  for bad in 10.213.0.0/33 10.213.0.0/31 10.213.0.0 10.213.0.300/30; do
    pod_start net CODER_DOCKER_BRIDGE_CIDR="$bad"
    wait_for_exit 30
    assert_equal "$POD_EXIT_STATUS" 2 "exit status for CODER_DOCKER_BRIDGE_CIDR=$bad"
    run cat "$POD_DIR/envbox.log"
    assert_contains "$output" "CODER_DOCKER_BRIDGE_CIDR" "log for $bad"
    assert_contains "$output" "$bad" "log for $bad"
    net_rotate_pod_log
  done
  run ip -n "$POD_NS" link show envbox0
  assert_nonzero_status
  assert_equal "$(net_pod_envbox_rules)" "" "envbox iptables rules in the pod"
}

@test "a CODER_DOCKER_BRIDGE_CIDR overlapping the pod's eth0 network exits 2 with a clear message" {
  local net
  net=$(net_pod_eth0_network)
  pod_start net CODER_DOCKER_BRIDGE_CIDR="$net"
  wait_for_exit 30
  assert_equal "$POD_EXIT_STATUS" 2 "exit status"
  run cat "$POD_DIR/envbox.log"
  assert_contains "$output" "CODER_DOCKER_BRIDGE_CIDR $net overlaps the pod's network $net"
  assert_contains "$output" "on eth0"
  assert_contains "$output" "set CODER_DOCKER_BRIDGE_CIDR to a range the pod does not use"
  run ip -n "$POD_NS" link show envbox0
  assert_nonzero_status
  assert_equal "$(net_pod_envbox_rules)" "" "envbox iptables rules in the pod"
}

@test "after envbox is SIGKILLed, a new start in the same pod network replaces the stale link and rules" {
  start_upstream
  pod_start net
  pod_wait_ready 90
  local rules_before
  rules_before=$(net_pod_envbox_rules)
  assert_equal "$(grep -c . <<<"$rules_before")" 3 "envbox rules after the first start"

  # PID 1 dies and takes the pod's pid namespace (and the workspace) with it; the network namespace
  # belongs to the test and survives, with envbox's NAT rules in it.
  pod_stop KILL 60 || { pod_print_log; fail "envbox did not die"; }
  assert_equal "$(net_pod_envbox_rules)" "$rules_before" "rules left behind by the killed envbox"
  # The workspace's netns died with it, and its veth pair with it. A runtime that keeps the netns alive
  # (sysbox) can leave both ends behind: put them there.
  if ! ip -n "$POD_NS" link show envbox0 >/dev/null 2>&1; then
    ip -n "$POD_NS" link add envbox0 type veth peer name envbox0-p
    ip -n "$POD_NS" addr add 172.19.0.1/30 dev envbox0
    ip -n "$POD_NS" link set envbox0 up
  fi
  # And a stale rule of an earlier start with another CIDR.
  nsenter --net="/run/netns/$POD_NS" iptables -w -t nat -A POSTROUTING -s 10.99.0.0/30 -o eth0 \
    -m comment --comment envbox -j MASQUERADE

  net_rotate_pod_log
  pod_start net
  pod_wait_ready 90
  assert_equal "$(net_pod_envbox_rules)" "$rules_before" "envbox rules after the second start (each once)"
  run ip -n "$POD_NS" -o link show
  assert_status 0
  refute_contains "$output" "envbox0-p"
  run ip -n "$POD_NS" -4 -o addr show dev envbox0
  assert_status 0
  assert_contains "$output" "inet 172.19.0.1/30"
  run pod_ws wget -qO- "$(net_http_url index.html)"
  assert_status 0
  assert_equal "$output" hello-from-upstream "page fetched after the restart"
}
