"""One PoolBudget reconcile: gather -> decide -> apply.

`gather` reads what a decision needs (the spec, the database's limits or why they could
not be read, the budget's view of the cluster, the managed ConfigMaps, what the budget
remembers) into one value; `domain.decide.decide` is pure and holds every rule; `apply`
carries the decision out in a safe order and reports what the API server refused. Nothing
here knows about Kopf; the adapters are described by the protocols below, so the whole
flow runs against in-memory fakes in unit tests and against the real API server and
PostgreSQL in the end-to-end tests.

Safety rules kept here (and why):
* ConfigMaps are written before restarts, and a Deployment whose ConfigMap write was
  refused is not restarted: a restart must see its new ConfigMap.
* Secrets are read per reconcile and handed to the probe only; the DSN never reaches a
  log line, an event, a status field or an exception message (probe errors are redacted
  by the adapter and carry their own reason).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from poolbudget import metrics
from poolbudget.adapters.kube import KubeError, NotFoundError, SecretKeyMissingError
from poolbudget.adapters.postgres import DatabaseProbeError
from poolbudget.api.status import PoolBudgetStatus
from poolbudget.api.v1alpha1 import PoolBudgetSpec, describe_validation_error
from poolbudget.domain.activity import DatabaseActivity, SignalKind
from poolbudget.domain.admission import AdmissionLimit
from poolbudget.domain.cluster_view import Observed
from poolbudget.domain.decide import (
    IN_FLIGHT,
    BudgetRef,
    ConfigMapLike,
    DatabaseUnavailable,
    Decision,
    Inputs,
    InvalidSpec,
    Outcome,
    TargetFacts,
    WatchMemory,
    decide,
    failed,
    with_refusals,
)
from poolbudget.domain.events import PendingEvent, aggregate
from poolbudget.domain.facts import DatabaseFacts
from poolbudget.domain.planning import POSTGRES_DEFAULT_SUPERUSER_RESERVED
from poolbudget.domain.reasons import Reason
from poolbudget.domain.rendering import ANNOTATION_CONFIG_HASH, LABEL_BUDGET, LABEL_MANAGED_BY

logger = logging.getLogger(__name__)


# --- what the reconciler needs from the outside world ------------------------------------


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
        self, namespace: str, name: str, status: PoolBudgetStatus
    ) -> None: ...
    async def post_event(
        self, budget: BudgetRef, type_: str, reason: str, message: str
    ) -> None: ...


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


@dataclass(frozen=True)
class BudgetObject:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @property
    def ref(self) -> BudgetRef:
        return BudgetRef(self.namespace, self.name, self.uid)


@dataclass
class BudgetMemory:
    """Per-budget state kept in memory between reconciles (lost on restart, by design)."""

    database: DatabaseFacts | None = None
    database_read_at: float | None = None
    dsn_fingerprint: str | None = None
    prober: DatabaseProber | None = None
    failures: int = 0
    # `last_status` and `written_status` (properties below) kept as compact JSON of
    # to_body(), decoded with the model when read: a status as dicts is about 10 KiB, as
    # models about 16, as JSON about 2.5-3 (1,000 budgets: 9.4 -> 2.5 MiB as dicts).
    _last_status: bytes | None = field(default=None, repr=False)
    _written_status: bytes | None = field(default=None, repr=False)
    # After a restart, status writes are held (loop times): see Reconciler._write_status.
    status_hold: StatusHold | None = None
    # Per Deployment, the config hash last seen on its pod template while it was the one
    # wanted: a template that loses it while the settings stay the same was written by
    # someone else.
    template_hash_seen: Mapping[str, str] = field(default_factory=dict)
    watch: WatchMemory = field(default_factory=WatchMemory)  # the database watch
    status_refused: bool = False  # the last status write was refused (logged once)

    @property
    def last_status(self) -> PoolBudgetStatus | None:
        """The status this process last decided, with the generation it was for: the
        object Kopf hands us may not show our own patch yet, and fields like
        restartedTime must not be lost to that race."""
        return _decoded(self._last_status)

    @last_status.setter
    def last_status(self, status: PoolBudgetStatus | None) -> None:
        self._last_status = _encoded(status)

    @property
    def written_status(self) -> PoolBudgetStatus | None:
        """The status as last written to the API server (last_status may be newer: see
        Reconciler._held_for), None until this process writes one."""
        return _decoded(self._written_status)

    @written_status.setter
    def written_status(self, status: PoolBudgetStatus | None) -> None:
        encoded = _encoded(status)
        # Usually the status just remembered: keep one copy of it.
        self._written_status = self._last_status if encoded == self._last_status else encoded

    @property
    def knows_status(self) -> bool:
        """Both the status to build on and the one on the server are remembered here: the
        PoolBudget's own status is no longer read (handlers.kept_body drops it)."""
        return self._last_status is not None and self._written_status is not None


def _encoded(status: PoolBudgetStatus | None) -> bytes | None:
    if status is None:
        return None
    return json.dumps(status.to_body(), separators=(",", ":")).encode()


def _decoded(encoded: bytes | None) -> PoolBudgetStatus | None:
    return None if encoded is None else PoolBudgetStatus.model_validate(json.loads(encoded))


@dataclass(frozen=True)
class StatusHold:
    """Status writes held after a restart: at least until `settled`, and while a target
    is still rolling out, until `give_up` (loop times)."""

    settled: float
    give_up: float


@dataclass(frozen=True)
class ReconcileResult:
    next_check_seconds: float | None
    status: PoolBudgetStatus  # what this round decided, written or held


VOLATILE_DATABASE_FIELDS = ("connectionsInUse", "observedTime")
# After restarting Deployments, a budget's status write waits at least this long, and
# while a restarted Deployment is still rolling out, at most STATUS_HOLD_MAX_SECONDS
# (see _write_status).
STATUS_SETTLE_SECONDS = 1.0
STATUS_HOLD_MAX_SECONDS = 15.0
# Rounds between their database read and their last write at once. A round's writes go
# one after another, and the gateway sends at most MAX_IN_FLIGHT (32) requests at once, so
# twice that keeps every connection busy. Unbounded, a cold start of 1,000 budgets decided
# every round before the first write was sent: all their inputs and decisions alive at
# once, and the heap they were built in stayed fragmented by what outlived them.
ROUNDS_IN_FLIGHT = 64


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
    rounds_in_flight: int = ROUNDS_IN_FLIGHT
    _slots: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.rounds_in_flight)

    async def reconcile(
        self, budget: BudgetObject, observe: Callable[[], Observed], memory: BudgetMemory
    ) -> ReconcileResult:
        """One round. `observe` gives the budget's view of the cluster, taken once the round
        has its slot: a cold start's rounds may wait seconds for one, and decide on what
        the cluster is then."""
        started = self.monotonic()
        try:
            spec = _validated(budget.spec)
            database = None
            if isinstance(spec, PoolBudgetSpec):
                # Read before taking a slot: a slow or unreachable database must not
                # hold up other budgets' rounds.
                database = await self._database(budget, spec, memory)
            async with self._slots:
                inputs = await self.gather(budget, observe(), memory, spec, database)
                return await self.apply(budget, inputs, decide(inputs), memory)
        finally:
            metrics.RECONCILE_SECONDS.observe(max(0.0, self.monotonic() - started))

    async def report_failure(
        self, budget: BudgetObject, memory: BudgetMemory, error: Exception
    ) -> None:
        """A reconcile raised (the operator's log has the traceback): say so in status."""
        previous = _previous(budget, memory)
        status, notes = failed(previous, budget.generation, self.clock(), type(error).__name__)
        metrics.RECONCILES.labels(
            namespace=budget.namespace, poolbudget=budget.name, outcome=Outcome.FAILED
        ).inc()
        await self._post(budget.ref, notes)
        memory.last_status = status
        await self._write_status(budget, status, memory, Outcome.FAILED)

    # --- gather --------------------------------------------------------------------------

    async def gather(
        self,
        budget: BudgetObject,
        observed: Observed,
        memory: BudgetMemory,
        spec: PoolBudgetSpec | InvalidSpec,
        database: DatabaseFacts | DatabaseUnavailable | None,
    ) -> Inputs:
        """Everything a decision needs, read once: nothing after this reads the world.
        `spec` and `database` are read first, by `reconcile`."""
        now = self.clock()
        common: dict[str, Any] = {
            "budget": budget.ref,
            "generation": budget.generation,
            "previous": _previous(budget, memory),
            "template_hash_seen": memory.template_hash_seen,
            "now": now,
        }
        if isinstance(spec, InvalidSpec) or database is None:
            return Inputs(
                spec=spec,
                database=None,
                database_failures=0,
                targets={},
                watch=memory.watch,
                seconds_until_refresh=0.0,
                **common,
            )
        # Configmaps from the operator's cache of managed ones (a GET only on a miss).
        configmaps = await asyncio.gather(
            *(
                self.kube.read_configmap(budget.namespace, t.resolved_config_map_name)
                for t in spec.targets
            )
        )
        targets: dict[str, TargetFacts] = {}
        for target, configmap in zip(spec.targets, configmaps, strict=True):
            key = (budget.namespace, target.deployment_name)
            claimants = sorted(observed.claims.get(key, ()) or [(budget.created, budget.name)])
            targets[target.deployment_name] = TargetFacts(
                deployment=observed.deployments.get(key),
                hpa_max_replicas=observed.hpa_max_replicas.get(key),
                claimants=tuple(name for _, name in claimants),
                configmap=configmap,
                configmap_writer_exists=await self._writer_exists(budget, configmap),
            )
        return Inputs(
            spec=spec,
            database=database,
            database_failures=memory.failures,
            targets=targets,
            watch=memory.watch,
            seconds_until_refresh=self._seconds_until_refresh(spec, memory),
            admission_guard=self.admission is not None,
            **common,
        )

    async def _writer_exists(self, budget: BudgetObject, configmap: ConfigMapLike | None) -> bool:
        """For a managed ConfigMap another budget wrote: does that budget still exist?"""
        if configmap is None or configmap.labels.get(LABEL_MANAGED_BY) is None:
            return True
        writer = configmap.labels.get(LABEL_BUDGET, budget.name)
        if writer == budget.name:
            return True
        return await self.kube.budget_exists(budget.namespace, writer)

    async def _database(
        self, budget: BudgetObject, spec: PoolBudgetSpec, memory: BudgetMemory
    ) -> DatabaseFacts | DatabaseUnavailable:
        """The database's limits, read at most every refreshSeconds on one connection per
        DSN, or why they could not be read (memory.failures counts them in a row)."""
        try:
            database = await self._read_database(budget, spec, memory)
        except _Unavailable as failure:
            memory.failures += 1
            return failure.unavailable
        memory.failures = 0
        return database

    async def _read_database(
        self, budget: BudgetObject, spec: PoolBudgetSpec, memory: BudgetMemory
    ) -> DatabaseFacts:
        labels = {"namespace": budget.namespace, "poolbudget": budget.name}
        source = spec.database.connection_secret_ref
        if source is None:
            override = spec.database.max_connections_override
            assert override is not None  # the spec model guarantees one of the two
            return DatabaseFacts(
                max_connections=override,
                superuser_reserved_connections=POSTGRES_DEFAULT_SUPERUSER_RESERVED,
            )
        try:
            dsn = await self.kube.read_secret_value(budget.namespace, source.name, source.key)
        except NotFoundError:
            raise _Unavailable(Reason.SECRET_NOT_FOUND, f"Secret {source.name} not found") from None
        except SecretKeyMissingError as exc:
            raise _Unavailable(Reason.SECRET_KEY_MISSING, str(exc)) from None
        except KubeError as exc:
            raise _Unavailable(Reason.SECRET_UNREADABLE, str(exc)) from None

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
                raise _Unavailable.of(exc) from None
            memory.database_read_at = self.monotonic()
            metrics.DATABASE_PROBES.labels(**labels, result="ok").inc()
            if spec.database.watch.enabled:
                await self._read_activity(spec, memory, labels)
        assert memory.database is not None
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
        watch = memory.watch
        try:
            reading = await memory.prober.activity(stale_after)
        except Exception as exc:
            metrics.ACTIVITY_READS.labels(**labels, result="error").inc()
            error = str(exc) if isinstance(exc, DatabaseProbeError) else type(exc).__name__
            memory.watch = replace(watch, pending=None, read_error=error)
            logger.warning(
                "%s/%s: reading pg_stat_activity failed: %s",
                labels["namespace"],
                labels["poolbudget"],
                error,
            )
            return
        metrics.ACTIVITY_READS.labels(**labels, result="ok").inc()
        memory.watch = replace(watch, pending=reading, read_error=None)

    def _seconds_until_refresh(self, spec: PoolBudgetSpec, memory: BudgetMemory) -> float:
        refresh = float(spec.database.refresh_seconds)
        if memory.database_read_at is None:
            return refresh
        return max(0.5, refresh - (self.monotonic() - memory.database_read_at))

    # --- apply ---------------------------------------------------------------------------

    async def apply(
        self, budget: BudgetObject, inputs: Inputs, decision: Decision, memory: BudgetMemory
    ) -> ReconcileResult:
        """ConfigMaps, then restarts (never of a Deployment whose ConfigMap write was
        refused), then the Events, then the status. A write the API server refuses becomes
        part of the status; anything else (an outage) raises, for the loop to retry."""
        labels = {"namespace": budget.namespace, "poolbudget": budget.name}
        if self.admission is not None and decision.admission is not None:
            await self.admission.publish(
                budget.namespace, budget.name, budget.generation, decision.admission
            )
        refused: dict[str, str] = {}
        notes: list[PendingEvent] = list(decision.notes)
        try:
            for write in decision.writes:
                try:
                    await self.kube.apply_configmap(
                        budget.namespace, write.name, write.data, write.labels, write.annotations
                    )
                except KubeError as exc:
                    if not _refused(exc):
                        raise
                    refused[write.target] = f"ConfigMap {write.name}: {_refusal(exc)}"
                    continue
                notes.extend(write.notes)
            for restart in decision.restarts:
                if restart.deployment in refused:
                    continue
                try:
                    await self.kube.annotate_pod_template(
                        budget.namespace,
                        restart.deployment,
                        {ANNOTATION_CONFIG_HASH: restart.config_hash},
                    )
                except KubeError as exc:
                    if not _refused(exc):
                        raise
                    refused[restart.deployment] = (
                        f"Deployment {restart.deployment}: {_refusal(exc)}"
                    )
                    continue
                metrics.RESTARTS.labels(**labels, deployment=restart.deployment).inc()
                notes.extend(restart.notes)
                self._hold_status(memory)
        except Exception:
            # What was done before the failure is still told (its Events are not posted
            # again: the next reconcile finds those writes done).
            await self._post(budget.ref, notes, best_effort=True)
            raise

        status, refusal_notes = with_refusals(decision, refused, inputs.previous, inputs.now)
        notes.extend(refusal_notes)
        if refused:
            logger.warning(
                "%s/%s: the API server refused: %s",
                budget.namespace,
                budget.name,
                "; ".join(refused.values()),
            )
        self._remember(budget, decision, memory)
        self._publish(labels, decision, bool(refused))
        # Before the status: whoever sees the new status can find the Events that explain it.
        await self._post(budget.ref, notes)
        memory.last_status = status
        next_check = decision.next_check_seconds
        wait = (
            self._held_for(memory.status_hold, status) if decision.outcome is Outcome.OK else None
        )
        if wait is not None:
            # Deployments were just restarted. Each answer of the Deployment controller
            # changes the status (observed, updated, available, complete): written every
            # time, a change cost 2-4 status writes, and a cold start of 1,000 budgets two
            # each, the controller taking 10 s to get through 5,000 rollouts. Held until
            # the rollouts are done (or STATUS_HOLD_MAX_SECONDS), the status is written once
            # and says how they went. Meanwhile the Events tell what was done, at once.
            next_check = wait if next_check is None else min(next_check, wait)
            return ReconcileResult(next_check_seconds=next_check, status=status)
        await self._write_status(budget, status, memory, decision.outcome)
        return ReconcileResult(next_check_seconds=next_check, status=status)

    def _hold_status(self, memory: BudgetMemory) -> None:
        """A restart during a hold moves its settle time, never its end: restarts paced one
        after another must not keep the status unwritten."""
        moment = self.monotonic()
        held = memory.status_hold
        give_up = moment + self.status_hold_max_seconds if held is None else held.give_up
        memory.status_hold = StatusHold(
            settled=min(moment + self.status_settle_seconds, give_up), give_up=give_up
        )

    @staticmethod
    def _remember(budget: BudgetObject, decision: Decision, memory: BudgetMemory) -> None:
        watched_before = memory.watch.usage is not None or bool(memory.watch.signals.raised)
        memory.template_hash_seen = decision.template_hash_seen
        memory.watch = decision.watch
        if watched_before and decision.watch == WatchMemory():
            metrics.forget_watch(budget.namespace, budget.name)

    async def _write_status(
        self,
        budget: BudgetObject,
        status: PoolBudgetStatus,
        memory: BudgetMemory,
        outcome: str,
    ) -> None:
        memory.status_hold = None
        recorded = memory.written_status
        changed = status_changes(recorded if recorded is not None else budget.status, status)
        if not changed:
            if recorded is None:
                # The server holds this status already (a restart that finds its work
                # done): remembered as written, the PoolBudget's own copy is no longer
                # needed (handlers.kept_body).
                memory.written_status = status
            return
        try:
            await self.kube.patch_budget_status(budget.namespace, budget.name, status)
        except KubeError as exc:
            if not _refused(exc):
                raise
            # Nowhere else to say it: the status is what was refused. Logged once per
            # streak (the same status is tried again next round), counted every time.
            metrics.ERRORS.labels(
                namespace=budget.namespace, poolbudget=budget.name, reason=Reason.WRITE_REFUSED
            ).inc()
            if not memory.status_refused:
                logger.warning(
                    "%s/%s: the API server refused the status: %s",
                    budget.namespace,
                    budget.name,
                    _refusal(exc),
                )
            memory.status_refused = True
            return
        memory.status_refused = False
        memory.written_status = status
        logger.info(
            "%s/%s: %s; %s; changed: %s",
            budget.namespace,
            budget.name,
            outcome,
            "; ".join(f"{c.type}={c.status.value} ({c.reason})" for c in status.conditions or ()),
            ", ".join(changed),
        )

    def _held_for(self, hold: StatusHold | None, status: PoolBudgetStatus) -> float | None:
        """Seconds the status write is still held (None: write now): until the hold has
        settled, then while a target is rolling out or waiting its turn, until it gives up."""
        if hold is None:
            return None
        moment = self.monotonic()
        if moment < hold.settled:
            return hold.settled - moment
        rolling = any(entry.state in IN_FLIGHT for entry in status.allocations or ())
        if rolling and moment < hold.give_up:
            return hold.give_up - moment
        return None

    async def _post(
        self, ref: BudgetRef, notes: Sequence[PendingEvent], *, best_effort: bool = False
    ) -> None:
        for event in aggregate(notes):
            try:
                await self.kube.post_event(ref, event.type, event.reason, event.message)
            except KubeError as exc:
                if not (best_effort or _refused(exc)):
                    raise
                # Refused (the namespace is being deleted, an Event quota): the status
                # still tells it; the reconcile goes on.
                logger.warning(
                    "%s/%s: the %s event was not posted: %s",
                    ref.namespace,
                    ref.name,
                    event.reason,
                    _refusal(exc) if _refused(exc) else exc,
                )
            except Exception:
                if not best_effort:
                    raise
                logger.warning(
                    "%s/%s: could not post the %s event", ref.namespace, ref.name, event.reason
                )

    # --- metrics -------------------------------------------------------------------------

    @staticmethod
    def _publish(labels: Mapping[str, str], decision: Decision, refused: bool) -> None:
        metrics.RECONCILES.labels(**labels, outcome=decision.outcome).inc()
        if decision.error is not None:
            metrics.ERRORS.labels(**labels, reason=decision.error).inc()
        if refused:
            metrics.ERRORS.labels(**labels, reason=Reason.WRITE_REFUSED).inc()
        if decision.outcome is Outcome.INFEASIBLE:
            metrics.FEASIBLE.labels(**labels).set(0)
        for name, reason in decision.skipped.items():
            metrics.RESTARTS_SKIPPED.labels(**labels, deployment=name, reason=reason).inc()
        plan = decision.plan
        if plan is not None:
            metrics.FEASIBLE.labels(**labels).set(1)
            metrics.MAX_CONNECTIONS.labels(**labels).set(plan.max_connections)
            metrics.USABLE_CONNECTIONS.labels(**labels).set(plan.usable_connections)
            metrics.PEAK_CONNECTIONS.labels(**labels).set(plan.peak_connections)
            metrics.HEADROOM.labels(**labels).set(plan.headroom)
            metrics.keep_targets(labels["namespace"], labels["poolbudget"], decision.owned)
            for name in decision.owned:
                allocation = plan.allocation(name)
                target = {**labels, "deployment": name}
                metrics.POOL_SIZE.labels(**target).set(allocation.pool_size)
                metrics.MAX_OVERFLOW.labels(**target).set(allocation.max_overflow)
                metrics.TARGET_PEAK.labels(**target).set(allocation.peak_connections)
        database = decision.status.database
        in_use = None if database is None else database.connections_in_use
        if decision.outcome is Outcome.OK and in_use is not None:
            metrics.CONNECTIONS_IN_USE.labels(**labels).set(in_use)
        usage = decision.watch.usage
        if decision.watch_judged and usage is not None:
            metrics.UNBUDGETED.labels(**labels).set(usage.unbudgeted_connections)
            for application in usage.targets:
                live = application.live
                for name in application.deployment_names:
                    for state, value in (
                        ("active", live.active),
                        ("idle", live.idle),
                        ("idle_in_transaction", live.idle_in_transaction),
                        ("unknown", live.unknown),
                    ):
                        metrics.TARGET_LIVE.labels(**labels, deployment=name, state=state).set(
                            value
                        )
            for kind in SignalKind:
                raised = sum(1 for s in decision.watch.signals.raised if s.kind is kind)
                metrics.SIGNALS.labels(**labels, signal=kind.value).set(raised)


class _Unavailable(Exception):
    """The database's limits could not be read (internal to gather)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.unavailable = DatabaseUnavailable(reason=reason, message=message)

    @classmethod
    def of(cls, exc: BaseException) -> _Unavailable:
        """A probe error carries its reason and a redacted message; anything else is named
        by its class only, since its text could echo a DSN."""
        if isinstance(exc, DatabaseProbeError):
            return cls(exc.reason, str(exc))
        return cls(Reason.DATABASE_ERROR, f"database probe failed ({type(exc).__name__})")


def _validated(spec: Mapping[str, Any]) -> PoolBudgetSpec | InvalidSpec:
    try:
        return PoolBudgetSpec.model_validate(spec)
    except ValidationError as exc:
        return InvalidSpec(message=describe_validation_error(exc))


def _previous(budget: BudgetObject, memory: BudgetMemory) -> PoolBudgetStatus:
    """The status to build on: the one this process last decided, else the PoolBudget's
    own, read leniently (api/status.py) once here."""
    remembered = memory.last_status  # decoded once
    if remembered is not None:
        return remembered
    return PoolBudgetStatus.model_validate(budget.status)


def _refused(exc: KubeError) -> bool:
    """The API server answered and said no (RBAC, quota, admission, invalid): waiting
    will not fix it, a person must. Timeouts, 5xx and lost leadership are retried."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status not in (404, 409, 429)


def _refusal(exc: KubeError) -> str:
    return f"{exc.status} {exc.api_reason or ''} {exc.api_message or ''}".strip()


def status_changes(
    before: PoolBudgetStatus | Mapping[str, Any], after: PoolBudgetStatus
) -> list[str]:
    """What differs, as field paths (`allocations[api].state`, `conditions[Ready]`), ignoring
    what changes without anything happening. Empty: nothing to write. The log line of each
    status write names them, so write churn can be traced to its cause.

    Compared as the JSON the API server holds (`to_body()`). `before` may be that JSON as
    read from the PoolBudget, unparsed: what this version cannot represent (an entry an
    older operator wrote with a value it no longer knows) then differs, and is replaced."""
    if isinstance(before, PoolBudgetStatus):
        before = before.to_body()
    old, new = _comparable(before), _comparable(after.to_body())
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
