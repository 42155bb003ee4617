"""The local cluster's node: pods are scheduled, run under containerd + runc, report real
readiness, and teardown leaves nothing behind, also when the launcher is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.images import Builder as ImageBuilder
from devtools.localcluster import LocalCluster, wait_for
from devtools.node import CNI_RESULTS, NODE_NAME, NodeLayout, sandbox_ids, sweep_stale_nodes

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def pod(name: str, image: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never"}],
                **spec,
            },
        }
    )


def pod_status(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    found = cluster.kubectl("-n", namespace, "get", "pod", name, "-o", "json", check=False)
    return dict(json.loads(found.stdout)["status"]) if found.returncode == 0 else {}


def is_ready(status: dict[str, Any]) -> bool:
    conditions = status.get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_node_is_ready_with_the_machine_address(local_cluster: LocalCluster) -> None:
    node = local_cluster.api_get(f"/api/v1/nodes/{NODE_NAME}")
    assert isinstance(node, dict)
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == local_cluster.node_ip
    assert not addresses["InternalIP"].startswith("127.")
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    assert info["containerRuntimeVersion"].startswith("containerd://2.")


def test_a_pod_runs_gets_an_ip_and_is_ready(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    image = ImageBuilder().pause().ref
    local_cluster.kubectl("-n", kube_namespace, "apply", "-f", "-", input=pod("p", image))
    wait_for(
        lambda: is_ready(pod_status(local_cluster, kube_namespace, "p")), timeout=60,
        what="pod p Ready",
    )  # fmt: skip
    status = pod_status(local_cluster, kube_namespace, "p")
    assert status["phase"] == "Running"
    assert status["podIP"].startswith("10.244.")
    assert status["containerStatuses"][0]["started"] is True


# In a pod, with the ServiceAccount token and CA the kubelet mounts: what any in-cluster
# client (Kopf's login, the operator's) does first.
_IN_CLUSTER_GET = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
request = urllib.request.Request(
    f"https://{host}:{port}/version",
    headers={"Authorization": "Bearer " + open(f"{sa}/token").read()},
)
context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
with urllib.request.urlopen(request, context=context, timeout=10) as response:
    print(json.dumps({"address": f"{host}:{port}", "status": response.status,
                      "version": json.load(response)["gitVersion"]}))
"""


def test_a_pod_reaches_the_api_server_as_the_kubernetes_service(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    image = ImageBuilder().base()
    local_cluster.import_image(image)
    manifest = pod("client", image.ref, restartPolicy="Never")
    spec = json.loads(manifest)
    spec["spec"]["containers"][0]["command"] = ["python3", "-c", _IN_CLUSTER_GET]
    local_cluster.kubectl("-n", kube_namespace, "apply", "-f", "-", input=json.dumps(spec))
    wait_for(
        lambda: pod_status(local_cluster, kube_namespace, "client").get("phase")
        in ("Succeeded", "Failed"),
        timeout=60, what="pod client finished",
    )  # fmt: skip
    logs = local_cluster.kubectl("-n", kube_namespace, "logs", "client").stdout
    assert pod_status(local_cluster, kube_namespace, "client")["phase"] == "Succeeded", logs
    answer = json.loads(logs.strip().splitlines()[-1])
    assert answer == {"address": "10.0.0.1:443", "status": 200, "version": answer["version"]}
    assert answer["version"].startswith("v1.36.")


def test_a_missing_image_is_reported_not_pulled(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    """No registry: an image that was not imported stays waiting with a clear reason."""
    local_cluster.kubectl(
        "-n", kube_namespace, "apply", "-f", "-", input=pod("p", "example.invalid/nope:1")
    )

    def waiting_reason() -> str | None:
        statuses = pod_status(local_cluster, kube_namespace, "p").get("containerStatuses") or []
        waiting = statuses[0]["state"].get("waiting") if statuses else None
        reason = waiting["reason"] if waiting else None
        return None if reason == "ContainerCreating" else reason

    assert wait_for(waiting_reason, timeout=60, what="a waiting reason") == "ErrImageNeverPull"


_CRASHING_LAUNCHER = textwrap.dedent("""\
    import json, sys, time
    from pathlib import Path
    from devtools.images import Builder
    from devtools.localcluster import LocalCluster, find_binaries, wait_for
    cluster = LocalCluster(Path(sys.argv[1]), binaries=find_binaries(), node=True)
    cluster.start()
    image = Builder().pause().ref
    for name in ("a", "b"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
               "spec": {"containers": [{"name": "main", "image": image, "imagePullPolicy": "Never"}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    def running():
        pods = json.loads(cluster.kubectl("get", "pods", "-o", "json").stdout)["items"]
        return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
    wait_for(running, timeout=90, what="two pods running")
    print(json.dumps({"node_dir": str(cluster.node_layout.directory)}), flush=True)
    time.sleep(600)
    """)


def _leftovers(layout: NodeLayout, sandboxes: list[str]) -> list[str]:
    """Whatever of the node still exists: cgroups, bridge, mounts, files (its own, the shim
    sockets', the CNI results of its pod sandboxes), processes."""
    found = [str(g) for g in layout.cgroup_dirs() if g.exists()]
    if layout.shim_socket_dir.exists():
        found.append(str(layout.shim_socket_dir))
    found += [str(r) for r in CNI_RESULTS.glob("*") if any(s in r.name for s in sandboxes)]
    if Path(f"/sys/class/net/{layout.bridge}").exists():
        found.append(f"bridge {layout.bridge}")
    nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    found += [line for line in nat.splitlines() if layout.nat_chain in line]
    prefix = str(layout.directory)
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [m.split()[4] for m in mounts if m.split()[4].startswith(prefix)]
    if layout.directory.exists():
        found.append(str(layout.directory))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(layout.containerd_socket).encode() in cmdline:
                found.append(f"process {proc.name}: {cmdline[:80]!r}")
    return found


def test_sigkilled_launcher_leaves_nothing_after_the_sweep(tmp_path: Path) -> None:
    """Pods running, the launcher SIGKILLed: its children die with it, but the shims and
    containers do not; the next sweep removes them, their mounts, cgroups, bridge and files."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_LAUNCHER, str(tmp_path / "cluster")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert launcher.stdout is not None
        line = launcher.stdout.readline()
        assert line, "the launcher exited before its pods ran"
        directory = Path(json.loads(line)["node_dir"])
        layout = NodeLayout(directory.name, directory)
        sandboxes = sandbox_ids(layout)
        assert len(sandboxes) == 2
        assert _leftovers(layout, sandboxes), "a running node has mounts, cgroups, a bridge"
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        if launcher.stdout is not None:
            launcher.stdout.close()
    time.sleep(1)  # PDEATHSIG reaches containerd and the kubelet
    survivors = _leftovers(layout, sandboxes)
    assert any("process" in s for s in survivors), "the shims outlive the launcher"

    removed = sweep_stale_nodes()
    assert any(r.startswith("bridge") for r in removed)
    assert _leftovers(layout, sandboxes) == []


def test_stop_leaves_nothing(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", node=True)
    cluster.start()
    layout = cluster.node_layout
    assert layout is not None
    cluster.kubectl("apply", "-f", "-", input=pod("p", ImageBuilder().pause().ref))
    wait_for(lambda: is_ready(pod_status(cluster, "default", "p")), timeout=60, what="pod p Ready")
    sandboxes = sandbox_ids(layout)
    assert len(sandboxes) == 1
    cluster.stop()
    assert _leftovers(layout, sandboxes) == []
