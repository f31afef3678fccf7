# shellcheck shell=bash
# Helpers for tests/bats/registry.bats: extra services in the upstream namespace (a token-auth
# registry with its token issuer, a fault-injecting proxy), hand-built images, `envbox pull` run in a
# pod's network namespace, and reading the registries' access logs.
#
# Every service is started in the background with its pid recorded in $REG_PIDS_DIR/<name>.pid and
# stopped by that pid (reg_stop_service), never by name.

REG_PYTHON=/usr/bin/python3
[[ -x $REG_PYTHON ]] || REG_PYTHON=python3
REG_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REG_TOKEN_PORT=5001
REG_ISSUER_PORT=5003
REG_PROXY_PORT=5002
# The world registry's log (access-log lines included), read by the bats file.
# shellcheck disable=SC2034
REG_MAIN_LOG=$EBX_WORLD_DIR/registry/registry.log

reg_in_upstream() {
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" "$@"
}

# reg_start_service NAME LOG CMD...: runs CMD in the upstream namespace in the background; $! is CMD
# itself (nsenter execs it), recorded in $REG_PIDS_DIR/NAME.pid.
reg_start_service() {
  local name=$1 log=$2
  shift 2
  mkdir -p "$REG_PIDS_DIR"
  nsenter --net="/run/netns/$EBX_UPSTREAM_NS" "$@" </dev/null >>"$log" 2>&1 3>&- &
  echo $! >"$REG_PIDS_DIR/$name.pid"
}

reg_stop_service() {
  local f=$REG_PIDS_DIR/$1.pid pid
  [[ -f $f ]] || return 0
  pid=$(<"$f")
  kill -TERM "$pid" 2>/dev/null || true
  ebx_wait_for 10 test ! -d "/proc/$pid" || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

# Succeeds once something accepts TCP connections on 127.0.0.1:PORT in the upstream namespace.
reg_port_open() {
  reg_in_upstream bash -c "exec 9<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# A second docker-registry on :5001 with `auth: token`, sharing the world registry's storage (read
# only here, so every image pushed to :5000 is served by it too), and the token issuer on :5003.
reg_start_token_registry() {
  local dir=$REG_STATE_DIR/token-registry reg=$EBX_WORLD_DIR/registry
  mkdir -p "$dir"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $reg/data
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 0.0.0.0:$REG_TOKEN_PORT
  secret: envbox-test-only
  tls:
    certificate: $reg/certs/domain.crt
    key: $reg/certs/domain.key
auth:
  token:
    realm: https://$EBX_REGISTRY_ADDR:$REG_ISSUER_PORT/token
    service: envbox-test-registry
    issuer: envbox-test-issuer
    rootcertbundle: $reg/certs/domain.crt
EOF
  reg_start_service token-issuer "$dir/issuer.log" "$REG_PYTHON" "$REG_LIB_DIR/token_issuer.py" \
    --listen "0.0.0.0:$REG_ISSUER_PORT" --cert "$reg/certs/domain.crt" --key "$reg/certs/domain.key" \
    --users "$EBX_REG_USER:$EBX_REG_PASS" --service envbox-test-registry --issuer envbox-test-issuer
  reg_start_service token-registry "$dir/registry.log" docker-registry serve "$dir/config.yml"
  ebx_wait_for 20 reg_port_open "$REG_ISSUER_PORT" || { cat "$dir/issuer.log" >&2; return 1; }
  ebx_wait_for 20 reg_port_open "$REG_TOKEN_PORT" || { cat "$dir/registry.log" >&2; return 1; }
}

# reg_start_proxy [FAULT ARGS...]: the fault proxy on :5002 in front of the world registry, logging
# to $REG_STATE_DIR/proxy.log (truncated first).
reg_start_proxy() {
  local reg=$EBX_WORLD_DIR/registry
  : >"$REG_STATE_DIR/proxy.log"
  reg_start_service proxy "$REG_STATE_DIR/proxy.out" "$REG_PYTHON" "$REG_LIB_DIR/fault_proxy.py" \
    --listen "0.0.0.0:$REG_PROXY_PORT" --cert "$reg/certs/domain.crt" --key "$reg/certs/domain.key" \
    --upstream "127.0.0.1:$EBX_REGISTRY_PORT" --upstream-ca "$reg/certs/domain.crt" \
    --log "$REG_STATE_DIR/proxy.log" "$@"
  ebx_wait_for 20 reg_port_open "$REG_PROXY_PORT" || { cat "$REG_STATE_DIR/proxy.out" >&2; return 1; }
}

# reg_make_image REPO:TAG ARCH=LAYERS...: builds an OCI layout with make_oci.py and pushes it (all
# platforms) to the world registry. Prints the top-level digest.
reg_make_image() {
  local ref=$1 layout digest
  shift
  layout=$REG_STATE_DIR/layouts/${ref//[:\/]/_}
  rm -rf "$layout"
  digest=$("$REG_PYTHON" "$REG_LIB_DIR/make_oci.py" "$layout" img "$@") || return 1
  reg_in_upstream skopeo copy -q --all --preserve-digests --dest-creds "$EBX_REG_USER:$EBX_REG_PASS" \
    --dest-cert-dir "$EBX_WORLD_DIR/registry/certdir" \
    "oci:$layout:img" "docker://127.0.0.1:$EBX_REGISTRY_PORT/$ref" </dev/null >&2 || return 1
  printf '%s\n' "$digest"
}

# Prints the digests of the layers of REPO:TAG's manifest for this machine's platform (in order).
reg_layer_digests() {
  local layout=$REG_STATE_DIR/layouts/${1//[:\/]/_}
  "$REG_PYTHON" - "$layout" <<'EOF'
import json, os, sys
root = sys.argv[1]
def blob(d):
    return json.load(open(os.path.join(root, "blobs", "sha256", d.split(":")[1])))
top = json.load(open(os.path.join(root, "index.json")))["manifests"][0]
m = blob(top["digest"])
if "manifests" in m:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    m = blob(next(x for x in m["manifests"] if x["platform"]["architecture"] == arch)["digest"])
print(m["config"]["digest"])
for l in m["layers"]:
    print(l["digest"])
EOF
}

# The pull secret for REGISTRY with USER:PASS.
reg_secret() {
  jq -cn --arg reg "$1" --arg auth "$(printf '%s' "$2" | base64 -w0)" '{auths: {($reg): {auth: $auth}}}'
}

# pull_in_pod [VAR=value|-VAR ...] IMAGE: `envbox pull IMAGE` in the pod's network namespace, with a
# clean environment (the pod's defaults: pull secret, CA, cache dir). Output: stdout+stderr.
pull_in_pod() {
  local -A vars=(
    [CODER_IMAGE_PULL_SECRET]=$EBX_PULL_SECRET
    [CODER_EXTRA_CERTS_PATH]=$EBX_REG_CA
    [CODER_CACHE_DIR]=$POD_DIR/cache
    [CODER_DOCKER_CONFIG]=$POD_DIR/no-docker-config.json
    [PATH]=$POD_PATH_DEFAULT
  )
  local arg envv=()
  while (($# > 1)); do
    arg=$1
    shift
    case $arg in
      -*) unset "vars[${arg#-}]" ;;
      *=*) vars[${arg%%=*}]=${arg#*=} ;;
      *) fail "pull_in_pod: expected VAR=value or -VAR, got '$arg'" ;;
    esac
  done
  for arg in "${!vars[@]}"; do envv+=("$arg=${vars[$arg]}"); done
  nsenter --net="/run/netns/$POD_NS" env -i "${envv[@]}" "$ENVBOX_BIN" pull "$1" </dev/null 2>&1
}

# Access-log lines of envbox's requests in LOG (a docker-registry log) after line MARK, as
# "METHOD URI STATUS".
reg_requests_since() {
  local log=$1 mark=$2
  tail -n "+$((mark + 1))" "$log" |
    awk '/"envbox\/[^"]*"$/ && match($0, /"[A-Z]+ \/v2\/[^"]* HTTP\/[0-9.]+" [0-9]+/) {
      split(substr($0, RSTART + 1, RLENGTH - 1), f, " "); print f[1], f[2], f[4] }'
}

reg_log_mark() {
  wc -l <"$1"
}
