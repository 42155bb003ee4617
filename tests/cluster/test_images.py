"""The images built here without Docker run on the node as they would anywhere: the
operator image from the repository's own Dockerfile, as a non-root user with a read-only
root filesystem (what the chart asks of it)."""

from __future__ import annotations

import json

import pytest

from devtools.images import Builder as ImageBuilder
from devtools.images import package_version
from devtools.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.cluster


def test_operator_image_runs_poolbudget_as_non_root(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    image = ImageBuilder().operator()
    assert image.ref.endswith(f"/operator:{package_version()}")
    local_cluster.import_image(image)
    # The classic worked example: 200 max, 10 reserved, 4 workers, overflow 5 -> pool 42.
    plan = ["plan", "--max-connections", "200", "--reserved", "10", "--workers", "4",
            "--max-overflow", "5", "--superuser-reserved", "0", "--output", "json"]  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "plan"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "dnsPolicy": "Default",
                    "containers": [{
                        "name": "poolbudget", "image": image.ref, "imagePullPolicy": "Never",
                        "args": plan,  # the image's entrypoint is `poolbudget`
                        "securityContext": {
                            "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                }
            },
        },
    }  # fmt: skip
    local_cluster.kubectl("-n", kube_namespace, "apply", "-f", "-", input=json.dumps(job))

    def finished() -> str | None:
        status = json.loads(
            local_cluster.kubectl("-n", kube_namespace, "get", "job", "plan", "-o", "json").stdout
        )["status"]
        return "ok" if status.get("succeeded") else "failed" if status.get("failed") else None

    assert wait_for(finished, timeout=120, what="the plan Job to finish") == "ok"
    # `kubectl logs` goes API server -> kubelet with the API server's client certificate.
    output = local_cluster.kubectl("-n", kube_namespace, "logs", "job/plan").stdout
    allocation = json.loads(output)["allocations"][0]
    assert allocation["poolSize"] == 42
