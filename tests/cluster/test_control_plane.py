"""The control plane is the real thing, at the pinned version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devtools.localcluster import LocalCluster

pytestmark = pytest.mark.cluster

KUBE_WRAPPER_GO_MOD = Path(__file__).parents[2] / "hack" / "localcluster" / "kube" / "go.mod"


def pinned_kubernetes_version() -> str:
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", KUBE_WRAPPER_GO_MOD.read_text(), re.M)
    assert match, f"no k8s.io/kubernetes requirement in {KUBE_WRAPPER_GO_MOD}"
    return match.group(1)


def test_server_reports_the_pinned_kubernetes_version(local_cluster: LocalCluster) -> None:
    version = json.loads(local_cluster.kubectl("version", "--output=json").stdout)

    assert version["serverVersion"]["gitVersion"] == pinned_kubernetes_version()


def test_admin_kubeconfig_is_cluster_admin(local_cluster: LocalCluster) -> None:
    whoami = json.loads(local_cluster.kubectl("auth", "whoami", "--output=json").stdout)

    assert whoami["status"]["userInfo"]["username"] == "poolbudget-admin"
    assert "system:masters" in whoami["status"]["userInfo"]["groups"]
    assert local_cluster.server_url.startswith(f"https://{local_cluster.node_ip or '127.0.0.1'}:")
