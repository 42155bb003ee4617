"""What applications import: the operator's ConfigMap -> `create_async_engine` kwargs.

    from poolbudget.client import engine_kwargs
    engine = create_async_engine(DATABASE_URL, **engine_kwargs())

`engine_kwargs()` reads the file named by ``POOLBUDGET_CONFIG_FILE`` when that variable is
set (mount the ConfigMap's ``sqlalchemy.json``), otherwise the ``DB_*`` environment keys
(``envFrom`` the ConfigMap). Both forms carry the same settings; `engine_kwargs_from_env`
is the one mapping between them, and the operator uses it to write ``sqlalchemy.json``.

No third-party imports: applications have SQLAlchemy, the operator does not need it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_FILE_VARIABLE = "POOLBUDGET_CONFIG_FILE"

REQUIRED_KEYS = (
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_POOL_TIMEOUT",
    "DB_POOL_RECYCLE",
    "DB_POOL_PRE_PING",
    "DB_STATEMENT_TIMEOUT_MS",
    "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS",
    "DB_COMMAND_TIMEOUT",
    "DB_STATEMENT_CACHE_SIZE",
    "DB_APPLICATION_NAME",
)


class PoolConfigError(ValueError):
    """A missing or malformed setting; the message names the key."""


def _int(env: Mapping[str, str], key: str, minimum: int) -> int:
    try:
        value = int(env[key].strip())
    except ValueError:
        raise PoolConfigError(f"{key}: expected a whole number, got {env[key]!r}") from None
    if value < minimum:
        raise PoolConfigError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], key: str) -> float:
    try:
        value = float(env[key].strip())
    except ValueError:
        raise PoolConfigError(f"{key}: expected a number, got {env[key]!r}") from None
    if value <= 0:
        raise PoolConfigError(f"{key}: must be > 0, got {value}")
    return value


def _bool(env: Mapping[str, str], key: str) -> bool:
    text = env[key].strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PoolConfigError(f"{key}: expected true or false, got {env[key]!r}")


def engine_kwargs_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The DB_* keys -> JSON-serialisable `create_async_engine` kwargs.

    connect_args go to asyncpg through SQLAlchemy's asyncpg dialect: `server_settings` are
    set on every new connection, `command_timeout` bounds each query client-side,
    `statement_cache_size` is asyncpg's prepared-statement cache and
    `prepared_statement_cache_size` is the dialect's own; both are 0 behind PgBouncer's
    transaction pooling.
    """
    source = os.environ if env is None else env
    missing = [key for key in REQUIRED_KEYS if key not in source]
    if missing:
        raise PoolConfigError(f"missing {', '.join(missing)} (is the ConfigMap in envFrom?)")
    statement_cache = _int(source, "DB_STATEMENT_CACHE_SIZE", 0)
    pool_size = _int(source, "DB_POOL_SIZE", 1)  # 0 would mean "no limit" to SQLAlchemy
    return {
        "pool_size": pool_size,
        "max_overflow": _int(source, "DB_MAX_OVERFLOW", 0),
        "pool_timeout": _float(source, "DB_POOL_TIMEOUT"),
        "pool_recycle": _int(source, "DB_POOL_RECYCLE", -1),
        "pool_pre_ping": _bool(source, "DB_POOL_PRE_PING"),
        "connect_args": {
            "server_settings": {
                "statement_timeout": str(_int(source, "DB_STATEMENT_TIMEOUT_MS", 0)),
                "idle_in_transaction_session_timeout": str(
                    _int(source, "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS", 0)
                ),
                "application_name": source["DB_APPLICATION_NAME"],
            },
            "command_timeout": _float(source, "DB_COMMAND_TIMEOUT"),
            "statement_cache_size": statement_cache,
            "prepared_statement_cache_size": statement_cache,
        },
    }


def engine_kwargs_from_file(path: str | Path) -> dict[str, Any]:
    """Read a mounted `sqlalchemy.json`."""
    try:
        kwargs = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PoolConfigError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PoolConfigError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("pool_size"), int):
        raise PoolConfigError(f"{path}: not a poolbudget sqlalchemy.json (no pool_size)")
    if kwargs["pool_size"] < 1:
        raise PoolConfigError(f"{path}: pool_size must be >= 1, got {kwargs['pool_size']}")
    return kwargs


def engine_kwargs(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Kwargs for `create_async_engine(url, **engine_kwargs())`, from file or environment."""
    source = os.environ if env is None else env
    config_file = source.get(CONFIG_FILE_VARIABLE)
    kwargs = engine_kwargs_from_file(config_file) if config_file else engine_kwargs_from_env(source)
    connect_args = kwargs.setdefault("connect_args", {})
    if connect_args.get("statement_cache_size") == 0:
        # Behind PgBouncer, statements asyncpg still prepares (unnamed ones aside) must not
        # collide across server connections: SQLAlchemy's documented remedy is unique names.
        connect_args["prepared_statement_name_func"] = _unique_statement_name
    return kwargs


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"
