#!/usr/bin/env bash
# Build the local control plane's binaries (etcd, kube-apiserver, kube-controller-manager)
# and helm from the pinned wrapper modules in hack/localcluster/, into a cache outside
# the repository:
#
#   ${POOLBUDGET_CACHE:-$HOME/.cache/poolbudget}/bin/<name>-<version>-<key>/<name>
#
# <key> hashes the wrapper's go.mod and go.sum, the Go version and the build flags, so
# changing a pin (or the toolchain) builds a new binary next to the old one. A warm cache
# returns in well under a second without running the Go compiler.
#
# The binaries of the current pins are also linked into one directory,
#
#   ${POOLBUDGET_CACHE:-$HOME/.cache/poolbudget}/bin/set-<key of all of them>/
#
# which is printed as the last line on stdout (everything else goes to stderr), so
# callers can do `bindir=$(bash hack/build-binaries.sh)`.
#
# Usage: hack/build-binaries.sh [--print-dir] [--force]
#   --print-dir  print that directory and exit without building (it may not exist yet)
#   --force      rebuild even if the cache has the binary
#
# Module checksums: sum.golang.org is not reachable here, so go.sum was produced with
# GOSUMDB=off from the module proxy and is committed; GOFLAGS=-mod=readonly makes every
# build verify against it and refuse to change go.mod/go.sum.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wrappers="${repo_root}/hack/localcluster"
cache_root="${POOLBUDGET_CACHE:-${HOME}/.cache/poolbudget}"
bin_root="${cache_root}/bin"

print_dir_only=0
force=0
for arg in "$@"; do
  case "${arg}" in
    --print-dir) print_dir_only=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-binaries.sh: unknown argument: ${arg}" >&2; exit 2 ;;
  esac
done

export PATH="${PATH}:/usr/local/go/bin"
export GOTOOLCHAIN=local
export GOFLAGS=-mod=readonly
export GOSUMDB=off
export CGO_ENABLED=0
export GOWORK=off

log() { printf '%s\n' "build-binaries: $*" >&2; }

# The version of module $2 that wrapper go.mod $1 requires (no Go invocation).
required_version() {
  awk -v mod="$2" '$1 == "require" { $1 = "" ; $0 = substr($0, 2) } $1 == mod { print $2; exit }' "$1"
}

# The commit time of a module version, as the proxy recorded it; used as buildDate so
# a rebuild of the same pins produces the same version output.
module_time() {
  (cd "$1" && go mod download -json "$2@$3") \
    | awk -F'"' '$2 == "Info" { print $4 }' \
    | xargs sed -n 's/.*"Time":"\([^"]*\)".*/\1/p'
}

if ! command -v go >/dev/null 2>&1; then
  log "no Go toolchain found (looked on PATH and in /usr/local/go/bin)"
  exit 1
fi
go_version=$(go env GOVERSION)

kube_version=$(required_version "${wrappers}/kube/go.mod" k8s.io/kubernetes)
etcd_version=$(required_version "${wrappers}/etcd/go.mod" go.etcd.io/etcd/server/v3)
helm_version=$(required_version "${wrappers}/helm/go.mod" helm.sh/helm/v3)
helm_client_go=$(required_version "${wrappers}/helm/go.mod" k8s.io/client-go)
containerd_version=$(required_version "${wrappers}/containerd/go.mod" github.com/containerd/containerd/v2)
for v in kube_version etcd_version helm_version helm_client_go containerd_version; do
  [[ -n "${!v}" ]] || { log "could not read ${v} from the wrapper go.mod files"; exit 1; }
done

# name | wrapper dir | package | version
binaries=(
  "etcd|etcd|go.etcd.io/etcd/server/v3|${etcd_version}"
  "kube-apiserver|kube|k8s.io/kubernetes/cmd/kube-apiserver|${kube_version}"
  "kube-controller-manager|kube|k8s.io/kubernetes/cmd/kube-controller-manager|${kube_version}"
  "helm|helm|helm.sh/helm/v3/cmd/helm|${helm_version}"
  # the node: scheduler, kubelet and the container runtime (runc and the CNI plugins
  # come from Debian, see hack/install-node.sh)
  "kube-scheduler|kube|k8s.io/kubernetes/cmd/kube-scheduler|${kube_version}"
  "kubelet|kube|k8s.io/kubernetes/cmd/kubelet|${kube_version}"
  "containerd|containerd|github.com/containerd/containerd/v2/cmd/containerd|${containerd_version}"
  "containerd-shim-runc-v2|containerd|github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2|${containerd_version}"
  "ctr|containerd|github.com/containerd/containerd/v2/cmd/ctr|${containerd_version}"
)

# Linker flags per binary, without the build date (which is derived from the pins).
ldflags_for() {
  local name=$1 version=$2 flags="-s -w"
  case "${name}" in
    kube-*|kubelet)
      local minor=${version#v1.}; minor=${minor%%.*}
      local pkg
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
        flags+=" -X ${pkg}.gitTreeState=clean"
      done
      ;;
    etcd)
      flags+=" -X go.etcd.io/etcd/api/v3/version.GitSHA=module-${version}"
      ;;
    containerd|containerd-shim-runc-v2|ctr)
      flags+=" -X github.com/containerd/containerd/v2/version.Version=${version}"
      flags+=" -X github.com/containerd/containerd/v2/version.Revision=module-${version}"
      ;;
    helm)
      # As helm's Makefile does: the default Kubernetes version for `helm template`
      # follows the client-go minor helm is built with (v0.X.Y -> 1.X).
      local cg_minor=${helm_client_go#v0.}; cg_minor=${cg_minor%%.*}
      flags+=" -X helm.sh/helm/v3/internal/version.version=${version}"
      flags+=" -X helm.sh/helm/v3/internal/version.metadata="
      flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      local pkg
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        flags+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${cg_minor}"
      done
      ;;
  esac
  printf '%s' "${flags}"
}

# Build tags: containerd without the snapshotters that need cgo or kernel headers
# (overlayfs and native are what the node uses).
tags_for() {
  case "$1" in
    containerd|containerd-shim-runc-v2|ctr) printf '%s' "no_btrfs no_devmapper no_zfs" ;;
  esac
}

cache_key() {  # name wrapper version
  local name=$1 wrapper=$2 version=$3
  {
    printf 'recipe=2 name=%s version=%s go=%s cgo=%s\n' "${name}" "${version}" "${go_version}" "${CGO_ENABLED}"
    printf 'ldflags=%s tags=%s\n' "$(ldflags_for "${name}" "${version}")" "$(tags_for "${name}")"
    cat "${wrappers}/${wrapper}/go.mod" "${wrappers}/${wrapper}/go.sum"
  } | sha256sum | cut -c1-12
}

declare -A paths=()
set_key_input=""
for entry in "${binaries[@]}"; do
  IFS='|' read -r name wrapper pkg version <<<"${entry}"
  key=$(cache_key "${name}" "${wrapper}" "${version}")
  paths[${name}]="${bin_root}/${name}-${version}-${key}/${name}"
  set_key_input+="${paths[${name}]}"$'\n'
done
set_dir="${bin_root}/set-$(printf '%s' "${set_key_input}" | sha256sum | cut -c1-12)"

if (( print_dir_only )); then
  printf '%s\n' "${set_dir}"
  exit 0
fi

mkdir -p "${bin_root}"
# One build at a time per cache (two pytest sessions may start together).
exec 9>"${bin_root}/.lock"
flock 9

total_start=${SECONDS}
built=0
for entry in "${binaries[@]}"; do
  IFS='|' read -r name wrapper pkg version <<<"${entry}"
  out=${paths[${name}]}
  if [[ -x "${out}" && "${force}" -eq 0 ]]; then
    log "cached  ${name} ${version}: ${out}"
    continue
  fi
  out_dir=$(dirname "${out}")
  mkdir -p "${out_dir}"
  module_path=${pkg}
  case "${name}" in
    kube-*|kubelet) module_path=k8s.io/kubernetes ;;
    containerd*|ctr) module_path=github.com/containerd/containerd/v2 ;;
    etcd) module_path=go.etcd.io/etcd/server/v3 ;;
    helm) module_path=helm.sh/helm/v3 ;;
  esac
  build_date=$(module_time "${wrappers}/${wrapper}" "${module_path}" "${version}")
  ldflags=$(ldflags_for "${name}" "${version}")
  case "${name}" in
    kube-*|kubelet) for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
              ldflags+=" -X ${p}.buildDate=${build_date}"
            done ;;
  esac
  log "building ${name} ${version} (${pkg}) ..."
  start=${SECONDS}
  tmp="${out}.tmp.$$"
  timing="${out_dir}/build-time.txt"
  build=(go build -trimpath -tags "$(tags_for "${name}")" -ldflags "${ldflags}" -o "${tmp}" "${pkg}")
  # A cold kube-apiserver compiles for minutes without a word: say it is still going.
  ( while sleep 30 && kill -0 $$ 2>/dev/null; do log "  ... ${name}: $(( SECONDS - start )) s"; done ) &
  heartbeat=$!
  # `|| true`: under `set -e` a failing kill in an EXIT trap becomes the script's status,
  # so a cold build that succeeded exited 1 once the heartbeat had already gone.
  trap 'kill "${heartbeat}" 2>/dev/null || true' EXIT
  if [[ -x /usr/bin/time ]]; then
    (cd "${wrappers}/${wrapper}" && /usr/bin/time -o "${timing}" \
      -f "%e s wall, %U s user, %S s sys, %M KiB peak RSS (largest process)" "${build[@]}")
  else
    (cd "${wrappers}/${wrapper}" && "${build[@]}")
    echo "$(( SECONDS - start )) s wall" >"${timing}"
  fi
  kill "${heartbeat}" 2>/dev/null || true
  trap - EXIT
  mv -f "${tmp}" "${out}"
  built=$(( built + 1 ))
  log "built   ${name} ${version} in $(( SECONDS - start )) s: $(cat "${timing}")"
done

mkdir -p "${set_dir}"
for name in "${!paths[@]}"; do
  ln -sfn "${paths[${name}]}" "${set_dir}/${name}"
done
log "${built} built, $(( ${#binaries[@]} - built )) cached, $(( SECONDS - total_start )) s total; binaries in:"
printf '%s\n' "${set_dir}"
