"""One PoolBudget reconcile: gather facts -> plan -> decide -> apply -> status.

Level-based and idempotent: it reads the world, computes what should be, and writes only
the differences. Nothing here knows about Kopf; the adapters it uses are described by the
protocols below, so the whole flow runs against in-memory fakes in unit tests and against
the real API server and PostgreSQL in the end-to-end tests.

Safety rules kept here (and why):
* On any failure to observe the database, or an infeasible plan, nothing is written but
  status: the last good ConfigMaps stay as they are.
* Secrets are read per reconcile and handed to the probe only; the DSN never reaches a
  log line, an event, a status field or an exception message (probe errors are redacted
  by the adapter, and only their class decides the reason shown).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from poolbudget import metrics
from poolbudget.adapters.kube import KubeError, NotFoundError, SecretKeyMissingError
from poolbudget.api.v1alpha1 import (
    PoolBudgetSpec,
    RolloutStrategy,
    Target,
    describe_validation_error,
)
from poolbudget.domain.activity import (
    BudgetUsage,
    DatabaseActivity,
    SignalKind,
    SignalState,
    budget_usage,
    evaluate_signals,
    target_allocations,
)
from poolbudget.domain.admission import AdmissionLimit, admission_limits
from poolbudget.domain.cluster_view import Observed
from poolbudget.domain.conditions import (
    ConditionType,
    Observation,
    feeds_ready,
    merge_conditions,
    rfc3339,
    summarize_ready,
)
from poolbudget.domain.events import PendingEvent, aggregate
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts
from poolbudget.domain.observe import DeploymentState
from poolbudget.domain.planning import (
    POSTGRES_DEFAULT_SUPERUSER_RESERVED,
    demand_for,
    limits_for,
)
from poolbudget.domain.rendering import (
    ANNOTATION_CONFIG_HASH,
    LABEL_BUDGET,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    config_hash,
    managed_labels,
    owned_hash,
    per_worker_connections,
    render_configmap_data,
)
from poolbudget.domain.rollout import (
    RolloutPlan,
    RolloutPolicy,
    TargetPhase,
    TargetState,
    plan_rollout,
)
from poolbudget.domain.sizing import BudgetPlan, Verdict, plan_budget
from poolbudget.domain.watch import (
    activity_status,
    cleared_message,
    health_observation,
    signal_settings,
    target_live,
)

logger = logging.getLogger(__name__)


# --- what the reconciler needs from the outside world ------------------------------------


class ConfigMapLike(Protocol):
    @property
    def data(self) -> dict[str, str]: ...
    @property
    def labels(self) -> dict[str, str]: ...


class BudgetRefLike(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def uid(self) -> str: ...


class Kube(Protocol):
    async def read_secret_value(self, namespace: str, name: str, key: str) -> str: ...
    async def read_configmap(self, namespace: str, name: str) -> ConfigMapLike | None: ...
    async def budget_exists(self, namespace: str, name: str) -> bool: ...
    async def apply_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None: ...
    async def annotate_pod_template(
        self, namespace: str, deployment: str, annotations: dict[str, str]
    ) -> None: ...
    async def patch_budget_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> None: ...
    async def post_event(self, budget: Any, type_: str, reason: str, message: str) -> None: ...


class DatabaseProber(Protocol):
    """One long-lived probe per DSN: reuses its connection across reconciles."""

    async def probe(self) -> DatabaseFacts: ...
    async def activity(self, stale_after_seconds: float) -> DatabaseActivity: ...
    async def close(self) -> None: ...


class AdmissionPublisher(Protocol):
    """Keeps the admission guard's parameters (poolbudget/admission.py)."""

    async def publish(
        self, namespace: str, budget: str, generation: int, limits: Sequence[AdmissionLimit]
    ) -> None: ...


class DatabaseFailure(Exception):
    """A probe failed; `reason` is the CamelCase reason shown in the condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class BudgetObject:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]


@dataclass
class BudgetMemory:
    """Per-budget state kept in memory between reconciles (lost on restart, by design)."""

    database: DatabaseFacts | None = None
    database_read_at: float | None = None
    dsn_fingerprint: str | None = None
    prober: DatabaseProber | None = None
    failures: int = 0
    # `last_status` and `written_status` (properties below) kept as compact JSON: a
    # status as dicts is about 10 KiB, as JSON about 2.5 (1,000 budgets: 9.4 -> 2.5 MiB).
    _last_status: bytes | None = field(default=None, repr=False)
    _written_status: bytes | None = field(default=None, repr=False)
    # After a restart, status writes are held (loop times): see Reconciler._finish.
    status_hold: StatusHold | None = None
    # Per Deployment, the config hash last seen on its pod template while it was the one
    # wanted: a template that loses it while the settings stay the same was written by
    # someone else.
    template_hash_seen: dict[str, str] = field(default_factory=dict)
    # The database watch. A pg_stat_activity reading taken with the limits waits here until
    # a plan is there to judge it, and is judged once: each refresh is one observation for
    # the signals' hysteresis, however often the budget is reconciled in between.
    activity: DatabaseActivity | None = None
    activity_error: str | None = None  # the last read failed (redacted, like probe errors)
    signals: SignalState = field(default_factory=SignalState)
    usage: BudgetUsage | None = None  # the last reading judged, shown until the next one
    usage_time: datetime | None = None

    @property
    def last_status(self) -> dict[str, Any] | None:
        """The status this process last wrote, with the generation it was for: the object
        Kopf hands us may not show our own patch yet, and fields like restartedTime must
        not be lost to that race."""
        return _decoded(self._last_status)

    @last_status.setter
    def last_status(self, status: Mapping[str, Any] | None) -> None:
        self._last_status = _encoded(status)

    @property
    def written_status(self) -> dict[str, Any] | None:
        """The status as last written to the API server (last_status may be newer: see
        Reconciler._status_held_for), None until this process writes one."""
        return _decoded(self._written_status)

    @written_status.setter
    def written_status(self, status: Mapping[str, Any] | None) -> None:
        encoded = _encoded(status)
        # Usually the status just remembered: keep one copy of it.
        self._written_status = self._last_status if encoded == self._last_status else encoded

    @property
    def knows_status(self) -> bool:
        """Both the status to build on and the one on the server are remembered here: the
        PoolBudget's own status is no longer read (handlers.kept_body drops it)."""
        return self._last_status is not None and self._written_status is not None


def _encoded(status: Mapping[str, Any] | None) -> bytes | None:
    return None if status is None else json.dumps(status, separators=(",", ":")).encode()


def _decoded(encoded: bytes | None) -> dict[str, Any] | None:
    if encoded is None:
        return None
    status: dict[str, Any] = json.loads(encoded)
    return status


@dataclass(frozen=True)
class StatusHold:
    """Status writes held after a restart: at least until `settled`, and while a target
    is still rolling out, until `give_up` (loop times)."""

    settled: float
    give_up: float


@dataclass(frozen=True)
class Outcome:
    next_check_seconds: float | None
    status: dict[str, Any]
    status_written: bool


@dataclass(frozen=True)
class BudgetEventRef:
    namespace: str
    name: str
    uid: str


@dataclass
class EventNotes:
    """The Events one reconcile will post, noted as it goes and posted together before its
    status is written: at most one per (type, reason), naming every target concerned
    (domain/events.py says how they read)."""

    ref: BudgetEventRef
    pending: list[PendingEvent] = field(default_factory=list)

    def add(
        self,
        type_: str,
        reason: str,
        message: str,
        *,
        subject: str = "",
        heading: str = "",
        entry: str = "",
    ) -> None:
        self.pending.append(PendingEvent(type_, reason, message, subject, heading, entry))

    def take(self) -> list[PendingEvent]:
        taken, self.pending = self.pending, []
        return taken


# --- the reconciler ----------------------------------------------------------------------

VOLATILE_DATABASE_FIELDS = ("connectionsInUse", "observedTime")
MIN_BACKOFF_SECONDS = 5.0
RECHECK_AFTER_WRITE_SECONDS = 1.0
# After restarting Deployments, a budget's status write waits at least this long, and
# while a restarted Deployment is still rolling out, at most STATUS_HOLD_MAX_SECONDS
# (see _finish).
STATUS_SETTLE_SECONDS = 1.0
STATUS_HOLD_MAX_SECONDS = 15.0


@dataclass
class Reconciler:
    kube: Kube
    prober_factory: Callable[[str], DatabaseProber]
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = field(default=lambda: asyncio.get_running_loop().time())
    status_settle_seconds: float = STATUS_SETTLE_SECONDS
    status_hold_max_seconds: float = STATUS_HOLD_MAX_SECONDS
    # The admission guard's parameters, kept only when enabled (POOLBUDGET_ADMISSION_PARAMS).
    admission: AdmissionPublisher | None = None

    async def reconcile(
        self, budget: BudgetObject, observed: Observed, memory: BudgetMemory
    ) -> Outcome:
        started = self.monotonic()
        events = EventNotes(BudgetEventRef(budget.namespace, budget.name, budget.uid))
        try:
            outcome = await self._reconcile(budget, observed, memory, events)
        except Exception:
            # What was done before the failure is still told (its Events are not posted
            # again: the next reconcile finds those writes done).
            await self._post_events(events, best_effort=True)
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(max(0.0, self.monotonic() - started))
        return outcome

    async def report_failure(
        self, budget: BudgetObject, memory: BudgetMemory, error: Exception
    ) -> None:
        """A reconcile that raised must not leave a stale Ready=True standing (it once did,
        for a generation it never applied): Ready=False ReconcileFailed for this generation,
        and one Warning event when it starts failing. Only the exception's type is shown:
        its text may carry anything (a DSN, say); the operator's log has the traceback."""
        events = EventNotes(BudgetEventRef(budget.namespace, budget.name, budget.uid))
        remembered = memory.last_status  # decoded once
        previous = dict(remembered if remembered is not None else budget.status)
        observation = Observation(
            type=ConditionType.READY,
            status=False,
            reason="ReconcileFailed",
            message=f"the last reconcile failed ({type(error).__name__}) and is retried "
            "every 10 s; the operator's log says why",
        )
        status = self._status_with(previous, budget, self.clock(), [observation])
        self._event_on_change(events, previous, observation, "Warning")
        await self._finish(events, budget, previous, status, None, "failed", memory)

    async def _reconcile(
        self, budget: BudgetObject, observed: Observed, memory: BudgetMemory, events: EventNotes
    ) -> Outcome:
        now = self.clock()
        labels = {"namespace": budget.namespace, "poolbudget": budget.name}
        remembered = memory.last_status  # decoded once
        previous = dict(remembered if remembered is not None else budget.status)

        try:
            spec = PoolBudgetSpec.model_validate(budget.spec)
        except ValidationError as exc:
            message = f"invalid spec: {describe_validation_error(exc)}"
            metrics.ERRORS.labels(**labels, reason="InvalidSpec").inc()
            status = self._status_with(
                previous,
                budget,
                now,
                [
                    Observation(
                        type=ConditionType.READY,
                        status=False,
                        reason="InvalidSpec",
                        message=message,
                    )
                ],
            )
            return await self._finish(events, budget, previous, status, None, "invalid", memory)

        # 1. The database's limits.
        try:
            database = await self._observe_database(budget, spec, memory)
        except DatabaseFailure as failure:
            memory.failures += 1
            metrics.ERRORS.labels(**labels, reason=failure.reason).inc()
            backoff = min(
                float(spec.database.refresh_seconds),
                MIN_BACKOFF_SECONDS * 2 ** (memory.failures - 1),
            )
            observation = Observation(
                type=ConditionType.DATABASE_OBSERVED,
                status=False,
                reason=failure.reason,
                message=f"{failure.message}; the last good ConfigMaps are kept, "
                f"retry in {backoff:.0f}s",
            )
            status = self._status_with(previous, budget, now, [observation])
            self._event_on_change(events, previous, observation, "Warning")
            return await self._finish(
                events, budget, previous, status, backoff, "database-error", memory
            )
        memory.failures = 0
        self._publish_database_metrics(labels, spec, database)

        # 2. Which targets are ours, and what their Deployments look like.
        owned: list[Target] = []
        conflicts: dict[str, str] = {}
        for target in spec.targets:
            claimants = sorted(
                observed.claims.get((budget.namespace, target.deployment_name), ())
                or [(budget.created, budget.name)]
            )
            owner = claimants[0][1]
            if owner != budget.name:
                conflicts[target.deployment_name] = (
                    f"claimed by PoolBudget {owner} (created earlier)"
                )
            else:
                owned.append(target)

        states: dict[str, DeploymentState | None] = {}
        facts: dict[str, DeploymentFacts] = {}
        for target in owned:
            key = (budget.namespace, target.deployment_name)
            state = observed.deployments.get(key)
            states[target.deployment_name] = state
            hpa = observed.hpa_max_replicas.get(key)
            # A missing Deployment is budgeted as one pod: it may be created any moment,
            # and its ConfigMap is written so its first pods start with the right settings.
            facts[target.deployment_name] = (
                state.facts(hpa)
                if state
                else DeploymentFacts(name=target.deployment_name, replicas=0)
            )

        # 3. The plan.
        demands = [demand_for(spec, t, facts[t.deployment_name]) for t in owned]
        plan = plan_budget(limits_for(spec, database), demands)
        if self.admission is not None:  # feasible or not: the guard checks against these
            limits = admission_limits(spec, database, budget.name, owned, facts)
            await self.admission.publish(budget.namespace, budget.name, budget.generation, limits)
        database_observation = self._database_observation(spec, database)
        if not plan.feasible:
            metrics.FEASIBLE.labels(**labels).set(0)
            metrics.ERRORS.labels(**labels, reason="BudgetInfeasible").inc()
            infeasible = Observation(
                type=ConditionType.BUDGET_FEASIBLE,
                status=False,
                reason="BudgetInfeasible",
                message=f"{plan.reason}; the last good ConfigMaps are kept",
            )
            status = self._status_with(previous, budget, now, [database_observation, infeasible])
            status["database"] = self._database_status(database, plan, now)
            status["verdict"] = plan.verdict.value
            self._event_on_change(events, previous, infeasible, "Warning")
            return await self._finish(
                events,
                budget,
                previous,
                status,
                float(spec.database.refresh_seconds),
                "infeasible",
                memory,
            )
        metrics.FEASIBLE.labels(**labels).set(1)

        # 4. Render, compare with what is there, decide.
        rendered: dict[str, dict[str, str]] = {}
        for target in owned:
            rendered[target.deployment_name] = render_configmap_data(
                spec, target, plan.allocation(target.deployment_name)
            )
        existing_list = await asyncio.gather(
            *(self.kube.read_configmap(budget.namespace, t.resolved_config_map_name) for t in owned)
        )
        existing = dict(zip([t.deployment_name for t in owned], existing_list, strict=True))
        adopted: dict[str, str] = {}  # target -> the deleted budget that wrote its ConfigMap
        for target in list(owned):
            current = existing[target.deployment_name]
            if current is None:
                continue
            writer = current.labels.get(LABEL_BUDGET, budget.name)
            ours = current.labels.get(LABEL_MANAGED_BY) == MANAGED_BY
            if (
                ours
                and writer != budget.name
                and not await self.kube.budget_exists(budget.namespace, writer)
            ):
                # Left behind by a budget since deleted (replaced under another name, say):
                # nobody else will ever write it, so take it over instead of asking a person.
                adopted[target.deployment_name] = writer
            elif not ours or writer != budget.name:
                conflicts[target.deployment_name] = (
                    f"ConfigMap {target.resolved_config_map_name} exists and is not managed by "
                    f"this PoolBudget; rename it or set configMapName"
                )
                owned.remove(target)

        previous_allocations = {
            str(a.get("deploymentName")): a for a in previous.get("allocations") or []
        }
        target_states = []
        for target in owned:
            name = target.deployment_name
            allocation = plan.allocation(name)
            current = existing[name]
            state = states[name]
            target_states.append(
                TargetState(
                    name=name,
                    desired_hash=config_hash(rendered[name]),
                    desired_per_worker=allocation.pool_size + allocation.max_overflow,
                    # An adopted ConfigMap is written once whatever it holds: the write
                    # puts this budget's label on it.
                    configmap_hash=None
                    if current is None or name in adopted
                    else owned_hash(current.data, rendered[name]),
                    configmap_per_worker=None
                    if current is None
                    else per_worker_connections(current.data),
                    deployment_exists=state is not None,
                    template_hash=None if state is None else state.template_hash,
                    rolling=False if state is None else state.rolling,
                    unobserved=False if state is None else state.unobserved,
                    stalled=False if state is None else state.stalled,
                    last_restart=_parse_time(
                        previous_allocations.get(name, {}).get("restartedTime")
                    ),
                )
            )
        overwritten = {
            t.name
            for t in target_states
            if _hash_overwritten(t, memory.template_hash_seen.get(t.name))
        }
        for t in target_states:
            if t.template_hash == t.desired_hash:
                memory.template_hash_seen[t.name] = t.desired_hash
        policy = RolloutPolicy(
            restarts_enabled=spec.rollout.strategy is RolloutStrategy.ROLLING_RESTART,
            max_concurrent=spec.rollout.max_concurrent,
            min_interval_seconds=spec.rollout.min_interval_seconds,
        )
        rollout = plan_rollout(target_states, policy, now)

        # 5. Apply: ConfigMaps first, then restarts (a restart must see the new ConfigMap).
        restarted: set[str] = set()
        by_target = {t.deployment_name: t for t in owned}
        by_state = {s.name: s for s in target_states}
        for action in rollout.actions:
            target = by_target[action.name]
            if action.write_configmap:
                data = rendered[action.name]
                await self.kube.apply_configmap(
                    budget.namespace,
                    target.resolved_config_map_name,
                    data,
                    managed_labels(budget.name),
                    {ANNOTATION_CONFIG_HASH: config_hash(data)},
                )
                events.add(
                    "Normal",
                    "ConfigMapUpdated",
                    _configmap_change_message(target, existing[action.name], data, plan),
                    subject=action.name,
                    heading="ConfigMaps updated",
                    entry=_configmap_change_entry(target, existing[action.name], data, plan),
                )
                if action.name in adopted:
                    events.add(
                        "Normal",
                        "ConfigMapAdopted",
                        f"{action.name}: ConfigMap {target.resolved_config_map_name} was "
                        f"written for PoolBudget {adopted[action.name]}, which no longer "
                        "exists; this budget manages it now",
                        subject=action.name,
                        heading="ConfigMaps written for PoolBudgets that no longer exist, "
                        "managed by this budget now",
                        entry=f"{target.resolved_config_map_name} (PoolBudget "
                        f"{adopted[action.name]})",
                    )
        for action in rollout.actions:
            target_labels = {**labels, "deployment": action.name}
            if action.restart:
                state_now = by_state[action.name]
                await self.kube.annotate_pod_template(
                    budget.namespace, action.name, {ANNOTATION_CONFIG_HASH: state_now.desired_hash}
                )
                restarted.add(action.name)
                metrics.RESTARTS.labels(**target_labels).inc()
                settings = (
                    f"pool_size {plan.allocation(action.name).pool_size}, max_overflow "
                    f"{plan.allocation(action.name).max_overflow}"
                )
                events.add(
                    "Normal",
                    "RolloutRestarted",
                    f"Deployment {action.name} restarted to pick up {settings}",
                    subject=action.name,
                    heading="Deployments restarted to pick up their pool settings",
                    entry=f"{action.name} ({settings})",
                )
                if action.name in overwritten:
                    events.add(
                        "Warning",
                        "ConfigHashOverwritten",
                        f"Deployment {action.name}: another writer changed or removed "
                        f"{ANNOTATION_CONFIG_HASH} on its pod template (settings unchanged); "
                        f"restored it, which restarts the pods. {_OVERWRITE_ADVICE}",
                        subject=action.name,
                        heading=f"Another writer changed or removed {ANNOTATION_CONFIG_HASH} "
                        "on these Deployments' pod templates (settings unchanged); restored "
                        f"it, which restarts their pods. {_OVERWRITE_ADVICE}. Deployments",
                        entry=action.name,
                    )
            elif by_state[action.name].template_hash == by_state[action.name].desired_hash:
                metrics.RESTARTS_SKIPPED.labels(**target_labels).inc()

        # 6. Events for targets newly missing or in conflict.
        for name, reason in sorted(conflicts.items()):
            if previous_allocations.get(name, {}).get("state") != "Conflict":
                events.add(
                    "Warning",
                    "TargetConflict",
                    f"{name}: {reason}; nothing written for it",
                    subject=name,
                    heading="Targets with nothing written for them",
                    entry=f"{name}: {reason}",
                )
        for action in rollout.actions:
            if (
                action.phase is TargetPhase.MISSING
                and previous_allocations.get(action.name, {}).get("state") != "Missing"
            ):
                events.add(
                    "Warning",
                    "DeploymentNotFound",
                    f"Deployment {budget.namespace}/{action.name} not found; "
                    "its ConfigMap is kept current",
                    subject=action.name,
                    heading=f"Deployments not found in {budget.namespace}; "
                    "their ConfigMaps are kept current",
                    entry=action.name,
                )

        if restarted:
            # A restart during a hold moves its settle time, never its end: restarts paced
            # one after another must not keep the status unwritten.
            moment = self.monotonic()
            held = memory.status_hold
            give_up = moment + self.status_hold_max_seconds if held is None else held.give_up
            memory.status_hold = StatusHold(
                settled=min(moment + self.status_settle_seconds, give_up), give_up=give_up
            )

        # 7. Status.
        allocations = self._allocations_status(
            spec, plan, rollout, rendered, restarted, previous_allocations, conflicts, now
        )
        self._publish_plan_metrics(labels, plan, owned)
        feasible = Observation(
            type=ConditionType.BUDGET_FEASIBLE,
            status=True,
            reason=plan.verdict.value,
            message=plan.reason,
        )
        rollout_observation = _rollout_observation(rollout, policy)
        observations = [database_observation, feasible, rollout_observation]
        ready = summarize_ready(observations)
        missing = [a.name for a in rollout.actions if a.phase is TargetPhase.MISSING]
        if ready.status and conflicts:
            ready = Observation(
                type=ConditionType.READY,
                status=False,
                reason="TargetConflict",
                message="; ".join(f"{k}: {v}" for k, v in sorted(conflicts.items())),
            )
        elif ready.status and missing:
            ready = Observation(
                type=ConditionType.READY,
                status=False,
                reason="DeploymentNotFound",
                message=f"Deployment(s) not found: {', '.join(missing)}",
            )
        rolling_out = {
            entry["deploymentName"]
            for entry in allocations
            if entry.get("state") in (TargetPhase.ROLLING.value, TargetPhase.PENDING.value)
        }
        health = self._watch(events, spec, plan, memory, labels, now, rolling_out)
        status = self._status_with(
            previous, budget, now, [ready, *observations, *([health] if health else [])]
        )
        status["database"] = self._database_status(database, plan, now)
        if health is None:
            status["conditions"] = [
                c for c in status["conditions"] if c["type"] != ConditionType.DATABASE_HEALTHY.value
            ]
        if health is None or memory.usage is None or memory.usage_time is None:
            status.pop("activity", None)
        else:
            status["activity"] = activity_status(memory.usage, memory.usage_time)
            live = target_live(memory.usage)
            for entry in allocations:
                if entry["deploymentName"] in live:
                    entry["liveConnections"] = live[entry["deploymentName"]]
        status["allocations"] = allocations
        status["peakConnections"] = plan.peak_connections
        status["usableConnections"] = plan.usable_connections
        status["headroom"] = plan.headroom
        status["verdict"] = plan.verdict.value
        if plan.verdict is Verdict.OVERFLOW_REDUCED:
            self._event_on_change(events, previous, feasible, "Warning", reason_changes=True)

        next_check = self._seconds_until_database_refresh(spec, memory)
        if any(a.write_configmap or a.restart for a in rollout.actions):
            # Confirm the level soon: a write may not produce any event that wakes us
            # (e.g. the ConfigMap of a Deployment that does not exist yet).
            next_check = min(next_check, RECHECK_AFTER_WRITE_SECONDS)
        if rollout.recheck_after_seconds is not None:
            next_check = min(next_check, rollout.recheck_after_seconds)
        return await self._finish(events, budget, previous, status, next_check, "ok", memory)

    # --- database ------------------------------------------------------------------------

    async def _observe_database(
        self, budget: BudgetObject, spec: PoolBudgetSpec, memory: BudgetMemory
    ) -> DatabaseFacts:
        labels = {"namespace": budget.namespace, "poolbudget": budget.name}
        source = spec.database.connection_secret_ref
        override = spec.database.max_connections_override
        if source is None:
            assert override is not None  # the spec model guarantees one of the two
            return DatabaseFacts(
                max_connections=override,
                superuser_reserved_connections=POSTGRES_DEFAULT_SUPERUSER_RESERVED,
            )
        try:
            dsn = await self.kube.read_secret_value(budget.namespace, source.name, source.key)
        except NotFoundError:
            raise DatabaseFailure("SecretNotFound", f"Secret {source.name} not found") from None
        except SecretKeyMissingError as exc:
            raise DatabaseFailure("SecretKeyMissing", str(exc)) from None
        except KubeError as exc:
            raise DatabaseFailure("SecretUnreadable", str(exc)) from None

        fingerprint = hashlib.sha256(dsn.encode()).hexdigest()
        fresh = (
            memory.database is not None
            and memory.dsn_fingerprint == fingerprint
            and memory.database_read_at is not None
            and self.monotonic() - memory.database_read_at < spec.database.refresh_seconds
        )
        if not fresh:
            if memory.prober is not None and memory.dsn_fingerprint != fingerprint:
                await memory.prober.close()
                memory.prober = None
            if memory.prober is None:
                memory.prober = self.prober_factory(dsn)
                memory.dsn_fingerprint = fingerprint
            try:
                memory.database = await memory.prober.probe()
            except Exception as exc:  # every probe failure becomes a condition, never a crash
                metrics.DATABASE_PROBES.labels(**labels, result="error").inc()
                memory.database = None
                raise _database_failure(exc) from None
            memory.database_read_at = self.monotonic()
            metrics.DATABASE_PROBES.labels(**labels, result="ok").inc()
            if spec.database.watch.enabled:
                await self._read_activity(spec, memory, labels)
        assert memory.database is not None
        if override is not None:
            return memory.database.model_copy(update={"max_connections": override})
        return memory.database

    @staticmethod
    async def _read_activity(
        spec: PoolBudgetSpec, memory: BudgetMemory, labels: Mapping[str, str]
    ) -> None:
        """The watch's reading, on the connection the limits were just read on. A failure
        is reported, never raised: the limits are good, so the plan and the ConfigMaps go
        on as usual, and the signals stand as they were (a failed read is no clean one)."""
        assert memory.prober is not None
        stale_after = float(spec.database.watch.idle_in_transaction_warning_seconds)
        try:
            memory.activity = await memory.prober.activity(stale_after)
        except Exception as exc:
            metrics.ACTIVITY_READS.labels(**labels, result="error").inc()
            memory.activity = None
            memory.activity_error = _activity_failure(exc)
            logger.warning(
                "%s/%s: reading pg_stat_activity failed: %s",
                labels["namespace"],
                labels["poolbudget"],
                memory.activity_error,
            )
            return
        metrics.ACTIVITY_READS.labels(**labels, result="ok").inc()
        memory.activity_error = None

    def _watch(
        self,
        events: EventNotes,
        spec: PoolBudgetSpec,
        plan: BudgetPlan,
        memory: BudgetMemory,
        labels: Mapping[str, str],
        now: datetime,
        rolling_out: Collection[str],
    ) -> Observation | None:
        """Judge a new reading (once), note an event per signal raised or cleared, and
        return DatabaseHealthy (None: nothing is watched). Targets in `rolling_out` are
        not judged over their allocation: the rollout's old pods hold the old pools."""
        watch = spec.database.watch
        if not watch.enabled or spec.database.connection_secret_ref is None:
            if memory.usage is not None or memory.signals.raised:
                metrics.forget_watch(labels["namespace"], labels["poolbudget"])
            memory.activity = memory.usage = memory.usage_time = memory.activity_error = None
            memory.signals = SignalState()
            return None
        settings = signal_settings(watch)
        if memory.activity is not None:
            usage = budget_usage(
                memory.activity,
                target_allocations(spec, plan, rolling_out),
                plan.usable_connections,
            )
            evaluation = evaluate_signals(usage, memory.signals, settings)
            memory.activity = None
            memory.usage, memory.usage_time, memory.signals = usage, now, evaluation.state
            for signal in evaluation.raised_now:
                events.add("Warning", signal.kind.value, signal.message, subject=signal.subject)
            for signal in evaluation.cleared_now:
                events.add(
                    "Normal",
                    f"{signal.kind.value}Cleared",
                    cleared_message(signal, settings),
                    subject=signal.subject,
                )
            self._publish_watch_metrics(labels, usage, evaluation.state)
        return health_observation(memory.usage, memory.signals, memory.activity_error)

    def _seconds_until_database_refresh(self, spec: PoolBudgetSpec, memory: BudgetMemory) -> float:
        refresh = float(spec.database.refresh_seconds)
        if memory.database_read_at is None:
            return refresh
        return max(0.5, refresh - (self.monotonic() - memory.database_read_at))

    @staticmethod
    def _database_observation(spec: PoolBudgetSpec, database: DatabaseFacts) -> Observation:
        if spec.database.connection_secret_ref is None:
            return Observation(
                type=ConditionType.DATABASE_OBSERVED,
                status=True,
                reason="MaxConnectionsOverride",
                message=f"max_connections {database.max_connections} from the spec; "
                f"superuser_reserved_connections assumed {database.superuser_reserved_connections}",
            )
        return Observation(
            type=ConditionType.DATABASE_OBSERVED,
            status=True,
            reason="Probed",
            message=f"PostgreSQL {database.server_version}: max_connections "
            f"{database.max_connections}, superuser_reserved_connections "
            f"{database.superuser_reserved_connections}, reserved_connections "
            f"{database.reserved_connections}"
            + (
                " (max_connections overridden by the spec)"
                if spec.database.max_connections_override
                else ""
            ),
        )

    @staticmethod
    def _database_status(
        database: DatabaseFacts, plan: BudgetPlan, now: datetime
    ) -> dict[str, Any]:
        status: dict[str, Any] = {
            "maxConnections": database.max_connections,
            "superuserReservedConnections": database.superuser_reserved_connections,
            "reservedConnections": database.reserved_connections,
            "usableConnections": plan.usable_connections,
            "observedTime": rfc3339(now),
        }
        if database.server_version:
            status["serverVersion"] = database.server_version
        if database.connections_in_use is not None:
            status["connectionsInUse"] = database.connections_in_use
        return status

    # --- status --------------------------------------------------------------------------

    @staticmethod
    def _status_with(
        previous: Mapping[str, Any],
        budget: BudgetObject,
        now: datetime,
        observations: Sequence[Observation],
    ) -> dict[str, Any]:
        """Previous status with these conditions merged in (and Ready recomputed if absent)."""
        status = {k: v for k, v in previous.items() if k != "conditions"}
        if not any(o.type is ConditionType.READY for o in observations):
            failing = next(
                (o for o in observations if feeds_ready(o) and o.status is not True), None
            )
            if failing is not None:
                observations = [
                    Observation(
                        type=ConditionType.READY,
                        status=False,
                        reason=failing.reason,
                        message=failing.message,
                    ),
                    *observations,
                ]
        status["observedGeneration"] = budget.generation
        status["conditions"] = merge_conditions(
            previous.get("conditions") or [], observations, budget.generation, now
        )
        return status

    @staticmethod
    def _allocations_status(
        spec: PoolBudgetSpec,
        plan: BudgetPlan,
        rollout: RolloutPlan,
        rendered: Mapping[str, Mapping[str, str]],
        restarted: set[str],
        previous: Mapping[str, Mapping[str, Any]],
        conflicts: Mapping[str, str],
        now: datetime,
    ) -> list[dict[str, Any]]:
        entries = []
        for target in spec.targets:
            name = target.deployment_name
            if name in conflicts:
                entries.append(
                    {
                        "deploymentName": name,
                        "state": "Conflict",
                        "message": conflicts[name],
                        "configMapName": target.resolved_config_map_name,
                    }
                )
                continue
            allocation = plan.allocation(name)
            action = rollout.action(name)
            entry: dict[str, Any] = {
                "deploymentName": name,
                "podsWorstCase": allocation.pods,
                "workers": allocation.workers,
                "poolSize": allocation.pool_size,
                "maxOverflow": allocation.max_overflow,
                "peakConnections": allocation.peak_connections,
                "configMapName": target.resolved_config_map_name,
                "configHash": config_hash(rendered[name]),
                "state": action.phase.value,
                "message": action.message,
            }
            restarted_time = (
                rfc3339(now) if name in restarted else previous.get(name, {}).get("restartedTime")
            )
            if restarted_time:
                entry["restartedTime"] = restarted_time
            entries.append(entry)
        return entries

    async def _finish(
        self,
        events: EventNotes,
        budget: BudgetObject,
        previous: Mapping[str, Any],
        status: dict[str, Any],
        next_check: float | None,
        outcome: str,
        memory: BudgetMemory,
    ) -> Outcome:
        metrics.RECONCILES.labels(
            namespace=budget.namespace, poolbudget=budget.name, outcome=outcome
        ).inc()
        written = False
        # Before the status: whoever sees the new status can find the Events that explain it.
        await self._post_events(events)
        # The next reconcile builds on this status (restartedTime, transition times),
        # whether or not it is written now.
        memory.last_status = status
        wait = self._status_held_for(memory.status_hold, status) if outcome == "ok" else None
        if wait is not None:
            # Deployments were just restarted. Each answer of the Deployment controller
            # changes the status (observed, updated, available, complete): written every
            # time, a change cost 2-4 status writes, and a cold start of 1,000 budgets two
            # each, the controller taking 10 s to get through 5,000 rollouts. Held until
            # the rollouts are done (or STATUS_HOLD_MAX_SECONDS), the status is written once
            # and says how they went. Meanwhile the Events tell what was done, at once.
            next_check = wait if next_check is None else min(next_check, wait)
            return Outcome(next_check_seconds=next_check, status=status, status_written=False)
        memory.status_hold = None
        recorded = memory.written_status
        on_server = recorded if recorded is not None else budget.status
        changed = status_changes(on_server, status)
        if changed:
            await self.kube.patch_budget_status(budget.namespace, budget.name, status)
            written = True
            memory.written_status = status
            logger.info(
                "%s/%s: %s; %s; changed: %s",
                budget.namespace,
                budget.name,
                outcome,
                "; ".join(
                    f"{c['type']}={c['status']} ({c['reason']})" for c in status["conditions"]
                ),
                ", ".join(changed),
            )
        return Outcome(next_check_seconds=next_check, status=status, status_written=written)

    def _status_held_for(self, hold: StatusHold | None, status: Mapping[str, Any]) -> float | None:
        """Seconds the status write is still held (None: write now): until the hold has
        settled, then while a target is rolling out or waiting its turn, until it gives up."""
        if hold is None:
            return None
        moment = self.monotonic()
        if moment < hold.settled:
            return hold.settled - moment
        rolling = any(
            entry.get("state") in (TargetPhase.ROLLING.value, TargetPhase.PENDING.value)
            for entry in status.get("allocations") or []
        )
        if rolling and moment < hold.give_up:
            return hold.give_up - moment
        return None

    async def _post_events(self, events: EventNotes, *, best_effort: bool = False) -> None:
        for event in aggregate(events.take()):
            try:
                await self.kube.post_event(events.ref, event.type, event.reason, event.message)
            except Exception:
                if not best_effort:
                    raise
                logger.warning(
                    "%s/%s: could not post the %s event",
                    events.ref.namespace,
                    events.ref.name,
                    event.reason,
                )

    @staticmethod
    def _event_on_change(
        events: EventNotes,
        previous: Mapping[str, Any],
        observation: Observation,
        type_: str,
        *,
        reason_changes: bool = True,
    ) -> None:
        """Post an event only when the condition flips (or its reason changes): no spam."""
        before = next(
            (
                c
                for c in previous.get("conditions") or []
                if c.get("type") == observation.type.value
            ),
            None,
        )
        same_status = before is not None and before.get("status") == observation.status_text
        same_reason = before is not None and before.get("reason") == observation.reason
        if same_status and (same_reason or not reason_changes):
            return
        events.add(type_, observation.reason, observation.message)

    # --- metrics -------------------------------------------------------------------------

    @staticmethod
    def _publish_database_metrics(
        labels: Mapping[str, str], spec: PoolBudgetSpec, database: DatabaseFacts
    ) -> None:
        metrics.MAX_CONNECTIONS.labels(**labels).set(database.max_connections)
        if database.connections_in_use is not None:
            metrics.CONNECTIONS_IN_USE.labels(**labels).set(database.connections_in_use)
        del spec

    @staticmethod
    def _publish_watch_metrics(
        labels: Mapping[str, str], usage: BudgetUsage, state: SignalState
    ) -> None:
        metrics.UNBUDGETED.labels(**labels).set(usage.unbudgeted_connections)
        for application in usage.targets:
            for name in application.deployment_names:
                live = application.live
                for label, value in (
                    ("active", live.active),
                    ("idle", live.idle),
                    ("idle_in_transaction", live.idle_in_transaction),
                    ("unknown", live.unknown),
                ):
                    metrics.TARGET_LIVE.labels(**labels, deployment=name, state=label).set(value)
        for kind in SignalKind:
            raised = sum(1 for signal in state.raised if signal.kind is kind)
            metrics.SIGNALS.labels(**labels, signal=kind.value).set(raised)

    @staticmethod
    def _publish_plan_metrics(
        labels: Mapping[str, str], plan: BudgetPlan, owned: Sequence[Target]
    ) -> None:
        metrics.USABLE_CONNECTIONS.labels(**labels).set(plan.usable_connections)
        metrics.PEAK_CONNECTIONS.labels(**labels).set(plan.peak_connections)
        metrics.HEADROOM.labels(**labels).set(plan.headroom)
        metrics.keep_targets(
            labels["namespace"], labels["poolbudget"], {t.deployment_name for t in owned}
        )
        for target in owned:
            allocation = plan.allocation(target.deployment_name)
            target_labels = {**labels, "deployment": target.deployment_name}
            metrics.POOL_SIZE.labels(**target_labels).set(allocation.pool_size)
            metrics.MAX_OVERFLOW.labels(**target_labels).set(allocation.max_overflow)
            metrics.TARGET_PEAK.labels(**target_labels).set(allocation.peak_connections)


def status_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs, as field paths (`allocations[api].state`, `conditions[Ready]`), ignoring
    what changes without anything happening. Empty: nothing to write. The log line of each
    status write names them, so write churn can be traced to its cause."""
    old, new = _comparable(before), _comparable(after)
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        by = {"allocations": "deploymentName", "conditions": "type"}.get(key)
        if by is None or not isinstance(old.get(key), list) or not isinstance(new.get(key), list):
            changes.append(key)
            continue
        old_items = {str(i.get(by)): i for i in old[key] if isinstance(i, Mapping)}
        new_items = {str(i.get(by)): i for i in new[key] if isinstance(i, Mapping)}
        for item in sorted(set(old_items) | set(new_items)):
            a, b = old_items.get(item, {}), new_items.get(item, {})
            fields = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            if fields:
                changes.append(f"{key}[{item}]." + "/".join(fields))
        if not changes or not changes[-1].startswith(key):
            changes.append(key)  # same items, other order
    return changes


def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    """Status minus what changes without anything happening (so no-op writes nothing)."""
    comparable = dict(status)
    database = dict(comparable.get("database") or {})
    for key in VOLATILE_DATABASE_FIELDS:
        database.pop(key, None)
    comparable["database"] = database
    if isinstance(comparable.get("activity"), Mapping):
        comparable["activity"] = {
            k: v for k, v in comparable["activity"].items() if k != "observedTime"
        }
    return comparable


def _rollout_observation(rollout: RolloutPlan, policy: RolloutPolicy) -> Observation:
    if rollout.complete:
        if not policy.restarts_enabled:
            return Observation(
                type=ConditionType.ROLLOUT_COMPLETE,
                status=True,
                reason="RestartsDisabled",
                message="ConfigMaps are current; rollout.strategy is None, "
                "pods pick them up when they restart",
            )
        return Observation(
            type=ConditionType.ROLLOUT_COMPLETE,
            status=True,
            reason="RolloutComplete",
            message="every target runs its current pool settings",
        )
    phases = {a.phase for a in rollout.actions}
    waiting = [
        f"{a.name}: {a.message}" for a in rollout.actions if a.phase is not TargetPhase.APPLIED
    ]
    if TargetPhase.STALLED in phases:
        reason = "RolloutStalled"
    elif TargetPhase.ROLLING in phases:
        reason = "RolloutInProgress"
    else:
        reason = "RolloutPending"
    return Observation(
        type=ConditionType.ROLLOUT_COMPLETE,
        status=False,
        reason=reason,
        message="; ".join(waiting) or "ConfigMaps are being written",
    )


def _configmap_change_message(
    target: Target, before: ConfigMapLike | None, after: Mapping[str, str], plan: BudgetPlan
) -> str:
    name = target.resolved_config_map_name
    peak = plan.allocation(target.deployment_name).peak_connections
    new = f"pool_size {after['DB_POOL_SIZE']}, max_overflow {after['DB_MAX_OVERFLOW']}"
    if before is None:
        return f"ConfigMap {name} created: {new} (peak {peak})"
    old_pool = before.data.get("DB_POOL_SIZE", "?")
    old_overflow = before.data.get("DB_MAX_OVERFLOW", "?")
    old = f"pool_size {old_pool}, max_overflow {old_overflow}"
    return f"ConfigMap {name} updated: {old} -> {new} (peak {peak} of {plan.usable_connections})"


def _configmap_change_entry(
    target: Target, before: ConfigMapLike | None, after: Mapping[str, str], plan: BudgetPlan
) -> str:
    """The change in a list of them: `api-db-pool pool_size 5 -> 6, max_overflow 2 -> 2`."""
    name = target.resolved_config_map_name
    peak = plan.allocation(target.deployment_name).peak_connections
    if before is None:
        return (
            f"{name} created with pool_size {after['DB_POOL_SIZE']}, max_overflow "
            f"{after['DB_MAX_OVERFLOW']} (peak {peak})"
        )
    return (
        f"{name} pool_size {before.data.get('DB_POOL_SIZE', '?')} -> {after['DB_POOL_SIZE']}, "
        f"max_overflow {before.data.get('DB_MAX_OVERFLOW', '?')} -> {after['DB_MAX_OVERFLOW']} "
        f"(peak {peak})"
    )


_OVERWRITE_ADVICE = (
    "Restores are paced by rollout.minIntervalSeconds; make the other writer leave the "
    "annotation alone (server-side apply without it, or ignore it)"
)


def _hash_overwritten(state: TargetState, seen: str | None) -> bool:
    """The template no longer carries the hash it was seen with, and the settings are
    still those: someone else wrote the annotation (a GitOps tool replacing the template,
    `kubectl rollout undo`)."""
    return (
        seen == state.desired_hash
        and state.configmap_hash == state.desired_hash
        and state.template_hash != state.desired_hash
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _activity_failure(exc: BaseException) -> str:
    """What to say about a failed pg_stat_activity read: the adapter's errors are redacted
    (user@host:port/database, never the password); anything else by its class only."""
    if any(cls.__name__ == "DatabaseProbeError" for cls in type(exc).__mro__):
        return str(exc)
    return f"{type(exc).__name__}"


def _database_failure(exc: BaseException) -> DatabaseFailure:
    """Map a probe error to a condition reason; messages come from the (redacting) adapter."""
    reasons = {
        "DatabaseAuthError": "AuthenticationFailed",
        "DatabaseUnreachableError": "DatabaseUnreachable",
        "DatabaseTimeoutError": "DatabaseTimeout",
        "InvalidDsnError": "InvalidDsn",
    }
    for cls in type(exc).__mro__:
        if cls.__name__ in reasons:
            return DatabaseFailure(reasons[cls.__name__], str(exc))
    # Unknown error types: the class name only, since the text could echo a DSN.
    return DatabaseFailure("DatabaseError", f"database probe failed ({type(exc).__name__})")
