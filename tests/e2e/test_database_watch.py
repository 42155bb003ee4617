"""The database watch end to end: a real operator process, the local control plane, a real
PostgreSQL, and real SQLAlchemy connections from an "application" that ignores its
ConfigMap.

The target's pods run the pause image and open nothing; the test process plays the
misbehaving application: a SQLAlchemy async engine (asyncpg underneath) with the target's
application_name and a pool of its own choosing, far larger than the allocation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from tests.e2e.support import Cluster, budget, deployment
from tests.e2e.test_database import database, secret

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.postgres]

__all__ = ["database"]  # the fixture, shared with test_database.py

REFRESH_SECONDS = 5  # the smallest refreshSeconds the API allows
HELD = 5  # connections the application opens; its allocation is 2


@contextmanager
def application_ignoring_its_configmap(dsn: str, name: str, connections: int) -> Iterator[None]:
    """`connections` connections checked out of a SQLAlchemy pool sized by the application
    itself (pool_size=connections), carrying the target's application_name; idle, held
    until the block ends, then closed."""
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    with asyncio.Runner() as runner:
        engine = create_async_engine(
            url,
            pool_size=connections,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": name}},
        )

        async def check_out() -> list[AsyncConnection]:
            return [await engine.connect() for _ in range(connections)]

        held = runner.run(check_out())
        try:
            yield
        finally:

            async def close() -> None:
                for connection in held:
                    await connection.close()
                await engine.dispose()

            runner.run(close())


def healthy(ns: Cluster) -> dict[str, str]:
    return ns.condition("shop", "DatabaseHealthy") or {}


def signal_gauge(operator: OperatorProcess, namespace: str, signal: str) -> float | None:
    for key, value in operator.metrics().items():
        if (
            key.startswith("poolbudget_signals_raised{")
            and f'namespace="{namespace}"' in key
            and f'signal="{signal}"' in key
        ):
            return value
    return None


def activity_reads(operator: OperatorProcess, namespace: str) -> float:
    return sum(
        value
        for key, value in operator.metrics().items()
        if key.startswith("poolbudget_activity_reads_total{")
        and f'namespace="{namespace}"' in key
        and 'result="ok"' in key
    )


def test_an_application_over_its_allocation_is_named_within_one_refresh_and_clears(
    ns: Cluster, database: tuple[PostgresServer, str], operator_process: OperatorProcess
) -> None:
    _, dsn = database
    secret(ns, dsn)
    ns.apply(deployment("api", 1, surge=0))
    # One pod, one worker, pool_size 2, no overflow: an allocation of 2 connections.
    doc = budget("shop", [{"deploymentName": "api", "maxPoolSize": 2, "maxOverflow": 0}])
    doc["spec"]["database"] = {
        "connectionSecretRef": {"name": "shop-db", "key": "dsn"},
        "refreshSeconds": REFRESH_SECONDS,
    }
    ns.apply(doc)
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")
    wait_for(lambda: healthy(ns).get("reason") == "WithinThresholds", timeout=15,
             what="DatabaseHealthy=True before the application misbehaves")  # fmt: skip
    assert ns.allocation("shop", "api")["peakConnections"] == 2  # type: ignore[index]
    good = ns.configmap("api-db-pool")
    assert good is not None
    assert good["DB_POOL_SIZE"] == "2"

    with application_ignoring_its_configmap(dsn, "api", HELD):
        opened = time.monotonic()
        wait_for(lambda: healthy(ns).get("reason") == "OverAllocation",
                 timeout=REFRESH_SECONDS + 5, what="OverAllocation within one refresh")  # fmt: skip
        named_after = time.monotonic() - opened
        condition = healthy(ns)
        assert condition["status"] == "False"
        assert f"Deployment api holds {HELD} connections" in condition["message"]
        assert f"{HELD - 2} over its allocation of 2" in condition["message"]
        warnings = wait_for(lambda: ns.events("OverAllocation"), timeout=5, what="the Warning")
        assert len(warnings) == 1
        assert f"Deployment api holds {HELD} connections" in warnings[0]
        live = ns.allocation("shop", "api")["liveConnections"]  # type: ignore[index]
        assert (live["total"], live["idle"], live["applicationName"]) == (HELD, HELD, "api")
        assert ns.status("shop")["activity"]["connectionsInUse"] >= HELD + 1  # + the operator
        assert signal_gauge(operator_process, ns.namespace, "OverAllocation") == 1
        # The watch reports; it does not touch the plan, the ConfigMap or Ready.
        assert ns.ready("shop")
        assert ns.configmap("api-db-pool") == good
        # Still there at the next refresh: no second Warning. (Status is not rewritten when
        # only the read time moves: the reads counter shows the refresh.)
        reads = activity_reads(operator_process, ns.namespace)
        wait_for(lambda: activity_reads(operator_process, ns.namespace) > reads,
                 timeout=REFRESH_SECONDS + 5, what="one more refresh")  # fmt: skip
        assert len(ns.events("OverAllocation")) == 1

    closed = time.monotonic()
    wait_for(lambda: healthy(ns).get("status") == "True", timeout=3 * REFRESH_SECONDS + 10,
             what="cleared after three clean refreshes")  # fmt: skip
    cleared_after = time.monotonic() - closed
    # Three clean readings a refresh apart, not the first one (less a second of jitter).
    assert cleared_after >= 2 * REFRESH_SECONDS - 1
    notices = wait_for(lambda: ns.events("OverAllocationCleared"), timeout=5, what="the Normal")
    assert len(notices) == 1
    assert len(ns.events("OverAllocation")) == 1
    assert signal_gauge(operator_process, ns.namespace, "OverAllocation") == 0
    assert ns.allocation("shop", "api")["liveConnections"]["total"] == 0  # type: ignore[index]
    print(f"\nnamed after {named_after:.1f} s; cleared {cleared_after:.1f} s after closing")
