"""The operator SIGKILLed at a random moment of a change, most often between writing the
ConfigMap and patching the Deployment's template: once restarted, every effective change
must have rolled the Deployment exactly once (never zero: pods on old settings; never twice:
a needless restart of every pod)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess, wait_for
from tests.chaos.conftest import TRIALS
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

REVISION = "deployment.kubernetes.io/revision"


def revision(ns: Cluster) -> int:
    return int(ns.get("deployment", "api")["metadata"]["annotations"][REVISION])


def test_killed_mid_change_each_change_rolls_out_exactly_once(
    crd_installed: LocalCluster, kube_namespace: str, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    ns = Cluster(crd_installed, kube_namespace)
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 2}]))
    operator = OperatorProcess(kubeconfig=crd_installed.kubeconfig, log_path=tmp_path / "op.log",
                               extra_args=["--namespace", kube_namespace])  # fmt: skip
    rng = random.Random(20261203)
    delays: list[float] = []
    rollouts: list[int] = []
    try:
        operator.start()
        wait_for(lambda: ns.settled("shop"), timeout=90, what="shop Ready, rolled out")
        for trial in range(1, TRIALS + 1):
            before = revision(ns)
            pool_before = (ns.allocation("shop", "api") or {})["poolSize"]
            # 4 workers share 187 - 4 * trial connections: every step shrinks the pool.
            ns.kubectl("patch", "poolbudget", "shop", "--type=merge",
                       "-p", f'{{"spec": {{"reservedConnections": {10 + 4 * trial}}}}}')  # fmt: skip
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            operator.kill()
            operator.start()

            def applied(pool_before: int = pool_before) -> bool:
                allocation = ns.allocation("shop", "api") or {}
                return bool(
                    allocation.get("poolSize", pool_before) < pool_before
                    and ns.settled("shop")
                    and ns.template_hash("api") == allocation.get("configHash")
                )

            wait_for(applied, timeout=120, what=f"trial {trial}: the change applied")
            delays.append(round(delay, 3))
            rollouts.append(revision(ns) - before)
    finally:
        operator.stop()
        chaos_report.update(trials=TRIALS, kill_after_seconds=delays, rollouts_per_change=rollouts)
    assert rollouts == [1] * TRIALS, f"rollouts per change: {rollouts} (kills after {delays} s)"
