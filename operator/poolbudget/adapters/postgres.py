"""Read PostgreSQL's connection limits with asyncpg, as an unprivileged role.

One `DatabaseProbe` per DSN keeps one connection open across reconciles (a new connection
costs milliseconds and a slot; `SHOW max_connections` on an open one costs ~0.1 ms) and
reconnects when it breaks. That connection counts against the database's limit: it belongs
inside `spec.reservedConnections`.

Every await is bounded (connect timeout, server-side statement_timeout, and an asyncio
timeout around each query), and errors are translated into a few types whose messages
name user@host:port/database and never the password.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import unquote, urlsplit

import asyncpg

from poolbudget.domain.facts import DatabaseFacts

CONNECT_TIMEOUT_SECONDS = 5.0
QUERY_TIMEOUT_SECONDS = 5.0

# settings that exist on every supported version; reserved_connections is PostgreSQL 16+.
_LIMITS_QUERY = """
SELECT name, setting FROM pg_catalog.pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections',
               'server_version', 'server_version_num')
"""
# Client connections, as any role may count them: pg_stat_activity hides backend_type of
# other roles' sessions from an unprivileged role, pg_stat_database.numbackends does not.
_IN_USE_QUERY = "SELECT coalesce(sum(numbackends), 0) FROM pg_catalog.pg_stat_database"


class DatabaseProbeError(Exception):
    """Base class: the database's limits could not be read."""


class InvalidDsnError(DatabaseProbeError):
    """The DSN is not a usable postgresql:// URI."""


class DatabaseAuthError(DatabaseProbeError):
    """The server refused the credentials (or the role may not connect)."""


class DatabaseUnreachableError(DatabaseProbeError):
    """Nothing answered at that address, or the server went away."""


class DatabaseTimeoutError(DatabaseProbeError):
    """The server did not answer in time."""


def describe_dsn(dsn: str) -> str:
    """user@host:port/database, for messages: never the password, never query options."""
    try:
        parts = urlsplit(dsn)
        user = unquote(parts.username or "")
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "<unparseable DSN>"
    database = unquote(parts.path.lstrip("/"))
    return f"{user + '@' if user else ''}{host}:{port}/{database}"


def validate_dsn(dsn: str) -> None:
    """Reject what would fail obscurely later: wrong scheme, no host, no database name."""
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidDsnError("the DSN is not a valid URI") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidDsnError(
            f"the DSN must start with postgresql:// (got {parts.scheme or 'no'} scheme)"
        )
    if not parts.hostname:
        raise InvalidDsnError(f"the DSN names no host ({describe_dsn(dsn)})")
    if not unquote(parts.path.lstrip("/")):
        raise InvalidDsnError(
            f"the DSN names no database ({describe_dsn(dsn)}); add /DBNAME after the host"
        )


class DatabaseProbe:
    """Reads limits through one reused connection. Not safe for concurrent use."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        query_timeout: float = QUERY_TIMEOUT_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._where = describe_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._connection: asyncpg.Connection | None = None

    @property
    def backend_pid(self) -> int | None:
        """The server process of the current connection (tests use it to prove reuse)."""
        return None if self._connection is None else self._connection.get_server_pid()

    async def probe(self) -> DatabaseFacts:
        validate_dsn(self._dsn)
        for attempt in (1, 2):
            connection = await self._connect()
            try:
                return await self._read(connection)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                # The reused connection died (server restart, idle kill): reconnect once.
                await self.close()
                if attempt == 2:
                    raise DatabaseUnreachableError(
                        f"lost the connection to {self._where}"
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), timeout=self._connect_timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                connection.terminate()

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is not None and not self._connection.is_closed():
            return self._connection
        timeout_ms = str(int(self._query_timeout * 1000))
        try:
            self._connection = await asyncio.wait_for(
                asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    statement_cache_size=0,
                    server_settings={
                        "application_name": "poolbudget-operator",
                        "statement_timeout": timeout_ms,
                    },
                ),
                timeout=self._connect_timeout + 1,
            )
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            raise DatabaseAuthError(
                f"authentication failed for {self._where} (check the Secret's DSN)"
            ) from None
        except asyncpg.InvalidCatalogNameError:
            raise DatabaseAuthError(f"database does not exist: {self._where}") from None
        except asyncpg.TooManyConnectionsError:
            raise DatabaseUnreachableError(
                f"{self._where} refused the connection: too many clients already"
            ) from None
        except TimeoutError:
            raise DatabaseTimeoutError(
                f"no answer from {self._where} within {self._connect_timeout:.0f}s"
            ) from None
        except (OSError, socket.gaierror, asyncpg.PostgresConnectionError):
            raise DatabaseUnreachableError(f"cannot connect to {self._where}") from None
        except asyncpg.PostgresError as exc:
            # Server-side refusal of another kind; its SQLSTATE is safe to show.
            raise DatabaseProbeError(
                f"{self._where} refused the connection (SQLSTATE {exc.sqlstate})"
            ) from None
        except ValueError:
            raise InvalidDsnError(f"the DSN could not be parsed ({self._where})") from None
        return self._connection

    async def _read(self, connection: asyncpg.Connection) -> DatabaseFacts:
        try:
            rows = await asyncio.wait_for(connection.fetch(_LIMITS_QUERY), self._query_timeout)
            in_use = await asyncio.wait_for(connection.fetchval(_IN_USE_QUERY), self._query_timeout)
        except TimeoutError:
            await self.close()
            raise DatabaseTimeoutError(
                f"{self._where} did not answer within {self._query_timeout:.0f}s"
            ) from None
        settings = {str(row["name"]): str(row["setting"]) for row in rows}
        return DatabaseFacts(
            max_connections=int(settings["max_connections"]),
            superuser_reserved_connections=int(settings.get("superuser_reserved_connections", 0)),
            reserved_connections=int(settings.get("reserved_connections", 0)),
            server_version=settings.get("server_version", "").split(" ")[0],
            server_version_num=int(settings.get("server_version_num", 0)),
            connections_in_use=int(in_use) if in_use is not None else None,
        )


async def probe_once(
    dsn: str, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
) -> DatabaseFacts:
    """Open, read, close: for the CLI and one-off checks."""
    probe = DatabaseProbe(dsn, connect_timeout=connect_timeout)
    try:
        return await probe.probe()
    finally:
        await probe.close()
