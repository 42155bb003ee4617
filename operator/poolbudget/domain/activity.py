"""Live connections against the budget, and the starvation signals: pure.

The adapter reads `pg_stat_activity` grouped by application_name and state
(`ActivityRow`s); here those rows meet the budget's targets — each target's connections
carry its `DB_APPLICATION_NAME`, its allocation is workers x (pool_size + max_overflow) —
and become per-target usage, the budget's in-use total and the connections that belong
to no target. `evaluate_signals` turns a sequence of such observations into signals that
raise and clear without flapping.

What a plain role sees: its own role's sessions in full, other roles' sessions with their
application_name but a NULL state (PostgreSQL hides state, wait events and timestamps
without pg_read_all_stats, which pg_monitor includes). Those connections still count
against their target's allocation and the in-use total; their state is `UNKNOWN`, and
lock waits or stale transactions among them cannot be seen (`partial_visibility`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from enum import StrEnum

from pydantic import Field, model_validator

from poolbudget.api.v1alpha1 import PoolBudgetSpec
from poolbudget.domain.facts import Frozen
from poolbudget.domain.rendering import application_name
from poolbudget.domain.sizing import BudgetPlan

# The application_name of the operator's own probe connections (adapters/postgres.py sets
# it): they hold slots (inside reservedConnections) but are no one's unbudgeted client.
OPERATOR_APPLICATION_NAME = "poolbudget-operator"


class SessionState(StrEnum):
    ACTIVE = "active"
    IDLE = "idle"
    IDLE_IN_TRANSACTION = "idle in transaction"
    # NULL in pg_stat_activity: another role's session seen without pg_read_all_stats (or
    # track_activities off, which PostgreSQL reports as 'disabled').
    UNKNOWN = "unknown"


def session_state(raw: str | None) -> SessionState:
    """pg_stat_activity.state as one of the four states counted here.

    'idle in transaction (aborted)' holds its connection and transaction like any idle
    transaction; 'fastpath function call' is a running call."""
    if raw is None:
        return SessionState.UNKNOWN
    if raw in ("active", "fastpath function call"):
        return SessionState.ACTIVE
    if raw == "idle":
        return SessionState.IDLE
    if raw.startswith("idle in transaction"):
        return SessionState.IDLE_IN_TRANSACTION
    return SessionState.UNKNOWN


class ActivityRow(Frozen):
    """Client backends of one application_name in one state, as the query counts them."""

    application_name: str
    state: SessionState
    connections: int = Field(ge=1)
    lock_waits: int = Field(default=0, ge=0)  # wait_event_type = 'Lock'
    # Idle in transaction for longer than the observation's stale_after_seconds.
    stale_in_transaction: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _parts_fit(self) -> ActivityRow:
        if self.lock_waits > self.connections or self.stale_in_transaction > self.connections:
            raise ValueError("lock waits and stale transactions are among the connections")
        if self.stale_in_transaction and self.state is not SessionState.IDLE_IN_TRANSACTION:
            raise ValueError("only a session idle in transaction can be stale")
        return self


class DatabaseActivity(Frozen):
    """One reading of pg_stat_activity (every client backend of the server)."""

    rows: tuple[ActivityRow, ...]
    stale_after_seconds: float = Field(ge=0)

    @property
    def partial_visibility(self) -> bool:
        """Some sessions' state was hidden from the role: lock waits and stale
        transactions among them are not counted (grant pg_monitor to see them)."""
        return any(row.state is SessionState.UNKNOWN for row in self.rows)


class StateCounts(Frozen):
    """Connections by state; lock waits and stale transactions are among them."""

    active: int = 0
    idle: int = 0
    idle_in_transaction: int = 0
    unknown: int = 0
    lock_waits: int = 0
    stale_in_transaction: int = 0

    @property
    def total(self) -> int:
        return self.active + self.idle + self.idle_in_transaction + self.unknown


def count_states(rows: Iterable[ActivityRow]) -> StateCounts:
    by_state: dict[SessionState, int] = defaultdict(int)
    lock_waits = stale = 0
    for row in rows:
        by_state[row.state] += row.connections
        lock_waits += row.lock_waits
        stale += row.stale_in_transaction
    return StateCounts(
        active=by_state[SessionState.ACTIVE],
        idle=by_state[SessionState.IDLE],
        idle_in_transaction=by_state[SessionState.IDLE_IN_TRANSACTION],
        unknown=by_state[SessionState.UNKNOWN],
        lock_waits=lock_waits,
        stale_in_transaction=stale,
    )


class TargetAllocation(Frozen):
    """A target as the watch needs it: whose connections, and how many it may hold."""

    deployment_name: str
    application_name: str
    allocation: int = Field(ge=0)  # workers x (pool_size + max_overflow)
    # Its pods are being restarted onto new settings: the old ones still hold the old
    # (maybe larger) pools, as the rollout planned, so it is not judged over its allocation.
    # Rolling out is what pacing waits for (domain/observe.py): until the controller calls
    # the rollout complete, a little after the old pods are gone. The extra wait for new
    # pods to become available costs nothing here: new pods hold the new, planned pools.
    rolling_out: bool = False


def target_allocations(
    spec: PoolBudgetSpec, plan: BudgetPlan, rolling_out: Collection[str] = ()
) -> tuple[TargetAllocation, ...]:
    """Every planned target's application name (as its ConfigMap writes it) and peak. A
    target another budget owns is not in this budget's plan, and not here. `rolling_out`:
    the Deployments whose restart onto new settings is pending or under way."""
    planned = {allocation.name for allocation in plan.allocations}
    return tuple(
        TargetAllocation(
            deployment_name=target.deployment_name,
            application_name=application_name(target),
            allocation=plan.allocation(target.deployment_name).peak_connections,
            rolling_out=target.deployment_name in rolling_out,
        )
        for target in spec.targets
        if target.deployment_name in planned
    )


class ApplicationUsage(Frozen):
    """Live connections of one application_name. Targets that share an application name
    cannot be told apart in pg_stat_activity: they are one entry with the sum of their
    allocations (None: the name belongs to no target)."""

    application_name: str
    deployment_names: tuple[str, ...] = ()
    allocation: int | None = None
    live: StateCounts = StateCounts()
    rolling_out: bool = False  # one of its targets is restarting onto new settings

    @property
    def over_allocation(self) -> int:
        """Connections beyond the allocation (0 within it, for no target, or while it
        rolls out: a paced rollout's old pods keep their old pools until replaced)."""
        if self.allocation is None or self.rolling_out:
            return 0
        return max(0, self.live.total - self.allocation)


class BudgetUsage(Frozen):
    """Live use of the whole server next to the budget."""

    targets: tuple[ApplicationUsage, ...]  # in spec order, one per distinct application name
    unbudgeted: tuple[ApplicationUsage, ...]  # client backends of no target, by name
    operator: StateCounts  # the operator's own probe connections
    usable: int
    partial_visibility: bool

    @property
    def everyone(self) -> tuple[StateCounts, ...]:
        """The counts of every client: targets, unbudgeted clients and the operator."""
        return (*(a.live for a in (*self.targets, *self.unbudgeted)), self.operator)

    @property
    def in_use(self) -> int:
        """Every client backend: each holds a max_connections slot, whoever it is."""
        return sum(counts.total for counts in self.everyone)

    @property
    def unbudgeted_connections(self) -> int:
        return sum(u.live.total for u in self.unbudgeted)

    @property
    def lock_waits(self) -> int:
        return sum(counts.lock_waits for counts in self.everyone)

    @property
    def stale_transactions(self) -> int:
        return sum(counts.stale_in_transaction for counts in self.everyone)


def budget_usage(
    activity: DatabaseActivity, targets: Sequence[TargetAllocation], usable: int
) -> BudgetUsage:
    """Split the server's client backends into targets, unbudgeted clients and the operator."""
    rows_by_name: dict[str, list[ActivityRow]] = defaultdict(list)
    for row in activity.rows:
        rows_by_name[row.application_name].append(row)

    deployments: dict[str, list[str]] = defaultdict(list)
    allocations: dict[str, int] = defaultdict(int)
    rolling: set[str] = set()
    for target in targets:  # dicts keep insertion order: spec order
        deployments[target.application_name].append(target.deployment_name)
        allocations[target.application_name] += target.allocation
        if target.rolling_out:
            rolling.add(target.application_name)

    return BudgetUsage(
        targets=tuple(
            ApplicationUsage(
                application_name=name,
                deployment_names=tuple(deployments[name]),
                allocation=allocations[name],
                live=count_states(rows_by_name.get(name, ())),
                rolling_out=name in rolling,
            )
            for name in deployments
        ),
        unbudgeted=tuple(
            ApplicationUsage(application_name=name, live=count_states(rows))
            for name, rows in sorted(rows_by_name.items())
            if name not in deployments and name != OPERATOR_APPLICATION_NAME
        ),
        operator=count_states(rows_by_name.get(OPERATOR_APPLICATION_NAME, ())),
        usable=usable,
        partial_visibility=activity.partial_visibility,
    )


# --- signals ------------------------------------------------------------------------------


class SignalKind(StrEnum):
    OVER_ALLOCATION = "OverAllocation"
    NEAR_CAPACITY = "NearCapacity"
    LOCK_WAITS = "LockWaits"
    STALE_TRANSACTIONS = "StaleTransactions"


class SignalSettings(Frozen):
    """Thresholds (the defaults are the guide's) and the hysteresis that clears signals."""

    near_capacity_ratio: float = Field(default=0.85, gt=0, le=1)
    lock_waits: int = Field(default=3, ge=1)
    # The same 5 s as the default DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS: PostgreSQL ends
    # such sessions of a target that applies its ConfigMap at about this age, so with both
    # defaults the signal mostly names clients that do not (unbudgeted ones, old pods).
    stale_transaction_seconds: float = Field(default=5.0, ge=0)
    # A raised capacity signal stays until in use is below (ratio - margin) x usable ...
    near_capacity_clear_margin: float = Field(default=0.05, ge=0, lt=1)
    # ... for this many observations in a row; every other signal needs as many clean ones.
    clear_after_clean_observations: int = Field(default=3, ge=1)


class Signal(Frozen):
    kind: SignalKind
    subject: str  # the Deployment(s) or application it names; "" for the whole budget
    message: str

    @property
    def key(self) -> tuple[SignalKind, str]:
        return (self.kind, self.subject)


class TrackedSignal(Frozen):
    signal: Signal
    clean_observations: int = Field(default=0, ge=0)  # in a row since the last bad one


class SignalState(Frozen):
    """What the previous observations left raised (kept by the caller between refreshes)."""

    tracked: tuple[TrackedSignal, ...] = ()

    @property
    def raised(self) -> tuple[Signal, ...]:
        return tuple(t.signal for t in self.tracked)


class SignalEvaluation(Frozen):
    state: SignalState
    raised_now: tuple[Signal, ...]  # not raised before this observation
    cleared_now: tuple[Signal, ...]  # raised before, cleared by this observation


def _names(usage: ApplicationUsage) -> str:
    return ", ".join(usage.deployment_names)


def current_breaches(usage: BudgetUsage, settings: SignalSettings) -> list[Signal]:
    """Every threshold this one observation crosses (no memory: see evaluate_signals)."""
    breaches: list[Signal] = []
    for target in usage.targets:
        if target.over_allocation:
            plural = "s" if len(target.deployment_names) > 1 else ""
            breaches.append(
                Signal(
                    kind=SignalKind.OVER_ALLOCATION,
                    subject=_names(target),
                    message=(
                        f"Deployment{plural} {_names(target)} hold{'' if plural else 's'} "
                        f"{target.live.total} connections (application_name "
                        f"{target.application_name!r}), {target.over_allocation} over "
                        f"{'their' if plural else 'its'} allocation of {target.allocation}: "
                        f"{'their' if plural else 'its'} pods are probably not reading their "
                        "ConfigMap, or still run an old one"
                    ),
                )
            )
    threshold = settings.near_capacity_ratio * usage.usable
    if usage.in_use >= threshold:
        breaches.append(
            Signal(
                kind=SignalKind.NEAR_CAPACITY,
                subject="",
                message=(
                    f"{usage.in_use} of {usage.usable} usable connections in use "
                    f"({_percent(usage.in_use, usage.usable)}, threshold "
                    f"{settings.near_capacity_ratio:.0%}); {usage.unbudgeted_connections} "
                    "of them belong to no target"
                ),
            )
        )
    if usage.lock_waits >= settings.lock_waits:
        waiting = [
            f"{a.application_name or '(no application_name)'} {a.live.lock_waits}"
            for a in (*usage.targets, *usage.unbudgeted)
            if a.live.lock_waits
        ]
        if usage.operator.lock_waits:
            waiting.append(f"{OPERATOR_APPLICATION_NAME} {usage.operator.lock_waits}")
        breaches.append(
            Signal(
                kind=SignalKind.LOCK_WAITS,
                subject="",
                message=(
                    f"{usage.lock_waits} sessions are waiting on a lock "
                    f"(threshold {settings.lock_waits}), by application: {', '.join(waiting)}"
                ),
            )
        )
    for application in (*usage.targets, *usage.unbudgeted):
        stale = application.live.stale_in_transaction
        if stale:
            name = application.application_name or "(no application_name)"
            breaches.append(
                Signal(
                    kind=SignalKind.STALE_TRANSACTIONS,
                    subject=application.application_name,
                    message=(
                        f"{stale} session{'s' if stale > 1 else ''} of {name} "
                        f"{'have' if stale > 1 else 'has'} been idle in transaction for more "
                        f"than {settings.stale_transaction_seconds:g}s: a transaction left "
                        "open holds its connection and its locks; adding more connections "
                        "will not fix a leak"
                    ),
                )
            )
    return breaches


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "no usable connections"


def _still_breached(
    key: tuple[SignalKind, str], usage: BudgetUsage, settings: SignalSettings
) -> bool:
    """For a raised signal: is this observation not yet clean enough to count toward
    clearing? Only capacity, a continuous ratio, needs a margin below its threshold."""
    if key[0] is SignalKind.NEAR_CAPACITY:
        ratio = settings.near_capacity_ratio - settings.near_capacity_clear_margin
        return usage.in_use >= ratio * usage.usable
    return False  # the others are breached only when current_breaches says so


def evaluate_signals(
    usage: BudgetUsage, previous: SignalState, settings: SignalSettings
) -> SignalEvaluation:
    """The signals after one more observation.

    Hysteresis: a signal raises on the first observation that crosses its threshold, so a
    problem is named within one refresh. It clears only after
    `clear_after_clean_observations` observations in a row that are clean — below the
    threshold, and for the capacity ratio below the threshold minus a margin. Observations
    are samples a refresh apart of numbers that jitter around their thresholds (a pool
    checking connections in and out, a lock queue forming and draining); without the
    streak and the margin a value hovering at 85% would raise and clear every refresh,
    and every flip is a Warning event. A raised signal's message follows the latest bad
    observation. Call this only with real observations: a failed read is no evidence that
    a problem went away.
    """
    breaches = {signal.key: signal for signal in current_breaches(usage, settings)}
    tracked: list[TrackedSignal] = []
    cleared: list[Signal] = []
    for before in previous.tracked:
        key = before.signal.key
        if key in breaches:
            tracked.append(TrackedSignal(signal=breaches.pop(key)))
        elif _still_breached(key, usage, settings):
            tracked.append(TrackedSignal(signal=before.signal))
        elif before.clean_observations + 1 >= settings.clear_after_clean_observations:
            cleared.append(before.signal)
        else:
            tracked.append(
                TrackedSignal(
                    signal=before.signal, clean_observations=before.clean_observations + 1
                )
            )
    raised = list(breaches.values())  # what is left was not raised before
    tracked.extend(TrackedSignal(signal=signal) for signal in raised)
    return SignalEvaluation(
        state=SignalState(tracked=tuple(tracked)),
        raised_now=tuple(raised),
        cleared_now=tuple(cleared),
    )
