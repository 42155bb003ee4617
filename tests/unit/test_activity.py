"""Live usage against the budget, and the signals' hysteresis (domain/activity.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poolbudget.api.v1alpha1 import PoolBudgetSpec
from poolbudget.domain.activity import (
    OPERATOR_APPLICATION_NAME,
    ActivityRow,
    BudgetUsage,
    DatabaseActivity,
    SessionState,
    Signal,
    SignalKind,
    SignalSettings,
    SignalState,
    TargetAllocation,
    budget_usage,
    evaluate_signals,
    session_state,
    target_allocations,
)
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts
from poolbudget.domain.planning import plan_for
from poolbudget.domain.watch import health_observation

DEFAULTS = SignalSettings()
TARGETS = (
    TargetAllocation(deployment_name="api", application_name="api", allocation=20),
    TargetAllocation(deployment_name="worker", application_name="jobs", allocation=10),
)


def row(name: str, state: SessionState, connections: int, **parts: int) -> ActivityRow:
    return ActivityRow(application_name=name, state=state, connections=connections, **parts)


def usage(*rows: ActivityRow, usable: int = 100) -> BudgetUsage:
    return budget_usage(DatabaseActivity(rows=rows, stale_after_seconds=5), TARGETS, usable)


def kinds(signals: tuple[Signal, ...]) -> set[tuple[SignalKind, str]]:
    return {s.key for s in signals}


# --- rows and usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("active", SessionState.ACTIVE),
        ("fastpath function call", SessionState.ACTIVE),
        ("idle", SessionState.IDLE),
        ("idle in transaction", SessionState.IDLE_IN_TRANSACTION),
        ("idle in transaction (aborted)", SessionState.IDLE_IN_TRANSACTION),
        ("disabled", SessionState.UNKNOWN),
        (None, SessionState.UNKNOWN),
    ],
)
def test_session_states(raw: str | None, expected: SessionState) -> None:
    assert session_state(raw) is expected


def test_a_row_cannot_hold_more_waits_than_connections_or_stale_idle_sessions() -> None:
    with pytest.raises(ValidationError):
        row("api", SessionState.ACTIVE, 1, lock_waits=2)
    with pytest.raises(ValidationError):
        row("api", SessionState.IDLE, 2, stale_in_transaction=1)


def test_usage_splits_targets_unbudgeted_clients_and_the_operator() -> None:
    result = usage(
        row("api", SessionState.IDLE, 5),
        row("api", SessionState.ACTIVE, 3, lock_waits=1),
        row("api", SessionState.IDLE_IN_TRANSACTION, 2, stale_in_transaction=1),
        row("jobs", SessionState.UNKNOWN, 4),
        row("psql", SessionState.ACTIVE, 1),
        row("", SessionState.IDLE, 2),
        row(OPERATOR_APPLICATION_NAME, SessionState.ACTIVE, 1),
    )
    api, jobs = result.targets
    assert (api.deployment_names, api.allocation) == (("api",), 20)
    assert (api.live.idle, api.live.active, api.live.idle_in_transaction) == (5, 3, 2)
    assert (api.live.lock_waits, api.live.stale_in_transaction, api.live.total) == (1, 1, 10)
    # The worker Deployment's connections carry its applicationName, not its name.
    assert (jobs.deployment_names, jobs.live.unknown, jobs.live.total) == (("worker",), 4, 4)
    assert [(u.application_name, u.live.total) for u in result.unbudgeted] == [("", 2), ("psql", 1)]
    assert result.operator.total == 1
    assert result.in_use == 18
    assert result.unbudgeted_connections == 3
    assert result.partial_visibility  # jobs' state was hidden


def test_targets_sharing_an_application_name_are_one_entry_with_both_allocations() -> None:
    shared = (
        TargetAllocation(deployment_name="api", application_name="shop", allocation=20),
        TargetAllocation(deployment_name="admin", application_name="shop", allocation=4),
    )
    activity = DatabaseActivity(rows=(row("shop", SessionState.IDLE, 25),), stale_after_seconds=5)
    (entry,) = budget_usage(activity, shared, 100).targets
    assert (entry.deployment_names, entry.allocation, entry.over_allocation) == (
        ("api", "admin"),
        24,
        1,
    )


def test_target_allocations_follow_the_configmap_application_name_and_the_plan() -> None:
    spec = PoolBudgetSpec.model_validate(
        {
            "database": {"maxConnectionsOverride": 200},
            "reservedConnections": 10,
            "targets": [
                {"deploymentName": "api", "processesPerPod": 4},
                {"deploymentName": "worker", "applicationName": "jobs"},
            ],
        }
    )
    deployments = {
        "api": DeploymentFacts(name="api", replicas=2, max_surge=0),
        "worker": DeploymentFacts(name="worker", replicas=1, max_surge=0),
    }
    plan = plan_for(spec, DatabaseFacts(max_connections=200), deployments)
    api, worker = target_allocations(spec, plan)
    assert (api.application_name, worker.application_name) == ("api", "jobs")
    assert api.allocation == plan.allocation("api").peak_connections
    assert api.allocation == 8 * (
        plan.allocation("api").pool_size + plan.allocation("api").max_overflow
    )
    assert worker.allocation == plan.allocation("worker").peak_connections


# --- signals: examples --------------------------------------------------------------------


def test_a_well_behaved_fleet_raises_nothing() -> None:
    observed = usage(
        row("api", SessionState.IDLE, 18), row("jobs", SessionState.ACTIVE, 2, lock_waits=2)
    )
    result = evaluate_signals(observed, SignalState(), DEFAULTS)
    assert result.state.raised == ()
    assert result.raised_now == ()


def test_each_threshold_raises_its_signal_with_a_message_a_person_can_act_on() -> None:
    observed = usage(
        row("api", SessionState.IDLE, 23),
        row("jobs", SessionState.ACTIVE, 3, lock_waits=3),
        row("jobs", SessionState.IDLE_IN_TRANSACTION, 2, stale_in_transaction=2),
        row("psql", SessionState.IDLE, 60),
        usable=100,
    )
    result = evaluate_signals(observed, SignalState(), DEFAULTS)
    by_kind = {s.kind: s for s in result.raised_now}
    assert set(by_kind) == set(SignalKind)
    over = by_kind[SignalKind.OVER_ALLOCATION]
    assert over.subject == "api"
    assert "api holds 23 connections" in over.message
    assert "3 over its allocation of 20" in over.message
    assert "not reading their ConfigMap" in over.message
    assert "88 of 100 usable connections in use" in by_kind[SignalKind.NEAR_CAPACITY].message
    assert "60 of them belong to no target" in by_kind[SignalKind.NEAR_CAPACITY].message
    assert (
        "3 sessions are waiting on a lock (threshold 3), by application: jobs 3"
        in by_kind[SignalKind.LOCK_WAITS].message
    )
    stale = by_kind[SignalKind.STALE_TRANSACTIONS]
    assert stale.subject == "jobs"
    assert "2 sessions of jobs" in stale.message
    assert "more than 5s" in stale.message
    assert "adding more connections will not fix a leak" in stale.message


def test_a_target_rolling_out_is_not_judged_over_its_allocation() -> None:
    """Its old pods keep their old pools until the paced rollout replaces them: 25 of 20
    is the plan working, not a pod ignoring its ConfigMap. Once it is Applied, it is."""
    rows = DatabaseActivity(rows=(row("api", SessionState.IDLE, 25),), stale_after_seconds=5)
    rolling = tuple(
        t.model_copy(update={"rolling_out": t.deployment_name == "api"}) for t in TARGETS
    )

    during = budget_usage(rows, rolling, 100)
    assert during.targets[0].live.total == 25  # still counted, and shown
    assert during.targets[0].over_allocation == 0
    assert evaluate_signals(during, SignalState(), DEFAULTS).raised_now == ()

    healthy = health_observation(during, SignalState(), None)
    assert healthy.status is True
    assert "but api, rolling out (not judged until its rollout is complete)" in healthy.message

    after = budget_usage(rows, TARGETS, 100)
    assert after.targets[0].over_allocation == 5
    assert kinds(evaluate_signals(after, SignalState(), DEFAULTS).raised_now) == {
        (SignalKind.OVER_ALLOCATION, "api")
    }


def test_a_stale_transaction_of_an_unbudgeted_client_is_named_too() -> None:
    observed = usage(row("reporting", SessionState.IDLE_IN_TRANSACTION, 1, stale_in_transaction=1))
    (signal,) = evaluate_signals(observed, SignalState(), DEFAULTS).raised_now
    assert (signal.kind, signal.subject) == (SignalKind.STALE_TRANSACTIONS, "reporting")
    assert "1 session of reporting has been idle" in signal.message


def test_capacity_clears_only_below_the_margin_for_enough_observations_in_a_row() -> None:
    at = {ratio: usage(row("psql", SessionState.IDLE, ratio), usable=100) for ratio in (86, 82, 79)}
    state = evaluate_signals(at[86], SignalState(), DEFAULTS).state
    assert kinds(state.raised) == {(SignalKind.NEAR_CAPACITY, "")}
    for _ in range(10):  # 82% is under the threshold but inside the margin: stays raised
        result = evaluate_signals(at[82], state, DEFAULTS)
        state = result.state
        assert result.cleared_now == ()
    for _ in range(DEFAULTS.clear_after_clean_observations - 1):
        result = evaluate_signals(at[79], state, DEFAULTS)
        state = result.state
        assert result.cleared_now == ()
        assert state.raised
    result = evaluate_signals(at[79], state, DEFAULTS)
    assert kinds(result.cleared_now) == {(SignalKind.NEAR_CAPACITY, "")}
    assert result.state.raised == ()


def test_a_bad_observation_restarts_the_clean_streak() -> None:
    bad = usage(row("api", SessionState.ACTIVE, 5, lock_waits=5))
    clean = usage(row("api", SessionState.IDLE, 5))
    state = evaluate_signals(bad, SignalState(), DEFAULTS).state
    for observed in (clean, clean, bad, clean, clean):
        result = evaluate_signals(observed, state, DEFAULTS)
        assert result.cleared_now == ()
        state = result.state
    assert evaluate_signals(clean, state, DEFAULTS).cleared_now != ()


def test_a_raised_signal_message_follows_the_numbers_without_a_new_transition() -> None:
    state = evaluate_signals(
        usage(row("api", SessionState.IDLE, 21)), SignalState(), DEFAULTS
    ).state
    result = evaluate_signals(usage(row("api", SessionState.IDLE, 30)), state, DEFAULTS)
    assert result.raised_now == ()
    assert result.cleared_now == ()
    (signal,) = result.state.raised
    assert "holds 30 connections" in signal.message


# --- signals: properties ------------------------------------------------------------------

OBSERVATIONS = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
NAMES = st.sampled_from(["api", "jobs", "psql", "", OPERATOR_APPLICATION_NAME])


@st.composite
def activity_rows(draw: st.DrawFn) -> ActivityRow:
    state = draw(st.sampled_from(SessionState))
    connections = draw(st.integers(1, 40))
    return ActivityRow(
        application_name=draw(NAMES),
        state=state,
        connections=connections,
        lock_waits=draw(st.integers(0, connections)),
        stale_in_transaction=(
            draw(st.integers(0, connections)) if state is SessionState.IDLE_IN_TRANSACTION else 0
        ),
    )


@st.composite
def observations(draw: st.DrawFn) -> BudgetUsage:
    rows = draw(st.lists(activity_rows(), max_size=8))
    return budget_usage(
        DatabaseActivity(rows=tuple(rows), stale_after_seconds=5),
        TARGETS,
        draw(st.integers(1, 200)),
    )


signal_settings = st.builds(
    SignalSettings,
    near_capacity_ratio=st.floats(0.5, 1.0),
    lock_waits=st.integers(1, 10),
    near_capacity_clear_margin=st.floats(0, 0.3),
    clear_after_clean_observations=st.integers(1, 5),
)


@OBSERVATIONS
@given(st.lists(activity_rows(), max_size=10), st.integers(1, 300))
def test_every_connection_is_counted_once(rows: list[ActivityRow], usable: int) -> None:
    result = budget_usage(
        DatabaseActivity(rows=tuple(rows), stale_after_seconds=5), TARGETS, usable
    )
    assert result.in_use == sum(r.connections for r in rows)
    assert result.lock_waits == sum(r.lock_waits for r in rows)
    everyone = (*result.targets, *result.unbudgeted)
    stale = (
        sum(a.live.stale_in_transaction for a in everyone) + result.operator.stale_in_transaction
    )
    assert stale == sum(r.stale_in_transaction for r in rows)
    assert all(u.application_name != OPERATOR_APPLICATION_NAME for u in result.unbudgeted)
    assert [t.application_name for t in result.targets] == ["api", "jobs"]


@OBSERVATIONS
@given(st.lists(observations(), min_size=1, max_size=12), signal_settings)
def test_no_signal_raises_and_clears_on_the_same_observation(
    sequence: list[BudgetUsage], thresholds: SignalSettings
) -> None:
    state = SignalState()
    for observed in sequence:
        result = evaluate_signals(observed, state, thresholds)
        assert not kinds(result.raised_now) & kinds(result.cleared_now)
        before, after = kinds(state.raised), kinds(result.state.raised)
        assert kinds(result.raised_now) == after - before
        assert kinds(result.cleared_now) == before - after
        state = result.state


@OBSERVATIONS
@given(observations(), signal_settings, st.integers(2, 10))
def test_a_steady_observation_never_flips_a_signal_twice(
    observed: BudgetUsage, thresholds: SignalSettings, repeats: int
) -> None:
    state, flips = SignalState(), 0
    for _ in range(repeats):
        result = evaluate_signals(observed, state, thresholds)
        flips += len(result.raised_now) + len(result.cleared_now)
        assert not result.cleared_now  # what a steady observation raises, it keeps
        state = result.state
    assert flips == len(state.raised)


@OBSERVATIONS
@given(st.lists(observations(), max_size=6), observations(), signal_settings)
def test_a_breach_is_raised_on_the_observation_that_shows_it(
    history: list[BudgetUsage], observed: BudgetUsage, thresholds: SignalSettings
) -> None:
    state = SignalState()
    for earlier in history:
        state = evaluate_signals(earlier, state, thresholds).state
    result = evaluate_signals(observed, state, thresholds)
    over = {t.deployment_names[0] for t in observed.targets if t.over_allocation}
    raised = kinds(result.state.raised)
    assert {(SignalKind.OVER_ALLOCATION, name) for name in over} <= raised
    if observed.lock_waits >= thresholds.lock_waits:
        assert (SignalKind.LOCK_WAITS, "") in raised


@OBSERVATIONS
@given(st.lists(activity_rows(), max_size=8), st.integers(1, 3))
def test_below_every_threshold_nothing_is_raised(rows: list[ActivityRow], scale: int) -> None:
    # One connection a row (at most 8: within both allocations and far below 85% of
    # usable), at most two lock waits in all, no stale transaction.
    calm = [
        r.model_copy(
            update={"connections": 1, "lock_waits": min(r.lock_waits, 1) if i < 2 else 0,
                    "stale_in_transaction": 0}
        )
        for i, r in enumerate(rows)
    ]  # fmt: skip
    observed = budget_usage(
        DatabaseActivity(rows=tuple(calm), stale_after_seconds=5), TARGETS, usable=100 * scale
    )
    result = evaluate_signals(observed, SignalState(), DEFAULTS)
    assert result.raised_now == ()
    assert result.state.raised == ()
