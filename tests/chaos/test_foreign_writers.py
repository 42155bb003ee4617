"""Another writer on a budgeted Deployment's pod template: a GitOps tool re-applying its
manifest, a person setting an env var, a controller that keeps stripping the operator's
`poolbudget.dev/config-hash` annotation. The operator must cause no restart for the first
two and, for the third, restore its annotation at most once per `minIntervalSeconds`
(the restart pacing), then settle: bounded writes, never a loop.

(A foreign key in a managed ConfigMap is tested in tests/e2e/test_operator.py.)"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess, wait_for
from tests.chaos.conftest import OUTAGE_SECONDS
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

MIN_INTERVAL_SECONDS = 10
REVISION = "deployment.kubernetes.io/revision"
REMOVE_HASH = '[{"op": "remove", "path": "/spec/template/metadata/annotations/poolbudget.dev~1config-hash"}]'  # fmt: skip


def revision(ns: Cluster) -> int:
    """The Deployment controller's count of pod templates: one more per template change
    it acted on (metadata.generation also moves when only the Deployment's annotations
    change, as a server-side apply by kubectl does)."""
    return int(ns.get("deployment", "api")["metadata"]["annotations"][REVISION])


def operator_restarts(ns: Cluster) -> int:
    return len(ns.events("RolloutRestarted"))


def quiet_for(ns: Cluster, seconds: float) -> tuple[int, int]:
    """(revision, operator restarts) after `seconds` in which neither may change."""
    before = revision(ns), operator_restarts(ns)
    time.sleep(seconds)
    after = revision(ns), operator_restarts(ns)
    assert after == before, f"(revision, restarts) went {before} -> {after} while quiet"
    return after


def test_foreign_template_writers_cause_no_restart_loop(
    crd_installed: LocalCluster, kube_namespace: str, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    ns = Cluster(crd_installed, kube_namespace)
    manifest = deployment("api", 2)
    ns.apply(manifest)
    ns.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 2}],
                    rollout={"maxConcurrent": 1, "minIntervalSeconds": MIN_INTERVAL_SECONDS}))  # fmt: skip
    operator = OperatorProcess(kubeconfig=crd_installed.kubeconfig, log_path=tmp_path / "op.log",
                               extra_args=["--namespace", kube_namespace])  # fmt: skip
    try:
        operator.start()
        wait_for(lambda: ns.settled("shop"), timeout=90, what="shop Ready, rolled out")
        desired = ns.template_hash("api")
        assert desired is not None
        start_revision, start_restarts = quiet_for(ns, 3)

        # 1. A GitOps tool re-applies the manifest it owns (which has no annotation), with
        #    client-side and server-side apply: nobody changes the template.
        for _ in range(3):
            ns.apply(manifest)
        crd_installed.kubectl("-n", kube_namespace, "apply", "--server-side",
                              "--field-manager=gitops", "-f", "-", input=manifest)  # fmt: skip
        assert quiet_for(ns, 5) == (start_revision, start_restarts)
        assert ns.template_hash("api") == desired

        # 2. A person changes the template: their rollout, none of the operator's.
        ns.kubectl("set", "env", "deployment/api", "FOREIGN_SETTING=1")
        wait_for(lambda: ns.rolled_out("api"), timeout=90, what="the foreign rollout")
        assert quiet_for(ns, 5) == (start_revision + 1, start_restarts)
        assert ns.template_hash("api") == desired

        # 3. A controller strips the operator's annotation every second: the operator puts
        #    it back, paced by minIntervalSeconds, and stops once the fight stops.
        fight_seconds = max(12.0, OUTAGE_SECONDS / 2)
        strips = 0
        deadline = time.monotonic() + fight_seconds
        while time.monotonic() < deadline:
            if ns.template_hash("api") is not None:
                ns.kubectl("patch", "deployment", "api", "--type=json", "-p", REMOVE_HASH)
                strips += 1
            time.sleep(1)
        wait_for(lambda: ns.template_hash("api") == desired and ns.settled("shop"),
                 timeout=MIN_INTERVAL_SECONDS + 90, what="the annotation restored, settled")  # fmt: skip
        final_revision, final_restarts = quiet_for(ns, 5)
        restores = final_restarts - start_restarts
        bound = math.ceil(fight_seconds / MIN_INTERVAL_SECONDS) + 1
        chaos_report.update(fight_seconds=fight_seconds, strips=strips, restores=restores,
                            restore_bound=bound, revisions=final_revision - start_revision)  # fmt: skip
        print(f"\nforeign writer stripped the hash {strips} times in {fight_seconds:.0f} s; "
              f"the operator restored it {restores} times (bound {bound})")  # fmt: skip
        assert strips >= 2, "the foreign writer never got to strip the annotation twice"
        assert 1 <= restores <= bound
        # Each restore is explained: the pods restart because of the other writer.
        assert len(ns.events("ConfigHashOverwritten")) == restores
        # Every template after step 2 is a strip or a restore: nothing else wrote. (A strip
        # undone within the controller's sync may never become a revision of its own.)
        assert start_revision + 1 < final_revision <= start_revision + 1 + strips + restores
    finally:
        operator.stop()
    assert "Traceback" not in operator.log()
