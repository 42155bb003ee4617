"""The activity query against real PostgreSQL 15 and 16, with real SQLAlchemy clients.

A fleet of two applications connects as its own role `activity_app` through SQLAlchemy
async engines (asyncpg underneath), each with its application_name, the way a target's
pods do with their ConfigMap. Two observers read pg_stat_activity through DatabaseProbe:
the fixture's plain role `monitor`, and `activity_watcher`, granted pg_monitor. The roles
and the table are created once per session server, under names no other test uses; every
application_name is this module's own, so other sessions on the shared server do not
disturb the counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from poolbudget.adapters.postgres import (
    APPLICATION_NAME,
    CLIENT_TIMEOUT_MARGIN_SECONDS,
    DatabaseProbe,
    DatabaseProbeError,
    DatabaseTimeoutError,
)
from poolbudget.domain.activity import (
    OPERATOR_APPLICATION_NAME,
    BudgetUsage,
    DatabaseActivity,
    Signal,
    SignalKind,
    SignalSettings,
    SignalState,
    StateCounts,
    TargetAllocation,
    budget_usage,
    count_states,
    evaluate_signals,
)
from tests.fixtures.postgres import MONITOR_PASSWORD, Database

pytestmark = pytest.mark.postgres

APP_PASSWORD = "fleet-app-pw-4417"
WATCHER_PASSWORD = "watcher-pw-9023"
API, JOBS = "fleet-api", "fleet-jobs"
STALE_AFTER_SECONDS = 1.0
WAIT_SECONDS = 8.0
# Budget-wide signals (capacity, lock waits) see the whole shared server: a usable figure
# this large keeps the capacity signal out of tests that are not about it.
LARGE_USABLE = 10_000


@dataclass(frozen=True)
class Fleet:
    database: Database
    app_url: str  # SQLAlchemy URL of the fleet's own role
    watcher_dsn: str  # a role granted pg_monitor


@pytest.fixture
def fleet(pg: Database) -> Fleet:
    server = pg.server
    if server.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'activity_app'") == "0":
        server.create_role("activity_app", APP_PASSWORD)
        server.create_role("activity_watcher", WATCHER_PASSWORD)
        server.sql("GRANT pg_monitor TO activity_watcher")
        server.sql(
            "CREATE TABLE activity_items (id int PRIMARY KEY, n int NOT NULL);"
            " INSERT INTO activity_items VALUES (1, 0);"
            " GRANT SELECT, UPDATE ON activity_items TO activity_app",
            database="shop",
        )
    app_dsn = server.dsn("activity_app", APP_PASSWORD, "shop")
    return Fleet(
        database=pg,
        app_url=app_dsn.replace("postgresql://", "postgresql+asyncpg://"),
        watcher_dsn=server.dsn("activity_watcher", WATCHER_PASSWORD, "shop"),
    )


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


async def engine(stack: AsyncExitStack, url: str, name: str) -> AsyncEngine:
    """A pool like a target's pod would build from its ConfigMap; disposed at the end."""
    created = create_async_engine(
        url,
        pool_size=8,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": name, "lock_timeout": "20s"}},
    )
    stack.push_async_callback(created.dispose)
    return created


async def probe(stack: AsyncExitStack, dsn: str) -> DatabaseProbe:
    opened = DatabaseProbe(dsn)
    stack.push_async_callback(opened.close)
    return opened


async def checked_out(stack: AsyncExitStack, pool: AsyncEngine) -> AsyncConnection:
    connection = await pool.connect()
    stack.push_async_callback(connection.close)
    return connection


def of(activity: DatabaseActivity, name: str) -> StateCounts:
    return count_states(row for row in activity.rows if row.application_name == name)


async def until(
    read: Callable[[], Awaitable[DatabaseActivity]],
    check: Callable[[DatabaseActivity], bool],
    what: str,
) -> DatabaseActivity:
    """Read until the check holds (pg_stat_activity shows a state change at once, but a
    waiter reaches its lock a moment after the query is sent)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        activity = await read()
        if check(activity):
            return activity
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {activity.rows}")
        await asyncio.sleep(0.05)


async def test_idle_active_idle_in_transaction_stale_and_unbudgeted_are_told_apart(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    watcher = await probe(stack, fleet.watcher_dsn)
    api, jobs = await engine(stack, fleet.app_url, API), await engine(stack, fleet.app_url, JOBS)

    # Three of api's connections checked out at once, used, returned: idle in its pool.
    held = [await checked_out(stack, api) for _ in range(3)]
    for connection in held:
        await connection.execute(text("SELECT 1"))
        await connection.close()
    # jobs runs a statement and leaves its transaction open (SQLAlchemy began it).
    forgotten = await checked_out(stack, jobs)
    await forgotten.execute(text("SELECT 1"))
    left_open_at = time.monotonic()
    # A client nobody budgeted for.
    mystery = await asyncpg.connect(
        fleet.app_url.replace("+asyncpg", ""), server_settings={"application_name": "fleet-mystery"}
    )
    stack.push_async_callback(mystery.close)

    async def sleep_on(pool: AsyncEngine) -> None:
        async with pool.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(1.5)"))

    sleepers = [asyncio.create_task(sleep_on(api)) for _ in range(2)]
    try:
        seen = await until(
            lambda: watcher.activity(STALE_AFTER_SECONDS),
            lambda a: of(a, API).active == 2,
            "api's two sleepers to be active",
        )
    finally:
        await asyncio.gather(*sleepers)
    assert of(seen, API) == StateCounts(active=2, idle=1)  # 3 pooled: 2 now sleep, 1 waits
    assert of(seen, JOBS).idle_in_transaction == 1
    if time.monotonic() - left_open_at < STALE_AFTER_SECONDS:
        assert of(seen, JOBS).stale_in_transaction == 0
    assert of(seen, "fleet-mystery") == StateCounts(idle=1)
    assert not seen.partial_visibility  # pg_monitor sees every state
    assert of(seen, OPERATOR_APPLICATION_NAME).active >= 1  # the watcher's own query

    stale = await until(
        lambda: watcher.activity(STALE_AFTER_SECONDS),
        lambda a: of(a, JOBS).stale_in_transaction == 1,
        "jobs' open transaction to become stale",
    )
    assert time.monotonic() - left_open_at >= STALE_AFTER_SECONDS
    assert of(stale, API) == StateCounts(idle=3)
    assert of(stale, JOBS) == StateCounts(idle_in_transaction=1, stale_in_transaction=1)

    targets = (
        TargetAllocation(deployment_name="api", application_name=API, allocation=2),
        TargetAllocation(deployment_name="jobs", application_name=JOBS, allocation=4),
    )
    usage = budget_usage(stale, targets, LARGE_USABLE)
    assert [
        u.application_name for u in usage.unbudgeted if u.application_name.startswith("fleet")
    ] == ["fleet-mystery"]
    assert usage.operator.total >= 1
    raised = {s.key: s for s in evaluate_signals(usage, SignalState(), SignalSettings()).raised_now}
    assert "api holds 3 connections" in raised[(SignalKind.OVER_ALLOCATION, "api")].message
    assert "1 over its allocation of 2" in raised[(SignalKind.OVER_ALLOCATION, "api")].message
    assert "fleet-jobs" in raised[(SignalKind.STALE_TRANSACTIONS, JOBS)].message


async def test_a_plain_role_sees_names_of_other_roles_sessions_but_not_their_state(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    plain = await probe(stack, fleet.database.dsn)  # `monitor`, no grants
    watcher = await probe(stack, fleet.watcher_dsn)
    jobs = await engine(stack, fleet.app_url, JOBS)
    forgotten = await checked_out(stack, jobs)
    await forgotten.execute(text("SELECT 1"))
    # The monitoring role's own sessions are its to see, whatever their name.
    same_role = await asyncpg.connect(
        fleet.database.dsn, server_settings={"application_name": "fleet-same-role"}
    )
    stack.push_async_callback(same_role.close)
    same_role_transaction = same_role.transaction()
    await same_role_transaction.start()
    stack.push_async_callback(same_role_transaction.rollback)
    await same_role.execute("SELECT 1")

    await watcher.activity(60)  # both observers connected before either counts
    by_plain = await plain.activity(60)
    by_watcher = await watcher.activity(60)

    assert of(by_plain, JOBS) == StateCounts(unknown=1)  # counted by name, state hidden
    assert by_plain.partial_visibility
    assert of(by_plain, "fleet-same-role") == StateCounts(idle_in_transaction=1)
    assert of(by_plain, APPLICATION_NAME).active >= 1  # its own query, fully visible

    assert of(by_watcher, JOBS) == StateCounts(idle_in_transaction=1)
    assert of(by_watcher, "fleet-same-role") == StateCounts(idle_in_transaction=1)
    assert not by_watcher.partial_visibility
    # Both count the same connections; only the states differ.
    assert sum(r.connections for r in by_plain.rows) == sum(r.connections for r in by_watcher.rows)


async def test_a_held_row_lock_with_three_waiters_raises_the_signal_and_clears_after(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    watcher = await probe(stack, fleet.watcher_dsn)
    plain = await probe(stack, fleet.database.dsn)
    api = await engine(stack, fleet.app_url, API)
    targets = (TargetAllocation(deployment_name="api", application_name=API, allocation=8),)
    thresholds = SignalSettings()

    async def observe(reader: DatabaseProbe = watcher) -> BudgetUsage:
        return budget_usage(await reader.activity(STALE_AFTER_SECONDS), targets, LARGE_USABLE)

    holder = await checked_out(stack, api)
    holding = await holder.begin()
    await holder.execute(text("SELECT n FROM activity_items WHERE id = 1 FOR UPDATE"))

    async def wait_for_the_row() -> None:
        async with api.begin() as connection:
            await connection.execute(text("SELECT n FROM activity_items WHERE id = 1 FOR UPDATE"))

    waiters = [asyncio.create_task(wait_for_the_row()) for _ in range(3)]
    try:
        seen = await until(
            lambda: watcher.activity(STALE_AFTER_SECONDS),
            lambda a: of(a, API).lock_waits == 3,
            "three sessions waiting on the row lock",
        )
        assert of(seen, API).active == 3  # a waiting session is active
        state = SignalState()
        result = evaluate_signals(budget_usage(seen, targets, LARGE_USABLE), state, thresholds)
        (lock,) = [s for s in result.raised_now if s.kind is SignalKind.LOCK_WAITS]
        assert f"{API} 3" in lock.message
        state = result.state
        # The plain role sees neither the waits nor the holder's state: partial, no signal.
        blind = await observe(plain)
        assert blind.lock_waits == 0
        assert blind.partial_visibility
    finally:
        await holding.commit()
        await asyncio.gather(*waiters)

    cleared: tuple[Signal, ...] = ()
    for _ in range(thresholds.clear_after_clean_observations):
        calm = await observe()
        assert calm.targets[0].live.lock_waits == 0
        result = evaluate_signals(calm, state, thresholds)
        state, cleared = result.state, result.cleared_now
    assert [s.kind for s in cleared] == [SignalKind.LOCK_WAITS]
    assert state.raised == ()


async def test_a_stale_transaction_raises_its_signal_and_clears_once_it_ends(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    watcher = await probe(stack, fleet.watcher_dsn)
    jobs = await engine(stack, fleet.app_url, JOBS)
    targets = (TargetAllocation(deployment_name="jobs", application_name=JOBS, allocation=8),)
    thresholds = SignalSettings(stale_transaction_seconds=STALE_AFTER_SECONDS)

    forgotten = await checked_out(stack, jobs)
    await forgotten.execute(text("SELECT 1"))
    seen = await until(
        lambda: watcher.activity(thresholds.stale_transaction_seconds),
        lambda a: of(a, JOBS).stale_in_transaction == 1,
        "a stale transaction",
    )
    result = evaluate_signals(budget_usage(seen, targets, LARGE_USABLE), SignalState(), thresholds)
    (stale,) = [s for s in result.raised_now if s.kind is SignalKind.STALE_TRANSACTIONS]
    assert stale.subject == JOBS
    assert "1 session of fleet-jobs has been idle in transaction for more than 1s" in stale.message
    state = result.state

    await forgotten.rollback()  # the application fixes its leak
    for _ in range(thresholds.clear_after_clean_observations):
        calm = await watcher.activity(thresholds.stale_transaction_seconds)
        assert of(calm, JOBS) == StateCounts(idle=1)
        result = evaluate_signals(budget_usage(calm, targets, LARGE_USABLE), state, thresholds)
        state = result.state
    assert [s.key for s in result.cleared_now] == [stale.key]


async def test_the_probe_connection_reads_limits_and_activity_alike(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    """One kept connection serves both reads (it counts once against the budget)."""
    watcher = await probe(stack, fleet.watcher_dsn)
    await watcher.probe()
    pid = watcher.backend_pid
    await watcher.activity(STALE_AFTER_SECONDS)
    assert watcher.backend_pid == pid
    assert fleet.database.server.sql(f"SELECT pg_terminate_backend({pid}, 5000)") == "t"
    activity = await watcher.activity(STALE_AFTER_SECONDS)  # reconnects once, transparently
    assert watcher.backend_pid not in (None, pid)
    assert of(activity, OPERATOR_APPLICATION_NAME).active >= 1


async def test_a_blocked_activity_read_is_cancelled_by_the_server(
    fleet: Fleet, stack: AsyncExitStack
) -> None:
    """statement_timeout bounds the query as it does the limits: a typed error, in time,
    and the kept connection stays usable."""
    admin = await asyncpg.connect(fleet.database.server.admin_dsn())
    stack.push_async_callback(admin.close)
    watcher = DatabaseProbe(fleet.watcher_dsn, query_timeout=0.5)
    stack.push_async_callback(watcher.close)
    await watcher.activity(STALE_AFTER_SECONDS)
    pid = watcher.backend_pid
    async with admin.transaction():
        # pg_stat_activity joins pg_database: this lock makes the read wait.
        await admin.execute("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(DatabaseTimeoutError, match=r"cancelled the query after 0\.5s"):
            await watcher.activity(STALE_AFTER_SECONDS)
        assert time.monotonic() - started < 0.5 + CLIENT_TIMEOUT_MARGIN_SECONDS
    assert (await watcher.activity(STALE_AFTER_SECONDS)).rows
    assert watcher.backend_pid == pid


async def test_a_role_denied_pg_stat_activity_gets_a_typed_error_and_still_its_limits(
    fresh_pg: Database,
) -> None:
    """A hardened server may revoke pg_stat_activity from PUBLIC: the activity read fails
    with the SQLSTATE and no secret; the limits, which need no privilege, still come back."""
    # Catalog views belong to each database: revoked where the probe reads.
    fresh_pg.server.sql("REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC", database="shop")
    probe = DatabaseProbe(fresh_pg.dsn)
    try:
        with pytest.raises(DatabaseProbeError, match="SQLSTATE 42501") as caught:
            await probe.activity(STALE_AFTER_SECONDS)
        assert MONITOR_PASSWORD not in str(caught.value)
        assert (await probe.probe()).max_connections == 37
    finally:
        await probe.close()
