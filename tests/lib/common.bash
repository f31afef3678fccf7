# shellcheck shell=bash
# Shared pieces of the envbox test harness: paths, logging and package installation.
# Sourced by scripts/test, scripts/demo, tests/lib/world.bash and the bats files; defines functions only.

EBX_REPO_ROOT=${EBX_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# Built images live outside the repository so that a fresh clone on a warm machine re-uses them.
EBX_CACHE_ROOT=${EBX_CACHE_ROOT:-/var/cache/envbox-test}

# Debian packages the harness needs: the install line of docs (test-environment.md §2) plus util-linux
# (unshare/nsenter) and coreutils, which are always present but named so that a minimal image is covered.
EBX_PACKAGES=(
  runc crun skopeo umoci docker-registry docker.io containerd iptables nftables fuse-overlayfs
  busybox-static uidmap jq apache2-utils openssl debootstrap iproute2 procps curl ca-certificates
  bats hyperfine bc strace python3 util-linux coreutils buildah python3-yaml libcap2-bin tar
  python3-venv
)
# The cgroup v2 VM tier (tests/vm/run): qemu, Debian's cloud kernel, what builds the guest's disk, and the
# guest's own programs beyond EBX_PACKAGES. Optional: where they cannot be installed the tier is skipped
# and says why.
# shellcheck disable=SC2034 # used by scripts/test
EBX_VM_PACKAGES=(
  qemu-system-x86 linux-image-cloud-amd64 cpio kmod file e2fsprogs fuse3 netbase hostname
)

ebx_log() {
  printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

ebx_die() {
  ebx_log "ERROR: $*"
  exit 1
}

# Installs the packages named (default: EBX_PACKAGES) with apt, but only when one of them is missing: a warm
# machine pays a dpkg query.
ebx_install_packages() {
  local pkgs=("$@") missing=() pkg status
  ((${#pkgs[@]})) || pkgs=("${EBX_PACKAGES[@]}")
  for pkg in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    ebx_log "packages: all ${#pkgs[@]} installed"
    return 0
  fi
  ebx_log "packages: installing ${missing[*]}"
  apt-get update -q </dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" </dev/null
}

# Kubernetes' own schemas, offline: PyPI's kubernetes-validate (it ships the OpenAPI schemas of every
# supported Kubernetes version) in a venv of Debian's python3 under EBX_CACHE_ROOT, made once per machine.
EBX_KUBERNETES_VALIDATE_VERSION=1.37.0
ebx_kubernetes_validate() {
  local venv=$EBX_CACHE_ROOT/venv-kubernetes-validate-$EBX_KUBERNETES_VALIDATE_VERSION
  if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    rm -rf "$venv"
    if ! { /usr/bin/python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q "kubernetes-validate==$EBX_KUBERNETES_VALIDATE_VERSION" </dev/null; } >&2; then
      rm -rf "$venv"
      return 1
    fi
  fi
  "$venv/bin/kubernetes-validate" "$@"
}

# Puts a rustup toolchain on PATH when the shell did not inherit one (CI runs `bash .ci/run` without a login shell).
ebx_ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [[ -f ${HOME:-/root}/.cargo/env ]]; then
    # shellcheck source=/dev/null
    . "${HOME:-/root}/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || ebx_die "cargo not found: install a Rust toolchain >= the rust-version in Cargo.toml"
}

# The Debian mirror this machine already uses (test-environment.md §7); tests never hard-code one.
ebx_debian_mirror() {
  local mirror=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
    mirror=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){print $i; exit}}' /etc/apt/sources.list)
  fi
  [[ -n $mirror ]] || ebx_die "no Debian mirror found in /etc/apt/sources.list{,.d/debian.sources}"
  printf '%s\n' "$mirror"
}

# Polls CMD... every 0.1 s until it succeeds or TIMEOUT seconds pass. Returns 1 on timeout.
ebx_wait_for() {
  local timeout=$1 deadline
  shift
  deadline=$(($(date +%s%N) + timeout * 1000000000))
  until "$@"; do
    (($(date +%s%N) < deadline)) || return 1
    sleep 0.1
  done
}
