"""A real worker node for the local cluster: containerd + kubelet on this machine.

`LocalCluster(node=True)` starts one after its control plane (and kube-scheduler); pods are
then scheduled, their images run under runc, and the kubelet reports readiness from real
probes. Everything the node creates is named after its id and kept in one place, so that
teardown, also after the launcher was SIGKILLed, can find and remove all of it:

* files: ``$POOLBUDGET_CACHE/nodes/<id>/`` (containerd's root and state with the pods'
  network namespaces, the kubelet's root dir, CNI config and IPAM), never in a test's tmp dir, so no
  `rm -rf` ever walks into a live container's mounts;
* cgroups: ``/sys/fs/cgroup/<controller>/poolbudget-<id>/`` (the kubelet's cgroupRoot);
* network: bridge ``pb-<id>`` with a /24 of 10.244.0.0/16, and one iptables nat chain
  ``PB-<id>`` that routes the ``kubernetes`` Service address to kube-apiserver for pods on
  that bridge (there is no kube-proxy: two clusters' kube-proxies would fight over one set of
  KUBE-* chains; a chain per node cannot).

`sweep_stale_nodes()` removes the leftovers of every node whose containerd no longer runs:
it is called before a node starts and by ``python -m devtools.localcluster down``.

Workarounds this machine needs, and why:

* cgroup v1 only: kubelet 1.36 refuses v1 unless ``failCgroupV1: false``; the ``cgroupfs``
  driver (no systemd here).
* no CAP_SYS_RESOURCE, even for root: runc cannot lower oom_score_adj, so containerd gets
  ``restrict_oom_score_adj`` and the kubelet ``oomScoreAdj: 0``.
* no registry: images are imported with ``ctr images import`` and image GC is off
  (thresholds 100/99), else the kubelet would delete an image no registry can give back.
* the kubelet refuses a loopback node IP: the node uses the address of the default route,
  and PostgreSQL listens there too when pods must reach it; so does kube-apiserver, which
  pods in-cluster (the operator's own pod) reach as https://10.0.0.1:443.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CGROUP_FS: Final = Path("/sys/fs/cgroup")
CNI_BIN_DIR: Final = Path("/usr/lib/cni")
CNI_RESULTS: Final = Path("/var/lib/cni/results")
RUNC: Final = Path("/usr/sbin/runc")
NODE_NAME: Final = "poolbudget-node"
NAMESPACE: Final = "k8s.io"  # containerd's namespace for CRI (kubelet) images and containers
RECORD: Final = "node.json"


class NodeError(RuntimeError):
    """The node could not be prepared, started or cleaned up."""


def nodes_root() -> Path:
    configured = os.environ.get("POOLBUDGET_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "poolbudget"
    return root / "nodes"


def node_ip() -> str:
    """The source address of the default route: what other hosts (and pods) reach us on."""
    result = subprocess.run(
        ["ip", "-4", "-j", "route", "get", "1.1.1.1"], capture_output=True, text=True, check=False
    )
    routes = json.loads(result.stdout) if result.returncode == 0 and result.stdout else []
    address = str(routes[0].get("prefsrc", "")) if routes else ""
    if not address or address.startswith("127."):
        raise NodeError(
            f"no non-loopback IPv4 source address for the default route ({result.stderr.strip()}):"
            " the kubelet refuses a loopback node IP"
        )
    return address


def missing_host_packages() -> list[str]:
    """Debian packages the node needs that are not installed (hack/install-node.sh)."""
    present = {
        "runc": RUNC.exists(),
        "containernetworking-plugins": (CNI_BIN_DIR / "bridge").exists(),
        "iproute2": shutil.which("ip") is not None,
        "iptables": shutil.which("iptables") is not None,
    }
    return [package for package, found in present.items() if not found]


@dataclass(frozen=True)
class NodeLayout:
    """Where one node keeps everything, derived from its id alone (so a sweep can find it)."""

    node_id: str
    directory: Path

    @classmethod
    def new(cls) -> NodeLayout:
        node_id = secrets.token_hex(3)
        return cls(node_id, nodes_root() / node_id)

    @property
    def bridge(self) -> str:
        return f"pb-{self.node_id}"  # Linux interface names: at most 15 characters

    @property
    def cgroup_root(self) -> str:
        return f"/poolbudget-{self.node_id}"

    @property
    def containerd_socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    @property
    def shim_socket_dir(self) -> Path:
        """Shim sockets: containerd wants at most 42 characters, so not under the cache."""
        return Path(f"/run/poolbudget-{self.node_id}")

    @property
    def nat_chain(self) -> str:
        return f"PB-{self.node_id}"  # iptables chain names: at most 28 characters

    @property
    def network(self) -> str:
        """The CNI network's name; libcni caches results as /var/lib/cni/results/<name>-*."""
        return f"poolbudget-{self.node_id}"

    def cgroup_dirs(self) -> list[Path]:
        """This node's cgroup in every mounted v1 hierarchy (and the unified one, if any)."""
        found = []
        for hierarchy in sorted(CGROUP_FS.iterdir()) if CGROUP_FS.exists() else []:
            if hierarchy.is_dir() and not hierarchy.is_symlink():
                found.append(hierarchy / self.cgroup_root.lstrip("/"))
        return found


# --------------------------------------------------------------------------- teardown


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first."""
    prefix = str(directory.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def _cgroup_tree(root: Path) -> Iterator[Path]:
    """`root` and every cgroup below it, children before parents."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir():
            yield from _cgroup_tree(child)
    yield root


def _kill_cgroup_processes(layout: NodeLayout, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for hierarchy_root in layout.cgroup_dirs():
            for group in _cgroup_tree(hierarchy_root):
                try:
                    pids.update(int(p) for p in (group / "cgroup.procs").read_text().split())
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NodeError(f"processes survive SIGKILL in {layout.cgroup_root}: {sorted(pids)}")
        time.sleep(0.1)


def _kill_shims(layout: NodeLayout) -> None:
    """containerd's shims daemonize out of the launcher's reach; they name our socket."""
    needle = str(layout.containerd_socket).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def sandbox_ids(layout: NodeLayout) -> list[str]:
    """Ids of the pod sandboxes containerd created for this node (from its own state)."""
    sandboxes = layout.directory / "containerd" / "root" / "io.containerd.grpc.v1.cri" / "sandboxes"
    return [d.name for d in sandboxes.iterdir()] if sandboxes.is_dir() else []


def cleanup_node(layout: NodeLayout) -> list[str]:
    """Remove everything of one node whose daemons are stopped; say what was removed."""
    removed: list[str] = []
    _kill_cgroup_processes(layout)
    _kill_shims(layout)
    for point in _mounts_under(layout.directory):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        removed.append(f"mount {point}")
    for hierarchy_root in layout.cgroup_dirs():
        for group in _cgroup_tree(hierarchy_root):
            try:
                group.rmdir()
            except OSError:
                continue
            if group == hierarchy_root:
                removed.append(f"cgroup {group}")
    # CNI results of pods that never got a CNI DEL (killed, not stopped): libcni keeps them
    # in /var/lib/cni/results whatever containerd's paths are.
    for result in CNI_RESULTS.glob("*"):
        if any(sandbox in result.name for sandbox in sandbox_ids(layout)):
            result.unlink(missing_ok=True)
    if layout.shim_socket_dir.exists():
        shutil.rmtree(layout.shim_socket_dir, ignore_errors=True)
        removed.append(f"dir {layout.shim_socket_dir}")
    if _remove_nat_chain(layout):
        removed.append(f"iptables chain {layout.nat_chain}")
    if Path(f"/sys/class/net/{layout.bridge}").exists():
        subprocess.run(["ip", "link", "delete", layout.bridge], capture_output=True, check=False)
        removed.append(f"bridge {layout.bridge}")
    if layout.directory.exists():
        leftover = _mounts_under(layout.directory)
        if leftover:
            raise NodeError(f"still mounted, not deleting {layout.directory}: {leftover}")
        shutil.rmtree(layout.directory, ignore_errors=True)
        removed.append(f"dir {layout.directory}")
    return removed


def _record_owner_alive(record: dict[str, object]) -> bool:
    pid = record.get("containerd_pid")
    if not isinstance(pid, int):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0", 1)[0].decode(errors="replace") == record.get("containerd")


def sweep_stale_nodes() -> list[str]:
    """Clean up every node under nodes_root() whose containerd is gone (a crashed or
    SIGKILLed launcher); nodes still running are left alone."""
    removed: list[str] = []
    root = nodes_root()
    for directory in sorted(root.iterdir()) if root.exists() else []:
        record_path = directory / RECORD
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if _record_owner_alive(record):
            continue
        removed += cleanup_node(NodeLayout(directory.name, directory))
    # A chain whose node directory is gone (a cleanup interrupted after the rmtree).
    for chain in _nat_chains():
        node_id = chain.removeprefix("PB-")
        if not (root / node_id).exists():
            layout = NodeLayout(node_id, root / node_id)
            if _remove_nat_chain(layout):
                removed.append(f"iptables chain {chain}")
    return removed


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-w", "5", "-t", "nat", *args], capture_output=True, text=True, check=False
    )


def _nat_chains() -> list[str]:
    listing = _iptables("-S").stdout if shutil.which("iptables") else ""
    return [line.split()[1] for line in listing.splitlines() if line.startswith("-N PB-")]


def _remove_nat_chain(layout: NodeLayout) -> bool:
    """Unhook and delete the node's nat chain; False when there was none."""
    if layout.nat_chain not in _nat_chains():
        return False
    jump = ["PREROUTING", "-i", layout.bridge, "-j", layout.nat_chain]
    while _iptables("-D", *jump).returncode == 0:
        pass
    _iptables("-F", layout.nat_chain)
    _iptables("-X", layout.nat_chain)
    return True


# --------------------------------------------------------------------------- configs


def containerd_config(layout: NodeLayout, *, pause_ref: str) -> str:
    d = layout.directory
    return f"""\
version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"
temp = "{d}/containerd/tmp"
plugin_dir = ""
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.blockfile"]

[grpc]
  address = "{layout.containerd_socket}"

[ttrpc]
  address = "{layout.containerd_socket}.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause_ref}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # This VM withholds CAP_SYS_RESOURCE: runc cannot set an oom_score_adj below ours.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true  # not /var/run/netns: teardown finds them by path
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{d}/runc"  # runc's state, not /run/containerd/runc
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{d}/cni/net.d"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{layout.shim_socket_dir}/s"
"""


def cni_config(layout: NodeLayout, subnet: str) -> str:
    config = {
        "cniVersion": "1.0.0",
        "name": layout.network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.bridge,
                "isGateway": True,
                # No masquerade, no iptables: pods talk to this host (the gateway side of
                # the bridge and the node IP), which is all the tests need.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.directory / "cni" / "ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def kubelet_config(
    layout: NodeLayout, *, ca_cert: Path, address: str, port: int, healthz_port: int
) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root,
        "failCgroupV1": False,  # this machine has cgroup v1 hierarchies only
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE: the kubelet cannot lower its own score
        "failSwapOn": False,
        "imageGCHighThresholdPercent": 100,  # no registry: never delete an imported image
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "volumePluginDir": str(layout.directory / "kubelet" / "volume-plugins"),
        # Not the default /var/log/pods: a kubelet's garbage collector removes the pod log
        # directories of pods its own runtime does not know, i.e. another node's.
        "podLogsDir": str(layout.directory / "pod-logs"),
        "resolvConf": "/etc/resolv.conf",
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "maxPods": 110,
        "registerNode": True,
        # Faster feedback than the defaults (a laptop-sized cluster, not a fleet):
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "4s",
        "shutdownGracePeriod": "0s",
    }  # fmt: skip
    return json.dumps(config, indent=2) + "\n"


def prepare_cgroups(layout: NodeLayout) -> None:
    """The kubelet requires its cgroupRoot to exist in every hierarchy. A new v1 cpuset
    cgroup starts with no CPUs and no memory nodes: copy the parent's."""
    for group in layout.cgroup_dirs():
        group.mkdir(exist_ok=True)
        if group.parent.name == "cpuset":
            for key in ("cpuset.cpus", "cpuset.mems"):
                (group / key).write_text((group.parent / key).read_text())


def pick_subnet() -> str:
    """A 10.244.N.0/24 no interface on this machine uses yet (two nodes may run at once)."""
    used = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    for n in range(1, 255):
        if f"10.244.{n}." not in used:
            return f"10.244.{n}.0/24"
    raise NodeError("no free 10.244.N.0/24 subnet")


def create_bridge(layout: NodeLayout, subnet: str) -> None:
    """The pods' bridge, up with its gateway address before any pod, so the subnet is
    claimed at once (another node starting now picks the next one) and this host is
    reachable from pods at the gateway address as well as the node IP."""
    gateway = subnet.replace(".0/24", ".1/24")
    for argv in (
        ["ip", "link", "add", layout.bridge, "type", "bridge"],
        ["ip", "addr", "add", gateway, "dev", layout.bridge],
        ["ip", "link", "set", layout.bridge, "up"],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NodeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    (layout.directory / "cni" / "net.d" / "10-poolbudget.conflist").write_text(
        cni_config(layout, subnet)
    )


def route_api_service(layout: NodeLayout, *, service: tuple[str, int], to: tuple[str, int]) -> None:
    """Pods on this node's bridge reach `service` (the `kubernetes` Service's ClusterIP and
    port, which the kubelet puts in every pod's KUBERNETES_SERVICE_HOST/PORT) at `to`, the
    address kube-apiserver listens on: what kube-proxy would do for this one Service."""
    (service_ip, service_port), (address, port) = service, to
    for args in (
        ["-N", layout.nat_chain],
        ["-A", layout.nat_chain, "-d", f"{service_ip}/32", "-p", "tcp",
         "--dport", str(service_port), "-j", "DNAT", "--to-destination", f"{address}:{port}"],
        ["-A", "PREROUTING", "-i", layout.bridge, "-j", layout.nat_chain],
    ):  # fmt: skip
        result = _iptables(*args)
        if result.returncode != 0:
            raise NodeError(f"iptables -t nat {' '.join(args)}: {result.stderr.strip()}")


def write_record(layout: NodeLayout, *, containerd: str, pid: int) -> None:
    """Who owns the node: while this containerd runs, sweeps leave the node alone."""
    record = {"containerd": containerd, "containerd_pid": pid, "bridge": layout.bridge}
    (layout.directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


POD_NETWORK: Final = "10.244.0.0/16"  # every node's pod subnet is a /24 of this
