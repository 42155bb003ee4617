#!/usr/bin/env bash
# Make sure what the local cluster's node and the image builds need from Debian is there:
#   runc                         the OCI runtime containerd's shim calls (containerd itself,
#                                its shim and ctr are built from Go modules: build-binaries.sh)
#   containernetworking-plugins  bridge, host-local and loopback CNI plugins (/usr/lib/cni)
#   iproute2                     the pods' bridge
#   iptables                     routes the `kubernetes` Service address to kube-apiserver
#   buildah                      builds the Dockerfiles without a Docker engine
#   debootstrap                  the Debian base image the Dockerfiles build on
#   gcc, libc6-dev               the static pause binary
# Idempotent and quick (no apt) when all is there. Needs root, like the node itself.
set -euo pipefail

need=()
command -v runc >/dev/null 2>&1 || need+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
    need+=(containernetworking-plugins)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/$(uname -m)-linux-gnu/libc.a ]] ||
    need+=(libc6-dev)

if (( ${#need[@]} == 0 )); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-node: missing ${need[*]}; run as root or: apt-get install ${need[*]}" >&2
    exit 1
fi
echo "install-node: installing ${need[*]} from Debian"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-node: runc $(runc --version | head -1 | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}')"
