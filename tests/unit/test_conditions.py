"""status.conditions: transitions only move lastTransitionTime when the status flips."""

from datetime import UTC, datetime, timedelta

from poolbudget.api.status import ConditionStatus
from poolbudget.domain.conditions import (
    ConditionType,
    Observation,
    merge_conditions,
    summarize_ready,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def obs(kind: ConditionType, status: bool | None, reason: str = "R") -> Observation:
    return Observation(type=kind, status=status, reason=reason, message=f"{reason} message")


def test_transition_time_changes_only_on_flip() -> None:
    first = merge_conditions([], [obs(ConditionType.BUDGET_FEASIBLE, True)], 1, T0)
    assert first[0].last_transition_time == "2026-11-24T12:00:00Z"
    same = merge_conditions(
        first, [obs(ConditionType.BUDGET_FEASIBLE, True, "Other")], 2, T0 + timedelta(minutes=5)
    )
    assert same[0].last_transition_time == "2026-11-24T12:00:00Z"
    assert same[0].reason == "Other"
    assert same[0].observed_generation == 2
    flipped = merge_conditions(
        same, [obs(ConditionType.BUDGET_FEASIBLE, False)], 2, T0 + timedelta(minutes=9)
    )
    assert flipped[0].last_transition_time == "2026-11-24T12:09:00Z"
    assert flipped[0].status is ConditionStatus.FALSE


def test_unobserved_conditions_are_kept_and_order_is_stable() -> None:
    before = merge_conditions(
        [],
        [obs(ConditionType.ROLLOUT_COMPLETE, True), obs(ConditionType.DATABASE_OBSERVED, True)],
        1,
        T0,
    )
    after = merge_conditions(before, [obs(ConditionType.READY, None)], 1, T0)
    assert [c.type for c in after] == ["Ready", "DatabaseObserved", "RolloutComplete"]
    assert after[0].status is ConditionStatus.UNKNOWN


def test_ready_summarises_the_first_failure() -> None:
    ready = summarize_ready(
        [
            obs(ConditionType.DATABASE_OBSERVED, True),
            obs(ConditionType.BUDGET_FEASIBLE, False, "BudgetInfeasible"),
        ]
    )
    assert ready.status is False
    assert ready.reason == "BudgetInfeasible"
    assert summarize_ready([obs(ConditionType.DATABASE_OBSERVED, True)]).status is True
