"""The PoolBudget CRD as the real API server serves it: schema, CEL rules, defaults, status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster

pytestmark = pytest.mark.cluster

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="module")
def crd(local_cluster: LocalCluster) -> LocalCluster:
    local_cluster.kubectl("apply", "-f", str(CRDS))
    local_cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/poolbudgets.poolbudget.dev"
    )
    return local_cluster


def apply(cluster: LocalCluster, namespace: str, spec: dict[str, Any], name: str = "b") -> Any:
    document = {
        "apiVersion": "poolbudget.dev/v1alpha1",
        "kind": "PoolBudget",
        "metadata": {"name": name},
        "spec": spec,
    }
    return cluster.kubectl(
        "-n",
        namespace,
        "apply",
        "--validate=strict",
        "-f",
        "-",
        input=json.dumps(document),
        check=False,
    )


VALID = {"database": {"maxConnectionsOverride": 100}, "targets": [{"deploymentName": "api"}]}


def test_valid_budget_is_accepted_with_defaults(crd: LocalCluster, kube_namespace: str) -> None:
    assert apply(crd, kube_namespace, VALID).returncode == 0
    spec = json.loads(crd.kubectl("-n", kube_namespace, "get", "pbud", "b", "-o", "json").stdout)[
        "spec"
    ]
    assert spec["reservedConnections"] == 10
    assert spec["rollout"] == {
        "strategy": "RollingRestart",
        "maxConcurrent": 1,
        "minIntervalSeconds": 300,
    }
    assert spec["targets"][0] == {
        "deploymentName": "api",
        "processesPerPod": 1,
        "weight": 1,
        "minPoolSize": 1,
    }
    assert spec["defaults"]["maxOverflow"] == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"targets": [{"deploymentName": "api", "minPoolSize": 5, "maxPoolSize": 2}]}, "spec.targets[0].maxPoolSize: Invalid value: maxPoolSize must be >= minPoolSize"),
        ({"targets": [{"deploymentName": "api"}, {"deploymentName": "api"}]}, "Duplicate value"),
        ({"targets": [{"deploymentName": "a", "configMapName": "x"}, {"deploymentName": "b", "configMapName": "x"}]}, "each target needs its own configMapName"),
        ({"database": {"refreshSeconds": 30}}, "set connectionSecretRef or maxConnectionsOverride"),
        ({"reservedConnections": -1}, "spec.reservedConnections in body should be greater than or equal to 0"),
        ({"pooling": "Magic"}, 'supported values: "Direct", "PgBouncerTransaction"'),
        ({"targets": [{"deploymentName": "Not_A_Name"}]}, "spec.targets[0].deploymentName in body should match"),
        ({"targets": [{"deploymentName": "api", "wieght": 2}]}, 'unknown field "spec.targets[0].wieght"'),
        ({"targets": []}, "spec.targets in body should have at least 1 items"),
    ],
)  # fmt: skip
def test_invalid_budgets_are_rejected_with_a_clear_message(
    crd: LocalCluster, kube_namespace: str, change: dict[str, Any], message: str
) -> None:
    result = apply(crd, kube_namespace, {**VALID, **change})
    assert result.returncode != 0
    assert message in result.stderr


def test_explain_teaches_the_fields(crd: LocalCluster) -> None:
    result = crd.kubectl("explain", "poolbudget.spec.targets.processesPerPod", check=False)
    if result.returncode != 0:  # discovery may lag a freshly established CRD by a moment
        crd.kubectl("api-resources", "--api-group=poolbudget.dev")
        result = crd.kubectl("explain", "poolbudget.spec.targets.processesPerPod")
    assert "Worker processes per pod" in result.stdout


def test_status_is_a_subresource(crd: LocalCluster, kube_namespace: str) -> None:
    assert apply(crd, kube_namespace, VALID).returncode == 0

    def generation() -> int:
        body = json.loads(
            crd.kubectl("-n", kube_namespace, "get", "pbud", "b", "-o", "json").stdout
        )
        return int(body["metadata"]["generation"])

    before = generation()
    crd.kubectl("-n", kube_namespace, "patch", "pbud", "b", "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"peakConnections": 42, "usableConnections": 87, "headroom": 45}}))  # fmt: skip
    assert generation() == before
    header, row = crd.kubectl("-n", kube_namespace, "get", "pbud", "b").stdout.splitlines()
    assert header.split() == ["NAME", "MAX", "USABLE", "PEAK", "HEADROOM", "READY", "AGE"]
    assert row.split()[:4] == ["b", "87", "42", "45"]  # MAX is empty until a probe
    assert apply(crd, kube_namespace, {**VALID, "reservedConnections": 12}).returncode == 0
    assert generation() == before + 1
