"""The gateway's write gate without a cluster: a refused write never reaches the network.

The gateway points at a port nothing listens on, so anything actually sent fails with a
connection error (KubeError); a refusal is NotLeaderError, raised before any I/O. The
cluster test (tests/cluster/test_kube_gateway.py) checks the same against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kubernetes.aio.client import Configuration

from poolbudget import metrics
from poolbudget.adapters.kube import KubeError, KubeGateway, NotLeaderError
from poolbudget.api.status import PoolBudgetStatus
from poolbudget.domain.decide import BudgetRef


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[KubeGateway, list[bool]]]:
    allowed = [False]
    kube = KubeGateway(
        Configuration(host="https://127.0.0.1:9"), may_write=lambda: allowed[0], timeout=2
    )
    yield kube, allowed
    await kube.close()


def _refused(kind: str) -> float:
    return float(metrics.API_WRITES_REFUSED.labels(kind=kind, reason="NotLeader")._value.get())


async def test_every_write_is_refused_before_sending(
    gateway: tuple[KubeGateway, list[bool]],
) -> None:
    kube, _ = gateway
    writes = {
        "configmap": kube.apply_configmap("ns", "cm", {}, {}, {}),
        "deployment": kube.annotate_pod_template("ns", "api", {"a": "b"}),
        "status": kube.patch_budget_status("ns", "shop", PoolBudgetStatus()),
        "event": kube.post_event(BudgetRef("ns", "shop", "uid"), "Normal", "R", "m"),
    }
    for kind, write in writes.items():
        before = _refused(kind)
        with pytest.raises(NotLeaderError, match="not sent"):
            await write
        assert _refused(kind) == before + 1


async def test_an_open_gate_sends(gateway: tuple[KubeGateway, list[bool]]) -> None:
    kube, allowed = gateway
    allowed[0] = True
    before = _refused("configmap")
    with pytest.raises(KubeError) as raised:
        await kube.apply_configmap("ns", "cm", {}, {}, {})
    assert not isinstance(raised.value, NotLeaderError)  # it was sent, and could not connect
    assert _refused("configmap") == before
