"""A CRD applied with kubectl is served, validated against its schema, and has a real
status subresource."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster

pytestmark = pytest.mark.cluster

SAMPLE_CRD = Path(__file__).parent / "testdata" / "sample-crd.yaml"


def sample(name: str, size: int) -> str:
    return json.dumps(
        {
            "apiVersion": "harness.poolbudget.dev/v1",
            "kind": "Sample",
            "metadata": {"name": name},
            "spec": {"size": size},
        }
    )


def get_sample(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "sample", name, "--namespace", namespace, "--output=json")
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


@pytest.fixture(scope="module")
def sample_crd(local_cluster: LocalCluster) -> str:
    local_cluster.kubectl("apply", "--server-side", "--filename", str(SAMPLE_CRD))
    local_cluster.wait_established("samples.harness.poolbudget.dev", timeout=30)
    return "samples.harness.poolbudget.dev"


def test_crd_is_served(local_cluster: LocalCluster, sample_crd: str, kube_namespace: str) -> None:
    served = local_cluster.kubectl(
        "api-resources", "--api-group=harness.poolbudget.dev", "--output=name"
    ).stdout.split()
    local_cluster.kubectl(
        "apply", "--namespace", kube_namespace, "--filename", "-", input=sample("first", 3)
    )

    assert served == [sample_crd]
    assert get_sample(local_cluster, kube_namespace, "first")["spec"] == {"size": 3}


def test_schema_validation_rejects_an_invalid_object(
    local_cluster: LocalCluster, sample_crd: str, kube_namespace: str
) -> None:
    result = local_cluster.kubectl(
        "apply",
        "--namespace",
        kube_namespace,
        "--filename",
        "-",
        input=sample("too-small", 0),
        check=False,
    )

    assert result.returncode != 0
    assert "spec.size" in result.stderr
    assert "should be greater than or equal to 1" in result.stderr


def test_status_is_written_only_through_the_status_subresource(
    local_cluster: LocalCluster, sample_crd: str, kube_namespace: str
) -> None:
    local_cluster.kubectl(
        "apply", "--namespace", kube_namespace, "--filename", "-", input=sample("observed", 2)
    )
    status_patch = json.dumps({"status": {"observedSize": 2}})
    local_cluster.kubectl(
        "patch",
        "sample",
        "observed",
        "--namespace",
        kube_namespace,
        "--subresource=status",
        "--type=merge",
        f"--patch={status_patch}",
    )
    # Through the main resource the same kind of patch is accepted but status is ignored.
    local_cluster.kubectl(
        "patch",
        "sample",
        "observed",
        "--namespace",
        kube_namespace,
        "--type=merge",
        "--patch",
        json.dumps({"status": {"observedSize": 99}}),
    )

    assert get_sample(local_cluster, kube_namespace, "observed")["status"] == {"observedSize": 2}
