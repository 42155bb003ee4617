"""poolbudget.client: the operator's ConfigMap -> create_async_engine kwargs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from poolbudget.api.v1alpha1 import PoolBudgetSpec
from poolbudget.client import (
    CONFIG_FILE_VARIABLE,
    PoolConfigError,
    engine_kwargs,
    engine_kwargs_from_env,
)
from poolbudget.domain.rendering import SQLALCHEMY_FILE_KEY, render_configmap_data
from poolbudget.domain.sizing import Allocation
from tests.fixtures.postgres import Database


def rendered(pooling: str = "Direct", pool_size: int = 7, overflow: int = 3) -> dict[str, str]:
    spec = PoolBudgetSpec.model_validate({
        "database": {"maxConnectionsOverride": 100},
        "pooling": pooling,
        "defaults": {"poolTimeoutSeconds": 2.5, "statementTimeoutMilliseconds": 1500,
                     "idleInTransactionSessionTimeoutMilliseconds": 4000, "commandTimeoutSeconds": 8},
        "targets": [{"deploymentName": "api", "applicationName": "api-web"}],
    })  # fmt: skip
    allocation = Allocation(
        name="api", pods=1, workers=1, weight=1, pool_size=pool_size, max_overflow=overflow,
        requested_max_overflow=overflow, at_max_pool_size=False,
    )  # fmt: skip
    return render_configmap_data(spec, spec.targets[0], allocation)


def test_env_keys_become_engine_kwargs() -> None:
    kwargs = engine_kwargs_from_env(rendered())
    assert kwargs["pool_size"] == 7
    assert kwargs["max_overflow"] == 3
    assert kwargs["pool_timeout"] == 2.5
    assert kwargs["pool_recycle"] == 1800
    assert kwargs["pool_pre_ping"] is True
    assert kwargs["connect_args"] == {
        "server_settings": {
            "statement_timeout": "1500",
            "idle_in_transaction_session_timeout": "4000",
            "application_name": "api-web",
        },
        "command_timeout": 8.0,
        "statement_cache_size": 100,
        "prepared_statement_cache_size": 100,
    }


def test_file_and_env_forms_agree(tmp_path: Path) -> None:
    data = rendered("PgBouncerTransaction")
    path = tmp_path / "sqlalchemy.json"
    path.write_text(data[SQLALCHEMY_FILE_KEY])
    from_file = engine_kwargs({CONFIG_FILE_VARIABLE: str(path)})
    from_env = engine_kwargs({k: v for k, v in data.items() if k != SQLALCHEMY_FILE_KEY})
    assert from_file.keys() == from_env.keys()
    for kwargs in (from_file, from_env):
        name_func = kwargs["connect_args"].pop("prepared_statement_name_func")
        assert name_func() != name_func()  # unique names behind PgBouncer
    assert from_file == from_env
    assert json.loads(data[SQLALCHEMY_FILE_KEY]) == engine_kwargs_from_env(data)


def test_pgbouncer_disables_both_statement_caches() -> None:
    args = engine_kwargs(rendered("PgBouncerTransaction"))["connect_args"]
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    assert callable(args["prepared_statement_name_func"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"DB_POOL_SIZE": None}, "missing DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE: must be >= 1, got 0"),
        ({"DB_MAX_OVERFLOW": "five"}, "DB_MAX_OVERFLOW: expected a whole number, got 'five'"),
        ({"DB_POOL_PRE_PING": "maybe"}, "DB_POOL_PRE_PING: expected true or false"),
        ({"DB_POOL_TIMEOUT": "-1"}, "DB_POOL_TIMEOUT: must be > 0"),
    ],
)
def test_bad_settings_name_the_key(change: dict[str, str | None], message: str) -> None:
    env: dict[str, str] = dict(rendered())
    for key, value in change.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    with pytest.raises(PoolConfigError, match=message):
        engine_kwargs(env)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"pool_size": 0}'])
def test_bad_files_are_reported(tmp_path: Path, content: str) -> None:
    path = tmp_path / "sqlalchemy.json"
    path.write_text(content)
    with pytest.raises(PoolConfigError, match=str(path)):
        engine_kwargs({CONFIG_FILE_VARIABLE: str(path)})


def _async_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.mark.postgres
async def test_a_real_engine_gets_the_pool_and_the_server_settings(pg: Database) -> None:
    kwargs: dict[str, Any] = engine_kwargs(rendered(pool_size=4, overflow=2))
    engine = create_async_engine(_async_url(pg.dsn), **kwargs)
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.size() == 4
        assert pool._max_overflow == 2  # SQLAlchemy keeps no public accessor for these two
        assert pool._timeout == 2.5
        async with engine.connect() as connection:
            settings = {
                name: (await connection.execute(text(f"SHOW {name}"))).scalar_one()
                for name in (
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "application_name",
                )
            }
        assert settings == {
            "statement_timeout": "1500ms",
            "idle_in_transaction_session_timeout": "4s",
            "application_name": "api-web",
        }
        # The pool really stops at pool_size + max_overflow: the 7th checkout times out.
        held = [await engine.connect() for _ in range(6)]
        try:
            with pytest.raises(Exception, match="QueuePool limit of size 4 overflow 2 reached"):
                await engine.connect()
        finally:
            for connection in held:
                await connection.close()
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_statement_cache_off_under_pgbouncer_mode(pg: Database) -> None:
    """With caches on, asyncpg leaves named prepared statements on the server; off, none."""

    async def prepared_after_queries(pooling: str) -> int:
        engine = create_async_engine(_async_url(pg.dsn), **engine_kwargs(rendered(pooling)))
        try:
            async with engine.connect() as connection:
                for value in range(3):
                    await connection.execute(text("SELECT :v + 1"), {"v": value})
                # The inspecting query is itself a prepared statement: leave it out.
                query = (
                    "SELECT count(*) FROM pg_prepared_statements"
                    " WHERE statement NOT LIKE '%pg_prepared_statements%'"
                )
                count = (await connection.execute(text(query))).scalar_one()
                return int(count)
        finally:
            await engine.dispose()

    assert await prepared_after_queries("Direct") > 0
    assert await prepared_after_queries("PgBouncerTransaction") == 0
