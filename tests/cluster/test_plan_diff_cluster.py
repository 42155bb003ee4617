"""`poolbudget plan --diff-cluster` against the real API server: the managed ConfigMaps
are read (GET only) and compared with what the plan would write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.localcluster import LocalCluster
from poolbudget.cli import EXIT_OK, EXIT_RESTART, EXIT_USAGE, main
from poolbudget.domain.manifests import parse_manifests
from poolbudget.domain.preflight import configmaps_of_outcome, plan_manifests
from tests.e2e.support import Cluster

pytestmark = pytest.mark.cluster


def rendered(namespace: str) -> str:
    budget = {
        "apiVersion": "poolbudget.dev/v1alpha1",
        "kind": "PoolBudget",
        "metadata": {"name": "shop-db", "namespace": namespace},
        "spec": {
            "database": {"maxConnectionsOverride": 100},
            "targets": [
                {"deploymentName": "api"},
                {"deploymentName": "worker"},
                {"deploymentName": "web"},
            ],
        },
    }
    deployments = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace}, "spec": {"replicas": 2}}
        for name in ("api", "worker", "web")
    ]  # fmt: skip
    return yaml.safe_dump_all([budget, *deployments])


def configmap(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def test_diff_cluster_reads_the_configmaps_and_says_who_restarts(
    local_cluster: LocalCluster,
    kube_namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = Cluster(local_cluster, kube_namespace)
    manifests_file = tmp_path / "rendered.yaml"
    manifests_file.write_text(rendered(kube_namespace))
    # The plan the CLI makes: max_connections from the override, PostgreSQL's default
    # superuser reserve (no server given).
    (outcome,) = plan_manifests(parse_manifests([("r", manifests_file.read_text())]), None)
    will_write = configmaps_of_outcome(outcome)
    # api: exactly what the plan writes, plus a key someone else added (not ours to compare);
    # worker: an older pool size; web: no ConfigMap yet.
    cluster.apply(configmap("api-db-pool", {**will_write["api-db-pool"], "TEAM_KEY": "x"}))
    cluster.apply(
        configmap("worker-db-pool", {**will_write["worker-db-pool"], "DB_POOL_SIZE": "9"})
    )
    versions = {
        name: cluster.get("configmap", name)["metadata"]["resourceVersion"]
        for name in ("api-db-pool", "worker-db-pool")
    }

    argv = ["plan", "-f", str(manifests_file), "--diff-cluster",
            "--kubeconfig", str(local_cluster.kubeconfig), "-o", "json"]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    report = json.loads(out)
    changes = {c["deploymentName"]: c for c in report["budgets"][0]["changes"]}
    pool = outcome.plan.allocation("worker").pool_size
    assert changes["api"]["change"] == "Unchanged"
    assert (changes["worker"]["change"], changes["worker"]["oldPoolSize"]) == ("Restart", 9)
    assert changes["worker"]["poolSize"] == pool
    assert (changes["web"]["change"], changes["web"]["oldPoolSize"]) == ("Restart", None)
    assert report["restarts"] == [f"{kube_namespace}/worker", f"{kube_namespace}/web"]

    assert main([*argv[:-2], "--fail-on-restart"]) == EXIT_RESTART
    text = capsys.readouterr().out
    assert f"worker      worker-db-pool  9 -> {pool}" in text
    # Read-only: nothing was written, and web's ConfigMap still does not exist.
    for name, version in versions.items():
        assert cluster.get("configmap", name)["metadata"]["resourceVersion"] == version
    assert cluster.get("configmap", "web-db-pool") is None


def test_diff_cluster_without_permission_is_one_line_and_exit_2(
    local_cluster: LocalCluster,
    kube_namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifests_file = tmp_path / "rendered.yaml"
    manifests_file.write_text(rendered(kube_namespace))
    nobody = local_cluster.serviceaccount_kubeconfig(kube_namespace, "nobody")
    code = main(["plan", "-f", str(manifests_file), "--diff-cluster", "--kubeconfig", str(nobody)])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE
    assert out == ""
    assert err.strip() == (
        f"poolbudget plan: error: --diff-cluster: GET ConfigMap {kube_namespace}/api-db-pool: "
        "API error 403 Forbidden"
    )
    token = nobody.read_text().split("token:")[-1].split()[0]
    assert token not in err
