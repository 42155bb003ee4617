"""One reconcile of a PoolBudget, decided: every rule the operator follows, in one place.

reconcile.py gathers what is true now into `Inputs`, calls `decide`, and carries out the
`Decision`: ConfigMaps first, then restarts (a restart must see its new ConfigMap), then
the Events, then the status. Nothing here does I/O, reads a clock or keeps state: what a
budget remembers between rounds comes in with the Inputs and leaves with the Decision.

`decide`, top to bottom:

1. An invalid spec writes nothing but Ready=False InvalidSpec.
2. Ownership: a Deployment claimed by several budgets belongs to the oldest; a ConfigMap
   of the target's name that this budget does not manage is a conflict, unless a budget
   since deleted wrote it (then it is adopted). Nothing is written for a conflict.
3. The database's limits could not be read: nothing is written but status, and the plan
   in force is held (the last good ConfigMaps stay), said so in every target's message.
4. The plan (domain/sizing.py). Infeasible: held the same way.
5. Which ConfigMaps to write and which Deployments to restart (domain/rollout.py's rules:
   same hash no restart, growers after shrinkers, maxConcurrent, minIntervalSeconds).
6. Events for what changed, the database watch's judgement, the status (computed from the
   facts of this round, never copied from the last), and when to look again.

After the writes, `with_refusals` turns what the API server refused into the status and
one Warning Event, so a refused write is seen on the PoolBudget, not only in a log.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from poolbudget.api.status import (
    Allocation,
    AllocationState,
    DatabaseStatus,
    PlanVerdict,
    PoolBudgetStatus,
)
from poolbudget.api.v1alpha1 import PoolBudgetSpec, RolloutStrategy, Target
from poolbudget.domain.activity import (
    BudgetUsage,
    DatabaseActivity,
    SignalState,
    budget_usage,
    evaluate_signals,
    target_allocations,
)
from poolbudget.domain.admission import AdmissionLimit, admission_limits
from poolbudget.domain.conditions import (
    ConditionType,
    Observation,
    feeds_ready,
    merge_conditions,
    rfc3339,
    summarize_ready,
)
from poolbudget.domain.events import PendingEvent
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts
from poolbudget.domain.observe import DeploymentState
from poolbudget.domain.planning import demand_for, limits_for
from poolbudget.domain.reasons import DATABASE_FAILURES, ERROR_REASONS, Reason, SkipReason
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

# A database that cannot be read is retried after 5, 10, 20 ... seconds, at most refreshSeconds.
MIN_BACKOFF_SECONDS = 5.0
# After a write, look again this soon: a write may wake nothing (the ConfigMap of a
# Deployment that does not exist yet, say), and the level must be confirmed.
RECHECK_AFTER_WRITE_SECONDS = 1.0
# status.allocations[].state of a target still rolling out or waiting its turn.
IN_FLIGHT = (AllocationState.ROLLING, AllocationState.PENDING)


# --- what a decision needs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """A PoolBudget, as Events point at it and metrics label it."""

    namespace: str
    name: str
    uid: str


class ConfigMapLike(Protocol):
    @property
    def data(self) -> Mapping[str, str]: ...
    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class InvalidSpec:
    message: str  # which field and why, as the schema says it


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseUnavailable:
    """The limits could not be read: the reason, and a message free of any secret."""

    reason: Reason
    message: str

    def __post_init__(self) -> None:
        if self.reason not in DATABASE_FAILURES:
            raise ValueError(f"{self.reason} is not a reason the database cannot be read")


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetFacts:
    """What is true now for one target of the spec."""

    deployment: DeploymentState | None  # None: no such Deployment
    hpa_max_replicas: int | None
    claimants: tuple[str, ...]  # budgets naming this Deployment, oldest first
    configmap: ConfigMapLike | None  # what the target's ConfigMap name holds now
    # The ConfigMap says another budget manages it: does that budget still exist?
    configmap_writer_exists: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchMemory:
    """The database watch between rounds: a reading waiting to be judged (each refresh is
    judged once, whatever the number of reconciles in between), the signals' hysteresis,
    and the last reading judged (shown until the next)."""

    pending: DatabaseActivity | None = None
    read_error: str | None = None  # the last read failed (redacted)
    signals: SignalState = field(default_factory=SignalState)
    usage: BudgetUsage | None = None
    usage_time: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Inputs:
    budget: BudgetRef
    generation: int
    spec: PoolBudgetSpec | InvalidSpec
    database: DatabaseFacts | DatabaseUnavailable | None  # None with an invalid spec
    database_failures: int  # failures in a row, this one included (0 after a good read)
    targets: Mapping[str, TargetFacts]  # every target of the spec, by Deployment name
    previous: PoolBudgetStatus  # the status this round builds on (transition times ...)
    template_hash_seen: Mapping[str, str]  # per Deployment, its wanted hash once seen
    watch: WatchMemory
    seconds_until_refresh: float  # until the limits are read again
    now: datetime
    admission_guard: bool = False  # compute the admission guard's limits (it is enabled)


# --- what it decides ---------------------------------------------------------------------


class Outcome(StrEnum):
    """The `outcome` label of poolbudget_reconciles_total."""

    OK = "ok"
    INVALID = "invalid"
    DATABASE_ERROR = "database-error"
    INFEASIBLE = "infeasible"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigMapWrite:
    target: str
    name: str
    data: dict[str, str]
    labels: dict[str, str]
    annotations: dict[str, str]
    notes: tuple[PendingEvent, ...]  # told once the API server took the write


@dataclass(frozen=True, slots=True, kw_only=True)
class Restart:
    deployment: str
    config_hash: str  # set on the pod template: the Deployment controller rolls it
    notes: tuple[PendingEvent, ...]


@dataclass(frozen=True, kw_only=True)
class Decision:
    outcome: Outcome
    status: PoolBudgetStatus
    next_check_seconds: float | None
    writes: tuple[ConfigMapWrite, ...] = ()
    restarts: tuple[Restart, ...] = ()
    notes: tuple[PendingEvent, ...] = ()  # Events about the round itself
    error: Reason | None = None  # counted in poolbudget_errors_total
    plan: BudgetPlan | None = None  # a feasible plan, applied (metrics)
    owned: tuple[str, ...] = ()  # the targets this budget plans
    skipped: Mapping[str, SkipReason] = field(default_factory=dict)
    admission: tuple[AdmissionLimit, ...] | None = None  # the admission guard's limits
    template_hash_seen: Mapping[str, str] = field(default_factory=dict)
    watch: WatchMemory = field(default_factory=WatchMemory)
    watch_judged: bool = False  # a new reading was judged this round

    def __post_init__(self) -> None:
        if self.error is not None and self.error not in ERROR_REASONS:
            raise ValueError(f"{self.error} is not one of the documented error reasons")


# --- the rules ---------------------------------------------------------------------------


def decide(inputs: Inputs) -> Decision:
    spec, previous = inputs.spec, inputs.previous
    previous_states = _allocations_by_name(previous)

    # 1. An invalid spec: the schema usually refuses it; what it cannot check lands here.
    if isinstance(spec, InvalidSpec):
        ready = _ready(False, Reason.INVALID_SPEC, f"invalid spec: {spec.message}")
        return Decision(
            outcome=Outcome.INVALID,
            status=_status_with(previous, inputs, [ready]),
            next_check_seconds=None,
            error=Reason.INVALID_SPEC,
            template_hash_seen=inputs.template_hash_seen,
            watch=inputs.watch,
        )

    # 2. Ownership.
    owned, conflicts, adopted = _ownership(inputs.budget.name, spec, inputs.targets)

    # 3. The database's limits.
    database = inputs.database
    if not isinstance(database, DatabaseFacts):
        assert database is not None  # only an invalid spec has no database outcome
        backoff = min(
            float(spec.database.refresh_seconds),
            MIN_BACKOFF_SECONDS * 2 ** max(0, inputs.database_failures - 1),
        )
        observed = Observation(
            type=ConditionType.DATABASE_OBSERVED,
            status=False,
            reason=database.reason,
            message=f"{database.message}; the last good ConfigMaps are kept, "
            f"retry in {backoff:.0f}s",
        )
        held = f"held: {database.reason.value}"
        return _hold(
            inputs,
            owned,
            conflicts,
            held,
            [observed],
            Outcome.DATABASE_ERROR,
            database.reason,
            previous_states=previous_states,
            notes=_on_change(previous, observed, "Warning"),
            database_status=_held_database_status(previous),
            next_check=backoff,
        )

    facts = {
        t.deployment_name: _deployment_facts(t, inputs.targets[t.deployment_name]) for t in owned
    }
    admission = (
        admission_limits(spec, database, inputs.budget.name, owned, facts)
        if inputs.admission_guard
        else None
    )

    # 4. The plan.
    plan = plan_budget(
        limits_for(spec, database), [demand_for(spec, t, facts[t.deployment_name]) for t in owned]
    )
    observed = _database_observation(spec, database)
    if not plan.feasible:
        infeasible = Observation(
            type=ConditionType.BUDGET_FEASIBLE,
            status=False,
            reason=Reason.BUDGET_INFEASIBLE,
            message=f"{plan.reason}; the last good ConfigMaps are kept",
        )
        return _hold(
            inputs,
            owned,
            conflicts,
            "held: the budget is infeasible",
            [observed, infeasible],
            Outcome.INFEASIBLE,
            Reason.BUDGET_INFEASIBLE,
            previous_states=previous_states,
            notes=_on_change(previous, infeasible, "Warning"),
            database_status=_database_status(database, plan, inputs.now),
            next_check=float(spec.database.refresh_seconds),
            usable=plan.usable_connections,
            verdict=plan.verdict,
            admission=admission,
        )

    # 5. What to write and restart.
    rendered = {
        t.deployment_name: render_configmap_data(spec, t, plan.allocation(t.deployment_name))
        for t in owned
    }
    hashes = {name: config_hash(data) for name, data in rendered.items()}
    states = [
        _target_state(
            t, inputs.targets[t.deployment_name], rendered, hashes, plan, adopted, previous_states
        )
        for t in owned
    ]
    overwritten = {
        s.name for s in states if _hash_overwritten(s, inputs.template_hash_seen.get(s.name))
    }
    seen = dict(inputs.template_hash_seen)
    seen.update({s.name: s.desired_hash for s in states if s.template_hash == s.desired_hash})
    policy = RolloutPolicy(
        restarts_enabled=spec.rollout.strategy is RolloutStrategy.ROLLING_RESTART,
        max_concurrent=spec.rollout.max_concurrent,
        min_interval_seconds=spec.rollout.min_interval_seconds,
    )
    rollout = plan_rollout(states, policy, inputs.now)
    by_target = {t.deployment_name: t for t in owned}
    writes = tuple(
        _configmap_write(
            inputs.budget.name,
            by_target[a.name],
            inputs.targets[a.name].configmap,
            rendered[a.name],
            hashes[a.name],
            plan,
            adopted.get(a.name),
        )
        for a in rollout.actions
        if a.write_configmap
    )
    restarts = tuple(
        _restart(a.name, hashes[a.name], plan, a.name in overwritten)
        for a in rollout.actions
        if a.restart
    )

    # 6. Events, the watch, the status, when to look again.
    notes = [
        *_conflict_notes(conflicts, previous_states),
        *_missing_notes(inputs.budget.namespace, rollout, previous_states),
    ]
    restarted = {r.deployment for r in restarts}
    allocations = _allocations(
        spec, plan, rollout, hashes, restarted, conflicts, previous_states, inputs.now
    )
    feasible = Observation(
        type=ConditionType.BUDGET_FEASIBLE,
        status=True,
        reason=Reason(plan.verdict.value),
        message=plan.reason,
    )
    observations = [observed, feasible, _rollout_observation(rollout, policy)]
    ready = _ready_of(observations, conflicts, rollout)
    rolling_out = {a.deployment_name for a in allocations if a.state in IN_FLIGHT}
    watch, health, watch_notes, judged = _judge_watch(inputs, plan, rolling_out)
    notes.extend(watch_notes)
    status = _status_with(previous, inputs, [ready, *observations, *([health] if health else [])])
    status = _with_watch(status, allocations, health, watch).model_copy(
        update={
            "database": _database_status(database, plan, inputs.now),
            "peak_connections": plan.peak_connections,
            "usable_connections": plan.usable_connections,
            "headroom": plan.headroom,
            "verdict": PlanVerdict(plan.verdict.value),
        }
    )
    if plan.verdict is Verdict.OVERFLOW_REDUCED:
        notes.extend(_on_change(previous, feasible, "Warning"))

    next_check = inputs.seconds_until_refresh
    if writes or restarts:
        next_check = min(next_check, RECHECK_AFTER_WRITE_SECONDS)
    if rollout.recheck_after_seconds is not None:
        next_check = min(next_check, rollout.recheck_after_seconds)
    return Decision(
        outcome=Outcome.OK,
        status=status,
        next_check_seconds=next_check,
        writes=writes,
        restarts=restarts,
        notes=tuple(notes),
        plan=plan,
        owned=tuple(t.deployment_name for t in owned),
        skipped={a.name: a.skipped for a in rollout.actions if a.skipped is not None},
        admission=admission,
        template_hash_seen=seen,
        watch=watch,
        watch_judged=judged,
    )


def failed(
    inputs_previous: PoolBudgetStatus, generation: int, now: datetime, error_type: str
) -> tuple[PoolBudgetStatus, tuple[PendingEvent, ...]]:
    """A reconcile that raised must not leave a stale Ready=True standing: Ready=False
    ReconcileFailed for this generation, one Warning when it starts failing. Only the
    exception's type is shown: its text may carry anything (a DSN, say)."""
    ready = _ready(
        False,
        Reason.RECONCILE_FAILED,
        f"the last reconcile failed ({error_type}) and is retried every 10 s; the "
        "operator's log says why",
    )
    status = _merged(inputs_previous, generation, now, [ready])
    return status, _on_change(inputs_previous, ready, "Warning")


def with_refusals(
    decision: Decision, refused: Mapping[str, str], previous: PoolBudgetStatus, now: datetime
) -> tuple[PoolBudgetStatus, tuple[PendingEvent, ...]]:
    """The status once the API server refused writes for some targets (target -> what it
    said): those targets wait, Ready=False WriteRefused names them, and one Warning Event
    tells it when it starts. The refused writes' own notes are not told."""
    if not refused:
        return decision.status, ()
    status = decision.status
    allocations = tuple(
        entry.model_copy(
            update={
                "state": AllocationState.PENDING,
                "message": f"refused: {refused[entry.deployment_name]}",
            }
        )
        if entry.deployment_name in refused
        else entry
        for entry in status.allocations or ()
    )
    ready = _ready(
        False,
        Reason.WRITE_REFUSED,
        "the API server refused: "
        + "; ".join(f"{name}: {why}" for name, why in sorted(refused.items())),
    )
    generation = status.observed_generation or 0
    conditions = merge_conditions(status.conditions or (), [ready], generation, now)
    status = status.model_copy(update={"allocations": allocations, "conditions": conditions})
    return status, _on_change(previous, ready, "Warning")


# --- ownership and facts -----------------------------------------------------------------


def _ownership(
    budget: str, spec: PoolBudgetSpec, targets: Mapping[str, TargetFacts]
) -> tuple[list[Target], dict[str, str], dict[str, str]]:
    """(targets this budget plans, conflicts: target -> why not, adopted: target -> the
    deleted budget whose ConfigMap this budget takes over)."""
    owned: list[Target] = []
    conflicts: dict[str, str] = {}
    adopted: dict[str, str] = {}
    for target in spec.targets:
        name = target.deployment_name
        facts = targets[name]
        owner = facts.claimants[0] if facts.claimants else budget
        if owner != budget:
            conflicts[name] = f"claimed by PoolBudget {owner} (created earlier)"
            continue
        current = facts.configmap
        if current is not None:
            writer = current.labels.get(LABEL_BUDGET, budget)
            ours = current.labels.get(LABEL_MANAGED_BY) == MANAGED_BY
            if ours and writer != budget and not facts.configmap_writer_exists:
                # Left by a budget since deleted (replaced under another name, say): nobody
                # else will ever write it, so take it over instead of asking a person.
                adopted[name] = writer
            elif not ours or writer != budget:
                conflicts[name] = (
                    f"ConfigMap {target.resolved_config_map_name} exists and is not managed "
                    "by this PoolBudget; rename it or set configMapName"
                )
                continue
        owned.append(target)
    return owned, conflicts, adopted


def _deployment_facts(target: Target, facts: TargetFacts) -> DeploymentFacts:
    # A missing Deployment is budgeted as one pod: it may be created any moment, and its
    # ConfigMap is written so its first pods start with the right settings.
    if facts.deployment is None:
        return DeploymentFacts(name=target.deployment_name, replicas=0)
    return facts.deployment.facts(facts.hpa_max_replicas)


def _target_state(
    target: Target,
    facts: TargetFacts,
    rendered: Mapping[str, Mapping[str, str]],
    hashes: Mapping[str, str],
    plan: BudgetPlan,
    adopted: Mapping[str, str],
    previous_states: Mapping[str, Allocation],
) -> TargetState:
    name = target.deployment_name
    allocation = plan.allocation(name)
    current, state = facts.configmap, facts.deployment
    return TargetState(
        name=name,
        desired_hash=hashes[name],
        desired_per_worker=allocation.pool_size + allocation.max_overflow,
        # An adopted ConfigMap is written once whatever it holds: the write puts this
        # budget's label on it.
        configmap_hash=None
        if current is None or name in adopted
        else owned_hash(current.data, rendered[name]),
        configmap_per_worker=None if current is None else per_worker_connections(current.data),
        deployment_exists=state is not None,
        template_hash=None if state is None else state.template_hash,
        rolling=False if state is None else state.rolling,
        unobserved=False if state is None else state.unobserved,
        stalled=False if state is None else state.stalled,
        last_restart=_parse_time(_restarted_time(previous_states.get(name))),
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


# --- writes and their Events -------------------------------------------------------------

OVERWRITE_ADVICE = (
    "Restores are paced by rollout.minIntervalSeconds; make the other writer leave the "
    "annotation alone (server-side apply without it, or ignore it)"
)


def _configmap_write(
    budget: str,
    target: Target,
    before: ConfigMapLike | None,
    data: dict[str, str],
    data_hash: str,
    plan: BudgetPlan,
    adopted_from: str | None,
) -> ConfigMapWrite:
    name, deployment = target.resolved_config_map_name, target.deployment_name
    peak = plan.allocation(deployment).peak_connections
    new = f"pool_size {data['DB_POOL_SIZE']}, max_overflow {data['DB_MAX_OVERFLOW']}"
    if before is None:
        message = f"ConfigMap {name} created: {new} (peak {peak})"
        entry = f"{name} created with {new} (peak {peak})"
    else:
        old_pool = before.data.get("DB_POOL_SIZE", "?")
        old_overflow = before.data.get("DB_MAX_OVERFLOW", "?")
        old = f"pool_size {old_pool}, max_overflow {old_overflow}"
        message = (
            f"ConfigMap {name} updated: {old} -> {new} (peak {peak} of {plan.usable_connections})"
        )
        entry = (
            f"{name} pool_size {old_pool} -> {data['DB_POOL_SIZE']}, max_overflow "
            f"{old_overflow} -> {data['DB_MAX_OVERFLOW']} (peak {peak})"
        )
    notes = [
        PendingEvent(
            "Normal",
            Reason.CONFIGMAP_UPDATED,
            message,
            subject=deployment,
            heading="ConfigMaps updated",
            entry=entry,
        )
    ]
    if adopted_from is not None:
        notes.append(
            PendingEvent(
                "Normal",
                Reason.CONFIGMAP_ADOPTED,
                f"{deployment}: ConfigMap {name} was written for PoolBudget {adopted_from}, "
                "which no longer exists; this budget manages it now",
                subject=deployment,
                heading="ConfigMaps written for PoolBudgets that no longer exist, managed by "
                "this budget now",
                entry=f"{name} (PoolBudget {adopted_from})",
            )
        )
    return ConfigMapWrite(
        target=deployment,
        name=name,
        data=data,
        labels=managed_labels(budget),
        annotations={ANNOTATION_CONFIG_HASH: data_hash},
        notes=tuple(notes),
    )


def _restart(deployment: str, desired_hash: str, plan: BudgetPlan, overwritten: bool) -> Restart:
    allocation = plan.allocation(deployment)
    settings = f"pool_size {allocation.pool_size}, max_overflow {allocation.max_overflow}"
    notes = [
        PendingEvent(
            "Normal",
            Reason.ROLLOUT_RESTARTED,
            f"Deployment {deployment} restarted to pick up {settings}",
            subject=deployment,
            heading="Deployments restarted to pick up their pool settings",
            entry=f"{deployment} ({settings})",
        )
    ]
    if overwritten:
        notes.append(
            PendingEvent(
                "Warning",
                Reason.CONFIG_HASH_OVERWRITTEN,
                f"Deployment {deployment}: another writer changed or removed "
                f"{ANNOTATION_CONFIG_HASH} on its pod template (settings unchanged); restored "
                f"it, which restarts the pods. {OVERWRITE_ADVICE}",
                subject=deployment,
                heading=f"Another writer changed or removed {ANNOTATION_CONFIG_HASH} on these "
                "Deployments' pod templates (settings unchanged); restored it, which restarts "
                f"their pods. {OVERWRITE_ADVICE}. Deployments",
                entry=deployment,
            )
        )
    return Restart(deployment=deployment, config_hash=desired_hash, notes=tuple(notes))


def _conflict_notes(
    conflicts: Mapping[str, str], previous_states: Mapping[str, Allocation]
) -> list[PendingEvent]:
    return [
        PendingEvent(
            "Warning",
            Reason.TARGET_CONFLICT,
            f"{name}: {why}; nothing written for it",
            subject=name,
            heading="Targets with nothing written for them",
            entry=f"{name}: {why}",
        )
        for name, why in sorted(conflicts.items())
        if _state_of(previous_states.get(name)) is not AllocationState.CONFLICT
    ]


def _missing_notes(
    namespace: str, rollout: RolloutPlan, previous_states: Mapping[str, Allocation]
) -> list[PendingEvent]:
    return [
        PendingEvent(
            "Warning",
            Reason.DEPLOYMENT_NOT_FOUND,
            f"Deployment {namespace}/{a.name} not found; its ConfigMap is kept current",
            subject=a.name,
            heading=f"Deployments not found in {namespace}; their ConfigMaps are kept current",
            entry=a.name,
        )
        for a in rollout.actions
        if a.phase is TargetPhase.MISSING
        and _state_of(previous_states.get(a.name)) is not AllocationState.MISSING
    ]


def _on_change(
    previous: PoolBudgetStatus, observation: Observation, type_: str
) -> tuple[PendingEvent, ...]:
    """An Event only when the condition flips or its reason changes: no spam."""
    before = previous.condition(observation.type.value)
    if (
        before is not None
        and before.status == observation.condition_status
        and before.reason == observation.reason
    ):
        return ()
    return (PendingEvent(type_, observation.reason, observation.message),)


# --- holding the plan in force -----------------------------------------------------------


def _hold(
    inputs: Inputs,
    owned: Sequence[Target],
    conflicts: Mapping[str, str],
    why: str,
    observations: list[Observation],
    outcome: Outcome,
    error: Reason,
    *,
    previous_states: Mapping[str, Allocation],
    notes: tuple[PendingEvent, ...],
    database_status: DatabaseStatus | None,
    next_check: float,
    usable: int | None = None,
    verdict: Verdict | None = None,
    admission: tuple[AdmissionLimit, ...] | None = None,
) -> Decision:
    """Nothing is written: the plan in force is the one the ConfigMaps hold. Every target's
    state is judged from this round's facts against it, and says it is held."""
    assert not isinstance(inputs.spec, InvalidSpec)
    previous = inputs.previous
    allocations: list[Allocation] = []
    phases: list[tuple[str, TargetPhase, str]] = []
    owned_names = {t.deployment_name for t in owned}
    for target in inputs.spec.targets:
        name = target.deployment_name
        if name not in owned_names:
            allocations.append(_conflict_entry(target, conflicts.get(name, "")))
            continue
        entry, phase, message = _held_entry(
            target, inputs.targets[name], previous_states.get(name), why
        )
        allocations.append(entry)
        phases.append((name, phase, message))
    rollout_observation = _held_rollout_observation(phases, why)
    observations = [*observations, rollout_observation]
    if inputs.spec.database.watch.enabled and inputs.spec.database.connection_secret_ref:
        observations.append(
            Observation(
                type=ConditionType.DATABASE_HEALTHY,
                status=None,
                reason=Reason.NOT_JUDGED,
                message=f"connections are not judged while the plan is {why.removeprefix('held: ')}"
                if outcome is Outcome.INFEASIBLE
                else "connections are not judged while the database's limits cannot be read",
            )
        )
    peak = sum(a.peak_connections or 0 for a in allocations)
    update: dict[str, Any] = {
        "activity": None,
        "database": database_status,
        "allocations": tuple(allocations),
        "peak_connections": peak,
    }
    if usable is None:
        usable = previous.usable_connections
    if usable is not None:
        update["usable_connections"] = usable
        update["headroom"] = usable - peak
    if verdict is not None:
        update["verdict"] = PlanVerdict(verdict.value)
    status = _status_with(previous, inputs, observations).model_copy(update=update)
    return Decision(
        outcome=outcome,
        status=status,
        next_check_seconds=next_check,
        notes=notes,
        error=error,
        owned=tuple(t.deployment_name for t in owned),
        admission=admission,
        template_hash_seen=inputs.template_hash_seen,
        watch=inputs.watch,
    )


def _held_entry(
    target: Target, facts: TargetFacts, before: Allocation | None, why: str
) -> tuple[Allocation, TargetPhase, str]:
    """A target under a held plan (its allocation, its phase, why in a few words). Its
    numbers are the last plan's while its ConfigMap still holds that plan's settings, else
    only what the ConfigMap says."""
    entry = Allocation(
        deployment_name=target.deployment_name,
        config_map_name=target.resolved_config_map_name,
        restarted_time=_restarted_time(before),
    )
    data = facts.configmap.data if facts.configmap is not None else None
    held_hash: str | None = None
    if data is not None:
        pool, overflow = _int(data.get("DB_POOL_SIZE")), _int(data.get("DB_MAX_OVERFLOW"))
        if before is not None and before.pool_size == pool and before.max_overflow == overflow:
            entry = entry.model_copy(
                update={
                    "pods_worst_case": before.pods_worst_case,
                    "workers": before.workers,
                    "peak_connections": before.peak_connections,
                    "config_hash": before.config_hash,
                }
            )
            held_hash = before.config_hash
        entry = entry.model_copy(update={"pool_size": pool, "max_overflow": overflow})
    deployment = facts.deployment
    if deployment is None:
        phase, message = TargetPhase.MISSING, "Deployment not found"
    elif deployment.stalled:
        phase, message = TargetPhase.STALLED, "rollout is not progressing"
    elif deployment.rolling:
        phase, message = TargetPhase.ROLLING, "rollout in progress"
    elif data is None:
        phase, message = TargetPhase.PENDING, "no ConfigMap written yet"
    elif held_hash is not None and deployment.template_hash != held_hash:
        phase, message = TargetPhase.PENDING, "its pods run other settings than its ConfigMap"
    else:
        phase, message = TargetPhase.APPLIED, "settings applied"
    said = f"{message}; {why}"
    return entry.model_copy(update={"state": _state(phase), "message": said}), phase, said


def _held_rollout_observation(
    phases: Sequence[tuple[str, TargetPhase, str]], why: str
) -> Observation:
    waiting = [f"{name}: {message}" for name, phase, message in phases if phase not in _DONE]
    if not waiting:
        return Observation(
            type=ConditionType.ROLLOUT_COMPLETE,
            status=True,
            reason=Reason.ROLLOUT_COMPLETE,
            message=f"every target runs the settings its ConfigMap holds ({why})",
        )
    return Observation(
        type=ConditionType.ROLLOUT_COMPLETE,
        status=False,
        reason=_rollout_reason({phase for _, phase, _ in phases}),
        message="; ".join(waiting),
    )


def _held_database_status(previous: PoolBudgetStatus) -> DatabaseStatus | None:
    """The limits the plan in force was made with, without what was live then."""
    if previous.database is None:
        return None
    return previous.database.model_copy(update={"connections_in_use": None})


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


# --- status ------------------------------------------------------------------------------

_DONE = (TargetPhase.APPLIED, TargetPhase.MISSING)


def _ready(status: bool, reason: Reason, message: str) -> Observation:
    return Observation(type=ConditionType.READY, status=status, reason=reason, message=message)


def _ready_of(
    observations: Sequence[Observation], conflicts: Mapping[str, str], rollout: RolloutPlan
) -> Observation:
    ready = summarize_ready(observations)
    missing = [a.name for a in rollout.actions if a.phase is TargetPhase.MISSING]
    if ready.status and conflicts:
        return _ready(
            False,
            Reason.TARGET_CONFLICT,
            "; ".join(f"{k}: {v}" for k, v in sorted(conflicts.items())),
        )
    if ready.status and missing:
        return _ready(
            False, Reason.DEPLOYMENT_NOT_FOUND, f"Deployment(s) not found: {', '.join(missing)}"
        )
    return ready


def _status_with(
    previous: PoolBudgetStatus, inputs: Inputs, observations: Sequence[Observation]
) -> PoolBudgetStatus:
    """The previous status with these conditions merged in; Ready follows the first
    failing condition that feeds it when the round did not say."""
    if not any(o.type is ConditionType.READY for o in observations):
        failing = next((o for o in observations if feeds_ready(o) and o.status is not True), None)
        if failing is not None:
            observations = [_ready(False, Reason(failing.reason), failing.message), *observations]
    return _merged(previous, inputs.generation, inputs.now, observations)


def _merged(
    previous: PoolBudgetStatus,
    generation: int,
    now: datetime,
    observations: Sequence[Observation],
) -> PoolBudgetStatus:
    conditions = merge_conditions(previous.conditions or (), observations, generation, now)
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions})


def _database_observation(spec: PoolBudgetSpec, database: DatabaseFacts) -> Observation:
    if spec.database.connection_secret_ref is None:
        return Observation(
            type=ConditionType.DATABASE_OBSERVED,
            status=True,
            reason=Reason.MAX_CONNECTIONS_OVERRIDE,
            message=f"max_connections {spec.database.max_connections_override} from the spec; "
            f"superuser_reserved_connections assumed {database.superuser_reserved_connections}",
        )
    overridden = spec.database.max_connections_override
    return Observation(
        type=ConditionType.DATABASE_OBSERVED,
        status=True,
        reason=Reason.PROBED,
        message=f"PostgreSQL {database.server_version}: max_connections "
        f"{database.max_connections}, superuser_reserved_connections "
        f"{database.superuser_reserved_connections}, reserved_connections "
        f"{database.reserved_connections}"
        + (f" (the spec's maxConnectionsOverride {overridden} is used)" if overridden else ""),
    )


def _database_status(database: DatabaseFacts, plan: BudgetPlan, now: datetime) -> DatabaseStatus:
    return DatabaseStatus(
        max_connections=plan.max_connections,
        superuser_reserved_connections=database.superuser_reserved_connections,
        reserved_connections=database.reserved_connections,
        usable_connections=plan.usable_connections,
        connections_in_use=database.connections_in_use,
        server_version=database.server_version or None,
        observed_time=rfc3339(now),
    )


def _conflict_entry(target: Target, why: str) -> Allocation:
    return Allocation(
        deployment_name=target.deployment_name,
        state=AllocationState.CONFLICT,
        message=why,
        config_map_name=target.resolved_config_map_name,
    )


def _state(phase: TargetPhase) -> AllocationState:
    """A rollout phase as status.allocations[].state says it (the same words)."""
    return AllocationState(phase.value)


def _allocations_by_name(status: PoolBudgetStatus) -> dict[str, Allocation]:
    return {a.deployment_name: a for a in status.allocations or ()}


def _state_of(allocation: Allocation | None) -> AllocationState | None:
    return None if allocation is None else allocation.state


def _restarted_time(allocation: Allocation | None) -> str | None:
    return (allocation.restarted_time or None) if allocation is not None else None


def _allocations(
    spec: PoolBudgetSpec,
    plan: BudgetPlan,
    rollout: RolloutPlan,
    hashes: Mapping[str, str],
    restarted: Collection[str],
    conflicts: Mapping[str, str],
    previous_states: Mapping[str, Allocation],
    now: datetime,
) -> list[Allocation]:
    entries = []
    for target in spec.targets:
        name = target.deployment_name
        if name in conflicts:
            entries.append(_conflict_entry(target, conflicts[name]))
            continue
        allocation = plan.allocation(name)
        action = rollout.action(name)
        restarted_time = (
            rfc3339(now) if name in restarted else _restarted_time(previous_states.get(name))
        )
        entries.append(
            Allocation(
                deployment_name=name,
                pods_worst_case=allocation.pods,
                workers=allocation.workers,
                pool_size=allocation.pool_size,
                max_overflow=allocation.max_overflow,
                peak_connections=allocation.peak_connections,
                config_map_name=target.resolved_config_map_name,
                config_hash=hashes[name],
                restarted_time=restarted_time,
                state=_state(action.phase),
                message=action.message,
            )
        )
    return entries


def _rollout_reason(phases: Collection[TargetPhase]) -> Reason:
    if TargetPhase.STALLED in phases:
        return Reason.ROLLOUT_STALLED
    if TargetPhase.ROLLING in phases:
        return Reason.ROLLOUT_IN_PROGRESS
    return Reason.ROLLOUT_PENDING


def _rollout_observation(rollout: RolloutPlan, policy: RolloutPolicy) -> Observation:
    if rollout.complete:
        if not policy.restarts_enabled:
            return Observation(
                type=ConditionType.ROLLOUT_COMPLETE,
                status=True,
                reason=Reason.RESTARTS_DISABLED,
                message="ConfigMaps are current; rollout.strategy is None, "
                "pods pick them up when they restart",
            )
        return Observation(
            type=ConditionType.ROLLOUT_COMPLETE,
            status=True,
            reason=Reason.ROLLOUT_COMPLETE,
            message="every target runs its current pool settings",
        )
    waiting = [
        f"{a.name}: {a.message}" for a in rollout.actions if a.phase is not TargetPhase.APPLIED
    ]
    return Observation(
        type=ConditionType.ROLLOUT_COMPLETE,
        status=False,
        reason=_rollout_reason({a.phase for a in rollout.actions}),
        message="; ".join(waiting) or "ConfigMaps are being written",
    )


# --- the database watch ------------------------------------------------------------------


def _judge_watch(
    inputs: Inputs, plan: BudgetPlan, rolling_out: Collection[str]
) -> tuple[WatchMemory, Observation | None, list[PendingEvent], bool]:
    """Judge a new reading (once), note an Event per signal raised or cleared, and say
    DatabaseHealthy (None: nothing is watched). Targets in `rolling_out` are not judged
    over their allocation: the rollout's old pods hold the old pools."""
    assert not isinstance(inputs.spec, InvalidSpec)
    watch_spec, memory = inputs.spec.database.watch, inputs.watch
    if not watch_spec.enabled or inputs.spec.database.connection_secret_ref is None:
        return WatchMemory(), None, [], False
    notes: list[PendingEvent] = []
    judged = memory.pending is not None
    if memory.pending is not None:
        settings = signal_settings(watch_spec)
        usage = budget_usage(
            memory.pending,
            target_allocations(inputs.spec, plan, rolling_out),
            plan.usable_connections,
        )
        evaluation = evaluate_signals(usage, memory.signals, settings)
        memory = replace(
            memory, pending=None, usage=usage, usage_time=inputs.now, signals=evaluation.state
        )
        for signal in evaluation.raised_now:
            notes.append(
                PendingEvent("Warning", signal.kind.value, signal.message, subject=signal.subject)
            )
        for signal in evaluation.cleared_now:
            notes.append(
                PendingEvent(
                    "Normal",
                    f"{signal.kind.value}Cleared",
                    cleared_message(signal, settings),
                    subject=signal.subject,
                )
            )
    return (
        memory,
        health_observation(memory.usage, memory.signals, memory.read_error),
        notes,
        judged,
    )


def _with_watch(
    status: PoolBudgetStatus,
    allocations: Sequence[Allocation],
    health: Observation | None,
    watch: WatchMemory,
) -> PoolBudgetStatus:
    """The status with these allocations and what the database watch says (DatabaseHealthy
    and status.activity go when nothing is watched; each target shows its live
    connections)."""
    conditions = status.conditions
    if health is None:
        conditions = tuple(
            c for c in conditions or () if c.type != ConditionType.DATABASE_HEALTHY.value
        )
    if health is None or watch.usage is None or watch.usage_time is None:
        return status.model_copy(
            update={"conditions": conditions, "activity": None, "allocations": tuple(allocations)}
        )
    live = target_live(watch.usage)
    return status.model_copy(
        update={
            "conditions": conditions,
            "activity": activity_status(watch.usage, watch.usage_time),
            "allocations": tuple(
                a.model_copy(update={"live_connections": live[a.deployment_name]})
                if a.deployment_name in live
                else a
                for a in allocations
            ),
        }
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
