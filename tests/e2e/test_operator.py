"""The operator against the real control plane: ConfigMaps, restarts, pacing, no-ops.

These budgets take `maxConnectionsOverride`, so the database is not involved here; the
tests that need PostgreSQL are in test_database.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.operator_process import OperatorProcess, wait_for
from tests.e2e.support import Cluster, budget, deployment, kubectl_json

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def plan_cli(budget_doc: dict[str, Any], tmp_path: Path, *flags: str) -> dict[str, Any]:
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(budget_doc))
    result = subprocess.run(
        [sys.executable, "-m", "poolbudget.cli", "plan", "-f", str(path), "-o", "json", *flags],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    plan: dict[str, Any] = json.loads(result.stdout)
    return plan


def test_two_targets_get_configmaps_matching_the_plan_and_a_template_hash(
    ns: Cluster, tmp_path: Path
) -> None:
    ns.apply(deployment("api", 3))
    ns.apply(deployment("worker", 2, surge=0))
    doc = budget(
        "shop",
        [
            {"deploymentName": "api", "processesPerPod": 4, "weight": 2},
            {"deploymentName": "worker", "processesPerPod": 2, "maxPoolSize": 10},
        ],
    )
    ns.apply(doc)
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")

    expected = plan_cli(
        doc, tmp_path, "--replicas", "api=3", "--replicas", "worker=2", "--max-surge", "worker=0"
    )
    for allocation in expected["allocations"]:
        name = allocation["name"]
        data = ns.configmap(f"{name}-db-pool")
        assert data is not None
        assert int(data["DB_POOL_SIZE"]) == allocation["poolSize"]
        assert int(data["DB_MAX_OVERFLOW"]) == allocation["maxOverflow"]
        assert data["DB_APPLICATION_NAME"] == name
        assert json.loads(data["sqlalchemy.json"])["pool_size"] == allocation["poolSize"]
        status_entry = ns.allocation("shop", name)
        assert status_entry is not None
        assert ns.template_hash(name) == status_entry["configHash"]
        assert status_entry["peakConnections"] == allocation["peakConnections"]
    status = ns.status("shop")
    assert status["peakConnections"] == expected["peakConnections"]
    assert status["headroom"] == expected["headroom"]
    labels = ns.get("configmap", "api-db-pool")["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/managed-by": "poolbudget-operator",
        "poolbudget.dev/budget": "shop",
    }
    assert ns.events("ConfigMapUpdated")
    assert ns.events("RolloutRestarted")


def test_scaling_rebudgets_and_rolls_but_hpa_covered_scaling_changes_nothing(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    operator = operator_process
    ns.apply(deployment("api", 2))
    ns.apply(deployment("web", 2))
    ns.apply(
        textwrap.dedent("""\
        apiVersion: autoscaling/v2
        kind: HorizontalPodAutoscaler
        metadata: {name: web}
        spec:
          scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
          minReplicas: 2
          maxReplicas: 8
          metrics:
            - type: Resource
              resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
        """)
    )
    ns.apply(
        budget(
            "shop",
            [
                {"deploymentName": "api", "processesPerPod": 2},
                {"deploymentName": "web", "processesPerPod": 2},
            ],
        )
    )
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")
    web = ns.allocation("shop", "web")
    assert web is not None
    assert web["podsWorstCase"] == 8 + 2  # HPA max + 25% surge of 8
    api_before = ns.allocation("shop", "api")
    assert api_before is not None
    wait_for(lambda: _writes_stable(operator, ns.namespace, 2.0), timeout=60,
             what="writes to settle")  # fmt: skip
    api_sets = ns.replicasets("api")
    web_sets = ns.replicasets("web")
    web_data = ns.configmap("web-db-pool")
    writes = operator.api_writes(ns.namespace)
    reconciles = _reconciles(operator, ns.namespace)

    # Within the HPA's max the worst case is unchanged: the operator reconciles (the
    # replicas changed) and writes nothing, restarts nothing.
    ns.kubectl("scale", "deployment", "web", "--replicas=6")
    wait_for(lambda: _reconciles(operator, ns.namespace) > reconciles, timeout=30,
             what="a reconcile after scaling web")  # fmt: skip
    assert operator.api_writes(ns.namespace) == writes
    assert ns.replicasets("web") == web_sets
    assert ns.configmap("web-db-pool") == web_data

    # Scaling api (no HPA) re-budgets: its worst case grows from 3 to 8 pods, its pool
    # shrinks, and it rolls.
    ns.kubectl("scale", "deployment", "api", "--replicas=6")
    wait_for(
        lambda: (ns.allocation("shop", "api") or {}).get("podsWorstCase") == 6 + 2,
        timeout=60, what="api re-budgeted for 8 pods",
    )  # fmt: skip
    api_after = ns.allocation("shop", "api")
    assert api_after is not None
    assert api_after["poolSize"] < api_before["poolSize"]
    wait_for(
        lambda: len(ns.replicasets("api")) > len(api_sets), timeout=60, what="a new api ReplicaSet"
    )
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready again")


def _reconciles(process: OperatorProcess, namespace: str) -> float:
    return sum(
        value
        for key, value in process.metrics().items()
        if key.startswith("poolbudget_reconciles_total") and f'namespace="{namespace}"' in key
    )


def _shop_ready(ns: Cluster) -> None:
    """The common start: Deployment api (2 replicas, 4 processes) under budget shop, Ready."""
    ns.apply(deployment("api", 2))
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 4}]))
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready, rolled out")


def test_operator_restart_restarts_no_deployment(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    _shop_ready(ns)
    generation = ns.get("deployment", "api")["metadata"]["generation"]
    sets = ns.replicasets("api")

    operator_process.restart()
    # The restarted operator has reconciled when its metrics show a reconcile of this budget.
    wait_for(lambda: _reconciles(operator_process, ns.namespace) > 0, timeout=60,
             what="a reconcile after the restart")  # fmt: skip
    assert ns.get("deployment", "api")["metadata"]["generation"] == generation
    assert ns.replicasets("api") == sets
    assert ns.ready("shop")


def test_an_edited_managed_configmap_is_put_back_at_once(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    """The operator watches the ConfigMaps it manages: a hand edit of a setting it owns is
    undone within seconds (it used to wait for the budget's next wake-up: minutes with
    the default refreshSeconds), without restarting the Deployment (the settings it rolled
    out are unchanged)."""
    _shop_ready(ns)
    planned = ns.get("configmap", "api-db-pool")["data"]["DB_POOL_SIZE"]
    generation = ns.get("deployment", "api")["metadata"]["generation"]
    reads_before = operator_process.metrics().get(
        'poolbudget_configmap_reads_total{source="cache"}', 0
    )
    ns.kubectl("patch", "configmap", "api-db-pool", "--type=merge",
               "-p", '{"data": {"DB_POOL_SIZE": "99"}}')  # fmt: skip
    edited = time.monotonic()
    wait_for(lambda: ns.get("configmap", "api-db-pool")["data"]["DB_POOL_SIZE"] == planned,
             timeout=10, interval=0.1, what="the edited setting put back")  # fmt: skip
    print(f"edited DB_POOL_SIZE put back after {time.monotonic() - edited:.2f} s")
    assert ns.get("deployment", "api")["metadata"]["generation"] == generation
    # The reconcile that put it back read the ConfigMap from the watch cache, not by GET.
    reads_after = operator_process.metrics()['poolbudget_configmap_reads_total{source="cache"}']
    assert reads_after > reads_before


def test_no_writes_when_nothing_changed(ns: Cluster, operator_process: OperatorProcess) -> None:
    _shop_ready(ns)
    # Let the restart's rollout and its status updates settle.
    wait_for(lambda: _writes_stable(operator_process, ns.namespace, 3.0), timeout=60,
             what="writes to settle")  # fmt: skip
    # Only this test's namespace: the operator is shared, and budgets in namespaces that
    # earlier tests left behind may still be wound down.
    before = operator_process.api_writes(ns.namespace)
    # Events that change nothing the budget depends on: a label, an annotation on the
    # Deployment (not its template), and a no-op touch of the PoolBudget's labels.
    ns.kubectl("label", "deployment", "api", "team=payments")
    ns.kubectl("annotate", "deployment", "api", "note=hello")
    ns.kubectl("label", "poolbudget", "shop", "owner=platform")
    time.sleep(3)  # a quiet period is the thing being measured here, not a wait for a state
    assert operator_process.api_writes(ns.namespace) == before
    # Positive control: a change the budget depends on is written within the same 3 s, so
    # the quiet above is the operator's, not a counter or a window that cannot see writes.
    ns.kubectl("scale", "deployment", "api", "--replicas=5")
    wait_for(lambda: operator_process.api_writes(ns.namespace) > before, timeout=3,
             interval=0.1, what="the scale-up's writes")  # fmt: skip


def test_a_foreign_key_in_a_managed_configmap_is_left_alone(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    """Another writer's key is theirs (server-side apply keeps it); the operator neither
    removes it nor keeps re-applying the ConfigMap over it (it once did: an apply and an
    Event every second, forever)."""
    _shop_ready(ns)
    ns.kubectl("patch", "configmap", "api-db-pool", "--type=merge",
               "-p", '{"data": {"TEAM_NOTE": "ours"}}')  # fmt: skip
    generation = ns.get("deployment", "api")["metadata"]["generation"]

    def budget_events() -> int:  # the operator's, not the kubelet's late pod events
        items = ns.get("events")["items"]
        return sum(1 for e in items if e["involvedObject"]["kind"] == "PoolBudget")

    events = budget_events()
    # Wake the budget: a spec change it reconciles at once (its refresh is minutes away).
    ns.kubectl("patch", "poolbudget", "shop", "--type=merge",
               "-p", '{"spec": {"rollout": {"maxConcurrent": 3}}}')  # fmt: skip
    wait_for(
        lambda: (ns.condition("shop", "Ready") or {}).get("observedGeneration") == 2,
        timeout=30, what="the budget to reconcile its new generation",
    )  # fmt: skip
    wait_for(lambda: _writes_stable(operator_process, ns.namespace, 3.0), timeout=30,
             what="the operator to stop writing")  # fmt: skip
    assert ns.get("configmap", "api-db-pool")["data"]["TEAM_NOTE"] == "ours"
    assert ns.get("deployment", "api")["metadata"]["generation"] == generation
    assert budget_events() == events


def _writes_stable(process: OperatorProcess, namespace: str, seconds: float) -> bool:
    before = process.api_writes(namespace)
    time.sleep(seconds)
    return process.api_writes(namespace) == before


def test_infeasible_budget_keeps_the_last_good_configmap(ns: Cluster) -> None:
    ns.apply(deployment("api", 2))
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 4, "minPoolSize": 2}]))
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")
    good = ns.configmap("api-db-pool")
    # 30 replicas x 4 workers x minPoolSize 2 = 240+ connections > 187 usable.
    ns.kubectl("scale", "deployment", "api", "--replicas=30")
    wait_for(
        lambda: (ns.condition("shop", "BudgetFeasible") or {}).get("status") == "False",
        timeout=60, what="BudgetFeasible=False",
    )  # fmt: skip
    condition = ns.condition("shop", "BudgetFeasible")
    assert condition is not None
    assert condition["reason"] == "BudgetInfeasible"
    assert "short by" in condition["message"]
    assert ns.condition("shop", "Ready")["status"] == "False"  # type: ignore[index]
    assert ns.configmap("api-db-pool") == good
    assert ns.events("BudgetInfeasible")


def test_two_budgets_claiming_one_deployment(ns: Cluster) -> None:
    ns.apply(deployment("api", 1))
    ns.apply(budget("first", [{"deploymentName": "api", "processesPerPod": 2}]))
    wait_for(lambda: ns.settled("first"), timeout=60, what="PoolBudget first Ready, rolled out")
    second = budget(
        "second",
        [{"deploymentName": "api", "processesPerPod": 8, "configMapName": "api-pool-2"}],
    )
    # Its periodic re-check is an hour away: only a wake-up can make it take over below.
    second["spec"]["database"]["refreshSeconds"] = 3600
    ns.apply(second)
    wait_for(
        lambda: (ns.allocation("second", "api") or {}).get("state") == "Conflict",
        timeout=60, what="second reports a conflict",
    )  # fmt: skip
    assert ns.configmap("api-pool-2") is None
    assert ns.condition("second", "Ready")["reason"] == "TargetConflict"  # type: ignore[index]
    assert ns.events("TargetConflict")
    assert ns.ready("first"), json.dumps(ns.status("first").get("conditions"))

    # The older claim goes away: the rival is woken and takes the Deployment over.
    ns.kubectl("delete", "poolbudget", "first")
    wait_for(lambda: ns.settled("second"), timeout=30, what="second Ready once first is gone")
    assert ns.configmap("api-pool-2") is not None
    assert ns.template_hash("api") == (ns.allocation("second", "api") or {}).get("configHash")


def test_missing_deployment_is_reported_and_its_configmap_written(ns: Cluster) -> None:
    ns.apply(budget("shop", [{"deploymentName": "later", "processesPerPod": 2}]))
    wait_for(
        lambda: (ns.condition("shop", "Ready") or {}).get("reason") == "DeploymentNotFound",
        timeout=60, what="Ready=False DeploymentNotFound",
    )  # fmt: skip
    assert ns.configmap("later-db-pool") is not None
    assert ns.events("DeploymentNotFound")
    ns.apply(deployment("later", 1))
    wait_for(lambda: ns.settled("shop"), timeout=60, what="Ready once the Deployment exists")
    assert ns.template_hash("later") == (ns.allocation("shop", "later") or {}).get("configHash")


def test_deleting_the_budget_leaves_configmaps(ns: Cluster) -> None:
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 2}]))
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")
    ns.kubectl("delete", "poolbudget", "shop", "--timeout=60s")
    assert ns.get("poolbudget", "shop") is None
    assert ns.configmap("api-db-pool") is not None


def test_no_finalizer_and_the_one_earlier_builds_added_is_removed(ns: Cluster) -> None:
    """Deleting a budget, or its namespace, must not wait for the operator (it may be
    uninstalled). Earlier builds ran a Kopf daemon per budget, which put a finalizer on it."""
    ns.apply(deployment("api", 1))
    fresh = budget("fresh", [{"deploymentName": "api"}])
    legacy = budget("legacy", [{"deploymentName": "api", "configMapName": "api-legacy"}])
    legacy["metadata"]["finalizers"] = ["poolbudget.dev/finalizer"]
    ns.apply(fresh)
    ns.apply(legacy)
    wait_for(lambda: ns.settled("fresh"), timeout=60, what="PoolBudget fresh Ready")
    wait_for(lambda: not ns.get("poolbudget", "legacy")["metadata"].get("finalizers"),
             timeout=30, what="the operator to remove the old finalizer")  # fmt: skip
    assert not ns.get("poolbudget", "fresh")["metadata"].get("finalizers")


def test_a_budget_replaced_under_another_name_adopts_its_configmaps(ns: Cluster) -> None:
    """The ConfigMap a deleted budget left behind is adopted by the next budget for that
    Deployment (it used to be a TargetConflict a person had to clear by hand)."""
    ns.apply(deployment("api", 1))
    ns.apply(budget("old", [{"deploymentName": "api"}]))
    wait_for(lambda: ns.settled("old"), timeout=60, what="PoolBudget old Ready")
    ns.kubectl("delete", "poolbudget", "old", "--timeout=30s")
    ns.apply(budget("new", [{"deploymentName": "api", "processesPerPod": 2}]))
    wait_for(lambda: ns.settled("new"), timeout=60, what="PoolBudget new Ready, rolled out")
    labels = ns.get("configmap", "api-db-pool")["metadata"]["labels"]
    assert labels["poolbudget.dev/budget"] == "new"
    (message,) = ns.events("ConfigMapAdopted")
    assert "written for PoolBudget old, which no longer exists" in message


def test_health_reports_what_each_informer_holds(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    _shop_ready(ns)

    def counted() -> dict[str, Any] | None:
        informers = operator_process.health().get("informers") or {}
        held = [informers.get(f"{kind} (all namespaces)")
                for kind in ("Deployment", "PoolBudget", "ConfigMap")]  # fmt: skip
        return informers if all(isinstance(n, int) and n >= 1 for n in held) else None

    # A fresh operator may still answer "listing".
    informers = wait_for(counted, timeout=30, what="/healthz to count the cached objects")
    assert set(informers) == {
        "Deployment (all namespaces)",
        "HorizontalPodAutoscaler (all namespaces)",
        "PoolBudget (all namespaces)",
        "ConfigMap (all namespaces)",
    }
    # Only the managed ConfigMaps are kept: every namespace also has kube-root-ca.crt.
    everywhere = kubectl_json(ns.cluster.kubectl, "get", "configmaps", "-A")["items"]
    assert informers["ConfigMap (all namespaces)"] < len(everywhere)


def test_a_write_the_api_server_refuses_is_reported_on_the_budget(
    ns: Cluster, operator_process: OperatorProcess
) -> None:
    """A ResourceQuota that allows no ConfigMap: the create is refused (403 exceeded
    quota). The budget says so (Ready=False WriteRefused with the API server's words, one
    Warning Event), the Deployment is not restarted onto a ConfigMap that is not there,
    the log has no traceback loop; lifting the quota lets the next round write it."""
    ns.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-configmaps"},
            "spec": {"hard": {"count/configmaps": "0"}},
        }
    )
    ns.apply(deployment("api", 1))  # its pod waits for the ConfigMap it reads
    generation = ns.get("deployment", "api")["metadata"]["generation"]
    log_before = len(operator_process.log())
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 2}]))
    wait_for(
        lambda: (ns.condition("shop", "Ready") or {}).get("reason") == "WriteRefused",
        timeout=60, what="Ready=False WriteRefused",
    )  # fmt: skip
    ready = ns.condition("shop", "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert "exceeded quota" in ready["message"], ready["message"]
    allocation = ns.allocation("shop", "api") or {}
    assert allocation.get("state") == "Pending"
    assert "refused" in allocation.get("message", "")
    time.sleep(3)  # a few more rounds (it looks again every second after a write)
    assert len(ns.events("WriteRefused")) == 1
    assert ns.configmap("api-db-pool") is None
    assert ns.get("deployment", "api")["metadata"]["generation"] == generation
    # The log is shared with other tests (whose namespaces may be going away): only the
    # records about this namespace count.
    records = re.split(r"\n(?=\[20)", operator_process.log()[log_before:])
    assert not [r for r in records if "Traceback" in r and ns.namespace in r]
    assert [r for r in records if "the API server refused" in r and ns.namespace in r]

    ns.kubectl("delete", "resourcequota", "no-configmaps")
    wait_for(lambda: ns.settled("shop"), timeout=60, what="shop settled once the quota is gone")
    assert ns.configmap("api-db-pool") is not None
