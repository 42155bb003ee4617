"""The database watch as users see it: settings, the DatabaseHealthy condition, status.

Pure: domain/activity.py computes usage and signals from a pg_stat_activity reading; this
module turns them into what reconcile.py writes. DatabaseHealthy reports; it never feeds
Ready, which is about the plan being applied (a leaking application is not a reason to
call the budget unapplied, and Ready must not flap with the database's load).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from poolbudget.api.status import ActivityStatus, LiveConnections, UnbudgetedClient, Visibility
from poolbudget.api.v1alpha1 import DatabaseWatch
from poolbudget.domain.activity import (
    BudgetUsage,
    Signal,
    SignalKind,
    SignalSettings,
    SignalState,
    StateCounts,
)
from poolbudget.domain.conditions import ConditionType, Observation, rfc3339
from poolbudget.domain.reasons import Reason

# How many clients of no target status names (the largest first); the total counts all.
TOP_UNBUDGETED = 5

PARTIAL_VISIBILITY_NOTE = (
    "partial view: the operator's role sees other roles' sessions without their state; "
    "grant pg_monitor for states, lock waits and stale transactions"
)


def signal_settings(watch: DatabaseWatch) -> SignalSettings:
    return SignalSettings(
        near_capacity_ratio=watch.capacity_warning_ratio,
        lock_waits=watch.lock_waits_warning,
        stale_transaction_seconds=float(watch.idle_in_transaction_warning_seconds),
    )


def ordered(signals: Sequence[Signal]) -> list[Signal]:
    """Raised signals in a stable order: by kind as SignalKind lists them, then subject."""
    rank = {kind: index for index, kind in enumerate(SignalKind)}
    return sorted(signals, key=lambda s: (rank[s.kind], s.subject))


def health_observation(
    usage: BudgetUsage | None, state: SignalState, read_error: str | None
) -> Observation:
    """DatabaseHealthy. Its status follows the raised signals only (which raise at once and
    clear after clean refreshes), so it flips on a raise or a clear and on nothing else. A
    failed read changes the message, not the status: it is no evidence either way."""
    failed = (
        f"the last read of pg_stat_activity failed ({read_error}); the signals stand as last "
        "seen until a read succeeds"
        if read_error
        else ""
    )
    raised = ordered(state.raised)
    if usage is None and not raised:
        if read_error:
            return Observation(
                type=ConditionType.DATABASE_HEALTHY,
                status=None,
                reason=Reason.ACTIVITY_UNREADABLE,
                message=failed,
            )
        return Observation(
            type=ConditionType.DATABASE_HEALTHY,
            status=None,
            reason=Reason.NOT_YET_OBSERVED,
            message="pg_stat_activity is read at the next refresh of the database",
        )
    notes = [failed] if failed else []
    if usage is not None and usage.partial_visibility:
        notes.append(PARTIAL_VISIBILITY_NOTE)
    if raised:
        return Observation(
            type=ConditionType.DATABASE_HEALTHY,
            status=False,
            reason=raised[0].kind.value,
            message="; ".join([f"{s.kind.value}: {s.message}" for s in raised] + notes),
        )
    assert usage is not None  # no reading and nothing raised returned above
    rolling = [name for t in usage.targets if t.rolling_out for name in t.deployment_names]
    allocations = "every target within its allocation"
    if rolling:  # their old pods hold the old pools, as the rollout planned
        allocations = (
            f"every target within its allocation but {', '.join(rolling)}, rolling out "
            "(not judged until its rollout is complete)"
        )
    summary = (
        f"{usage.in_use} of {usage.usable} usable connections in use, "
        f"{usage.unbudgeted_connections} of them by clients of no target; {allocations}; "
        f"{usage.lock_waits} lock waits; no transaction left open"
    )
    return Observation(
        type=ConditionType.DATABASE_HEALTHY,
        status=True,
        reason=Reason.WITHIN_THRESHOLDS,
        message="; ".join([summary, *notes]),
    )


def cleared_message(signal: Signal, settings: SignalSettings) -> str:
    what = f" ({signal.subject})" if signal.subject else ""
    return (
        f"{signal.kind.value}{what} cleared after {settings.clear_after_clean_observations} "
        f"clean refreshes in a row; it was: {signal.message}"
    )


def live_connections(application_name: str, counts: StateCounts) -> LiveConnections:
    return LiveConnections(
        application_name=application_name,
        active=counts.active,
        idle=counts.idle,
        idle_in_transaction=counts.idle_in_transaction,
        unknown=counts.unknown,
        total=counts.total,
    )


def target_live(usage: BudgetUsage) -> dict[str, LiveConnections]:
    """Per Deployment: its application's live connections (status.allocations[].live).
    Targets sharing an application_name cannot be told apart: each shows the sum."""
    return {
        name: live_connections(application.application_name, application.live)
        for application in usage.targets
        for name in application.deployment_names
    }


def activity_status(usage: BudgetUsage, observed: datetime) -> ActivityStatus:
    """status.activity: the server's client connections at the last refresh."""
    top = sorted(usage.unbudgeted, key=lambda u: (-u.live.total, u.application_name))
    return ActivityStatus(
        connections_in_use=usage.in_use,
        unbudgeted_connections=usage.unbudgeted_connections,
        unbudgeted_clients=tuple(
            UnbudgetedClient(application_name=u.application_name, connections=u.live.total)
            for u in top[:TOP_UNBUDGETED]
        ),
        operator_connections=usage.operator.total,
        lock_waits=usage.lock_waits,
        stale_transactions=usage.stale_transactions,
        visibility=Visibility.PARTIAL if usage.partial_visibility else Visibility.FULL,
        observed_time=rfc3339(observed),
    )
