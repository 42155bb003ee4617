"""The PoolBudget CRD as a real kube-apiserver serves it.

Applied with kubectl like a user would; then the API server itself fills in the defaults,
rejects invalid budgets with a message that names the field (and the pydantic models reject
the same specs), teaches the fields through `kubectl explain`, keeps status behind its
subresource, and prints the columns of `kubectl get pbud`. The cases themselves live in
tests/unit/test_crd.py, which checks the pydantic models refuse and accept the same specs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.localcluster import LocalCluster, wait_for
from poolbudget.api.v1alpha1 import PoolBudgetSpec
from tests.unit.test_crd import EDGE_SPECS, INVALID_SPECS, VALID

pytestmark = pytest.mark.cluster

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "poolbudget.dev_poolbudgets.yaml"
CRD_NAME = "poolbudgets.poolbudget.dev"


@pytest.fixture(scope="module")
def cluster(crd_installed: LocalCluster) -> LocalCluster:
    """The control plane with the CRD Established (`crd_installed`) and served to clients:
    discovery can lag Established by a moment, and kubectl needs it to map the kind."""

    def served() -> bool:
        result = crd_installed.kubectl(
            "api-resources", "--api-group=poolbudget.dev", "-o", "name", check=False
        )
        return CRD_NAME in result.stdout.split()

    wait_for(served, timeout=30, what="poolbudgets in API discovery")
    return crd_installed


def document(spec: dict[str, Any], name: str = "shop-db") -> str:
    return json.dumps(
        {
            "apiVersion": "poolbudget.dev/v1alpha1",
            "kind": "PoolBudget",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def apply(
    cluster: LocalCluster, namespace: str, spec: dict[str, Any], name: str = "shop-db"
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "-n", namespace, "apply", "--validate=strict", "-f", "-",
        input=document(spec, name), check=False,
    )  # fmt: skip


def get(cluster: LocalCluster, namespace: str, name: str = "shop-db") -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        cluster.kubectl("-n", namespace, "get", "poolbudget", name, "-o", "json").stdout
    )
    return body


def test_crd_is_accepted_structural_and_established(cluster: LocalCluster) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    # The CEL rules' estimated cost is within the API server's budget (it refuses the whole
    # CRD otherwise), and the schema is structural (NonStructuralSchema would be listed).
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert crd["status"]["acceptedNames"]["shortNames"] == ["pbud"]
    assert crd["status"]["acceptedNames"]["categories"] == ["poolbudget"]


def test_valid_budget_is_accepted_and_defaulted_by_the_api_server(
    cluster: LocalCluster, kube_namespace: str
) -> None:
    result = apply(cluster, kube_namespace, VALID)
    assert result.returncode == 0, result.stderr

    spec = get(cluster, kube_namespace)["spec"]

    assert spec["reservedConnections"] == 10
    assert spec["pooling"] == "Direct"
    assert spec["replicaBasis"] == "WorstCase"
    assert spec["database"]["refreshSeconds"] == 60
    assert spec["defaults"]["maxOverflow"] == 5
    assert spec["defaults"]["poolTimeoutSeconds"] == 10
    assert spec["rollout"] == {
        "strategy": "RollingRestart",
        "maxConcurrent": 1,
        "minIntervalSeconds": 300,
    }
    assert spec["targets"] == [
        {"deploymentName": "api", "processesPerPod": 4, "weight": 1, "minPoolSize": 1}
    ]
    # ... which is exactly what the operator's own models make of the same input.
    assert spec == PoolBudgetSpec.model_validate(VALID).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


def test_a_minimal_target_gets_every_default(cluster: LocalCluster, kube_namespace: str) -> None:
    minimal = {"database": {"maxConnectionsOverride": 100}, "targets": [{"deploymentName": "api"}]}
    assert apply(cluster, kube_namespace, minimal).returncode == 0

    spec = get(cluster, kube_namespace)["spec"]

    assert spec["targets"] == [
        {"deploymentName": "api", "processesPerPod": 1, "weight": 1, "minPoolSize": 1}
    ]
    assert spec["defaults"]["poolRecycleSeconds"] == 1800
    assert spec == PoolBudgetSpec.model_validate(minimal).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


def test_short_name_and_category_but_not_all(cluster: LocalCluster, kube_namespace: str) -> None:
    assert apply(cluster, kube_namespace, VALID).returncode == 0

    by_short_name = cluster.kubectl("-n", kube_namespace, "get", "pbud", "-o", "name").stdout
    everything = cluster.kubectl("-n", kube_namespace, "get", "all", "-o", "name", check=False)

    assert by_short_name.split() == ["poolbudget.poolbudget.dev/shop-db"]
    assert "poolbudget" not in everything.stdout + everything.stderr


@pytest.mark.parametrize(
    ("change", "messages"),
    [pytest.param(change, messages, id=case) for case, change, messages, _ in INVALID_SPECS],
)
def test_invalid_budget_is_rejected_naming_the_field(
    cluster: LocalCluster, kube_namespace: str, change: dict[str, Any], messages: list[str]
) -> None:
    result = apply(cluster, kube_namespace, {**VALID, **change})

    assert result.returncode != 0
    for message in messages:
        assert message in result.stderr
    absent = cluster.kubectl("-n", kube_namespace, "get", "pbud", "shop-db", check=False)
    assert "NotFound" in absent.stderr


@pytest.mark.parametrize("change", [pytest.param(change, id=case) for case, change in EDGE_SPECS])
def test_the_edges_of_the_rules_are_accepted(
    cluster: LocalCluster, kube_namespace: str, change: dict[str, Any]
) -> None:
    result = apply(cluster, kube_namespace, {**VALID, **change})

    assert result.returncode == 0, result.stderr


def test_a_name_too_long_for_the_budget_label_is_rejected(
    cluster: LocalCluster, kube_namespace: str
) -> None:
    result = apply(cluster, kube_namespace, VALID, name="a" * 64)

    assert result.returncode != 0
    assert "metadata: Invalid value: metadata.name must be at most 63 characters" in result.stderr
    assert apply(cluster, kube_namespace, VALID, name="a" * 63).returncode == 0


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_explain_teaches_the_target_fields(cluster: LocalCluster) -> None:
    def explained() -> str | None:
        result = cluster.kubectl("explain", "poolbudget.spec.targets", check=False)
        return result.stdout if result.returncode == 0 else None

    # The OpenAPI document is published a moment after the CRD is Established.
    output = wait_for(explained, timeout=30, what="kubectl explain poolbudget.spec.targets")

    flat = " ".join(output.split())
    targets_schema = _crd_schema()["properties"]["spec"]["properties"]["targets"]
    assert " ".join(targets_schema["description"].split()) in flat
    for name, field in targets_schema["items"]["properties"].items():
        assert name in flat
        assert " ".join(field["description"].split()) in flat, name
    assert "deploymentName <string> -required-" in flat
    assert "Default: 1. Range: 1 to 1024." in flat  # processesPerPod


def test_explain_says_why_pool_recycle_cannot_be_zero(cluster: LocalCluster) -> None:
    output = cluster.kubectl("explain", "poolbudget.spec.defaults.poolRecycleSeconds").stdout

    flat = " ".join(output.split())
    assert "-1 for never. 0 is refused: SQLAlchemy would replace the connection on every checkout (no pooling)." in flat  # fmt: skip
    assert "Rule: poolRecycleSeconds must be -1 (never) or at least 1." in flat


STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "database": {
        "maxConnections": 200,
        "superuserReservedConnections": 3,
        "reservedConnections": 0,
        "usableConnections": 187,
        "connectionsInUse": 57,
        "serverVersion": "16.4",
        "observedTime": "2026-11-24T12:00:00Z",
    },
    "allocations": [
        {
            "deploymentName": "api",
            "podsWorstCase": 5,
            "workers": 20,
            "poolSize": 4,
            "maxOverflow": 5,
            "peakConnections": 180,
            "configMapName": "api-db-pool",
            "configHash": "0" * 64,
            "restartedTime": "2026-11-24T12:00:00Z",
            "state": "Applied",
            "message": "settings applied",
            "liveConnections": {
                "applicationName": "api",
                "active": 3,
                "idle": 40,
                "idleInTransaction": 1,
                "unknown": 0,
                "total": 44,
            },
        }
    ],
    "activity": {
        "connectionsInUse": 57,
        "unbudgetedConnections": 12,
        "unbudgetedClients": [{"applicationName": "psql", "connections": 12}],
        "operatorConnections": 1,
        "lockWaits": 0,
        "staleTransactions": 0,
        "visibility": "Full",
        "observedTime": "2026-11-24T12:00:00Z",
    },
    "peakConnections": 180,
    "usableConnections": 187,
    "headroom": 7,
    "verdict": "Feasible",
    "conditions": [
        {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": "",
            "observedGeneration": 1,
            "lastTransitionTime": "2026-11-24T12:00:00Z",
        }
        for kind, reason in (
            ("Ready", "BudgetApplied"),
            ("DatabaseObserved", "Probed"),
            ("BudgetFeasible", "Feasible"),
            ("RolloutComplete", "RolloutComplete"),
            ("DatabaseHealthy", "WithinThresholds"),
        )
    ],
}


def patch_status(
    cluster: LocalCluster, namespace: str, status: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "-n", namespace, "patch", "pbud", "shop-db", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=False,
    )  # fmt: skip


def test_status_is_a_subresource(cluster: LocalCluster, kube_namespace: str) -> None:
    assert apply(cluster, kube_namespace, VALID).returncode == 0
    generation = get(cluster, kube_namespace)["metadata"]["generation"]

    result = patch_status(cluster, kube_namespace, {**STATUS, "notAField": 1})
    assert result.returncode == 0, result.stderr
    after_status = get(cluster, kube_namespace)

    # Written through /status: stored as sent, minus the unknown field (pruned), and the
    # generation stays: status is not spec.
    assert after_status["status"] == STATUS
    assert after_status["metadata"]["generation"] == generation

    # Through the main resource a status change is ignored...
    cluster.kubectl(
        "-n", kube_namespace, "patch", "pbud", "shop-db", "--type=merge",
        "-p", json.dumps({"status": {"headroom": 999}}),
    )  # fmt: skip
    assert get(cluster, kube_namespace)["status"]["headroom"] == 7

    # ... and a spec change bumps the generation and leaves status alone.
    assert apply(cluster, kube_namespace, {**VALID, "reservedConnections": 12}).returncode == 0
    after_spec = get(cluster, kube_namespace)
    assert after_spec["metadata"]["generation"] == generation + 1
    assert after_spec["status"] == STATUS


def test_max_column_is_empty_until_the_database_is_read(
    cluster: LocalCluster, kube_namespace: str
) -> None:
    assert apply(cluster, kube_namespace, VALID).returncode == 0
    planned = {"peakConnections": 42, "usableConnections": 87, "headroom": 45}
    assert patch_status(cluster, kube_namespace, planned).returncode == 0

    _, row = cluster.kubectl("-n", kube_namespace, "get", "pbud").stdout.splitlines()

    # No status.database yet: MAX prints nothing rather than a misleading number.
    assert row.split()[:4] == ["shop-db", "87", "42", "45"]


def test_status_is_validated_too(cluster: LocalCluster, kube_namespace: str) -> None:
    assert apply(cluster, kube_namespace, VALID).returncode == 0
    condition = {**STATUS["conditions"][0], "status": "Maybe", "reason": "not camel case"}

    result = patch_status(cluster, kube_namespace, {"conditions": [condition]})

    assert result.returncode != 0
    assert 'status.conditions[0].status: Unsupported value: "Maybe"' in result.stderr
    assert "status.conditions[0].reason: Invalid value" in result.stderr


def test_kubectl_get_shows_the_printer_columns(cluster: LocalCluster, kube_namespace: str) -> None:
    assert apply(cluster, kube_namespace, VALID).returncode == 0
    assert patch_status(cluster, kube_namespace, STATUS).returncode == 0

    header, row = cluster.kubectl("-n", kube_namespace, "get", "pbud").stdout.splitlines()
    wide_header, wide_row = cluster.kubectl(
        "-n", kube_namespace, "get", "pbud", "-o", "wide"
    ).stdout.splitlines()

    assert header.split() == [
        "NAME", "MAX", "USABLE", "PEAK", "HEADROOM", "LIVE", "READY", "AGE"
    ]  # fmt: skip
    assert row.split()[:7] == ["shop-db", "200", "187", "180", "7", "57", "True"]
    assert wide_header.split()[8:] == ["FEASIBLE", "REASON", "SHARE", "DB", "VERSION"]
    # shareBy is not in the applied spec: the API server's default shows.
    assert wide_row.split()[8:] == ["True", "BudgetApplied", "Worker", "16.4"]
