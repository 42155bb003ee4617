"""Properties of the restart pacing, over thousands of generated budgets.

Each example is one reconcile round of one budget: a few targets in arbitrary states (hash
current or not, rolling or not, restarted recently or long ago, growing or shrinking) and a
policy. The rules of domain/rollout.py must hold in every such round.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolbudget.domain.rollout import (
    RolloutPlan,
    RolloutPolicy,
    TargetPhase,
    TargetState,
    plan_rollout,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
ROUNDS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HASHES = st.sampled_from(["h1", "h2", "h3"])


@st.composite
def target_states(draw: st.DrawFn, name: str) -> TargetState:
    has_configmap = draw(st.booleans())
    rolling = draw(st.booleans())
    desired_hash, desired_per_worker = draw(HASHES), draw(st.integers(1, 20))
    configmap_hash = draw(HASHES) if has_configmap else None
    # The hash is of the data: a ConfigMap with the desired hash holds the desired pool.
    configmap_per_worker = (
        None
        if configmap_hash is None
        else desired_per_worker
        if configmap_hash == desired_hash
        else draw(st.integers(1, 20))
    )
    return TargetState(
        name=name,
        desired_hash=desired_hash,
        desired_per_worker=desired_per_worker,
        configmap_hash=configmap_hash,
        configmap_per_worker=configmap_per_worker,
        deployment_exists=draw(st.booleans() | st.just(True)),
        template_hash=draw(st.none() | HASHES),
        rolling=rolling,
        unobserved=draw(st.booleans()),
        stalled=rolling and draw(st.booleans()),
        last_restart=draw(
            st.none() | st.integers(0, 900).map(lambda s: NOW - timedelta(seconds=s))
        ),
    )


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[TargetState], RolloutPolicy]:
    count = draw(st.integers(1, 6))
    targets = [draw(target_states(f"t{i}")) for i in range(count)]
    policy = RolloutPolicy(
        restarts_enabled=draw(st.booleans() | st.just(True)),
        max_concurrent=draw(st.integers(1, 4)),
        min_interval_seconds=draw(st.sampled_from([0, 60, 300])),
    )
    return targets, policy


def restarted(plan: RolloutPlan) -> set[str]:
    return {a.name for a in plan.actions if a.restart}


@ROUNDS
@given(rounds())
def test_rolling_deployments_never_exceed_max_concurrent(
    case: tuple[list[TargetState], RolloutPolicy],
) -> None:
    targets, policy = case
    plan = plan_rollout(targets, policy, NOW)
    busy = {t.name for t in targets if t.rolling or t.unobserved}
    if restarted(plan):
        assert len(busy | restarted(plan)) <= policy.max_concurrent


@ROUNDS
@given(rounds())
def test_restarts_only_what_needs_one_and_may_have_one(
    case: tuple[list[TargetState], RolloutPolicy],
) -> None:
    targets, policy = case
    plan = plan_rollout(targets, policy, NOW)
    for target in targets:
        if plan.action(target.name).restart:
            assert policy.restarts_enabled
            assert target.deployment_exists
            assert target.template_hash != target.desired_hash  # same hash: never restarted
            assert not target.rolling
            if target.last_restart is not None:  # the cooldown has passed
                elapsed = (NOW - target.last_restart).total_seconds()
                assert elapsed >= policy.min_interval_seconds


@ROUNDS
@given(rounds())
def test_growing_pools_wait_for_every_other_target_to_settle(
    case: tuple[list[TargetState], RolloutPolicy],
) -> None:
    targets, policy = case
    plan = plan_rollout(targets, policy, NOW)
    growers = [t for t in targets if t.grows]
    others_settled = all(
        t.configmap_hash == t.desired_hash
        and (
            not t.deployment_exists
            or not policy.restarts_enabled
            or (t.template_hash == t.desired_hash and not t.rolling)
        )
        for t in targets
        if not t.grows
    )
    for grower in growers:
        action = plan.action(grower.name)
        if policy.restarts_enabled and not others_settled:
            assert not action.write_configmap  # a restarting pod must not take it early
            assert not action.restart
            assert action.phase is TargetPhase.PENDING


@ROUNDS
@given(rounds())
def test_every_target_gets_one_action_and_complete_means_nothing_left(
    case: tuple[list[TargetState], RolloutPolicy],
) -> None:
    targets, policy = case
    plan = plan_rollout(targets, policy, NOW)
    assert [a.name for a in plan.actions] == [t.name for t in targets]
    if plan.complete:
        assert not any(a.write_configmap or a.restart for a in plan.actions)
        assert all(a.phase in (TargetPhase.APPLIED, TargetPhase.MISSING) for a in plan.actions)
    if plan.recheck_after_seconds is not None:  # only a cooldown asks to come back
        assert 0 < plan.recheck_after_seconds <= policy.min_interval_seconds


@ROUNDS
@given(rounds())
def test_a_round_applied_as_decided_is_settled_or_still_progressing(
    case: tuple[list[TargetState], RolloutPolicy],
) -> None:
    """Idempotence: after the writes and restarts of a round happen, the next round (same
    instant) decides no second write of the same ConfigMap nor a second restart."""
    targets, policy = case
    first = plan_rollout(targets, policy, NOW)
    after: list[TargetState] = []
    for target in targets:
        action = first.action(target.name)
        changes: dict[str, object] = {}
        if action.write_configmap:
            changes |= {
                "configmap_hash": target.desired_hash,
                "configmap_per_worker": target.desired_per_worker,
            }
        if action.restart:
            changes |= {"template_hash": target.desired_hash, "rolling": True, "last_restart": NOW}
        after.append(target.model_copy(update=changes))
    second = plan_rollout(after, policy, NOW)
    for target in after:
        action = second.action(target.name)
        assert not action.restart or not first.action(target.name).restart
        if first.action(target.name).write_configmap:
            assert not action.write_configmap
