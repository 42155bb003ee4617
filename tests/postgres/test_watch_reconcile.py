"""The database watch through a whole reconcile, on real PostgreSQL 15 and 16.

The reconciler runs with in-memory Kubernetes (tests/unit's FakeKube) and the real
DatabaseProbe, as the operator builds it; an "application" that ignores its ConfigMap is a
real SQLAlchemy async engine (asyncpg underneath) of its own role, with the target's
application_name and a pool larger than its allocation. The operator's role is either the
plain `monitor` (it then sees the application's sessions without their state) or a role
granted pg_monitor (it sees everything).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from poolbudget.adapters.postgres import DatabaseProbe
from poolbudget.api.status import (
    Allocation,
    Condition,
    ConditionStatus,
    LiveConnections,
    PoolBudgetStatus,
    Visibility,
)
from poolbudget.domain.cluster_view import Observed
from poolbudget.domain.observe import DeploymentState
from poolbudget.reconcile import BudgetMemory, BudgetObject, Reconciler
from tests.fixtures.postgres import Database
from tests.unit.test_reconcile import FakeKube

pytestmark = pytest.mark.postgres

APP_PASSWORD = "watch-app-pw-6113"
WATCHER_PASSWORD = "watch-watcher-pw-2209"
NOW = datetime(2026, 12, 6, 6, 0, tzinfo=UTC)


class Operator:
    """One budget's reconciles, a refresh apart each (the clock is the test's)."""

    def __init__(self, dsn: str, stack: AsyncExitStack) -> None:
        self.kube = FakeKube(secrets={"shop-db": dsn})
        self.memory = BudgetMemory()
        self.time = 1000.0
        self.status = PoolBudgetStatus()
        self.stack = stack
        # The hash on api's pod template: the one the operator restarted it with, as if the
        # rollout finished at once (a target still rolling out is not judged).
        self.template_hash: str | None = None
        self.reconciler = Reconciler(
            kube=self.kube, prober_factory=self._prober, clock=lambda: NOW,
            monotonic=lambda: self.time,
        )  # fmt: skip

    def _prober(self, dsn: str) -> DatabaseProbe:
        probe = DatabaseProbe(dsn)
        self.stack.push_async_callback(probe.close)
        return probe

    async def refresh(self) -> None:
        self.time += 61
        spec = {
            "database": {"connectionSecretRef": {"name": "shop-db"}, "refreshSeconds": 60},
            "targets": [{"deploymentName": "api", "maxPoolSize": 1, "maxOverflow": 0}],
        }
        budget = BudgetObject(namespace="shop", name="shop", uid="u1", generation=1,
                              created="2026-01-01T00:00:00Z", spec=spec, status=self.status.to_body())  # fmt: skip
        api = DeploymentState(name="api", replicas=1, max_surge=None, recreate=False,
                              template_hash=self.template_hash, rolling=False, unobserved=False,
                              stalled=False)  # fmt: skip
        observed = Observed(deployments={("shop", "api"): api}, hpa_max_replicas={}, claims={})
        self.status = (
            await self.reconciler.reconcile(budget, lambda: observed, self.memory)
        ).status
        self.template_hash = self.api().config_hash

    def api(self) -> Allocation:
        found = self.status.allocation("api")
        assert found is not None
        return found

    def live(self) -> LiveConnections:
        live = self.api().live_connections
        assert live is not None
        return live

    def healthy(self) -> Condition:
        found = self.status.condition("DatabaseHealthy")
        assert found is not None
        return found

    def events(self, prefix: str) -> list[tuple[str, str, str]]:
        return [e for e in self.kube.events if e[1].startswith(prefix)]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


async def hold(
    stack: AsyncExitStack, url: str, name: str, count: int
) -> tuple[AsyncEngine, list[AsyncConnection]]:
    """`count` idle connections checked out of a pool the application sized itself."""
    engine = create_async_engine(
        url, pool_size=count, max_overflow=0,
        connect_args={"server_settings": {"application_name": name}},
    )  # fmt: skip
    stack.push_async_callback(engine.dispose)
    return engine, [await engine.connect() for _ in range(count)]


@pytest.mark.parametrize("observer", ["plain-role", "pg_monitor"])
async def test_an_application_over_its_allocation_is_named_then_cleared(
    own_pg: Database, stack: AsyncExitStack, observer: str
) -> None:
    server = own_pg.server
    server.create_role("watch_app", APP_PASSWORD)
    dsn = own_pg.dsn
    if observer == "pg_monitor":
        dsn = server.create_role("watch_watcher", WATCHER_PASSWORD, database=None)
        dsn = dsn.rsplit("/", 1)[0] + "/shop"
        server.sql("GRANT pg_monitor TO watch_watcher")
    operator = Operator(dsn, stack)
    await operator.refresh()
    assert operator.healthy().reason == "WithinThresholds"
    peak = operator.api().peak_connections
    assert peak is not None
    assert operator.live().total == 0

    app_url = server.dsn("watch_app", APP_PASSWORD, "shop").replace(
        "postgresql://", "postgresql+asyncpg://"
    )
    engine, held = await hold(stack, app_url, "api", peak + 2)
    await operator.refresh()
    healthy = operator.healthy()
    assert (healthy.status, healthy.reason) == (ConditionStatus.FALSE, "OverAllocation")
    assert f"Deployment api holds {peak + 2} connections" in healthy.message
    assert f"2 over its allocation of {peak}" in healthy.message
    assert [e[:2] for e in operator.events("OverAllocation")] == [("Warning", "OverAllocation")]
    live = operator.live()
    activity = operator.status.activity
    assert activity is not None
    assert live.total == peak + 2
    assert activity.operator_connections == 1
    assert activity.connections_in_use == peak + 3
    if observer == "pg_monitor":
        assert (live.idle, live.unknown, activity.visibility) == (peak + 2, 0, Visibility.FULL)
    else:  # another role's sessions: counted, their state hidden
        assert (live.idle, live.unknown, activity.visibility) == (0, peak + 2, Visibility.PARTIAL)
        assert "grant pg_monitor" in healthy.message
    assert operator.status.conditions is not None
    assert operator.status.conditions[0].type == "Ready"
    assert operator.kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"] == "1"

    for connection in held:
        await connection.close()  # back to the pool, which keeps them open ...
    await engine.dispose()  # ... until the application shuts it down
    for _ in range(3):
        assert operator.healthy().status is ConditionStatus.FALSE
        await operator.refresh()
    assert operator.healthy().status is ConditionStatus.TRUE
    assert [e[:2] for e in operator.events("OverAllocation")] == [
        ("Warning", "OverAllocation"),
        ("Normal", "OverAllocationCleared"),
    ]
