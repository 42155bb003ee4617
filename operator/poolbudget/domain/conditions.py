"""status.conditions the Kubernetes way: keyed by type, lastTransitionTime only on flips."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum

from poolbudget.api.status import Condition, ConditionStatus
from poolbudget.domain.facts import Frozen
from poolbudget.domain.reasons import Reason


class ConditionType(StrEnum):
    READY = "Ready"
    DATABASE_OBSERVED = "DatabaseObserved"
    BUDGET_FEASIBLE = "BudgetFeasible"
    ROLLOUT_COMPLETE = "RolloutComplete"
    # Reports the database watch (spec.database.watch); never part of Ready.
    DATABASE_HEALTHY = "DatabaseHealthy"


CONDITION_ORDER = (
    ConditionType.READY,
    ConditionType.DATABASE_OBSERVED,
    ConditionType.BUDGET_FEASIBLE,
    ConditionType.ROLLOUT_COMPLETE,
    ConditionType.DATABASE_HEALTHY,
)


class Observation(Frozen):
    """One condition as this reconcile sees it (no timestamps)."""

    type: ConditionType
    status: bool | None  # None = Unknown
    reason: str  # a Reason, or a signal's kind (DatabaseHealthy)
    message: str

    @property
    def condition_status(self) -> ConditionStatus:
        if self.status is None:
            return ConditionStatus.UNKNOWN
        return ConditionStatus.TRUE if self.status else ConditionStatus.FALSE


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Sequence[Condition],
    observations: Sequence[Observation],
    generation: int,
    now: datetime,
) -> tuple[Condition, ...]:
    """The whole conditions list to write (a merge patch replaces lists wholesale).

    lastTransitionTime is carried over unless the status flips; conditions this reconcile
    did not observe are kept as they were.
    """
    old = {c.type: c for c in previous}
    merged = dict(old)
    for observation in observations:
        before = old.get(observation.type.value)
        status = observation.condition_status
        transition = rfc3339(now)
        if before is not None and before.status == status:
            transition = before.last_transition_time or transition
        merged[observation.type.value] = Condition(
            type=observation.type.value,
            status=status,
            reason=observation.reason,
            message=observation.message,
            observed_generation=generation,
            last_transition_time=transition,
        )
    order = {t.value: i for i, t in enumerate(CONDITION_ORDER)}
    return tuple(sorted(merged.values(), key=lambda c: (order.get(c.type, len(order)), c.type)))


def feeds_ready(observation: Observation) -> bool:
    """Whether a condition counts for Ready: every one but Ready itself and DatabaseHealthy,
    which reports the database's load, not the plan."""
    return observation.type not in (ConditionType.READY, ConditionType.DATABASE_HEALTHY)


def summarize_ready(observations: Sequence[Observation]) -> Observation:
    """Ready is True only when every condition that feeds it is; otherwise the first
    failure says why."""
    for observation in observations:
        if not feeds_ready(observation):
            continue
        if observation.status is not True:
            return Observation(
                type=ConditionType.READY,
                status=False,
                reason=observation.reason,
                message=observation.message,
            )
    return Observation(
        type=ConditionType.READY,
        status=True,
        reason=Reason.BUDGET_APPLIED,
        message="every target's pool settings are applied and fit the database",
    )
