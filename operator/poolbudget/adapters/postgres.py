"""Read PostgreSQL's connection limits and its live connections with asyncpg.

The limits need no privilege. The activity (`DatabaseProbe.activity`) is complete for a
role with pg_monitor (or pg_read_all_stats); a plain role sees every connection's
application_name but the state only of its own role's sessions (see _ACTIVITY_QUERY).

One `DatabaseProbe` per DSN keeps one connection open across reconciles (a new connection
costs milliseconds and a slot; a warm probe is one round trip) and reconnects when it
breaks. That connection counts against the database's limit: it belongs inside
`spec.reservedConnections`. It is also replaced once it is `max_lifetime` old: an open
connection stays authenticated after the role's password changes on the server, so without
a fresh login a rotated password would go unnoticed until the next server restart.

Every await is bounded: the connect timeout covers DNS, TCP, TLS and authentication; each
query carries a server-side `statement_timeout` and, as a backstop for a network that
stops answering, a client-side timeout a little longer. Errors are translated into the
types below, whose messages name user@host:port/database and never the password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from poolbudget.domain.activity import (
    OPERATOR_APPLICATION_NAME,
    ActivityRow,
    DatabaseActivity,
    session_state,
)
from poolbudget.domain.facts import DatabaseFacts
from poolbudget.domain.reasons import Reason

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5.0
# Like pgbouncer's server_lifetime or SQLAlchemy's pool_recycle: log in again this often.
CONNECTION_LIFETIME_SECONDS = 300.0
QUERY_TIMEOUT_SECONDS = 5.0
# The client-side backstop fires this much after the server's own statement_timeout, so a
# slow query is cancelled cleanly by the server (the connection stays usable) and only a
# silent network is cut off by the client.
CLIENT_TIMEOUT_MARGIN_SECONDS = 1.0
APPLICATION_NAME = OPERATOR_APPLICATION_NAME

# current_setting(name, true) is NULL for a setting the server does not have:
# reserved_connections exists from PostgreSQL 16 on.
_LIMITS_QUERY = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
       current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int AS server_version_num
"""
# Connections that hold a max_connections slot are client backends. A role without
# pg_read_all_stats sees backend_type only for its own sessions: for the others it sees
# NULL there, but still datid and usesysid. Among those, client backends are the rows with
# both set: background processes have no database, autovacuum workers no user. (Parallel
# and logical replication workers of other roles would also be counted; a monitoring role
# granted pg_monitor gets an exact count.) pg_stat_database.numbackends is no better: it
# counts autovacuum workers, which use slots of their own.
_IN_USE_QUERY = """
SELECT count(*) FROM pg_catalog.pg_stat_activity
WHERE backend_type = 'client backend'
   OR (backend_type IS NULL AND datid IS NOT NULL AND usesysid IS NOT NULL)
"""

# Every client backend of the server, in every database: max_connections is one limit for
# the whole server, so a client of another database takes a slot from the budget all the
# same. One scan of the backend status array, grouped: a few rows per application.
# Without pg_read_all_stats (pg_monitor has it) another role's row keeps its
# application_name, datid and usesysid but shows NULL state, wait_event_type and
# state_change: it is counted by name with state NULL ('unknown'), and its lock waits and
# stale transactions cannot be seen. The client-backend test is _IN_USE_QUERY's.
_ACTIVITY_QUERY = """
SELECT coalesce(application_name, '') AS application_name,
       state,
       count(*)::int AS connections,
       (count(*) FILTER (WHERE wait_event_type = 'Lock'))::int AS lock_waits,
       (count(*) FILTER (
           WHERE state LIKE 'idle in transaction%'
             AND state_change < now() - make_interval(secs => $1::float8)
       ))::int AS stale_in_transaction
FROM pg_catalog.pg_stat_activity
WHERE backend_type = 'client backend'
   OR (backend_type IS NULL AND datid IS NOT NULL AND usesysid IS NOT NULL)
GROUP BY 1, 2
"""

# How a reused connection looks when the server or the network dropped it.
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    ConnectionError,
    OSError,
)


class DatabaseProbeError(Exception):
    """Base class: the database's limits could not be read. Messages never hold secrets;
    `reason` is what the DatabaseObserved condition says."""

    reason = Reason.DATABASE_ERROR


class InvalidDsnError(DatabaseProbeError):
    """The DSN is not a usable postgresql:// URI (rejected before connecting)."""

    reason = Reason.INVALID_DSN


class DatabaseAuthError(DatabaseProbeError):
    """The server refused the credentials, or the role may not connect to the database."""

    reason = Reason.AUTHENTICATION_FAILED


class DatabaseNotFoundError(DatabaseAuthError):
    """The DSN names a database the server does not have."""

    reason = Reason.DATABASE_NOT_FOUND


class DatabaseUnreachableError(DatabaseProbeError):
    """Nothing answered at that address, the server refused new clients, or went away."""

    reason = Reason.DATABASE_UNREACHABLE


class DatabaseTimeoutError(DatabaseProbeError):
    """The server (or the network) did not answer in time."""

    reason = Reason.DATABASE_TIMEOUT


@dataclass(frozen=True)
class DsnParts:
    """What a DSN names, without its password."""

    user: str
    hosts: tuple[tuple[str, int], ...]
    database: str

    def __str__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts) or "?"
        return f"{self.user + '@' if self.user else ''}{hosts}/{self.database}"


def _split_host(item: str) -> tuple[str, str]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = item.partition(":")
    return host, port


def parse_dsn(dsn: str) -> DsnParts:
    """Check a postgresql:// URI the way asyncpg reads it; InvalidDsnError names the flaw.

    A DSN must name a host and a database: asyncpg would otherwise fall back to PGHOST,
    PGDATABASE or the user's name from the operator's own environment, and read the limits
    of some other database than the one meant.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        raise InvalidDsnError("the DSN is not a valid URI") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidDsnError(
            f"the DSN must start with postgresql:// (got {parts.scheme or 'no'} scheme)"
        )
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) or query.get("user", "")
    if not hostlist and "host" in query:
        hostlist = query["host"]
    database = unquote(parts.path.removeprefix("/")) or query.get("dbname", "")
    database = database or query.get("database", "")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(",") if hostlist else []:
        host, port_text = _split_host(item)
        port_text = port_text or query.get("port", "5432")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidDsnError(f"the DSN has an invalid port {port_text!r}")
        if not host:
            raise InvalidDsnError("the DSN has an empty host in its host list")
        hosts.append((unquote(host), int(port_text)))
    described = DsnParts(user=user, hosts=tuple(hosts), database=database)
    if not hosts:
        raise InvalidDsnError(f"the DSN names no host ({described})")
    if not database:
        raise InvalidDsnError(
            f"the DSN names no database ({described}); add /DBNAME after the host"
        )
    return described


def describe_dsn(dsn: str) -> str:
    """user@host:port/database, for messages: never the password, never query options."""
    try:
        return str(parse_dsn(dsn))
    except InvalidDsnError:
        return "<invalid DSN>"


class DatabaseProbe:
    """Reads limits through one reused connection; concurrent calls take turns."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        query_timeout: float = QUERY_TIMEOUT_SECONDS,
        max_lifetime: float = CONNECTION_LIFETIME_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._where = describe_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._max_lifetime = max_lifetime
        self._connection: asyncpg.Connection | None = None
        self._connected_at = 0.0  # time.monotonic() of the last successful login
        self._lock = asyncio.Lock()

    @property
    def backend_pid(self) -> int | None:
        """The server process of the open connection (tests use it to prove reuse)."""
        connection = self._connection
        if connection is None or connection.is_closed():
            return None
        return connection.get_server_pid()

    async def probe(self) -> DatabaseFacts:
        """The limits now. Raises a DatabaseProbeError subclass; never hangs."""
        return await self._with_connection(self._read)

    async def activity(self, stale_after_seconds: float) -> DatabaseActivity:
        """Every client backend of the server, by application_name and state, with lock
        waits and sessions idle in transaction for more than `stale_after_seconds`; one
        query on the kept connection. Raises a DatabaseProbeError subclass; never hangs."""

        async def read(connection: asyncpg.Connection) -> DatabaseActivity:
            records = await self._bounded(
                connection.fetch(_ACTIVITY_QUERY, stale_after_seconds), "report its activity"
            )
            return DatabaseActivity(
                rows=tuple(
                    ActivityRow(
                        application_name=str(record["application_name"]),
                        state=session_state(record["state"]),
                        connections=int(record["connections"]),
                        lock_waits=int(record["lock_waits"]),
                        stale_in_transaction=int(record["stale_in_transaction"]),
                    )
                    for record in records
                ),
                stale_after_seconds=stale_after_seconds,
            )

        return await self._with_connection(read)

    async def _with_connection(self, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `read` on the kept connection (opened or renewed as needed); if the kept
        connection turns out dead, once more on a fresh one."""
        parse_dsn(self._dsn)  # here, not in __init__: a bad DSN is a probe result too
        async with self._lock:
            if time.monotonic() - self._connected_at >= self._max_lifetime:
                await self._close_kept()  # log in again: a changed password shows now
            reused = self._connection is not None and not self._connection.is_closed()
            connection = await self._connect()
            try:
                return await read(connection)
            except _CONNECTION_LOST:
                self._discard()
                if not reused:
                    raise DatabaseUnreachableError(
                        f"lost the connection to {self._where}"
                    ) from None
            # The kept connection had died (server restart, idle timeout, pg_terminate_backend):
            # one fresh attempt.
            connection = await self._connect()
            try:
                return await read(connection)
            except _CONNECTION_LOST:
                self._discard()
                raise DatabaseUnreachableError(f"lost the connection to {self._where}") from None

    async def close(self) -> None:
        """Close the kept connection (bounded; terminated if the server does not answer)."""
        async with self._lock:
            await self._close_kept()

    async def _close_kept(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or connection.is_closed():
            return
        try:
            await connection.close(timeout=self._connect_timeout)
        except (TimeoutError, *_CONNECTION_LOST, asyncpg.PostgresError):
            connection.terminate()

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is not None and not self._connection.is_closed():
            return self._connection
        where = self._where
        try:
            # asyncpg's timeout covers the whole handshake; the outer one is a backstop.
            async with asyncio.timeout(self._connect_timeout + CLIENT_TIMEOUT_MARGIN_SECONDS):
                self._connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    statement_cache_size=0,  # two fixed queries; nothing worth caching
                    server_settings={
                        "application_name": APPLICATION_NAME,
                        "statement_timeout": str(int(self._query_timeout * 1000)),
                    },
                )
                self._connected_at = time.monotonic()
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            raise DatabaseAuthError(
                f"authentication failed for {where} (check the Secret's DSN)"
            ) from None
        except asyncpg.InvalidCatalogNameError:
            raise DatabaseNotFoundError(f"database does not exist: {where}") from None
        except asyncpg.InsufficientPrivilegeError:
            raise DatabaseAuthError(f"the role may not connect to the database: {where}") from None
        except asyncpg.TooManyConnectionsError:
            raise DatabaseUnreachableError(
                f"{where} refused the connection: too many clients already"
            ) from None
        except asyncpg.CannotConnectNowError:
            raise DatabaseUnreachableError(
                f"{where} is starting up or shutting down and accepts no connections now"
            ) from None
        except TimeoutError:
            raise DatabaseTimeoutError(
                f"no answer from {where} within {self._connect_timeout:g}s"
            ) from None
        except asyncpg.ClientConfigurationError:
            raise InvalidDsnError(f"asyncpg rejected the DSN's options ({where})") from None
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise DatabaseUnreachableError(f"cannot connect to {where}: {reason}") from None
        except asyncpg.PostgresError as exc:
            # Another server-side refusal; its SQLSTATE is safe to show, its text may not be.
            raise DatabaseProbeError(
                f"{where} refused the connection (SQLSTATE {exc.sqlstate})"
            ) from None
        except ValueError:
            raise InvalidDsnError(f"asyncpg could not parse the DSN ({where})") from None
        return self._connection

    async def _read(self, connection: asyncpg.Connection) -> DatabaseFacts:
        async def both() -> tuple[asyncpg.Record | None, int | None]:
            return (
                await connection.fetchrow(_LIMITS_QUERY),
                await self._connections_in_use(connection),
            )

        limits, in_use = await self._bounded(both(), "report its limits")
        if limits is None:  # one row, always; this only satisfies the type checker
            raise DatabaseProbeError(f"{self._where} returned no limits")
        return DatabaseFacts(
            max_connections=int(limits["max_connections"]),
            superuser_reserved_connections=int(limits["superuser_reserved"]),
            reserved_connections=int(limits["reserved"]),
            server_version=str(limits["server_version"]).split(" ")[0],  # "15.8 (Debian ...)"
            server_version_num=int(limits["server_version_num"]),
            connections_in_use=in_use,
        )

    async def _bounded(self, query: Awaitable[T], what: str) -> T:
        """Await a query within the client-side backstop; translate what can go wrong.
        A lost connection propagates as is: _with_connection retries it once."""
        try:
            async with asyncio.timeout(self._query_timeout + CLIENT_TIMEOUT_MARGIN_SECONDS):
                return await query
        except TimeoutError:
            # The network went quiet mid-query: the connection's state is unknown.
            self._discard()
            raise DatabaseTimeoutError(
                f"{self._where} did not answer within {self._query_timeout:g}s"
            ) from None
        except asyncpg.QueryCanceledError:
            raise DatabaseTimeoutError(
                f"{self._where} cancelled the query after {self._query_timeout:g}s"
            ) from None
        except _CONNECTION_LOST:
            raise
        except asyncpg.PostgresError as exc:
            raise DatabaseProbeError(
                f"{self._where} failed to {what} (SQLSTATE {exc.sqlstate})"
            ) from None

    @staticmethod
    async def _connections_in_use(connection: asyncpg.Connection) -> int | None:
        """Informational only: when the role may not read pg_stat_activity (a hardened
        server revokes it) or the count times out, the limits still count; None here."""
        try:
            count = await connection.fetchval(_IN_USE_QUERY)
        except (asyncpg.InsufficientPrivilegeError, asyncpg.QueryCanceledError):
            return None
        return None if count is None else int(count)


async def probe_once(
    dsn: str,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    query_timeout: float = QUERY_TIMEOUT_SECONDS,
) -> DatabaseFacts:
    """Open, read, close: for the CLI and one-off checks."""
    probe = DatabaseProbe(dsn, connect_timeout=connect_timeout, query_timeout=query_timeout)
    try:
        return await probe.probe()
    finally:
        await probe.close()
