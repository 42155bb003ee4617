"""Pydantic models of the PoolBudget custom resource (poolbudget.dev/v1alpha1).

Field names follow the CRD (camelCase at the boundary, snake_case in Python). Unknown
fields are rejected, so a typo in a YAML file is an error that names the field rather than
a silently ignored setting. The CRD's OpenAPI schema in ``crds/`` says the same things for
the API server; a test keeps the two in step.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from poolbudget.client import MIN_TIMEOUT_SECONDS

GROUP = "poolbudget.dev"
VERSION = "v1alpha1"
KIND = "PoolBudget"
PLURAL = "poolbudgets"
API_VERSION = f"{GROUP}/{VERSION}"

# DNS-1123 subdomain, which is what Deployment and ConfigMap names must be.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_OBJECT_NAME_LENGTH = 253
# A key of a Secret's (or ConfigMap's) data, as the API server checks it (IsConfigMapKey).
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# PostgreSQL keeps application_name as printable ASCII (anything else becomes '?'), at most
# NAMEDATALEN - 1 = 63 bytes; ASCII makes characters and bytes the same count.
PRINTABLE_ASCII = r"^[ -~]*$"
MAX_APPLICATION_NAME_LENGTH = 63

DEFAULT_CONFIGMAP_SUFFIX = "-db-pool"
# Longest deploymentName whose default ConfigMap name is still a valid object name.
MAX_DEPLOYMENT_NAME_FOR_DEFAULT_CONFIGMAP = MAX_OBJECT_NAME_LENGTH - len(DEFAULT_CONFIGMAP_SUFFIX)


class CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Pooling(StrEnum):
    """How applications reach PostgreSQL."""

    DIRECT = "Direct"
    # Behind PgBouncer in transaction mode, prepared-statement caches must be off.
    PGBOUNCER_TRANSACTION = "PgBouncerTransaction"


class ReplicaBasis(StrEnum):
    """Which replica count a budget is computed for."""

    WORST_CASE = "WorstCase"  # max(replicas, HPA maxReplicas) + surge
    CURRENT = "Current"  # replicas + surge


class TerminatingPods(StrEnum):
    """Whether a budget counts pods that are shutting down during a rollout."""

    UNCOUNTED = "Uncounted"  # as the Deployment controller counts: replicas + maxSurge
    COUNTED = "Counted"  # + one rollout step still terminating (maxSurge + maxUnavailable)


TERMINATING_PODS_DESCRIPTION = (
    "Uncounted (default): budget the pods the Deployment controller counts, replicas + "
    "maxSurge; a pod that is terminating must have released its pool before its "
    "replacement connects. Counted: also budget one rollout step of pods still shutting "
    "down (maxSurge + maxUnavailable of a RollingUpdate Deployment, at most its replicas): "
    "the controller starts replacements as soon as old pods begin terminating, and those "
    "hold their connections until their processes exit (in-flight requests, grace period). "
    "Smaller pools, no refused connection during a rollout. Recreate Deployments have no "
    "overlap either way."
)


class ShareBy(StrEnum):
    """What a target's weight multiplies when the budget is shared."""

    WORKER = "Worker"  # weight x workers: the same pool per worker for equal weights
    TARGET = "Target"  # weight alone: the same total per Deployment for equal weights


SHARE_BY_DESCRIPTION = (
    "How the usable connections are shared. Worker (default): per worker process; with "
    "equal weights every worker of every target gets the same pool, floor(usable / all "
    "workers) - maxOverflow, and weight 2 means twice the pool per worker. Fair to busy "
    "services, but when one Deployment scales the level moves for all, so most targets' "
    "pools change and their Deployments restart (paced by rollout). Target: per Deployment; "
    "with equal weights each target gets the same total whatever its size, so a target "
    "with many workers gets small pools, but a Deployment that scales changes mostly its "
    "own pools (others only when rounding moves the shared level), so fewer restart."
)


class RolloutStrategy(StrEnum):
    ROLLING_RESTART = "RollingRestart"
    NONE = "None"


class SecretKeyRef(CamelModel):
    """A key of a Secret in the PoolBudget's namespace."""

    name: str = Field(
        min_length=1,
        max_length=MAX_OBJECT_NAME_LENGTH,
        pattern=DNS1123_SUBDOMAIN,
        description="Name of the Secret, in the PoolBudget's namespace.",
    )
    key: str = Field(
        default="dsn",
        min_length=1,
        max_length=253,
        pattern=DATA_KEY_PATTERN,
        description="Key in the Secret whose value is the DSN.",
    )


CAPACITY_RATIO_MESSAGE = "capacityWarningRatio must be between 0.1 and 1"


class DatabaseWatch(CamelModel):
    """What the operator watches in pg_stat_activity on each refresh, and when it warns."""

    enabled: bool = Field(
        default=True,
        description=(
            "Read pg_stat_activity on every refresh (one grouped query on the operator's kept "
            "connection): live connections by state per target and for the whole server, "
            "clients that belong to no target, and the four signals below, reported in "
            "status, the DatabaseHealthy condition, events and metrics. Needs "
            "connectionSecretRef; pg_monitor shows everything, a plain role sees other roles' "
            "sessions without their state."
        ),
    )
    capacity_warning_ratio: float = Field(
        default=0.85,
        ge=0.1,
        le=1,
        description=(
            "Warn (NearCapacity) when the client connections open on the server reach this "
            "share of the budget's usable connections; the warning clears once they stay "
            "5 points below it for three refreshes."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                # An integer 0 would pass `minimum: 0.1` (compared truncated): CEL compares numbers.
                {"rule": "self >= 0.1 && self <= 1.0", "message": CAPACITY_RATIO_MESSAGE}
            ]
        },
    )
    lock_waits_warning: int = Field(
        default=3,
        ge=1,
        le=100000,
        description=(
            "Warn (LockWaits) when at least this many sessions wait on a lock at a refresh "
            "(needs pg_monitor to see other roles' sessions)."
        ),
    )
    idle_in_transaction_warning_seconds: int = Field(
        default=5,
        ge=1,
        le=86400,
        description=(
            "Warn (StaleTransactions, naming the application) when a session has been idle "
            "in transaction for longer than this: a transaction left open holds its "
            "connection and its locks (needs pg_monitor to see other roles' sessions)."
        ),
    )


class DatabaseSpec(CamelModel):
    """Where the connection limit comes from and how often it is re-read."""

    model_config = CamelModel.model_config | ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.connectionSecretRef) || has(self.maxConnectionsOverride)",
                    "message": "set connectionSecretRef or maxConnectionsOverride",
                }
            ]
        }
    )

    connection_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding a postgresql:// DSN (with the database name) the operator "
            "uses to read max_connections, superuser_reserved_connections and "
            "reserved_connections. A read-only role is enough. The operator keeps one "
            "connection open: count it in reservedConnections. The DSN never appears in "
            "logs, events or status."
        ),
    )
    max_connections_override: int | None = Field(
        default=None,
        ge=1,
        le=262143,
        description=(
            "Use this max_connections instead of the database's. Without a "
            "connectionSecretRef, PostgreSQL's default superuser_reserved_connections (3) "
            "is assumed."
        ),
    )
    refresh_seconds: int = Field(
        default=60,
        ge=5,
        le=86400,
        description=(
            "How often the database's limits (and, with watch enabled, its live "
            "connections) are re-read, in seconds."
        ),
    )
    watch: DatabaseWatch = Field(
        default=DatabaseWatch(),
        description=(
            "Live connections and starvation signals read on each refresh. They never change "
            "the plan, the ConfigMaps or Ready: they report."
        ),
    )

    @model_validator(mode="after")
    def _has_a_source(self) -> DatabaseSpec:
        # The CRD says the same in CEL; this keeps `poolbudget plan` and reconcile honest.
        if self.connection_secret_ref is None and self.max_connections_override is None:
            raise ValueError("set connectionSecretRef or maxConnectionsOverride")
        return self


POOL_RECYCLE_MESSAGE = "poolRecycleSeconds must be -1 (never) or at least 1"
# `minimum: 0.001` alone lets an integer 0 through the API server (its validator compares
# an integer value with the minimum truncated to an integer): CEL compares numbers.
TIMEOUT_MESSAGE = "must be at least 0.001 (seconds, millisecond resolution)"


def _timeout_rule() -> dict[str, list[dict[str, str]]]:
    return {"x-kubernetes-validations": [{"rule": "self >= 0.001", "message": TIMEOUT_MESSAGE}]}


class PoolDefaults(CamelModel):
    """SQLAlchemy/asyncpg settings written into every target's ConfigMap."""

    max_overflow: int = Field(
        default=5,
        ge=0,
        le=10000,
        description=(
            "max_overflow per worker process unless a target overrides it; lowered "
            "automatically (for all targets alike) when the minimum pools do not fit."
        ),
    )
    pool_timeout_seconds: float = Field(
        default=10,
        ge=MIN_TIMEOUT_SECONDS,
        le=3600,
        description=(
            "pool_timeout: seconds a request waits for a free connection (millisecond "
            "resolution: 0.001 at least, finer values are rounded)."
        ),
        json_schema_extra=_timeout_rule(),  # type: ignore[arg-type]
    )
    pool_recycle_seconds: int = Field(
        default=1800,
        ge=-1,
        le=86400,
        description=(
            "pool_recycle: seconds before a connection is replaced, -1 for never. 0 is "
            "refused: SQLAlchemy would replace the connection on every checkout (no pooling)."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == -1 || self >= 1", "message": POOL_RECYCLE_MESSAGE}
            ]
        },
    )
    pool_pre_ping: bool = Field(
        default=True,
        description="pool_pre_ping: test connections on checkout.",
    )
    statement_timeout_milliseconds: int = Field(
        default=30000,
        ge=0,
        le=2147483647,
        description="PostgreSQL statement_timeout set on every connection; 0 disables.",
    )
    idle_in_transaction_session_timeout_milliseconds: int = Field(
        default=5000,
        ge=0,
        le=2147483647,
        description=(
            "PostgreSQL idle_in_transaction_session_timeout set on every connection; 0 disables."
        ),
    )
    command_timeout_seconds: float = Field(
        default=10,
        ge=MIN_TIMEOUT_SECONDS,
        le=86400,
        description=(
            "asyncpg command_timeout: client-side limit per query, in seconds (millisecond "
            "resolution: 0.001 at least, finer values are rounded)."
        ),
        json_schema_extra=_timeout_rule(),  # type: ignore[arg-type]
    )

    @field_validator("pool_recycle_seconds")
    @classmethod
    def _recycle_not_every_checkout(cls, value: int) -> int:
        # The CRD's CEL rule says the same; ge=-1 alone would let 0 through.
        if value == 0:
            raise ValueError(POOL_RECYCLE_MESSAGE)
        return value


LONG_DEPLOYMENT_NAME_MESSAGE = (
    f"deploymentName longer than {MAX_DEPLOYMENT_NAME_FOR_DEFAULT_CONFIGMAP} characters "
    f"makes the default ConfigMap name <deploymentName>{DEFAULT_CONFIGMAP_SUFFIX} longer "
    f"than {MAX_OBJECT_NAME_LENGTH}: set configMapName"
)


class Target(CamelModel):
    """A Deployment whose pods get pool settings from this budget."""

    model_config = CamelModel.model_config | ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxPoolSize) || self.minPoolSize <= self.maxPoolSize",
                    "message": "maxPoolSize must be >= minPoolSize",
                    "fieldPath": ".maxPoolSize",
                },
                {
                    "rule": "has(self.configMapName) || size(self.deploymentName) <= "
                    f"{MAX_DEPLOYMENT_NAME_FOR_DEFAULT_CONFIGMAP}",
                    "message": LONG_DEPLOYMENT_NAME_MESSAGE,
                    "fieldPath": ".deploymentName",
                },
            ]
        }
    )

    deployment_name: str = Field(
        min_length=1,
        max_length=MAX_OBJECT_NAME_LENGTH,
        pattern=DNS1123_SUBDOMAIN,
        description=(
            "Name of a Deployment in the PoolBudget's namespace. Without configMapName, at "
            f"most {MAX_DEPLOYMENT_NAME_FOR_DEFAULT_CONFIGMAP} characters (room for the "
            f"{DEFAULT_CONFIGMAP_SUFFIX} suffix)."
        ),
    )
    processes_per_pod: int = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "Worker processes per pod that each open their own pool (gunicorn/uvicorn "
            "workers). Connections = pods x processesPerPod x (pool_size + max_overflow)."
        ),
    )
    weight: int = Field(
        default=1,
        ge=1,
        le=1000,
        description=(
            "Share of the budget relative to the other targets' weights: per worker "
            "process (shareBy Worker) or per Deployment (shareBy Target)."
        ),
    )
    min_pool_size: int = Field(
        default=1,
        ge=1,
        le=10000,
        description=(
            "Smallest pool_size worth running. If even these do not fit, max_overflow is "
            "lowered, then the budget is reported infeasible and nothing is written."
        ),
    )
    max_pool_size: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="Largest pool_size to give; what this target does not take goes to others.",
    )
    max_overflow: int | None = Field(
        default=None,
        ge=0,
        le=10000,
        description="Overrides defaults.maxOverflow for this target.",
    )
    config_map_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_OBJECT_NAME_LENGTH,
        pattern=DNS1123_SUBDOMAIN,
        description=f"ConfigMap to write; default <deploymentName>{DEFAULT_CONFIGMAP_SUFFIX}.",
    )
    application_name: str | None = Field(
        default=None,
        max_length=MAX_APPLICATION_NAME_LENGTH,
        pattern=PRINTABLE_ASCII,
        description=(
            "PostgreSQL application_name for the connections; default the Deployment name "
            f"(its first {MAX_APPLICATION_NAME_LENGTH} characters)."
        ),
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Target:
        if self.max_pool_size is not None and self.max_pool_size < self.min_pool_size:
            raise ValueError(
                f"maxPoolSize ({self.max_pool_size}) must be >= minPoolSize ({self.min_pool_size})"
            )
        return self

    @model_validator(mode="after")
    def _default_config_map_name_fits(self) -> Target:
        # The CRD's CEL rule on the target says the same.
        if (
            self.config_map_name is None
            and len(self.deployment_name) > MAX_DEPLOYMENT_NAME_FOR_DEFAULT_CONFIGMAP
        ):
            raise ValueError(LONG_DEPLOYMENT_NAME_MESSAGE)
        return self

    @property
    def resolved_config_map_name(self) -> str:
        return self.config_map_name or f"{self.deployment_name}{DEFAULT_CONFIGMAP_SUFFIX}"


class RolloutSpec(CamelModel):
    """How Deployments are restarted when their settings change."""

    strategy: RolloutStrategy = Field(
        default=RolloutStrategy.ROLLING_RESTART,
        description=(
            "RollingRestart: set poolbudget.dev/config-hash on the pod template so the "
            "Deployment rolls. None: only write ConfigMaps; pods pick them up when they restart."
        ),
    )
    max_concurrent: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Deployments of this budget rolling at once (rollouts in progress count).",
    )
    min_interval_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="Cooldown: a Deployment is not restarted again within this many seconds.",
    )


_CONFIGMAP_OF = (
    "(has({0}.configMapName) ? {0}.configMapName : {0}.deploymentName + '"
    + DEFAULT_CONFIGMAP_SUFFIX
    + "')"
)


class PoolBudgetSpec(CamelModel):
    """Keep the listed Deployments' connection pools inside one database's limit."""

    database: DatabaseSpec = Field(description="The database whose limit is shared.")
    reserved_connections: int = Field(
        default=10,
        ge=0,
        le=262143,
        description=(
            "Connections held back for clients outside the budget (admin, monitoring, "
            "migrations, this operator), on top of PostgreSQL's own reserve."
        ),
    )
    pooling: Pooling = Field(
        default=Pooling.DIRECT,
        description=(
            "Direct: applications connect to PostgreSQL. PgBouncerTransaction: through "
            "PgBouncer in transaction mode; prepared-statement caches are disabled."
        ),
    )
    replica_basis: ReplicaBasis = Field(
        default=ReplicaBasis.WORST_CASE,
        description=(
            "WorstCase: budget for max(replicas, HPA maxReplicas) + maxSurge pods. "
            "Current: replicas + maxSurge (breaks when an HPA scales up)."
        ),
    )
    terminating_pods: TerminatingPods = Field(
        default=TerminatingPods.UNCOUNTED, description=TERMINATING_PODS_DESCRIPTION
    )
    share_by: ShareBy = Field(default=ShareBy.WORKER, description=SHARE_BY_DESCRIPTION)
    defaults: PoolDefaults = Field(
        default=PoolDefaults(), description="Pool settings written for every target."
    )
    targets: tuple[Target, ...] = Field(
        min_length=1,
        max_length=100,
        description="The Deployments that share the budget.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["deploymentName"],
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(t, self.exists_one(u, "
                    + _CONFIGMAP_OF.format("u")
                    + " == "
                    + _CONFIGMAP_OF.format("t")
                    + "))",
                    "message": "each target needs its own configMapName",
                }
            ],
        },
    )
    rollout: RolloutSpec = Field(
        default=RolloutSpec(), description="How Deployments are restarted."
    )

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
    errors = _causes(exc.errors())
    error = errors[0]
    location = ""
    for part in error["loc"]:
        location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else part)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    message = message.removeprefix("Value error, ")
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{location}: {message}{extra}" if location else f"{message}{extra}"


def _causes(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """Drop the echo pydantic adds when a list item fails: the item is left out, and the
    list is then reported `too_short` too, although the item is the only thing wrong."""
    causes = [
        e
        for e in errors
        if not (
            e["type"] == "too_short"
            and any(o is not e and o["loc"][: len(e["loc"])] == e["loc"] for o in errors)
        )
    ]
    return causes or errors
