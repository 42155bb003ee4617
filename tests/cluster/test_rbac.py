"""A ServiceAccount kubeconfig carries exactly that ServiceAccount's permissions: refused
where RBAC grants nothing, allowed once a RoleBinding says so, and nowhere else."""

from __future__ import annotations

import json

import pytest

from devtools.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.cluster


def test_serviceaccount_is_refused_until_a_rolebinding_allows_it(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    kubeconfig = local_cluster.serviceaccount_kubeconfig(kube_namespace, "reader")
    user = f"system:serviceaccount:{kube_namespace}:reader"

    def as_reader(*args: str) -> tuple[int, str]:
        result = local_cluster.kubectl(*args, kubeconfig=kubeconfig, check=False)
        return result.returncode, result.stdout + result.stderr

    whoami = json.loads(as_reader("auth", "whoami", "--output=json")[1])
    assert whoami["status"]["userInfo"]["username"] == user

    code, output = as_reader("get", "configmaps", "--namespace", kube_namespace)
    assert code != 0
    assert f'User "{user}" cannot list resource "configmaps"' in output

    local_cluster.kubectl(
        "create",
        "role",
        "configmap-reader",
        "--namespace",
        kube_namespace,
        "--verb=get,list",
        "--resource=configmaps",
    )
    local_cluster.kubectl(
        "create",
        "rolebinding",
        "reader-reads-configmaps",
        "--namespace",
        kube_namespace,
        "--role=configmap-reader",
        f"--serviceaccount={kube_namespace}:reader",
    )

    wait_for(
        lambda: as_reader("get", "configmaps", "--namespace", kube_namespace)[0] == 0,
        timeout=30,
        what="the RoleBinding to take effect",
    )
    code, output = as_reader("get", "secrets", "--namespace", kube_namespace)
    assert code != 0
    assert f'User "{user}" cannot list resource "secrets"' in output
    code, output = as_reader("get", "configmaps", "--namespace", "default")
    assert code != 0
    assert 'cannot list resource "configmaps" in API group "" in the namespace "default"' in output
