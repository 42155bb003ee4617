"""KubeGateway on kubernetes.aio against the real API server: every call the reconciler
uses, its error translation, and the write gate (`may_write`) that leader election plugs
into: a refused write is never sent, and is counted."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from devtools.localcluster import LocalCluster
from poolbudget.adapters.credentials import load_configuration
from poolbudget.adapters.kube import (
    KubeGateway,
    NotFoundError,
    NotLeaderError,
    SecretKeyMissingError,
)
from poolbudget.api.status import PoolBudgetStatus
from poolbudget.domain.decide import BudgetRef
from tests.e2e.support import Cluster, budget, deployment

pytestmark = pytest.mark.cluster


class Gate:
    """A may_write switch the test flips."""

    def __init__(self) -> None:
        self.open = True

    def __call__(self) -> bool:
        return self.open


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def kube(crd_installed: LocalCluster, gate: Gate) -> AsyncIterator[KubeGateway]:
    configuration = await load_configuration(kubeconfig=str(crd_installed.kubeconfig))
    gateway = KubeGateway(configuration, may_write=gate)
    yield gateway
    await gateway.close()


async def test_reads_and_writes_on_the_real_api_server(
    crd_installed: LocalCluster, kube_namespace: str, kube: KubeGateway
) -> None:
    ns = kube_namespace
    cluster = Cluster(crd_installed, ns)
    value = base64.b64encode(b"postgresql://u:p@db/x").decode()
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "dsn"},
            "data": {"dsn": value, "bad": base64.b64encode(b"\xff\xfe").decode()},
        }
    )
    assert await kube.read_secret_value(ns, "dsn", "dsn") == "postgresql://u:p@db/x"
    with pytest.raises(SecretKeyMissingError, match="no key 'other'"):
        await kube.read_secret_value(ns, "dsn", "other")
    with pytest.raises(SecretKeyMissingError, match="not valid base64"):
        await kube.read_secret_value(ns, "dsn", "bad")
    with pytest.raises(NotFoundError):
        await kube.read_secret_value(ns, "missing", "dsn")
    assert await kube.secret_version(ns, "missing") is None
    assert (await kube.secret_version(ns, "dsn") or "").isdigit()

    assert await kube.read_configmap(ns, "api-db-pool") is None
    await kube.apply_configmap(ns, "api-db-pool", {"DB_POOL_SIZE": "4"}, {"a": "1"}, {"b": "2"})
    view = await kube.read_configmap(ns, "api-db-pool")
    assert view is not None
    assert (dict(view.data), dict(view.labels), dict(view.annotations)) == (
        {"DB_POOL_SIZE": "4"},
        {"a": "1"},
        {"b": "2"},
    )
    managed = cluster.get("configmap", "api-db-pool", "--show-managed-fields")
    managers = [m["manager"] for m in managed["metadata"]["managedFields"]]
    assert managers == ["poolbudget-operator"]

    cluster.apply(deployment("api", 1))
    await kube.annotate_pod_template(ns, "api", {"poolbudget.dev/config-hash": "abc"})
    applied = cluster.get("deployment", "api")
    annotations = applied["spec"]["template"]["metadata"]["annotations"]
    assert annotations["poolbudget.dev/config-hash"] == "abc"

    assert not await kube.budget_exists(ns, "shop")
    cluster.apply(budget("shop", [{"deploymentName": "api", "processesPerPod": 1}]))
    assert await kube.budget_exists(ns, "shop")
    await kube.patch_budget_status(ns, "shop", PoolBudgetStatus(peak_connections=7, headroom=3))
    status = cluster.get("poolbudget", "shop")["status"]
    assert status["peakConnections"] == 7
    uid = str(cluster.get("poolbudget", "shop")["metadata"]["uid"])

    await kube.post_event(BudgetRef(ns, "shop", uid), "Warning", "BudgetInfeasible", "too many")
    events = cluster.get("events")["items"]
    posted = [e for e in events if e["reason"] == "BudgetInfeasible"]
    assert len(posted) == 1
    assert posted[0]["involvedObject"]["uid"] == uid
    assert posted[0]["source"]["component"] == "poolbudget-operator"


async def test_a_closed_write_gate_sends_nothing_and_counts_the_refusal(
    crd_installed: LocalCluster, kube_namespace: str, kube: KubeGateway, gate: Gate
) -> None:
    ns = kube_namespace
    cluster = Cluster(crd_installed, ns)

    def refused() -> float:
        labels = {"kind": "configmap", "reason": "NotLeader"}
        return REGISTRY.get_sample_value("poolbudget_api_writes_refused_total", labels) or 0.0

    def sent() -> float:
        labels = {"kind": "configmap", "namespace": ns}
        return REGISTRY.get_sample_value("poolbudget_api_writes_total", labels) or 0.0

    gate.open = False
    before_refused, before_sent = refused(), sent()
    with pytest.raises(NotLeaderError, match="may not write"):
        await kube.apply_configmap(ns, "gated", {"k": "v"}, {}, {})
    assert (refused(), sent()) == (before_refused + 1, before_sent)
    found = cluster.kubectl("get", "configmap", "gated", check=False)
    assert found.returncode != 0
    assert "NotFound" in found.stderr
    # Reads are not gated: a standby may look.
    assert await kube.read_configmap(ns, "gated") is None

    gate.open = True
    await kube.apply_configmap(ns, "gated", {"k": "v"}, {}, {})
    assert (refused(), sent()) == (before_refused + 1, before_sent + 1)
    assert cluster.configmap("gated") == {"k": "v"}
