"""poolbudget.client: the operator's ConfigMap -> create_async_engine kwargs.

The ConfigMap data comes from the operator's own renderer, so these tests read what
applications really get. The ones marked `postgres` build real engines against real
PostgreSQL 15 and 16, and against a stock PgBouncer in transaction pooling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from devtools.pgserver import PgBouncer
from poolbudget.api.v1alpha1 import PoolBudgetSpec
from poolbudget.client import (
    CONFIG_FILE_VARIABLE,
    PoolConfigError,
    engine_kwargs,
    engine_kwargs_from_env,
    engine_kwargs_from_file,
)
from poolbudget.domain.rendering import SQLALCHEMY_FILE_KEY, render_configmap_data
from poolbudget.domain.sizing import Allocation
from tests.fixtures.postgres import MONITOR_PASSWORD, Database

UNIQUE_NAME = re.compile(
    r"__asyncpg_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}__"
)


def rendered(
    pooling: str = "Direct", pool_size: int = 7, overflow: int = 3, pool_timeout: float = 2.5
) -> dict[str, str]:
    """The ConfigMap data the operator writes for one target."""
    spec = PoolBudgetSpec.model_validate({
        "database": {"maxConnectionsOverride": 100},
        "pooling": pooling,
        "defaults": {"poolTimeoutSeconds": pool_timeout, "statementTimeoutMilliseconds": 1500,
                     "idleInTransactionSessionTimeoutMilliseconds": 4000, "commandTimeoutSeconds": 8},
        "targets": [{"deploymentName": "api", "applicationName": "api-web"}],
    })  # fmt: skip
    allocation = Allocation(
        name="api", pods=1, workers=1, weight=1, pool_size=pool_size, max_overflow=overflow,
        requested_max_overflow=overflow, at_max_pool_size=False,
    )  # fmt: skip
    return render_configmap_data(spec, spec.targets[0], allocation)


def env_of(data: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in data.items() if k != SQLALCHEMY_FILE_KEY}


# --- reading the two forms ------------------------------------------------------------------


def test_env_keys_become_engine_kwargs() -> None:
    kwargs = engine_kwargs_from_env(env_of(rendered()))
    assert kwargs == {
        "pool_size": 7,
        "max_overflow": 3,
        "pool_timeout": 2.5,
        "pool_recycle": 1800,
        "pool_pre_ping": True,
        "connect_args": {
            "server_settings": {
                "statement_timeout": "1500",
                "idle_in_transaction_session_timeout": "4000",
                "application_name": "api-web",
            },
            "command_timeout": 8.0,
            "statement_cache_size": 100,
            "prepared_statement_cache_size": 100,
        },
    }
    assert "prepared_statement_name_func" not in engine_kwargs(env_of(rendered()))["connect_args"]


def test_pgbouncer_mode_disables_caches_and_sends_only_what_pgbouncer_accepts() -> None:
    args = engine_kwargs(env_of(rendered("PgBouncerTransaction")))["connect_args"]
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    # PgBouncer refuses other startup parameters; application_name it tracks per client.
    assert args["server_settings"] == {"application_name": "api-web"}
    assert args["command_timeout"] == 8.0  # still bounded, client-side
    name_func = args["prepared_statement_name_func"]
    names = {name_func() for _ in range(100)}
    assert len(names) == 100
    assert all(UNIQUE_NAME.fullmatch(name) for name in names)


@pytest.mark.parametrize("pooling", ["Direct", "PgBouncerTransaction"])
def test_file_and_env_forms_agree(tmp_path: Path, pooling: str) -> None:
    data = rendered(pooling)
    path = tmp_path / "sqlalchemy.json"
    path.write_text(data[SQLALCHEMY_FILE_KEY])
    from_file = engine_kwargs({CONFIG_FILE_VARIABLE: str(path)})
    from_env = engine_kwargs(env_of(data))
    funcs = [
        kw["connect_args"].pop("prepared_statement_name_func", None) for kw in (from_file, from_env)
    ]
    assert from_file == from_env
    assert [callable(f) for f in funcs] == [pooling == "PgBouncerTransaction"] * 2
    assert json.loads(data[SQLALCHEMY_FILE_KEY]) == engine_kwargs_from_env(env_of(data))


def test_an_explicit_path_wins_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "sqlalchemy.json"
    path.write_text(rendered(pool_size=9)[SQLALCHEMY_FILE_KEY])
    env = {**env_of(rendered(pool_size=4)), CONFIG_FILE_VARIABLE: "/nonexistent.json"}
    assert engine_kwargs(env, path=path)["pool_size"] == 9
    assert engine_kwargs(env_of(rendered(pool_size=4)))["pool_size"] == 4


def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    env = {**env_of(rendered()), CONFIG_FILE_VARIABLE: str(tmp_path / "absent.json")}
    with pytest.raises(PoolConfigError, match=r"absent\.json: No such file"):
        engine_kwargs(env)


def test_keys_a_newer_operator_adds_pass_through(tmp_path: Path) -> None:
    kwargs = json.loads(rendered()[SQLALCHEMY_FILE_KEY])
    kwargs["pool_use_lifo"] = True
    path = tmp_path / "sqlalchemy.json"
    path.write_text(json.dumps(kwargs))
    assert engine_kwargs_from_file(path)["pool_use_lifo"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"DB_POOL_SIZE": None}, "missing DB_POOL_SIZE"),
        (
            {"DB_POOL_SIZE": None, "DB_APPLICATION_NAME": None},
            "missing DB_POOL_SIZE, DB_APPLICATION_NAME",
        ),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE: must be >= 1, got 0"),
        ({"DB_POOL_SIZE": "5.0"}, "DB_POOL_SIZE: expected a whole number, got '5.0'"),
        ({"DB_POOL_SIZE": "1_000"}, "DB_POOL_SIZE: expected a whole number"),
        ({"DB_MAX_OVERFLOW": "five"}, "DB_MAX_OVERFLOW: expected a whole number, got 'five'"),
        ({"DB_MAX_OVERFLOW": "-1"}, "DB_MAX_OVERFLOW: must be >= 0"),
        ({"DB_POOL_RECYCLE": "-2"}, "DB_POOL_RECYCLE: must be >= -1"),
        ({"DB_POOL_RECYCLE": "0"}, "DB_POOL_RECYCLE: must be -1 (never) or >= 1, got 0"),
        ({"DB_POOL_PRE_PING": "maybe"}, "DB_POOL_PRE_PING: expected true or false"),
        ({"DB_POOL_TIMEOUT": "-1"}, "DB_POOL_TIMEOUT: expected a decimal number"),
        ({"DB_POOL_TIMEOUT": "0"}, "DB_POOL_TIMEOUT: must be >= 0.001"),
        ({"DB_COMMAND_TIMEOUT": "0.0009"}, "DB_COMMAND_TIMEOUT: must be >= 0.001"),
        ({"DB_POOL_TIMEOUT": "nan"}, "DB_POOL_TIMEOUT: expected a decimal number, got 'nan'"),
        ({"DB_COMMAND_TIMEOUT": "inf"}, "DB_COMMAND_TIMEOUT: expected a decimal number"),
        ({"DB_STATEMENT_TIMEOUT_MS": "30s"}, "DB_STATEMENT_TIMEOUT_MS: expected a whole number"),
        ({"DB_STATEMENT_CACHE_SIZE": ""}, "DB_STATEMENT_CACHE_SIZE: expected a whole number"),
    ],
)
def test_bad_settings_name_the_key(change: dict[str, str | None], message: str) -> None:
    env = env_of(rendered())
    for key, value in change.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    with pytest.raises(PoolConfigError, match=re.escape(message)):
        engine_kwargs(env)


def test_values_with_surrounding_spaces_are_read() -> None:
    env = {k: f" {v} " if k != "DB_APPLICATION_NAME" else v for k, v in env_of(rendered()).items()}
    assert engine_kwargs_from_env(env) == engine_kwargs_from_env(env_of(rendered()))


def _file_with(change: dict[str, Any]) -> str:
    kwargs = json.loads(rendered()[SQLALCHEMY_FILE_KEY])
    for dotted, value in change.items():
        *parents, key = dotted.split(".")
        target = kwargs
        for parent in parents:
            target = target[parent]
        if value is None:
            del target[key]
        else:
            target[key] = value
    return json.dumps(kwargs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_file_with({"pool_size": None}), "missing pool_size"),
        (_file_with({"pool_size": 0}), "pool_size: expected a whole number >= 1, got 0"),
        (_file_with({"pool_size": True}), "pool_size: expected a whole number >= 1, got True"),
        (_file_with({"max_overflow": "3"}), "max_overflow: expected a whole number >= 0, got '3'"),
        (_file_with({"pool_timeout": 0}), "pool_timeout: expected a number >= 0.001"),
        (
            _file_with({"pool_recycle": 0}),
            "pool_recycle: expected -1 (never) or a whole number >= 1",
        ),
        (_file_with({"pool_pre_ping": "true"}), "pool_pre_ping: expected true or false"),
        (_file_with({"connect_args": []}), "connect_args: expected an object"),
        (
            _file_with({"connect_args.command_timeout": None}),
            "connect_args.: missing command_timeout",
        ),
        (
            _file_with({"connect_args.statement_cache_size": -1}),
            "connect_args.statement_cache_size: expected a whole number >= 0",
        ),
        (
            _file_with({"connect_args.server_settings": {"statement_timeout": 1500}}),
            "connect_args.server_settings: expected an object of strings",
        ),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "sqlalchemy.json"
    path.write_text(content)
    with pytest.raises(PoolConfigError, match=re.escape(message)) as caught:
        engine_kwargs({CONFIG_FILE_VARIABLE: str(path)})
    assert str(caught.value).startswith(str(path))


def test_the_client_does_not_import_sqlalchemy() -> None:
    """Applications bring SQLAlchemy; the operator image does not have it."""
    source = Path(__file__).resolve().parents[2] / "operator" / "poolbudget" / "client.py"
    imports = [
        line for line in source.read_text().splitlines() if line.startswith(("import ", "from "))
    ]
    assert imports
    assert not [line for line in imports if "sqlalchemy" in line or "asyncpg" in line]


# --- real engines ---------------------------------------------------------------------------


def _async_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


async def _show(engine: AsyncEngine, *names: str) -> dict[str, str]:
    async with engine.connect() as connection:
        return {
            name: (await connection.execute(text(f"SHOW {name}"))).scalar_one() for name in names
        }


@pytest.mark.postgres
@pytest.mark.parametrize("source", ["env", "file"])
async def test_a_real_engine_gets_the_pool_and_the_server_settings(
    pg: Database, tmp_path: Path, source: str
) -> None:
    data = rendered(pool_size=4, overflow=2, pool_timeout=0.3)
    if source == "file":
        (tmp_path / "sqlalchemy.json").write_text(data[SQLALCHEMY_FILE_KEY])
        kwargs = engine_kwargs({CONFIG_FILE_VARIABLE: str(tmp_path / "sqlalchemy.json")})
    else:
        kwargs = engine_kwargs(env_of(data))
    engine = create_async_engine(_async_url(pg.dsn), **kwargs)
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.size() == 4
        assert pool._max_overflow == 2  # SQLAlchemy keeps no public accessor for these
        assert pool._timeout == 0.3
        assert pool._recycle == 1800
        assert pool._pre_ping is True
        assert await _show(
            engine, "statement_timeout", "idle_in_transaction_session_timeout", "application_name"
        ) == {
            "statement_timeout": "1500ms",
            "idle_in_transaction_session_timeout": "4s",
            "application_name": "api-web",
        }
        # The pool really stops at pool_size + max_overflow: the 7th checkout times out.
        held = [await engine.connect() for _ in range(6)]
        try:
            assert pool.checkedout() == 6
            with pytest.raises(Exception, match="QueuePool limit of size 4 overflow 2 reached"):
                await engine.connect()
        finally:
            for connection in held:
                await connection.close()
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_prepared_statements_under_each_pooling_mode(pg: Database) -> None:
    """Direct: cached, counter-named statements stay on the server. PgBouncerTransaction:
    none stay, and the one being run has a unique name."""
    own = "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%pg_prepared_statements%'"
    others = "SELECT count(*) FROM pg_prepared_statements WHERE statement NOT LIKE '%pg_prepared_statements%'"

    async def observe(pooling: str) -> tuple[str, int]:
        engine = create_async_engine(_async_url(pg.dsn), **engine_kwargs(env_of(rendered(pooling))))
        try:
            async with engine.connect() as connection:
                for value in range(3):
                    await connection.execute(text("SELECT CAST(:v AS integer) + 1"), {"v": value})
                name = (await connection.execute(text(own))).scalar_one()
                left = (await connection.execute(text(others))).scalar_one()
                return str(name), int(left)
        finally:
            await engine.dispose()

    name, left = await observe("Direct")
    assert re.fullmatch(r"__asyncpg_stmt_[0-9a-f]+__", name)
    assert left > 0
    name, left = await observe("PgBouncerTransaction")
    assert UNIQUE_NAME.fullmatch(name)
    assert left == 0


# --- through a real PgBouncer in transaction pooling ------------------------------------------


@pytest.fixture(scope="module")
def bouncer(pg: Database) -> Iterator[PgBouncer]:
    """Stock PgBouncer, transaction pooling, two server connections for the `monitor` role."""
    with PgBouncer(pg.server, "shop", {"monitor": MONITOR_PASSWORD}, pool_size=2) as running:
        yield running


@pytest.fixture
def bouncer_url(bouncer: PgBouncer) -> str:
    return _async_url(bouncer.dsn("monitor", MONITOR_PASSWORD, "shop"))


async def interleave(url: str, kwargs: dict[str, Any]) -> None:
    """A statement run again in a later transaction that PgBouncer puts on another server
    connection: client A's first server connection is taken by client B meanwhile."""
    a, b = (create_async_engine(url, **kwargs) for _ in range(2))
    query = text("SELECT CAST(:v AS integer) + 1")
    try:
        async with a.connect() as first:
            assert (await first.execute(query, {"v": 1})).scalar_one() == 2
            await first.commit()
            async with b.connect() as second:
                await second.execute(text("SELECT 1"))  # holds the server connection A had
                assert (await first.execute(query, {"v": 2})).scalar_one() == 3
                await first.commit()
    finally:
        await a.dispose()
        await b.dispose()


def pgbouncer_kwargs() -> dict[str, Any]:
    return engine_kwargs(env_of(rendered("PgBouncerTransaction", pool_size=1, overflow=0)))


@pytest.mark.postgres
async def test_pgbouncer_mode_works_through_pgbouncer(bouncer_url: str) -> None:
    for _ in range(3):
        await interleave(bouncer_url, pgbouncer_kwargs())
    engine = create_async_engine(bouncer_url, **pgbouncer_kwargs())
    try:
        assert await _show(engine, "application_name") == {"application_name": "api-web"}
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_with_statement_caches_on_pgbouncer_breaks(bouncer_url: str) -> None:
    """Why the caches must be off: the cached statement is on the other server connection."""
    kwargs = pgbouncer_kwargs()
    kwargs["connect_args"].update(statement_cache_size=100, prepared_statement_cache_size=100)
    del kwargs["connect_args"]["prepared_statement_name_func"]
    with pytest.raises(
        DBAPIError, match=r'prepared statement "__asyncpg_stmt_\w+__" does not exist'
    ):
        await interleave(bouncer_url, kwargs)


@pytest.mark.postgres
async def test_pgbouncer_refuses_the_direct_mode_startup_parameters(bouncer_url: str) -> None:
    """Why PgBouncer mode sends no statement_timeout: PgBouncer turns the client away."""
    engine = create_async_engine(bouncer_url, **engine_kwargs(env_of(rendered("Direct"))))
    try:
        with pytest.raises(DBAPIError, match="unsupported startup parameter: statement_timeout"):
            await _show(engine, "application_name")
    finally:
        await engine.dispose()
