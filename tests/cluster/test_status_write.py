"""The status write on the real API server: what the model sends is stored whole (the CRD's
status schema prunes and rejects nothing of it), and a field that vanished from the status
is gone from the server afterwards, also when the status was first written the old way (a
plain merge patch, the fields left out instead of nulled)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devtools.localcluster import LocalCluster
from poolbudget.adapters.credentials import load_configuration
from poolbudget.adapters.kube import FIELD_MANAGER, KubeGateway
from poolbudget.api.status import PoolBudgetStatus
from tests.e2e.support import Cluster, budget
from tests.unit.test_status import WRITTEN

pytestmark = pytest.mark.cluster


@pytest.fixture
async def kube(crd_installed: LocalCluster) -> AsyncIterator[KubeGateway]:
    configuration = await load_configuration(kubeconfig=str(crd_installed.kubeconfig))
    gateway = KubeGateway(configuration)
    yield gateway
    await gateway.close()


def _without_the_vanishing_fields(status: dict[str, Any]) -> dict[str, Any]:
    """The status once the role may no longer count connections nor read the version, and
    the watch is off: no serverVersion, connectionsInUse, activity or liveConnections."""
    return {
        **{k: v for k, v in status.items() if k != "activity"},
        "database": {
            k: v
            for k, v in status["database"].items()
            if k not in ("serverVersion", "connectionsInUse")
        },
        "allocations": [
            {k: v for k, v in entry.items() if k != "liveConnections"}
            for entry in status["allocations"]
        ],
    }


def _status(cluster: Cluster) -> dict[str, Any]:
    found = cluster.get("poolbudget", "shop")
    assert found is not None
    status: dict[str, Any] = found.get("status") or {}
    return status


async def test_vanished_fields_are_removed_and_the_rest_kept(
    crd_installed: LocalCluster, kube_namespace: str, kube: KubeGateway
) -> None:
    cluster = Cluster(crd_installed, kube_namespace)
    cluster.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 1}]))

    await kube.patch_budget_status(kube_namespace, "shop", PoolBudgetStatus.model_validate(WRITTEN))
    assert _status(cluster) == WRITTEN  # stored whole: nothing pruned or rejected

    after = _without_the_vanishing_fields(WRITTEN)
    assert after != WRITTEN
    await kube.patch_budget_status(kube_namespace, "shop", PoolBudgetStatus.model_validate(after))
    stored = _status(cluster)
    assert "serverVersion" not in stored["database"]
    assert "connectionsInUse" not in stored["database"]
    assert "activity" not in stored
    assert all("liveConnections" not in entry for entry in stored["allocations"])
    assert stored == after


async def test_a_status_written_the_old_way_loses_its_vanished_fields_too(
    crd_installed: LocalCluster, kube_namespace: str, kube: KubeGateway
) -> None:
    cluster = Cluster(crd_installed, kube_namespace)
    cluster.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 1}]))
    # What operators before issue 13 sent: a merge patch of the status, under our manager.
    cluster.kubectl(
        "patch", "poolbudget", "shop", "--subresource=status", "--type=merge",
        f"--field-manager={FIELD_MANAGER}", "-p", json.dumps({"status": WRITTEN}),
    )  # fmt: skip
    assert _status(cluster) == WRITTEN
    managed = cluster.get("poolbudget", "shop", "--show-managed-fields")["metadata"]
    owners = {
        (m["manager"], m["operation"], m.get("subresource")) for m in managed["managedFields"]
    }
    assert (FIELD_MANAGER, "Update", "status") in owners  # what an apply would not take over

    after = _without_the_vanishing_fields(WRITTEN)
    await kube.patch_budget_status(kube_namespace, "shop", PoolBudgetStatus.model_validate(after))
    assert _status(cluster) == after
