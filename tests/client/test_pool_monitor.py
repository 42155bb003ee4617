"""poolbudget.pool_monitor on real SQLAlchemy async engines against real PostgreSQL.

pool_size 2 + max_overflow 1: holding 3 connections saturates the pool and uses its
overflow; a 4th checkout waits (and, with a short pool_timeout, gives up). Each test drives
`check()` itself, one sample at a time, so nothing depends on the background task's timing
except the test that runs it through `async with`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from poolbudget.pool_monitor import PoolMonitor
from tests.fixtures.postgres import Database

pytestmark = pytest.mark.postgres


@pytest.fixture
async def engine(pg: Database) -> AsyncIterator[AsyncEngine]:
    url = pg.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url, pool_size=2, max_overflow=1, pool_timeout=0.3)
    try:
        yield engine
    finally:
        await engine.dispose()


def signals(caplog: pytest.LogCaptureFixture, level: int) -> list[tuple[str, str]]:
    return [
        (r.pool_signal, r.pool_action)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "test.pool" and r.levelno == level and hasattr(r, "pool_signal")
    ]


def value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"application_name": "api-web"})


async def hold(engine: AsyncEngine, n: int) -> list[AsyncConnection]:
    held = [await engine.connect() for _ in range(n)]
    for connection in held:
        await connection.execute(text("SELECT 1"))
    return held


async def test_a_full_pool_warns_once_then_clears_once_with_metrics(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.pool")
    registry = CollectorRegistry()
    monitor = PoolMonitor(engine, logger=logging.getLogger("test.pool"), metrics=registry,
                          application_name="api-web", repeat_every=10)  # fmt: skip
    try:
        monitor.check()
        assert signals(caplog, logging.WARNING) == []
        assert value(registry, "poolbudget_client_pool_capacity") == 3
        held = await hold(engine, 3)
        for _ in range(3):  # the state lasts three samples: one warning each, not three
            monitor.check()
        assert sorted(signals(caplog, logging.WARNING)) == [
            ("overflow", "warn"),
            ("saturated", "warn"),
        ]
        warning = next(r for r in caplog.records if getattr(r, "pool_signal", "") == "saturated")
        assert warning.checked_out == 3  # type: ignore[attr-defined]
        assert warning.application_name == "api-web"  # type: ignore[attr-defined]
        assert "3 of 3 connections checked out" in warning.getMessage()
        assert value(registry, "poolbudget_client_pool_size") == 2
        assert value(registry, "poolbudget_client_pool_checked_out") == 3
        assert value(registry, "poolbudget_client_pool_overflow_in_use") == 1
        assert value(registry, "poolbudget_client_pool_checkout_waits_total") == 0
        for connection in held:
            await connection.close()  # the overflow connection is closed, not kept
        monitor.check()
        monitor.check()
        assert sorted(signals(caplog, logging.INFO)) == [
            ("overflow", "clear"),
            ("saturated", "clear"),
        ]
        assert value(registry, "poolbudget_client_pool_checked_out") == 0
        assert value(registry, "poolbudget_client_pool_overflow_in_use") == 0
    finally:
        await monitor.stop()


async def test_checkouts_that_wait_are_counted_and_timeouts_too(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.pool")
    registry = CollectorRegistry()
    monitor = PoolMonitor(engine, logger=logging.getLogger("test.pool"), metrics=registry,
                          application_name="api-web")  # fmt: skip
    try:
        monitor.check()  # wraps the pool's connect
        held = await hold(engine, 3)
        # A 4th checkout waits: one gets its connection when another is returned, ...
        waiter = asyncio.create_task(hold(engine, 1))
        await asyncio.sleep(0.05)
        await held.pop().close()
        got = await waiter
        # ... one gives up after pool_timeout (0.3 s).
        with pytest.raises(sa_exc.TimeoutError):
            await engine.connect()
        sample = monitor.check()
        assert sample is not None
        assert (sample.waits, sample.timeouts) == (2, 1)
        assert ("waits", "warn") in signals(caplog, logging.WARNING)
        assert value(registry, "poolbudget_client_pool_checkout_waits_total") == 2
        assert value(registry, "poolbudget_client_pool_checkout_timeouts_total") == 1
        for connection in held + got:
            await connection.close()
        sample = monitor.check()  # counts are per sample: nothing waited since
        assert sample is not None
        assert (sample.waits, sample.timeouts) == (0, 0)
        assert ("waits", "clear") in signals(caplog, logging.INFO)
        # A checkout into a pool with room is not a wait.
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        assert value(registry, "poolbudget_client_pool_checkout_waits_total") == 2
    finally:
        await monitor.stop()
    assert "connect" not in vars(engine.pool)  # stop() unwrapped the pool


async def test_the_task_samples_on_its_own_in_a_lifespan(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.pool")
    async with PoolMonitor(engine, interval=0.05, logger=logging.getLogger("test.pool"),
                           application_name="api-web"):  # fmt: skip
        held = await hold(engine, 3)
        for _ in range(100):
            if ("saturated", "warn") in signals(caplog, logging.WARNING):
                break
            await asyncio.sleep(0.02)
        for connection in held:
            await connection.close()
        for _ in range(100):
            if ("saturated", "clear") in signals(caplog, logging.INFO):
                break
            await asyncio.sleep(0.02)
    assert signals(caplog, logging.WARNING).count(("saturated", "warn")) == 1
    assert ("saturated", "clear") in signals(caplog, logging.INFO)
    assert "connect" not in vars(engine.pool)
