"""kube-controller-manager really runs the Deployment controller: a Deployment gets a
ReplicaSet, and changing its pod template (the operator's restart annotation) starts a
second one. Pods stay Pending (no scheduler or kubelet), which is all a rollout needs
to begin."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.cluster

RESTART_ANNOTATION = "poolbudget.dev/config-hash"


def deployment(name: str) -> str:
    labels = {"app": name}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": {RESTART_ANNOTATION: "one"}},
                    "spec": {
                        "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]
                    },
                },
            },
        }
    )


def replicasets(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    result = cluster.kubectl("get", "replicasets", "--namespace", namespace, "--output=json")
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def wait_for_replicasets(
    cluster: LocalCluster, namespace: str, count: int, what: str
) -> list[dict[str, Any]]:
    def exactly_count() -> list[dict[str, Any]] | None:
        found = replicasets(cluster, namespace)
        return found if len(found) == count else None

    return wait_for(exactly_count, timeout=30, what=what)


def test_pod_template_change_starts_a_second_replicaset(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    local_cluster.kubectl(
        "apply", "--namespace", kube_namespace, "--filename", "-", input=deployment("web")
    )
    [first] = wait_for_replicasets(local_cluster, kube_namespace, 1, "the first ReplicaSet")

    patch = {"spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: "two"}}}}}
    local_cluster.kubectl(
        "patch",
        "deployment",
        "web",
        "--namespace",
        kube_namespace,
        "--type=strategic",
        f"--patch={json.dumps(patch)}",
    )
    both = wait_for_replicasets(
        local_cluster, kube_namespace, 2, "a second ReplicaSet after the pod-template change"
    )

    [second] = [rs for rs in both if rs["metadata"]["uid"] != first["metadata"]["uid"]]
    template_hash = "pod-template-hash"
    assert first["metadata"]["ownerReferences"][0]["name"] == "web"
    assert second["metadata"]["ownerReferences"][0]["name"] == "web"
    assert second["spec"]["template"]["metadata"]["annotations"][RESTART_ANNOTATION] == "two"
    assert second["metadata"]["labels"][template_hash] != first["metadata"]["labels"][template_hash]
    assert second["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
