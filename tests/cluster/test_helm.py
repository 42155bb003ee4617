"""helm, built from its Go module, renders a chart offline and installs it into the
local cluster."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from devtools.localcluster import LocalCluster

pytestmark = pytest.mark.cluster

CHART = Path(__file__).parent / "testdata" / "charts" / "greeting"

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def helm(local_cluster: LocalCluster, tmp_path: Path) -> Helm:
    """Run helm against the local cluster, with its cache and config in tmp_path."""
    env = {
        **os.environ,
        "KUBECONFIG": str(local_cluster.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "helm" / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm" / "config"),
        "HELM_DATA_HOME": str(tmp_path / "helm" / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(local_cluster.binaries.helm), *args],
            env=env,
            text=True,
            capture_output=True,
            check=True,
            timeout=120,
        )

    return run


def test_helm_template_renders_the_chart(helm: Helm) -> None:
    rendered = helm("template", "demo", str(CHART), "--set", "greeting=bonjour").stdout

    [configmap] = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == "demo-greeting"
    assert configmap["data"]["greeting"] == "bonjour"


def test_helm_install_creates_the_release_in_the_cluster(
    helm: Helm, local_cluster: LocalCluster, kube_namespace: str
) -> None:
    helm("install", "demo", str(CHART), "--namespace", kube_namespace, "--wait", "--timeout=60s")

    configmap = json.loads(
        local_cluster.kubectl(
            "get", "configmap", "demo-greeting", "--namespace", kube_namespace, "--output=json"
        ).stdout
    )
    version = json.loads(local_cluster.kubectl("version", "--output=json").stdout)
    [release] = json.loads(helm("list", "--namespace", kube_namespace, "--output=json").stdout)
    assert configmap["data"]["greeting"] == "hello"
    # Rendered with the capabilities helm discovered from this API server.
    assert configmap["data"]["kubeVersion"] == version["serverVersion"]["gitVersion"]
    assert release["name"] == "demo"
    assert release["status"] == "deployed"

    helm("uninstall", "demo", "--namespace", kube_namespace, "--wait")
    gone = local_cluster.kubectl(
        "get", "configmap", "demo-greeting", "--namespace", kube_namespace, check=False
    )
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
