"""What applications import: the operator's ConfigMap -> `create_async_engine` kwargs.

    from poolbudget.client import engine_kwargs
    engine = create_async_engine(DATABASE_URL, **engine_kwargs())

`engine_kwargs()` reads the file named by ``POOLBUDGET_CONFIG_FILE`` when that variable is
set (mount the ConfigMap's ``sqlalchemy.json``), otherwise the ``DB_*`` environment keys
(``envFrom`` the ConfigMap). A named file that is missing is an error, not a reason to fall
back to the environment: a pod whose mount went wrong must not start with other settings.
Both forms carry the same settings; `engine_kwargs_from_env` is the one mapping between
them, and the operator uses it to write ``sqlalchemy.json``.

Behind PgBouncer in transaction pooling (the budget's ``pooling: PgBouncerTransaction``,
which the ConfigMap marks with ``DB_STATEMENT_CACHE_SIZE=0``):

* both statement caches are off: asyncpg's (``statement_cache_size``) and the SQLAlchemy
  dialect's (``prepared_statement_cache_size``), since a statement prepared in one
  transaction is on a server connection the next transaction may not get;
* statements the dialect still prepares get unique names (``prepared_statement_name_func``,
  SQLAlchemy's documented remedy): asyncpg's own names count up from 1 in every process, so
  two pods would collide on one server connection;
* ``statement_timeout`` and ``idle_in_transaction_session_timeout`` are not sent: PgBouncer
  refuses a client that sends them as startup parameters ("unsupported startup parameter:
  statement_timeout"), and a session SET would stick to a shared server connection. Set
  them where the server applies them to every session, e.g. ``ALTER ROLE app SET
  statement_timeout = '30s'``. ``command_timeout`` still bounds every query client-side.

No third-party imports: applications have SQLAlchemy, the operator does not need it.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
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

_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")

# Timeouts are seconds with millisecond resolution: the one format the operator writes
# and applications read (plain decimals: no exponent, no "inf"), and the smallest value
# the CRD, the renderer and this reader all accept.
MIN_TIMEOUT_SECONDS = 0.001


def format_seconds(value: float) -> str:
    """10.0 -> "10", 2.5 -> "2.5", 0.0004999 -> "0": a plain decimal, at most 3 places."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


class PoolConfigError(ValueError):
    """A missing or malformed setting; the message names the key."""


def _int(env: Mapping[str, str], key: str, minimum: int) -> int:
    text = env[key].strip()
    if not _WHOLE.fullmatch(text):
        raise PoolConfigError(f"{key}: expected a whole number, got {env[key]!r}")
    value = int(text)
    if value < minimum:
        raise PoolConfigError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _recycle(value: int, key: str) -> int:
    """-1 (never) or whole seconds >= 1: 0 would replace the connection on every checkout."""
    if value == 0:
        raise PoolConfigError(f"{key}: must be -1 (never) or >= 1, got 0")
    return value


def _float(env: Mapping[str, str], key: str) -> float:
    text = env[key].strip()
    if not _DECIMAL.fullmatch(text):  # no "inf", "nan" or exponents
        raise PoolConfigError(f"{key}: expected a decimal number, got {env[key]!r}")
    value = float(text)
    if value < MIN_TIMEOUT_SECONDS:
        raise PoolConfigError(f"{key}: must be >= {MIN_TIMEOUT_SECONDS}, got {env[key]!r}")
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
    sent as startup parameters of every new connection, `command_timeout` bounds each query
    client-side, `statement_cache_size` is asyncpg's prepared-statement cache and
    `prepared_statement_cache_size` is the dialect's own.
    """
    source = os.environ if env is None else env
    missing = [key for key in REQUIRED_KEYS if key not in source]
    if missing:
        raise PoolConfigError(f"missing {', '.join(missing)} (is the ConfigMap in envFrom?)")
    statement_cache = _int(source, "DB_STATEMENT_CACHE_SIZE", 0)
    statement_timeout = _int(source, "DB_STATEMENT_TIMEOUT_MS", 0)
    idle_timeout = _int(source, "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS", 0)
    server_settings = {"application_name": source["DB_APPLICATION_NAME"]}
    if statement_cache > 0:  # 0 marks PgBouncer transaction pooling: see the module doc
        server_settings["statement_timeout"] = str(statement_timeout)
        server_settings["idle_in_transaction_session_timeout"] = str(idle_timeout)
    return {
        "pool_size": _int(source, "DB_POOL_SIZE", 1),  # 0 would mean "no limit" to SQLAlchemy
        "max_overflow": _int(source, "DB_MAX_OVERFLOW", 0),
        "pool_timeout": _float(source, "DB_POOL_TIMEOUT"),
        "pool_recycle": _recycle(_int(source, "DB_POOL_RECYCLE", -1), "DB_POOL_RECYCLE"),
        "pool_pre_ping": _bool(source, "DB_POOL_PRE_PING"),
        "connect_args": {
            "server_settings": server_settings,
            "command_timeout": _float(source, "DB_COMMAND_TIMEOUT"),
            "statement_cache_size": statement_cache,
            "prepared_statement_cache_size": statement_cache,
        },
    }


# sqlalchemy.json: each known key and its check. Keys the file has beyond these are passed
# on untouched, so a newer operator can add engine arguments without breaking older apps.
def _whole(minimum: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _timeout(v: object) -> bool:
    return (
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and v >= MIN_TIMEOUT_SECONDS
    )


_FILE_KEYS: dict[str, tuple[Callable[[object], bool], str]] = {
    "pool_size": (_whole(1), "a whole number >= 1"),
    "max_overflow": (_whole(0), "a whole number >= 0"),
    "pool_timeout": (_timeout, f"a number >= {MIN_TIMEOUT_SECONDS}"),
    "pool_recycle": (
        lambda v: _whole(-1)(v) and v != 0,
        "-1 (never) or a whole number >= 1",
    ),
    "pool_pre_ping": (lambda v: isinstance(v, bool), "true or false"),
    "connect_args": (lambda v: isinstance(v, dict), "an object"),
}
_CONNECT_ARGS_KEYS: dict[str, tuple[Callable[[object], bool], str]] = {
    "server_settings": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(s, str) for k, s in v.items())
        ),
        "an object of strings",
    ),
    "command_timeout": (_timeout, f"a number >= {MIN_TIMEOUT_SECONDS}"),
    "statement_cache_size": (_whole(0), "a whole number >= 0"),
    "prepared_statement_cache_size": (_whole(0), "a whole number >= 0"),
}


def _check(
    where: str, values: Mapping[str, Any], keys: dict[str, tuple[Callable[[object], bool], str]]
) -> None:
    missing = [key for key in keys if key not in values]
    if missing:
        raise PoolConfigError(f"{where}: missing {', '.join(missing)}")
    for key, (valid, expected) in keys.items():
        if not valid(values[key]):
            raise PoolConfigError(f"{where}{key}: expected {expected}, got {values[key]!r}")


def engine_kwargs_from_file(path: str | Path) -> dict[str, Any]:
    """Read a mounted `sqlalchemy.json`; PoolConfigError names the file and the key."""
    try:
        kwargs = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PoolConfigError(f"{path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PoolConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise PoolConfigError(f"{path}: expected a JSON object of engine arguments")
    _check(f"{path}: ", kwargs, _FILE_KEYS)
    _check(f"{path}: connect_args.", kwargs["connect_args"], _CONNECT_ARGS_KEYS)
    return kwargs


def engine_kwargs(
    env: Mapping[str, str] | None = None, *, path: str | Path | None = None
) -> dict[str, Any]:
    """Kwargs for `create_async_engine(url, **engine_kwargs())`.

    From `path` if given, else from the file ``POOLBUDGET_CONFIG_FILE`` names, else from the
    DB_* keys of `env` (default: the process environment).
    """
    source = os.environ if env is None else env
    config_file = path if path is not None else source.get(CONFIG_FILE_VARIABLE)
    kwargs = engine_kwargs_from_file(config_file) if config_file else engine_kwargs_from_env(source)
    connect_args = kwargs["connect_args"]
    if connect_args.get("statement_cache_size") == 0:
        # Not JSON, so added here rather than written into the ConfigMap.
        connect_args["prepared_statement_name_func"] = unique_statement_name
    return kwargs


def unique_statement_name() -> str:
    """A prepared-statement name no other process will use (SQLAlchemy's asyncpg docs)."""
    return f"__asyncpg_{uuid.uuid4()}__"
