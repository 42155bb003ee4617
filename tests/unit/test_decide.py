"""`decide`, branch by branch: one round's inputs in, the writes, Events and status out.

Pure: no fakes of Kubernetes or PostgreSQL, only values. tests/unit/test_reconcile.py runs
the same rules through gather and apply against in-memory adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from poolbudget.api.status import (
    Allocation,
    AllocationState,
    Condition,
    ConditionStatus,
    PlanVerdict,
    PoolBudgetStatus,
)
from poolbudget.api.v1alpha1 import PoolBudgetSpec
from poolbudget.domain.decide import (
    BudgetRef,
    DatabaseUnavailable,
    Decision,
    Inputs,
    InvalidSpec,
    Outcome,
    TargetFacts,
    WatchMemory,
    decide,
    with_refusals,
)
from poolbudget.domain.facts import DatabaseFacts
from poolbudget.domain.observe import DeploymentState
from poolbudget.domain.reasons import Reason, SkipReason
from poolbudget.domain.rendering import LABEL_BUDGET, LABEL_MANAGED_BY, MANAGED_BY

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
BUDGET = BudgetRef("shop", "shop", "uid-1")
DATABASE = DatabaseFacts(max_connections=100, server_version="16.4", connections_in_use=7)


@dataclass(frozen=True)
class FakeConfigMap:
    data: dict[str, str]
    labels: dict[str, str]


def spec(*targets: str, **rollout: Any) -> PoolBudgetSpec:
    return PoolBudgetSpec.model_validate(
        {
            "database": {"connectionSecretRef": {"name": "db", "key": "dsn"}},
            "targets": [{"deploymentName": t, "processesPerPod": 2} for t in targets],
            "rollout": {"minIntervalSeconds": 0, **rollout},
        }
    )


def deployment(name: str, **changes: Any) -> DeploymentState:
    state = DeploymentState(
        name=name,
        replicas=2,
        max_surge=None,
        recreate=False,
        template_hash=None,
        rolling=False,
        unobserved=False,
        stalled=False,
    )
    return replace(state, **changes)


def facts(name: str, *, configmap: FakeConfigMap | None = None, **changes: Any) -> TargetFacts:
    return TargetFacts(
        deployment=deployment(name, **changes),
        hpa_max_replicas=None,
        claimants=("shop",),
        configmap=configmap,
    )


def inputs(budget_spec: PoolBudgetSpec | InvalidSpec, **changes: Any) -> Inputs:
    targets = (
        {}
        if isinstance(budget_spec, InvalidSpec)
        else {t.deployment_name: facts(t.deployment_name) for t in budget_spec.targets}
    )
    base = Inputs(
        budget=BUDGET,
        generation=3,
        spec=budget_spec,
        database=DATABASE,
        database_failures=0,
        targets=targets,
        previous=PoolBudgetStatus(),
        template_hash_seen={},
        watch=WatchMemory(),
        seconds_until_refresh=60.0,
        now=NOW,
    )
    return replace(base, **changes)


def condition(decision: Decision | PoolBudgetStatus, kind: str) -> Condition:
    status = decision.status if isinstance(decision, Decision) else decision
    found = status.condition(kind)
    assert found is not None, f"no {kind} condition"
    return found


def states(decision: Decision) -> dict[str, AllocationState | None]:
    return {a.deployment_name: a.state for a in decision.status.allocations or ()}


def allocation(decision: Decision, name: str = "api") -> Allocation:
    found = decision.status.allocation(name)
    assert found is not None, f"no allocation for {name}"
    return found


def rolled_out(first: Decision, round_inputs: Inputs) -> Inputs:
    """The next round's inputs once the first round's writes landed and its rollouts ended:
    ConfigMaps hold what was written, templates carry the hashes."""
    targets = dict(round_inputs.targets)
    for write in first.writes:
        old = targets[write.target]
        targets[write.target] = replace(old, configmap=FakeConfigMap(write.data, write.labels))
    for restart in first.restarts:
        old = targets[restart.deployment]
        assert old.deployment is not None
        targets[restart.deployment] = replace(
            old, deployment=replace(old.deployment, template_hash=restart.config_hash)
        )
    return replace(
        round_inputs,
        targets=targets,
        previous=first.status,
        template_hash_seen=first.template_hash_seen,
    )


# --- the branches ------------------------------------------------------------------------


def test_an_invalid_spec_writes_nothing_and_says_why() -> None:
    decision = decide(inputs(InvalidSpec(message="spec.targets: field required"), database=None))
    assert (decision.outcome, decision.writes, decision.restarts) == (Outcome.INVALID, (), ())
    ready = condition(decision, "Ready")
    assert (ready.status, ready.reason) == (ConditionStatus.FALSE, Reason.INVALID_SPEC)
    assert "spec.targets: field required" in ready.message
    assert decision.error is Reason.INVALID_SPEC


def test_a_first_round_writes_the_configmap_and_restarts() -> None:
    decision = decide(inputs(spec("api")))
    assert [w.name for w in decision.writes] == ["api-db-pool"]
    assert [r.deployment for r in decision.restarts] == ["api"]
    assert decision.restarts[0].config_hash == allocation(decision).config_hash
    assert states(decision) == {"api": AllocationState.ROLLING}
    assert decision.next_check_seconds == 1.0  # confirm the level after writing
    assert [n.reason for n in decision.writes[0].notes] == [Reason.CONFIGMAP_UPDATED]
    assert [n.reason for n in decision.restarts[0].notes] == [Reason.ROLLOUT_RESTARTED]


def test_a_settled_budget_writes_nothing_and_counts_the_skip_as_unchanged() -> None:
    first_inputs = inputs(spec("api"))
    second = decide(rolled_out(decide(first_inputs), first_inputs))
    assert (second.writes, second.restarts, second.notes) == ((), (), ())
    assert states(second) == {"api": AllocationState.APPLIED}
    assert second.skipped == {"api": SkipReason.UNCHANGED}
    assert condition(second, "Ready").status is ConditionStatus.TRUE
    assert second.next_check_seconds == 60.0


@pytest.mark.parametrize(
    ("rollout", "target_changes", "previous_restart", "skip"),
    [
        ({"strategy": "None"}, {}, None, SkipReason.DISABLED),
        ({"minIntervalSeconds": 300}, {}, NOW - timedelta(seconds=10), SkipReason.COOLDOWN),
        ({}, {"rolling": True}, None, SkipReason.ROLLING),
    ],
)
def test_a_restart_not_made_says_why(
    rollout: dict[str, Any],
    target_changes: dict[str, Any],
    previous_restart: datetime | None,
    skip: SkipReason,
) -> None:
    budget_spec = spec("api", **rollout)
    round_inputs = inputs(budget_spec)
    round_inputs = replace(
        round_inputs,
        targets={"api": facts("api", template_hash="old", **target_changes)},
        previous=PoolBudgetStatus(
            allocations=(
                Allocation(
                    deployment_name="api",
                    restarted_time=previous_restart.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ),
            )
        )
        if previous_restart
        else PoolBudgetStatus(),
    )
    decision = decide(round_inputs)
    assert decision.restarts == ()
    assert decision.skipped["api"] is skip


def test_max_concurrent_lets_one_deployment_restart_at_a_time() -> None:
    decision = decide(inputs(spec("api", "web")))
    assert [r.deployment for r in decision.restarts] == ["api"]
    assert decision.skipped == {"web": SkipReason.MAX_CONCURRENT}
    assert states(decision) == {"api": AllocationState.ROLLING, "web": AllocationState.PENDING}


def test_a_deployment_claimed_by_an_older_budget_is_a_conflict_told_once() -> None:
    budget_spec = spec("api")
    round_inputs = replace(
        inputs(budget_spec),
        targets={"api": replace(facts("api"), claimants=("older", "shop"))},
    )
    first = decide(round_inputs)
    assert (first.writes, first.restarts) == ((), ())
    assert states(first) == {"api": AllocationState.CONFLICT}
    assert condition(first, "Ready").reason == Reason.TARGET_CONFLICT
    assert [n.reason for n in first.notes] == [Reason.TARGET_CONFLICT]
    again = decide(replace(round_inputs, previous=first.status))
    assert again.notes == ()


def test_a_configmap_someone_else_wrote_is_never_overwritten() -> None:
    foreign = FakeConfigMap({"mine": "yes"}, {"team": "payments"})
    decision = decide(
        replace(inputs(spec("api")), targets={"api": facts("api", configmap=foreign)})
    )
    assert decision.writes == ()
    assert states(decision) == {"api": AllocationState.CONFLICT}


def test_a_configmap_left_by_a_deleted_budget_is_adopted() -> None:
    left = FakeConfigMap(
        {"DB_POOL_SIZE": "3", "DB_MAX_OVERFLOW": "1"},
        {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUDGET: "old-name"},
    )
    target = replace(facts("api", configmap=left), configmap_writer_exists=False)
    decision = decide(replace(inputs(spec("api")), targets={"api": target}))
    assert [w.name for w in decision.writes] == ["api-db-pool"]
    assert [n.reason for n in decision.writes[0].notes] == [
        Reason.CONFIGMAP_UPDATED,
        Reason.CONFIGMAP_ADOPTED,
    ]
    assert decision.writes[0].labels[LABEL_BUDGET] == "shop"


def test_a_missing_deployment_gets_its_configmap_and_is_told_once() -> None:
    budget_spec = spec("api")
    missing = replace(facts("api"), deployment=None)
    round_inputs = replace(inputs(budget_spec), targets={"api": missing})
    first = decide(round_inputs)
    assert [w.name for w in first.writes] == ["api-db-pool"]
    assert first.restarts == ()
    assert states(first) == {"api": AllocationState.MISSING}
    assert condition(first, "Ready").reason == Reason.ROLLOUT_PENDING  # being written
    assert [n.reason for n in first.notes] == [Reason.DEPLOYMENT_NOT_FOUND]
    second = decide(rolled_out(first, round_inputs))
    assert second.notes == ()
    assert condition(second, "Ready").reason == Reason.DEPLOYMENT_NOT_FOUND


def test_a_hash_another_writer_removed_is_restored_with_a_warning() -> None:
    first_inputs = inputs(spec("api"))
    settled = rolled_out(decide(first_inputs), first_inputs)
    seen = decide(settled).template_hash_seen  # the wanted hash, seen on the template
    assert set(seen) == {"api"}
    api = settled.targets["api"]
    assert api.deployment is not None
    unchanged = decide(replace(settled, template_hash_seen=seen))
    assert unchanged.restarts == ()
    overwritten = replace(
        settled,
        template_hash_seen=seen,
        targets={"api": replace(api, deployment=replace(api.deployment, template_hash=None))},
    )
    decision = decide(overwritten)
    assert [r.deployment for r in decision.restarts] == ["api"]
    assert [n.reason for n in decision.restarts[0].notes] == [
        Reason.ROLLOUT_RESTARTED,
        Reason.CONFIG_HASH_OVERWRITTEN,
    ]


# --- holding the plan: per-target state from this round's facts -------------------------


def test_a_database_failure_holds_the_plan_and_judges_targets_from_current_facts() -> None:
    """The issue's stale status: the restart was due, then the database went away and the
    rollout finished. The state must follow the Deployment, not the last round."""
    first_inputs = inputs(spec("api"))
    first = decide(first_inputs)
    assert states(first) == {"api": AllocationState.ROLLING}
    settled = rolled_out(first, first_inputs)
    unavailable = DatabaseUnavailable(
        reason=Reason.DATABASE_UNREACHABLE, message="cannot connect to db:5432"
    )
    held = decide(replace(settled, database=unavailable, database_failures=1))
    assert (held.outcome, held.writes, held.restarts) == (Outcome.DATABASE_ERROR, (), ())
    assert states(held) == {"api": AllocationState.APPLIED}
    entry = allocation(held)
    assert entry.message is not None
    assert entry.message.endswith("held: DatabaseUnreachable")
    assert entry.pool_size == allocation(first).pool_size
    assert entry.config_hash == allocation(first).config_hash
    assert condition(held, "RolloutComplete").status is ConditionStatus.TRUE
    ready = condition(held, "Ready")
    assert (ready.status, ready.reason) == (ConditionStatus.FALSE, Reason.DATABASE_UNREACHABLE)
    assert held.status.database is not None
    assert held.status.database.connections_in_use is None  # not observed this round
    assert held.status.database.max_connections == 100  # the limits the plan used
    assert held.next_check_seconds == 5.0
    assert [n.reason for n in held.notes] == [Reason.DATABASE_UNREACHABLE]
    again = decide(
        replace(settled, database=unavailable, database_failures=3, previous=held.status)
    )
    assert again.notes == ()
    assert again.next_check_seconds == 20.0


def test_a_held_target_still_rolling_says_so() -> None:
    first_inputs = inputs(spec("api"))
    settled = rolled_out(decide(first_inputs), first_inputs)
    api = settled.targets["api"]
    assert api.deployment is not None
    rolling = replace(api, deployment=replace(api.deployment, rolling=True))
    unavailable = DatabaseUnavailable(reason=Reason.SECRET_NOT_FOUND, message="Secret db not found")
    held = decide(replace(settled, targets={"api": rolling}, database=unavailable))
    assert states(held) == {"api": AllocationState.ROLLING}
    assert condition(held, "RolloutComplete").reason == Reason.ROLLOUT_IN_PROGRESS


def test_an_infeasible_budget_holds_the_plan_and_reports_the_new_limits() -> None:
    first_inputs = inputs(spec("api"))
    first = decide(first_inputs)
    settled = rolled_out(first, first_inputs)
    tiny = DatabaseFacts(max_connections=4, superuser_reserved_connections=3)
    held = decide(replace(settled, database=tiny))
    assert (held.outcome, held.writes, held.restarts) == (Outcome.INFEASIBLE, (), ())
    assert states(held) == {"api": AllocationState.APPLIED}
    assert held.status.verdict is PlanVerdict.INFEASIBLE
    usable, peak = held.status.usable_connections, held.status.peak_connections
    assert usable is not None
    assert peak is not None
    assert first.status.usable_connections is not None
    assert usable < first.status.usable_connections
    assert held.status.headroom == usable - peak
    feasible = condition(held, "BudgetFeasible")
    assert (feasible.status, feasible.reason) == (ConditionStatus.FALSE, Reason.BUDGET_INFEASIBLE)
    assert condition(held, "Ready").reason == Reason.BUDGET_INFEASIBLE


def test_a_first_round_without_the_database_has_nothing_to_hold() -> None:
    unavailable = DatabaseUnavailable(reason=Reason.DATABASE_NOT_FOUND, message="no database shop")
    held = decide(inputs(spec("api"), database=unavailable, database_failures=1))
    assert states(held) == {"api": AllocationState.PENDING}
    assert "no ConfigMap written yet" in (allocation(held).message or "")
    assert condition(held, "Ready").reason == Reason.DATABASE_NOT_FOUND
    assert held.status.database is None
    assert "database" not in held.status.to_body()


# --- refused writes ----------------------------------------------------------------------


def test_a_refused_write_becomes_ready_false_and_one_warning() -> None:
    decision = decide(inputs(spec("api")))
    refused = {"api": "ConfigMap api-db-pool: 403 Forbidden configmaps is forbidden"}
    status, notes = with_refusals(decision, refused, PoolBudgetStatus(), NOW)
    assert states(replace(decision, status=status)) == {"api": AllocationState.PENDING}
    ready = condition(status, "Ready")
    assert (ready.status, ready.reason) == (ConditionStatus.FALSE, Reason.WRITE_REFUSED)
    assert "403 Forbidden" in ready.message
    assert [n.reason for n in notes] == [Reason.WRITE_REFUSED]
    _, again = with_refusals(decision, refused, status, NOW)
    assert again == ()  # the same refusal is told once
    assert with_refusals(decision, {}, PoolBudgetStatus(), NOW) == (decision.status, ())


# --- what the types refuse ---------------------------------------------------------------


def test_only_database_reasons_describe_an_unreadable_database() -> None:
    with pytest.raises(ValueError, match="not a reason the database cannot be read"):
        DatabaseUnavailable(reason=Reason.BUDGET_APPLIED, message="")


def test_a_decision_counts_only_documented_error_reasons() -> None:
    with pytest.raises(ValueError, match="documented error reasons"):
        Decision(
            outcome=Outcome.OK,
            status=PoolBudgetStatus(),
            next_check_seconds=None,
            error=Reason.PROBED,
        )


def test_the_admission_guards_limits_are_computed_only_when_it_is_enabled() -> None:
    assert decide(inputs(spec("api"))).admission is None
    limits = decide(inputs(spec("api"), admission_guard=True)).admission
    assert limits is not None
    assert [limit.deployment for limit in limits] == ["api"]
