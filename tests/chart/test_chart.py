"""The Helm chart against the real control plane, with the operator acting as the chart's
ServiceAccount: a missing RBAC verb fails these tests, an extra scope shows up in them."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from tests.e2e.support import Cluster, budget, deployment

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "poolbudget-operator"
Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.parametrize(
    ("manifest", "watched"), [("install.yaml", []), ("install-namespaced.yaml", ["default"])]
)
def test_install_manifest_is_up_to_date(manifest: str, watched: list[str]) -> None:
    rendered = subprocess.run(
        ["bash", str(REPO / "hack" / "render-install-manifest.sh"), *watched],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert (REPO / "manifests" / manifest).read_text() == rendered, "run `make manifests`"


def rbac_denials(log: str) -> list[str]:
    """Log lines where the API server refused the operator for lack of a permission. A 403
    for writing into a namespace that is being deleted (another test's, going away on the
    shared cluster) is not one: RBAC allowed it."""
    return [
        line
        for line in log.splitlines()
        if "Forbidden" in line and "because it is being terminated" not in line
    ]


def _release_objects(cluster: LocalCluster, release: str, kinds: str) -> list[str]:
    result = cluster.kubectl(
        "get", kinds, "-A", "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
    )
    return sorted(result.stdout.split())


@pytest.fixture
def app_namespace(local_cluster: LocalCluster) -> Iterator[str]:
    name = f"app-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name  # its pods run on the session cluster's node
    local_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _drive_a_budget(cluster: LocalCluster, namespace: str, dsn: str) -> Cluster:
    ns = Cluster(cluster, namespace)
    secret = ns.kubectl(
        "create",
        "secret",
        "generic",
        "db",
        f"--from-literal=dsn={dsn}",
        "--dry-run=client",
        "-o",
        "yaml",
    ).stdout
    ns.apply(secret)
    ns.apply(deployment("api", 2))
    doc = budget("shop", [{"deploymentName": "api", "processesPerPod": 2}])
    doc["spec"]["database"] = {"connectionSecretRef": {"name": "db"}, "refreshSeconds": 5}
    ns.apply(doc)
    wait_for(lambda: ns.settled("shop"), timeout=90, what=f"PoolBudget {namespace}/shop Ready")
    assert ns.configmap("api-db-pool") is not None
    assert ns.template_hash("api") == (ns.allocation("shop", "api") or {}).get("configHash")
    return ns


def test_cluster_wide_install_runs_as_its_service_account(
    helm: Helm, local_cluster: LocalCluster, kube_namespace: str, app_namespace: str, tmp_path: Path
) -> None:
    release = f"pb{os.getpid() % 10000}"
    helm("install", release, str(CHART), "--namespace", kube_namespace)
    assert (
        json.loads(helm("status", release, "-n", kube_namespace, "-o", "json").stdout)["info"][
            "status"
        ]
        == "deployed"
    )
    sa = f"{release}-poolbudget-operator"
    sa_kubeconfig = local_cluster.serviceaccount_kubeconfig(kube_namespace, sa)

    with PostgresServer(major=15) as server:
        dsn = server.create_role("monitor", "chart-pw", database="shop")
        operator = OperatorProcess(kubeconfig=sa_kubeconfig, log_path=tmp_path / "operator.log")
        operator.start()
        try:
            _drive_a_budget(local_cluster, app_namespace, dsn)
        finally:
            operator.stop()
    assert rbac_denials(operator.log()) == [], operator.log()

    helm(
        "upgrade", release, str(CHART), "--namespace", kube_namespace, "--set", "metrics.port=9090"
    )
    assert _release_objects(local_cluster, release, "service") == [
        f"service/{release}-poolbudget-operator-metrics"
    ]
    helm("uninstall", release, "--namespace", kube_namespace)
    leftovers = _release_objects(
        local_cluster,
        release,
        "deployments,services,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings",
    )
    assert leftovers == []


def test_namespaced_install_cannot_touch_other_namespaces(
    helm: Helm, local_cluster: LocalCluster, kube_namespace: str, app_namespace: str, tmp_path: Path
) -> None:
    release = f"pbn{os.getpid() % 10000}"
    outside = f"{app_namespace}-outside"
    local_cluster.kubectl("create", "namespace", outside)
    try:
        helm("install", release, str(CHART), "--namespace", kube_namespace,
             "--set", f"watchNamespaces={{{app_namespace}}}")  # fmt: skip
        sa_kubeconfig = local_cluster.serviceaccount_kubeconfig(
            kube_namespace, f"{release}-poolbudget-operator"
        )

        def can(verb: str, resource: str, namespace: str) -> str:
            result = local_cluster.kubectl(
                "auth",
                "can-i",
                verb,
                resource,
                "-n",
                namespace,
                kubeconfig=sa_kubeconfig,
                check=False,
            )
            return result.stdout.strip()

        assert can("patch", "deployments", app_namespace) == "yes"
        assert can("patch", "deployments", outside) == "no"
        assert can("get", "secrets", outside) == "no"
        assert can("list", "secrets", app_namespace) == "no"  # get by name only
        assert can("delete", "configmaps", app_namespace) == "no"

        # A budget outside the watched namespaces is left alone.
        Cluster(local_cluster, outside).apply(budget("ignored", [{"deploymentName": "api"}]))
        with PostgresServer(major=15) as server:
            dsn = server.create_role("monitor", "chart-pw", database="shop")
            operator = OperatorProcess(kubeconfig=sa_kubeconfig, log_path=tmp_path / "operator.log",
                                       extra_args=["--namespace", app_namespace])  # fmt: skip
            operator.start()
            try:
                _drive_a_budget(local_cluster, app_namespace, dsn)
                assert Cluster(local_cluster, outside).status("ignored") == {}
            finally:
                operator.stop()
        assert rbac_denials(operator.log()) == [], operator.log()
        helm("uninstall", release, "--namespace", kube_namespace)
        assert (
            _release_objects(
                local_cluster, release, "roles,rolebindings,serviceaccounts,deployments"
            )
            == []
        )
    finally:
        local_cluster.kubectl("delete", "namespace", outside, "--wait=false", check=False)


def test_namespaced_install_over_many_namespaces_still_reconciles(
    helm: Helm, local_cluster: LocalCluster, kube_namespace: str, app_namespace: str, tmp_path: Path
) -> None:
    """40 watched namespaces mean 160 watches held open for good (Deployments, HPAs,
    PoolBudgets, managed ConfigMaps): more than one HTTP connection pool (100) holds, which
    must not starve the operator's writes."""
    release = f"pbm{os.getpid() % 10000}"
    others = [f"{app_namespace}-w{i}" for i in range(39)]
    for name in others:
        local_cluster.kubectl("create", "namespace", name)
    watched = [app_namespace, *others]
    try:
        helm("install", release, str(CHART), "--namespace", kube_namespace,
             "--set", f"watchNamespaces={{{','.join(watched)}}}")  # fmt: skip
        sa_kubeconfig = local_cluster.serviceaccount_kubeconfig(
            kube_namespace, f"{release}-poolbudget-operator"
        )
        with PostgresServer(major=15) as server:
            dsn = server.create_role("monitor", "chart-pw", database="shop")
            flags = [arg for name in watched for arg in ("--namespace", name)]
            operator = OperatorProcess(kubeconfig=sa_kubeconfig, log_path=tmp_path / "operator.log",
                                       extra_args=flags)  # fmt: skip
            operator.start()
            try:
                _drive_a_budget(local_cluster, app_namespace, dsn)
                informers = wait_for(
                    lambda: (operator.health().get("informers") or {}) or None,
                    timeout=30,
                    what="/healthz to list the informers",
                )
                assert len(informers) == 4 * len(watched)
            finally:
                operator.stop()
        assert rbac_denials(operator.log()) == [], operator.log()
        assert "PoolTimeout" not in operator.log(), operator.log()
        helm("uninstall", release, "--namespace", kube_namespace)
    finally:
        for name in others:
            local_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_two_replicas_never_both_act(
    crd_installed: LocalCluster, kube_namespace: str, tmp_path: Path
) -> None:
    """Leader election: the second operator stands by until the first one goes away."""
    local_cluster = crd_installed
    ns = Cluster(local_cluster, kube_namespace)
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api"}]))
    args = ["--leader-election-namespace", kube_namespace]
    first = OperatorProcess(
        kubeconfig=local_cluster.kubeconfig, log_path=tmp_path / "first.log", extra_args=args
    )
    second = OperatorProcess(
        kubeconfig=local_cluster.kubeconfig, log_path=tmp_path / "second.log", extra_args=args
    )
    first.start()
    try:
        wait_for(lambda: ns.settled("shop"), timeout=60, what="the first replica to reconcile")
        second.start()  # healthy while standing by
        lease = ns.get("lease", "poolbudget-operator")
        assert f"leading as {lease['spec']['holderIdentity']} " in first.log()
        assert "leading as" not in second.log()
        assert not any(k.startswith("poolbudget_reconciles_total") for k in second.metrics())

        first.stop()  # a clean stop releases the Lease
        wait_for(lambda: "leading as" in second.log(), timeout=30, what="the standby to take over")
        ns.kubectl("scale", "deployment", "api", "--replicas=3")
        wait_for(lambda: (ns.allocation("shop", "api") or {}).get("podsWorstCase") == 4, timeout=60,
                 what="the new leader to re-budget")  # fmt: skip
    finally:
        first.stop()
        second.stop()
