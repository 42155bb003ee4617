"""The launcher cleans up after itself: no processes and no etcd data are left behind,
whether the code using the cluster fails or the CLI's `down` stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.localcluster import REPO_ROOT, LocalCluster, pid_alive

pytestmark = pytest.mark.cluster


def test_context_manager_stops_everything_when_the_body_fails(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster = LocalCluster(tmp_path / "state", binaries=local_cluster.binaries)
    pids_seen_inside: dict[str, int] = {}

    def failing_test() -> None:
        with cluster:
            pids_seen_inside.update(cluster.pids)
            assert all(pid_alive(pid) for pid in cluster.pids.values())
            raise RuntimeError("a failing test")

    with pytest.raises(RuntimeError, match="a failing test"):
        failing_test()

    assert sorted(pids_seen_inside) == ["etcd", "kube-apiserver", "kube-controller-manager"]
    assert not [name for name, pid in pids_seen_inside.items() if pid_alive(pid)]
    assert not cluster.data_dir.exists()
    assert (cluster.log_dir / "kube-apiserver.log").stat().st_size > 0


def test_cli_up_leaves_it_running_and_down_removes_it(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    state_dir = tmp_path / "cli-state"
    env = {**os.environ, "POOLBUDGET_BIN_DIR": str(local_cluster.binaries.etcd.parent)}

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "devtools.localcluster", *args, "--dir", str(state_dir)],
            cwd=REPO_ROOT,
            env=env,
            text=True,
            capture_output=True,
            check=True,
            timeout=180,
        ).stdout

    try:
        output = cli("up")
        pids = [p["pid"] for p in json.loads((state_dir / "pids.json").read_text())["processes"]]
        kubeconfig = state_dir / "kubeconfig"
        namespaces = local_cluster.kubectl(
            "get", "namespaces", "--output=name", kubeconfig=kubeconfig
        ).stdout.split()
        node_dir = Path(json.loads((state_dir / "pids.json").read_text())["node_dir"])
        nodes = local_cluster.kubectl("get", "nodes", "--output=name", kubeconfig=kubeconfig)
        assert f"kubeconfig: {kubeconfig}" in output
        assert "control plane and node up in" in output
        assert "image on the node: localhost/poolbudget/sampleapp:" in output
        assert len(pids) == 6  # etcd, apiserver, controller-manager, scheduler, containerd, kubelet
        assert all(pid_alive(pid) for pid in pids)
        assert "namespace/kube-system" in namespaces
        assert nodes.stdout.split() == ["node/poolbudget-node"]
        assert node_dir.is_dir()
    finally:
        output = cli("down")

    # Stopped in reverse start order, so no component sees its dependency vanish first.
    assert output.startswith("stopped: kubelet")
    assert "node leftovers removed" in output
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not state_dir.exists()
    assert not node_dir.exists()
