"""The database probe against real PostgreSQL 15 and 16 servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import asyncpg
import pytest

from poolbudget.adapters.postgres import (
    DatabaseAuthError,
    DatabaseProbe,
    DatabaseTimeoutError,
    DatabaseUnreachableError,
    InvalidDsnError,
    probe_once,
)
from tests.fixtures.postgres import MONITOR_PASSWORD, Database

pytestmark = pytest.mark.postgres


async def test_reads_the_limits_the_server_was_started_with(pg: Database) -> None:
    facts = await probe_once(pg.dsn)
    assert facts.max_connections == 37
    assert facts.superuser_reserved_connections == 2
    assert facts.reserved_connections == pg.expected.get("reserved_connections", 0)
    assert facts.server_version.startswith(f"{pg.server.major}.")
    assert facts.server_version_num // 10000 == pg.server.major
    assert facts.connections_in_use is not None
    assert facts.connections_in_use >= 1  # the probe's own connection


async def test_counts_connections_in_use_as_an_unprivileged_role(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    try:
        before = (await probe.probe()).connections_in_use
        assert before is not None
        others = [await asyncpg.connect(pg.server.admin_dsn()) for _ in range(3)]
        try:
            during = (await probe.probe()).connections_in_use
        finally:
            for connection in others:
                await connection.close()
        assert during == before + 3
    finally:
        await probe.close()


async def test_one_connection_is_reused_across_probes(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    try:
        await probe.probe()
        first = probe.backend_pid
        for _ in range(5):
            await probe.probe()
        assert first is not None
        assert probe.backend_pid == first
    finally:
        await probe.close()


async def test_wrong_password_is_an_auth_error_without_the_password(pg: Database) -> None:
    bad = pg.dsn.replace(MONITOR_PASSWORD, "not-the-password-xyz")
    with pytest.raises(DatabaseAuthError) as caught:
        await probe_once(bad)
    text = f"{caught.value} {caught.value!r}"
    assert "not-the-password-xyz" not in text
    assert MONITOR_PASSWORD not in text
    assert "monitor@127.0.0.1" in str(caught.value)
    assert caught.value.__cause__ is None  # nothing chained that could carry the DSN


async def test_missing_database_is_reported(pg: Database) -> None:
    with pytest.raises(DatabaseAuthError, match="database does not exist"):
        await probe_once(pg.dsn.rsplit("/", 1)[0] + "/nosuchdb")


async def test_dsn_without_a_database_is_rejected_before_connecting(pg: Database) -> None:
    no_database = pg.dsn.rsplit("/", 1)[0]
    with pytest.raises(InvalidDsnError, match="names no database") as caught:
        await probe_once(no_database)
    assert MONITOR_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "dsn",
    ["mysql://u:p@127.0.0.1/db", "postgresql:///shop", "postgresql://u:p@127.0.0.1:notaport/db"],
)
async def test_malformed_dsns(dsn: str) -> None:
    with pytest.raises(InvalidDsnError):
        await probe_once(dsn)


async def test_unreachable_port_fails_fast() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachableError):
        await probe_once(f"postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{port}/shop")
    assert time.monotonic() - started < 5


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections (the kernel does) but never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


async def test_a_server_that_never_answers_times_out(silent_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseTimeoutError):
        await probe_once(
            f"postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{silent_server}/shop",
            connect_timeout=1.0,
        )
    assert time.monotonic() - started < 4


async def test_reconnects_after_a_server_restart_and_sees_new_limits(fresh_pg: Database) -> None:
    probe = DatabaseProbe(fresh_pg.dsn)
    try:
        assert (await probe.probe()).max_connections == 37
        first_pid = probe.backend_pid
        await asyncio.to_thread(fresh_pg.server.restart, {"max_connections": "55"})
        facts = await probe.probe()
        assert facts.max_connections == 55
        assert probe.backend_pid != first_pid
    finally:
        await probe.close()
