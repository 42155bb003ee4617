"""Pydantic models of the PoolBudget status (poolbudget.dev/v1alpha1), described once.

The CRD's status schema is generated from these models (api/crd.py, `make crds`), like the
spec's from v1alpha1.py; the class docstrings and field descriptions are what
`kubectl explain poolbudget.status` shows. Field names are camelCase at the boundary,
snake_case in Python, and every field but the list keys (allocations[].deploymentName) and
the metav1.Condition fields is optional: None is "absent", never written.

Two ways out:

- `PoolBudgetStatus.to_body()`: the status as the API server stores it (no nulls).
- `PoolBudgetStatus.merge_patch()`: what the operator sends to the status subresource (a
  JSON merge patch): the same, plus an explicit null for every field this model knows and
  this status leaves out, so a field that vanished (database.serverVersion,
  database.connectionsInUse, activity, ...) is removed on the server whatever was there
  before. Lists are replaced whole by a merge patch, so their entries need no nulls. See
  adapters/kube.py `patch_budget_status` for why a merge patch and not server-side apply.

One way in, lenient, because it reads what any operator version (or a person with kubectl)
wrote: `PoolBudgetStatus.model_validate(body["status"])`

- unknown fields are ignored (the API server prunes fields its schema does not know, so
  they can only come from a newer schema; reading must not fail on them);
- a list entry that does not validate (an allocation or condition an older operator wrote
  with a value this one no longer knows) is dropped, the other entries are kept;
- a top-level field that still does not validate (verdict "Bogus", a database object with
  a string where a number belongs) is read as absent.

It never raises on a mapping. Reading this way and writing back can therefore drop what
this version cannot represent, which is what the API server would do with it too. Models
built in Python are typed (mypy, the pydantic plugin with init_typed), and each nested
model validates strictly when it is built: the leniency is for mappings read off the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.alias_generators import to_camel


class StatusModel(BaseModel):
    """camelCase at the boundary like the spec's CamelModel, but unknown fields ignored:
    a status is read, never typed by a person."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    def to_body(self) -> dict[str, Any]:
        """The JSON the API server stores: camelCase, enums as strings, absent fields
        left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Item = TypeVar("Item")


def _valid_entries(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A list that does not validate keeps the entries that do (see the module docstring)."""
    try:
        return handler(value)
    except ValidationError:
        if not isinstance(value, list | tuple):
            raise
    kept: list[Any] = []
    for entry in value:
        try:
            kept.extend(handler([entry]))
        except ValidationError:
            continue
    return tuple(kept)


# A list read leniently: entries that do not validate are dropped.
Entries = Annotated[tuple[Item, ...], WrapValidator(_valid_entries)]

# metav1.Condition exactly as Kubernetes' own CRDs declare it (controller-gen's output for
# k8s.io/apimachinery/pkg/apis/meta/v1.Condition): tools that read conditions can rely on it.
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
DATE_TIME: dict[str, Any] = {"format": "date-time"}
INT64: dict[str, Any] = {"format": "int64"}


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """A standard Kubernetes condition (metav1.Condition): one aspect of the budget's state."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description=(
            "Ready (DatabaseObserved, BudgetFeasible and RolloutComplete are True), "
            "DatabaseObserved (the limits could be read), BudgetFeasible (the plan fits "
            "the usable connections), RolloutComplete (every target runs its current "
            "settings) or DatabaseHealthy (spec.database.watch: no starvation signal is "
            "raised; it reports and does not count toward Ready)."
        ),
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description=(
            "CamelCase reason for the status, for tools and alerts (for example "
            "BudgetInfeasible, AuthenticationFailed, RolloutPending, OverAllocation)."
        ),
    )
    message: str = Field(max_length=32768, description="What happened, for humans; may be empty.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="metadata.generation of the spec this condition was computed from.",
        json_schema_extra=INT64,
    )
    last_transition_time: str = Field(
        description="When status last changed (not when the condition was last checked).",
        json_schema_extra=DATE_TIME,
    )


class AllocationState(StrEnum):
    """Where one target stands: domain.rollout.TargetPhase's values, plus Conflict (the api
    layer may not import the domain; a unit test keeps the two in step)."""

    APPLIED = "Applied"
    ROLLING = "Rolling"
    STALLED = "Stalled"
    PENDING = "Pending"
    MISSING = "Missing"
    CONFLICT = "Conflict"


class PlanVerdict(StrEnum):
    """domain.sizing.Verdict's values (a unit test keeps the two in step)."""

    FEASIBLE = "Feasible"
    OVERFLOW_REDUCED = "OverflowReduced"
    INFEASIBLE = "Infeasible"


class Visibility(StrEnum):
    FULL = "Full"
    PARTIAL = "Partial"


def _count(description: str) -> Any:
    return Field(default=None, ge=0, description=description)


class LiveConnections(StatusModel):
    """The target's connections open at the last refresh (spec.database.watch), by
    pg_stat_activity state, to compare with peakConnections. Targets that share an
    application_name cannot be told apart: each shows their sum."""

    application_name: str | None = Field(
        default=None, description="The application_name the connections carry."
    )
    active: int | None = _count("Running a query.")
    idle: int | None = _count("Idle in the pool.")
    idle_in_transaction: int | None = _count("Idle inside an open transaction.")
    unknown: int | None = _count(
        "State hidden from the operator's role (another role's session without pg_monitor)."
    )
    total: int | None = _count("All of them: what counts against peakConnections.")


class Allocation(StatusModel):
    """What one target was given: the pool settings in its ConfigMap and where its rollout
    stands."""

    deployment_name: str = Field(
        description="The target Deployment (spec.targets[].deploymentName)."
    )
    pods_worst_case: int | None = Field(
        default=None,
        description=(
            "Pods budgeted for: max(replicas, HPA maxReplicas) + maxSurge under "
            "replicaBasis WorstCase, replicas + maxSurge under Current; plus one rollout "
            "step of terminating pods (maxSurge + maxUnavailable) under terminatingPods "
            "Counted."
        ),
    )
    workers: int | None = Field(
        default=None, description="Processes with their own pool: podsWorstCase x processesPerPod."
    )
    pool_size: int | None = Field(
        default=None, description="pool_size written into the ConfigMap (DB_POOL_SIZE)."
    )
    max_overflow: int | None = Field(
        default=None,
        description=(
            "max_overflow written into the ConfigMap (DB_MAX_OVERFLOW); below the requested "
            "value when the budget had to lower it."
        ),
    )
    peak_connections: int | None = Field(
        default=None,
        description=(
            "Most connections this target can open at once: workers x (poolSize + maxOverflow)."
        ),
    )
    config_map_name: str | None = Field(
        default=None, description="The ConfigMap holding the settings, for envFrom."
    )
    config_hash: str | None = Field(
        default=None,
        description=(
            "sha256 of the ConfigMap data (sorted keys); the operator sets it as the "
            "poolbudget.dev/config-hash annotation on the pod template to roll the "
            "Deployment."
        ),
    )
    restarted_time: str | None = Field(
        default=None,
        description="When the operator last restarted this Deployment; absent if it never has.",
        json_schema_extra=DATE_TIME,
    )
    state: AllocationState | None = Field(
        default=None,
        description=(
            "Applied: ConfigMap current and the pods run it. Rolling: restarted, rollout in "
            "progress. Stalled: the rollout makes no progress. Pending: waiting for a "
            "restart slot (rollout.maxConcurrent), the cooldown (rollout.minIntervalSeconds) "
            "or other targets to settle. Missing: the Deployment does not exist; its "
            "ConfigMap is kept current. Conflict: another PoolBudget already manages this "
            "Deployment; nothing is written for it."
        ),
    )
    message: str | None = Field(
        default=None, description="Why the target is in this state, for humans."
    )
    live_connections: LiveConnections | None = None


class DatabaseStatus(StatusModel):
    """The database's connection limits as last read by the operator (or taken from
    spec.database.maxConnectionsOverride)."""

    max_connections: int | None = Field(
        default=None,
        description="PostgreSQL max_connections, or spec.database.maxConnectionsOverride when set.",
    )
    superuser_reserved_connections: int | None = Field(
        default=None,
        description="PostgreSQL superuser_reserved_connections: slots only superusers may use.",
    )
    reserved_connections: int | None = Field(
        default=None,
        description=(
            "PostgreSQL reserved_connections (PostgreSQL 16 and later, else 0): slots for "
            "roles with pg_use_reserved_connections."
        ),
    )
    usable_connections: int | None = Field(
        default=None,
        description=(
            "maxConnections minus both PostgreSQL reserves and spec.reservedConnections: "
            "what the budget may hand out."
        ),
    )
    connections_in_use: int | None = Field(
        default=None,
        description=(
            "Client connections open on the server (all databases) when the limits were "
            "last read; absent if the role may not count them."
        ),
    )
    server_version: str | None = Field(
        default=None, description="PostgreSQL server version, e.g. 16.4."
    )
    observed_time: str | None = Field(
        default=None, description="When these facts were read.", json_schema_extra=DATE_TIME
    )


class UnbudgetedClient(StatusModel):
    """One application_name and its connections."""

    application_name: str | None = Field(
        default=None, description="application_name; empty if none was set."
    )
    connections: int | None = _count("Its connections.")


class ActivityStatus(StatusModel):
    """The database's client connections at the last refresh (spec.database.watch): every
    database of the server, since max_connections is one limit for all."""

    connections_in_use: int | None = _count(
        "Client connections open on the server, this budget's or not: compare with "
        "usableConnections."
    )
    unbudgeted_connections: int | None = _count(
        "Client connections whose application_name belongs to no target of this budget "
        "(nor the operator): admin sessions, cron jobs, other budgets' targets."
    )
    unbudgeted_clients: Entries[UnbudgetedClient] | None = Field(
        default=None,
        max_length=5,
        description="The largest unbudgeted clients (at most 5), by application_name.",
    )
    operator_connections: int | None = _count(
        "The operator's own connections (application_name poolbudget-operator)."
    )
    lock_waits: int | None = _count("Sessions waiting on a lock.")
    stale_transactions: int | None = _count(
        "Sessions idle in transaction for longer than "
        "spec.database.watch.idleInTransactionWarningSeconds."
    )
    visibility: Visibility | None = Field(
        default=None,
        description=(
            "Full: the role sees every session's state (pg_monitor). Partial: other roles' "
            "sessions are counted but their state, lock waits and stale transactions are "
            "hidden; grant pg_monitor to see them."
        ),
    )
    observed_time: str | None = Field(
        default=None, description="When pg_stat_activity was read.", json_schema_extra=DATE_TIME
    )


class PoolBudgetStatus(StatusModel):
    """Observed state, written by the operator through the status subresource."""

    observed_generation: int | None = Field(
        default=None,
        description=(
            "metadata.generation of the spec this status describes; behind "
            "metadata.generation while the operator has not acted on the latest change."
        ),
        json_schema_extra=INT64,
    )
    database: DatabaseStatus | None = None
    activity: ActivityStatus | None = None
    allocations: Entries[Allocation] | None = Field(
        default=None,
        description="One entry per target, keyed by deploymentName.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["deploymentName"],
        },
    )
    peak_connections: int | None = Field(
        default=None,
        description=(
            "Sum of the allocations' peakConnections: the most connections all targets can "
            "open at once in the budgeted worst case."
        ),
    )
    usable_connections: int | None = Field(
        default=None,
        description="max_connections minus PostgreSQL's reserves and spec.reservedConnections.",
    )
    headroom: int | None = Field(
        default=None,
        description=(
            "usableConnections - peakConnections: connections left over in the worst case."
        ),
    )
    verdict: PlanVerdict | None = Field(
        default=None,
        description=(
            "Outcome of the last plan. Feasible: every target fits with its requested "
            "max_overflow. OverflowReduced: max_overflow was lowered so the minimum pools "
            "fit. Infeasible: even minPoolSize with no overflow does not fit; the last good "
            "ConfigMaps are kept and BudgetFeasible is False."
        ),
    )
    conditions: Entries[Condition] | None = Field(
        default=None,
        description=(
            "Ready, DatabaseObserved, BudgetFeasible, RolloutComplete and DatabaseHealthy, "
            "keyed by type. Ready is True only when DatabaseObserved, BudgetFeasible and "
            "RolloutComplete are: it says the plan is applied. DatabaseHealthy reports what "
            "the watch sees and never makes Ready False."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )

    @model_validator(mode="wrap")
    @classmethod
    def _lenient(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """A top-level field that does not validate is read as absent (module docstring)."""
        try:
            return handler(data)
        except ValidationError as error:
            if not isinstance(data, Mapping):
                raise
            bad = {e["loc"][0] for e in error.errors() if e["loc"]}
            return handler({k: v for k, v in data.items() if k not in bad})

    def merge_patch(self) -> dict[str, Any]:
        """The JSON merge patch (RFC 7386) that turns any status the schema allows into
        this one: `to_body()` plus a null for every field left out, in nested objects too
        (lists are replaced whole, so their entries carry no nulls)."""
        return _with_nulls(self, self.to_body())

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if there is one."""
        return next((c for c in self.conditions or () if c.type == type_), None)

    def allocation(self, deployment_name: str) -> Allocation | None:
        """The allocation of this Deployment, if there is one."""
        return next(
            (a for a in self.allocations or () if a.deployment_name == deployment_name), None
        )


def _with_nulls(model: BaseModel, body: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        if value is None:
            body[key] = None
        elif isinstance(value, BaseModel):
            body[key] = _with_nulls(value, body[key])
    return body
