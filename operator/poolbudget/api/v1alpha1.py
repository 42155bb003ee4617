"""Pydantic models of the PoolBudget custom resource (poolbudget.dev/v1alpha1).

Field names follow the CRD (camelCase at the boundary, snake_case in Python). Unknown
fields are rejected, so a typo in a YAML file is an error that names the field rather than
a silently ignored setting. The CRD's OpenAPI schema in ``crds/`` says the same things for
the API server; a test keeps the two in step.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "poolbudget.dev"
VERSION = "v1alpha1"
KIND = "PoolBudget"
PLURAL = "poolbudgets"
API_VERSION = f"{GROUP}/{VERSION}"

# DNS-1123 subdomain, which is what Deployment and ConfigMap names must be.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Pooling(StrEnum):
    DIRECT = "Direct"
    # Behind PgBouncer in transaction mode, prepared-statement caches must be off.
    PGBOUNCER_TRANSACTION = "PgBouncerTransaction"


class ReplicaBasis(StrEnum):
    """Which replica count a budget is computed for."""

    WORST_CASE = "WorstCase"  # max(replicas, HPA maxReplicas) + surge
    CURRENT = "Current"  # replicas + surge


class RolloutStrategy(StrEnum):
    ROLLING_RESTART = "RollingRestart"
    NONE = "None"


class SecretKeyRef(CamelModel):
    name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)
    key: str = Field(default="dsn", min_length=1, max_length=253)


class DatabaseSpec(CamelModel):
    connection_secret_ref: SecretKeyRef | None = None
    max_connections_override: int | None = Field(default=None, ge=1, le=262143)
    refresh_seconds: int = Field(default=60, ge=5, le=86400)

    @model_validator(mode="after")
    def _has_a_source(self) -> DatabaseSpec:
        if self.connection_secret_ref is None and self.max_connections_override is None:
            raise ValueError("set connectionSecretRef or maxConnectionsOverride")
        return self


class PoolDefaults(CamelModel):
    max_overflow: int = Field(default=5, ge=0, le=10000)
    pool_timeout_seconds: float = Field(default=10, gt=0, le=3600)
    pool_recycle_seconds: int = Field(default=1800, ge=-1, le=86400)
    pool_pre_ping: bool = True
    statement_timeout_milliseconds: int = Field(default=30000, ge=0)
    idle_in_transaction_session_timeout_milliseconds: int = Field(default=5000, ge=0)
    command_timeout_seconds: float = Field(default=10, gt=0, le=86400)


class Target(CamelModel):
    deployment_name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)
    processes_per_pod: int = Field(default=1, ge=1, le=1024)
    weight: int = Field(default=1, ge=1, le=1000)
    min_pool_size: int = Field(default=1, ge=1, le=10000)
    max_pool_size: int | None = Field(default=None, ge=1, le=10000)
    max_overflow: int | None = Field(default=None, ge=0, le=10000)
    config_map_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN
    )
    application_name: str | None = Field(default=None, max_length=63)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Target:
        if self.max_pool_size is not None and self.max_pool_size < self.min_pool_size:
            raise ValueError(
                f"maxPoolSize ({self.max_pool_size}) must be >= minPoolSize ({self.min_pool_size})"
            )
        return self

    @property
    def resolved_config_map_name(self) -> str:
        return self.config_map_name or f"{self.deployment_name}-db-pool"


class RolloutSpec(CamelModel):
    strategy: RolloutStrategy = RolloutStrategy.ROLLING_RESTART
    max_concurrent: int = Field(default=1, ge=1, le=100)
    min_interval_seconds: int = Field(default=300, ge=0, le=86400)


class PoolBudgetSpec(CamelModel):
    database: DatabaseSpec
    reserved_connections: int = Field(default=10, ge=0, le=262143)
    pooling: Pooling = Pooling.DIRECT
    replica_basis: ReplicaBasis = ReplicaBasis.WORST_CASE
    defaults: PoolDefaults = PoolDefaults()
    targets: tuple[Target, ...] = Field(min_length=1, max_length=200)
    rollout: RolloutSpec = RolloutSpec()

    @model_validator(mode="after")
    def _targets_unique(self) -> PoolBudgetSpec:
        seen: set[str] = set()
        for field, names in (
            ("deploymentName", [t.deployment_name for t in self.targets]),
            ("configMapName", [t.resolved_config_map_name for t in self.targets]),
        ):
            seen.clear()
            for name in names:
                if name in seen:
                    raise ValueError(f"targets: {field} {name!r} appears more than once")
                seen.add(name)
        return self


class ObjectMeta(BaseModel):
    """The part of metadata the CLI reads; everything else is allowed and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "poolbudget"
    namespace: str = "default"


class PoolBudget(CamelModel):
    api_version: str = Field(pattern=f"^{GROUP}/{VERSION}$")
    kind: str = Field(pattern=f"^{KIND}$")
    metadata: ObjectMeta = ObjectMeta()
    spec: PoolBudgetSpec
    # Status is the operator's to write; a file copied from `kubectl get -o yaml` may carry it.
    status: dict[str, object] | None = None


def describe_validation_error(exc: ValidationError) -> str:
    """The first error as `field.path: message`, in the CRD's camelCase field names."""
    error = exc.errors()[0]
    location = ""
    for part in error["loc"]:
        location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else part)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    message = message.removeprefix("Value error, ")
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{location}: {message}{extra}" if location else f"{message}{extra}"
