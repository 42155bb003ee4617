"""The ConfigMap each target gets, and the hash that decides restarts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from poolbudget.api.v1alpha1 import (
    MAX_APPLICATION_NAME_LENGTH,
    PoolBudgetSpec,
    Pooling,
    Target,
)
from poolbudget.client import engine_kwargs_from_env, format_seconds
from poolbudget.domain.sizing import Allocation

MANAGED_BY = "poolbudget-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_BUDGET = "poolbudget.dev/budget"
ANNOTATION_CONFIG_HASH = "poolbudget.dev/config-hash"
SQLALCHEMY_FILE_KEY = "sqlalchemy.json"

# asyncpg's default statement cache size; 0 disables it (required behind PgBouncer's
# transaction pooling, where prepared statements do not survive between transactions).
ASYNCPG_DEFAULT_STATEMENT_CACHE_SIZE = 100


def render_env(spec: PoolBudgetSpec, target: Target, allocation: Allocation) -> dict[str, str]:
    """The environment keys (for envFrom) for one target."""
    defaults = spec.defaults
    statement_cache = (
        0 if spec.pooling is Pooling.PGBOUNCER_TRANSACTION else ASYNCPG_DEFAULT_STATEMENT_CACHE_SIZE
    )
    return {
        "DB_POOL_SIZE": str(allocation.pool_size),
        "DB_MAX_OVERFLOW": str(allocation.max_overflow),
        "DB_POOL_TIMEOUT": format_seconds(defaults.pool_timeout_seconds),
        "DB_POOL_RECYCLE": str(defaults.pool_recycle_seconds),
        "DB_POOL_PRE_PING": "true" if defaults.pool_pre_ping else "false",
        "DB_STATEMENT_TIMEOUT_MS": str(defaults.statement_timeout_milliseconds),
        "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS": str(
            defaults.idle_in_transaction_session_timeout_milliseconds
        ),
        "DB_COMMAND_TIMEOUT": format_seconds(defaults.command_timeout_seconds),
        "DB_STATEMENT_CACHE_SIZE": str(statement_cache),
        "DB_APPLICATION_NAME": application_name(target),
    }


def application_name(target: Target) -> str:
    """applicationName, else the Deployment name cut to what PostgreSQL keeps.

    PostgreSQL keeps at most 63 bytes of application_name; cutting the default here makes
    the ConfigMap say what pg_stat_activity will show. Deployment names are ASCII, so 63
    characters are 63 bytes. (An explicit applicationName is validated to fit.)
    """
    return target.application_name or target.deployment_name[:MAX_APPLICATION_NAME_LENGTH]


def render_configmap_data(
    spec: PoolBudgetSpec, target: Target, allocation: Allocation
) -> dict[str, str]:
    """Environment keys plus `sqlalchemy.json`, the same settings as engine kwargs.

    The JSON is produced by the very function applications use to read the environment
    keys, so the two forms cannot disagree.
    """
    env = render_env(spec, target, allocation)
    kwargs = engine_kwargs_from_env(env)
    return {**env, SQLALCHEMY_FILE_KEY: json.dumps(kwargs, sort_keys=True, indent=2) + "\n"}


def config_hash(data: Mapping[str, str]) -> str:
    """sha256 over the ConfigMap data with sorted keys: same settings, same hash."""
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode())
        digest.update(b"=")
        digest.update(data[key].encode())
        digest.update(b"\n")
    return digest.hexdigest()


def owned_hash(current: Mapping[str, str], rendered: Mapping[str, str]) -> str:
    """config_hash of the keys the operator writes, as the ConfigMap holds them now.

    Keys another writer added (`kubectl edit`, a GitOps tool) are theirs: server-side
    apply leaves them in place, so comparing them would show a difference no write can
    remove, every round (a write storm). One of our keys edited or deleted still differs
    from `rendered`, and is restored once."""
    return config_hash({key: current[key] for key in rendered if key in current})


def per_worker_connections(data: Mapping[str, str]) -> int | None:
    """pool_size + max_overflow recorded in a ConfigMap's data; None if unreadable."""
    try:
        return int(data["DB_POOL_SIZE"]) + int(data["DB_MAX_OVERFLOW"])
    except (KeyError, ValueError):
        return None


def managed_labels(budget_name: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUDGET: budget_name}
