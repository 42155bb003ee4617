"""The database probe against real PostgreSQL 15 and 16 servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest

from poolbudget.adapters.postgres import (
    APPLICATION_NAME,
    CLIENT_TIMEOUT_MARGIN_SECONDS,
    DatabaseAuthError,
    DatabaseNotFoundError,
    DatabaseProbe,
    DatabaseProbeError,
    DatabaseTimeoutError,
    DatabaseUnreachableError,
    InvalidDsnError,
    probe_once,
)
from tests.fixtures.postgres import MONITOR_PASSWORD, Database

pytestmark = pytest.mark.postgres

EXACT_CLIENT_BACKENDS = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


WAIT_SECONDS = 30.0


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async predicate until it holds or the deadline passes."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        await asyncio.sleep(0.05)


# --- what it reads ------------------------------------------------------------------------


async def test_reads_the_limits_the_server_was_started_with(pg: Database) -> None:
    facts = await probe_once(pg.dsn)
    assert facts.max_connections == 37
    assert facts.superuser_reserved_connections == 2
    # 3 on PostgreSQL 16 (set by the fixture); 15 has no such setting: 0.
    assert facts.reserved_connections == pg.expected.get("reserved_connections", 0)
    assert facts.reserved_connections == (3 if pg.server.major >= 16 else 0)
    assert facts.server_version == pg.server.sql("SHOW server_version").split(" ")[0]
    assert facts.server_version.startswith(f"{pg.server.major}.")
    assert facts.server_version_num == int(pg.server.sql("SHOW server_version_num"))
    assert facts.server_version_num // 10000 == pg.server.major
    assert facts.connections_in_use is not None
    assert facts.connections_in_use >= 1  # the probe's own connection


async def test_the_probe_connects_as_the_unprivileged_role(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    admin = await asyncpg.connect(pg.server.admin_dsn())
    try:
        await probe.probe()
        row = await admin.fetchrow(
            "SELECT usename, application_name, rolsuper FROM pg_stat_activity"
            " JOIN pg_roles ON rolname = usename WHERE pid = $1",
            probe.backend_pid,
        )
        assert row is not None
        assert tuple(row) == ("monitor", APPLICATION_NAME, False)
    finally:
        await probe.close()
        await admin.close()


async def test_counts_connections_in_use_as_an_unprivileged_role(pg: Database) -> None:
    """Other roles' sessions count too, although this role cannot see their backend_type."""
    probe = DatabaseProbe(pg.dsn)
    try:
        before = (await probe.probe()).connections_in_use
        assert before is not None
        others = [await asyncpg.connect(pg.server.admin_dsn()) for _ in range(3)]
        try:
            during = (await probe.probe()).connections_in_use
            exact = int(pg.server.sql(EXACT_CLIENT_BACKENDS))  # psql is one more client
        finally:
            for connection in others:
                await connection.close()
        assert during == before + 3
        assert during == exact - 1
    finally:
        await probe.close()


async def test_a_pg_monitor_role_gets_the_same_count(pg: Database) -> None:
    pg.server.sql("CREATE ROLE watcher LOGIN PASSWORD 'watcher-pw' IN ROLE pg_monitor")
    try:
        plain, privileged = (
            DatabaseProbe(pg.dsn),
            DatabaseProbe(pg.server.dsn("watcher", "watcher-pw", "shop")),
        )
        try:
            await plain.probe()
            await privileged.probe()  # both connections open: both see the same sessions
            assert (await plain.probe()).connections_in_use == (
                await privileged.probe()
            ).connections_in_use
        finally:
            await plain.close()
            await privileged.close()
    finally:
        pg.server.sql("DROP ROLE watcher")


async def test_autovacuum_workers_are_not_counted(slow_autovacuum_pg: Database) -> None:
    """They hold no max_connections slot; pg_stat_database.numbackends counts them anyway."""
    server = slow_autovacuum_pg.server
    # Dead rows in every database an autovacuum worker may pick; cost limit 1 keeps it busy.
    server.sql(
        "CREATE TABLE churn AS SELECT g FROM generate_series(1, 200000) g; DELETE FROM churn"
    )
    workers = "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"

    async def a_worker_runs() -> bool:
        return server.sql(workers) != ""

    await until(a_worker_runs, "an autovacuum worker")
    probe = DatabaseProbe(slow_autovacuum_pg.dsn)
    try:
        for _ in range(20):  # the same worker seen before and after: it ran during the probe
            seen_before = server.sql(workers)
            facts = await probe.probe()
            exact = int(server.sql(EXACT_CLIENT_BACKENDS)) - 1  # without psql itself
            numbackends = int(server.sql("SELECT sum(numbackends) FROM pg_stat_database")) - 1
            if seen_before and server.sql(workers) == seen_before:
                break
        else:
            pytest.fail("no autovacuum worker stayed for the length of one probe")
        assert facts.connections_in_use == exact
        assert numbackends >= exact + 1  # what the naive count would have said
    finally:
        await probe.close()


async def test_no_count_when_the_role_may_not_read_pg_stat_activity(pg: Database) -> None:
    """A hardened server may revoke pg_stat_activity: the limits still come back."""
    # Catalog views are per database: revoke it in the one the probe connects to.
    pg.server.sql("REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC", database="shop")
    try:
        facts = await probe_once(pg.dsn)
    finally:
        pg.server.sql("GRANT SELECT ON pg_catalog.pg_stat_activity TO PUBLIC", database="shop")
    assert facts.max_connections == 37
    assert facts.connections_in_use is None


# --- one connection, kept -----------------------------------------------------------------


async def test_one_connection_is_reused_across_probes(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    try:
        await probe.probe()
        first = probe.backend_pid
        assert first is not None
        for _ in range(5):
            await probe.probe()
        assert probe.backend_pid == first
        admin = await asyncpg.connect(pg.server.admin_dsn())
        try:
            mine = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            assert await admin.fetchval(mine, APPLICATION_NAME) == 1
        finally:
            await admin.close()
    finally:
        await probe.close()
    assert probe.backend_pid is None


async def test_concurrent_probes_share_the_connection(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    try:
        results = await asyncio.gather(*(probe.probe() for _ in range(8)))
        assert {facts.max_connections for facts in results} == {37}
        pid = probe.backend_pid
        await probe.probe()
        assert probe.backend_pid == pid
    finally:
        await probe.close()


async def test_reconnects_after_its_backend_is_terminated(pg: Database) -> None:
    probe = DatabaseProbe(pg.dsn)
    try:
        await probe.probe()
        first = probe.backend_pid
        assert pg.server.sql(f"SELECT pg_terminate_backend({first}, 5000)") == "t"
        facts = await probe.probe()
        assert facts.max_connections == 37
        assert probe.backend_pid not in (None, first)
    finally:
        await probe.close()


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


async def test_a_stopped_server_is_unreachable_then_found_again(fresh_pg: Database) -> None:
    probe = DatabaseProbe(fresh_pg.dsn, connect_timeout=2)
    try:
        await probe.probe()
        await asyncio.to_thread(fresh_pg.server.ctl, "stop")
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachableError):
            await probe.probe()
        assert time.monotonic() - started < 3
        await asyncio.to_thread(fresh_pg.server.ctl, "start")
        assert (await probe.probe()).max_connections == 37
    finally:
        await probe.close()


async def test_a_password_changed_on_the_server_is_noticed_within_the_lifetime(
    fresh_pg: Database,
) -> None:
    """An open connection stays authenticated after ALTER ROLE ... PASSWORD: the probe
    logs in again once its connection is max_lifetime old, and then reports the failure."""
    kept = DatabaseProbe(fresh_pg.dsn, max_lifetime=3600)
    renewed = DatabaseProbe(fresh_pg.dsn, max_lifetime=0.5)
    try:
        await kept.probe()
        await renewed.probe()
        first = renewed.backend_pid
        await asyncio.sleep(0.6)
        await renewed.probe()  # same password: a new login, a new backend
        assert renewed.backend_pid not in (None, first)

        fresh_pg.server.sql("ALTER ROLE monitor PASSWORD 'rotated-on-the-server-5521'")
        assert (await kept.probe()).max_connections == 37  # still the old, open session
        await asyncio.sleep(0.6)
        with pytest.raises(DatabaseAuthError, match="authentication failed") as caught:
            await renewed.probe()
        assert_no_secret(caught.value, MONITOR_PASSWORD, "rotated-on-the-server-5521")
    finally:
        await kept.close()
        await renewed.close()


# --- errors: typed, bounded, no password ----------------------------------------------------


def assert_no_secret(error: BaseException, *secrets: str) -> None:
    text = f"{error} {error!r} {error.args}"
    for secret in secrets:
        assert secret not in text
    assert error.__cause__ is None  # nothing chained that could carry the DSN
    assert error.__context__ is None or error.__suppress_context__  # nor printed with it


async def test_wrong_password_is_an_auth_error_without_the_password(pg: Database) -> None:
    bad = pg.dsn.replace(MONITOR_PASSWORD, "not-the-password-xyz")
    with pytest.raises(DatabaseAuthError, match="authentication failed") as caught:
        await probe_once(bad)
    assert_no_secret(caught.value, "not-the-password-xyz", MONITOR_PASSWORD)
    assert f"monitor@127.0.0.1:{pg.server.port}/shop" in str(caught.value)


async def test_unknown_role_is_an_auth_error(pg: Database) -> None:
    with pytest.raises(DatabaseAuthError) as caught:
        await probe_once(pg.server.dsn("nobody", "nobody-pw-123", "shop"))
    assert_no_secret(caught.value, "nobody-pw-123")


async def test_missing_database_is_reported(pg: Database) -> None:
    with pytest.raises(DatabaseNotFoundError, match="database does not exist") as caught:
        await probe_once(pg.dsn.rsplit("/", 1)[0] + "/nosuchdb")
    assert isinstance(caught.value, DatabaseAuthError)  # a subclass: callers may ignore it
    assert_no_secret(caught.value, MONITOR_PASSWORD)


async def test_a_role_without_connect_privilege_is_an_auth_error(pg: Database) -> None:
    pg.server.sql("CREATE DATABASE locked")
    pg.server.sql("REVOKE CONNECT ON DATABASE locked FROM PUBLIC")
    try:
        with pytest.raises(DatabaseAuthError, match="may not connect"):
            await probe_once(pg.dsn.rsplit("/", 1)[0] + "/locked")
    finally:
        pg.server.sql("DROP DATABASE locked")


async def test_dsn_without_a_database_is_rejected_before_connecting() -> None:
    # Nothing listens on that port: an attempt to connect would be "unreachable".
    no_database = f"postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{unused_port()}"
    for dsn in (no_database, no_database + "/"):
        with pytest.raises(InvalidDsnError, match="names no database") as caught:
            await probe_once(dsn)
        assert_no_secret(caught.value, MONITOR_PASSWORD)


async def test_a_full_server_is_unreachable_for_now(own_pg: Database) -> None:
    """Once ordinary roles have used every slot they may, the probe says so and does not hang."""
    held: list[asyncpg.Connection] = []
    try:
        while True:
            try:
                held.append(await asyncpg.connect(own_pg.dsn))
            except asyncpg.TooManyConnectionsError:
                break
            assert len(held) < 40, "max_connections was not enforced"
        with pytest.raises(DatabaseUnreachableError, match="too many clients"):
            await probe_once(own_pg.dsn)
    finally:
        for connection in held:
            await connection.close()
    # What an ordinary role may use: max_connections minus both reserves (37 - 2 - 3 on 16).
    assert len(held) == 37 - 2 - own_pg.expected.get("reserved_connections", 0)


async def test_unreachable_port_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachableError, match="cannot connect") as caught:
        await probe_once(f"postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{unused_port()}/shop")
    assert time.monotonic() - started < 2
    assert_no_secret(caught.value, MONITOR_PASSWORD)


async def test_unknown_host_is_unreachable() -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachableError):
        await probe_once(
            f"postgresql://monitor:{MONITOR_PASSWORD}@no-such-host.invalid:5432/shop",
            connect_timeout=3,
        )
    assert time.monotonic() - started < 3 + CLIENT_TIMEOUT_MARGIN_SECONDS + 1


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections (the kernel does) but never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


async def test_a_server_that_never_answers_times_out(silent_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseTimeoutError, match="no answer") as caught:
        await probe_once(
            f"postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{silent_server}/shop",
            connect_timeout=1.0,
        )
    assert time.monotonic() - started < 1.0 + CLIENT_TIMEOUT_MARGIN_SECONDS + 1
    assert_no_secret(caught.value, MONITOR_PASSWORD)


async def test_a_blocked_count_is_cancelled_by_the_server(pg: Database) -> None:
    """statement_timeout bounds each query server-side; the limits still come back."""
    admin = await asyncpg.connect(pg.server.admin_dsn())
    probe = DatabaseProbe(pg.dsn, query_timeout=0.5)
    try:
        await probe.probe()
        pid = probe.backend_pid
        async with admin.transaction():
            # pg_stat_activity joins pg_database: this lock makes the count wait.
            await admin.execute("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            facts = await probe.probe()
            elapsed = time.monotonic() - started
        assert facts.max_connections == 37
        assert facts.connections_in_use is None
        assert 0.4 < elapsed < 0.5 + CLIENT_TIMEOUT_MARGIN_SECONDS
        assert probe.backend_pid == pid  # a server-side cancel leaves the connection usable
        assert (await probe.probe()).connections_in_use is not None
    finally:
        await probe.close()
        await admin.close()


class FreezableProxy:
    """A TCP relay to PostgreSQL that can stop relaying: a network that goes silent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if not self.frozen:
                    sink.write(data)
                    await sink.drain()

        await asyncio.gather(
            pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True
        )

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(pg: Database) -> AsyncIterator[FreezableProxy]:
    relay = FreezableProxy(pg.server.port)
    yield relay
    await relay.close()


async def test_a_network_that_goes_silent_mid_probe_times_out(
    pg: Database, proxy: FreezableProxy
) -> None:
    port = await proxy.start()
    dsn = pg.dsn.replace(f":{pg.server.port}/", f":{port}/")
    probe = DatabaseProbe(dsn, connect_timeout=1.0, query_timeout=0.5)
    try:
        await probe.probe()
        first = probe.backend_pid
        proxy.frozen = True
        started = time.monotonic()
        with pytest.raises(DatabaseTimeoutError):
            await probe.probe()
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + CLIENT_TIMEOUT_MARGIN_SECONDS + 0.5
        assert probe.backend_pid is None  # a connection in an unknown state is dropped
        # While still silent, a new connection times out too, within the connect timeout.
        with pytest.raises(DatabaseTimeoutError):
            await probe.probe()
        proxy.frozen = False
        assert (await probe.probe()).max_connections == 37
        assert probe.backend_pid not in (None, first)
    finally:
        await probe.close()


@pytest.mark.parametrize(
    "dsn",
    ["mysql://u:p@127.0.0.1/db", "postgresql:///shop", "postgresql://u:p@127.0.0.1:notaport/db"],
)
async def test_malformed_dsns_are_rejected_before_connecting(dsn: str) -> None:
    with pytest.raises(InvalidDsnError) as caught:
        await probe_once(dsn)
    assert isinstance(caught.value, DatabaseProbeError)
    assert ":p@" not in str(caught.value)
