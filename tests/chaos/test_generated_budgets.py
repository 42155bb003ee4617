"""Generated PoolBudgets, valid and not, sent through the real API server to a running
operator: each is rejected at admission naming a field, or admitted and reported in its
status (a Ready condition for its generation). The operator never crashes, and a budget
beside them keeps being served. (Three such specs were once admitted and reported
nowhere: timeouts below a millisecond.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess, wait_for
from tests.chaos.conftest import TRIALS
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]


# A valid spec, then (half the time) one field set to a value at or beyond its edge: every
# field wrong at once would only ever test the first check that fires.
def valid_specs() -> st.SearchStrategy[dict[str, Any]]:
    target = st.fixed_dictionaries(
        {"deploymentName": st.sampled_from(["api", "web", "gen-target"])},
        optional={
            "processesPerPod": st.integers(1, 8), "weight": st.integers(1, 5),
            "minPoolSize": st.integers(1, 3), "maxOverflow": st.integers(0, 10),
        },
    )  # fmt: skip
    return st.fixed_dictionaries(
        {
            "database": st.fixed_dictionaries({"maxConnectionsOverride": st.integers(20, 500)}),
            "targets": st.lists(
                target, min_size=1, max_size=3, unique_by=lambda t: t["deploymentName"]
            ),
        },
        optional={
            "reservedConnections": st.integers(0, 20),
            "defaults": st.fixed_dictionaries(
                {},
                optional={
                    "poolTimeoutSeconds": st.sampled_from([0.001, 0.0015, 0.25, 2.5, 30]),
                    "commandTimeoutSeconds": st.sampled_from([0.001, 0.5, 10, 86400]),
                    "poolRecycleSeconds": st.sampled_from([-1, 1, 1800]),
                },
            ),
            "rollout": st.fixed_dictionaries(
                {},
                optional={
                    "strategy": st.sampled_from(["RollingRestart", "None"]),
                    "maxConcurrent": st.integers(1, 3),
                },
            ),
        },
    )


EDGES: list[tuple[tuple[str | int, ...], Any]] = [
    (("database", "maxConnectionsOverride"), 0),
    (("database", "maxConnectionsOverride"), 3),
    (("database", "maxConnectionsOverride"), 2**31),
    (("reservedConnections",), -1),
    (("reservedConnections",), 10_000),
    (("defaults", "poolTimeoutSeconds"), 1e-9),
    (("defaults", "poolTimeoutSeconds"), 0.00005),
    (("defaults", "poolTimeoutSeconds"), 0),
    (("defaults", "commandTimeoutSeconds"), 0.00001),
    (("defaults", "commandTimeoutSeconds"), 1e12),
    (("defaults", "poolRecycleSeconds"), 0),
    (("defaults", "maxOverflow"), -1),
    (("rollout", "strategy"), "Sometimes"),
    (("rollout", "maxConcurrent"), 0),
    (("pooling",), "Magic"),
    (("targets",), []),
    (("targets", 0, "deploymentName"), "Bad_Name"),
    (("targets", 0, "deploymentName"), ""),
    (("targets", 0, "processesPerPod"), 0),
    (("targets", 0, "processesPerPod"), 10**6),
    (("targets", 0, "minPoolSize"), 500),
    (("targets", 0, "maxPoolSize"), 0),
    (("targets", 0, "weight"), 0),
    (("targets", 0, "configMapName"), "Bad Name"),
    (("targets", 0, "applicationName"), "é" * 40),
]


def with_edge(
    spec: dict[str, Any], edge: tuple[tuple[str | int, ...], Any] | None
) -> dict[str, Any]:
    if edge is None:
        return spec
    path, value = edge
    node: Any = spec
    for step in path[:-1]:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    node[path[-1]] = value
    return spec


def specs() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(with_edge, valid_specs(), st.one_of(st.none(), st.sampled_from(EDGES)))


def reported(ns: Cluster, name: str) -> bool:
    found = ns.get("poolbudget", name)
    generation = found["metadata"]["generation"]
    conditions = (found.get("status") or {}).get("conditions") or []
    return any(
        c["type"] == "Ready" and c.get("observedGeneration") == generation for c in conditions
    )


def test_every_generated_budget_is_rejected_or_reported(
    crd_installed: LocalCluster, kube_namespace: str, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    ns = Cluster(crd_installed, kube_namespace)
    ns.apply(deployment("api", 1))
    ns.apply(budget("canary", [{"deploymentName": "api"}]))
    operator = OperatorProcess(kubeconfig=crd_installed.kubeconfig, log_path=tmp_path / "op.log",
                               extra_args=["--namespace", kube_namespace])  # fmt: skip
    counts = {"rejected": 0, "admitted_and_reported": 0}
    slowest = 0.0

    @settings(max_examples=TRIALS * 10, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(spec=specs())
    def check(spec: dict[str, Any]) -> None:
        nonlocal slowest
        document = {"apiVersion": "poolbudget.dev/v1alpha1", "kind": "PoolBudget",
                    "metadata": {"name": "generated"}, "spec": spec}  # fmt: skip
        applied = crd_installed.kubectl("-n", kube_namespace, "apply", "-f", "-",
                                        input=yaml.safe_dump(document), check=False)  # fmt: skip
        if applied.returncode != 0:
            assert "spec" in applied.stderr, applied.stderr  # names the field
            counts["rejected"] += 1
            return
        try:
            began = time.monotonic()
            wait_for(lambda: reported(ns, "generated"), timeout=20,
                     what=f"a status for the admitted spec {json.dumps(spec)}")  # fmt: skip
            slowest = max(slowest, time.monotonic() - began)
            counts["admitted_and_reported"] += 1
        finally:
            ns.kubectl("delete", "poolbudget", "generated", "--wait=true")
        assert operator.running, operator.log()[-3000:]

    try:
        operator.start()
        wait_for(lambda: ns.settled("canary"), timeout=90, what="the canary Ready")
        check()
        # The canary is still served: it re-budgets a scale-up.
        ns.kubectl("scale", "deployment", "api", "--replicas=2")
        wait_for(lambda: (ns.allocation("canary", "api") or {}).get("podsWorstCase") == 3,
                 timeout=60, what="the canary to follow a scale-up")  # fmt: skip
        assert operator.running
        assert "Traceback" not in operator.log(), operator.log()[-3000:]
    finally:
        operator.stop()
        chaos_report.update(**counts, slowest_report_seconds=round(slowest, 2))
