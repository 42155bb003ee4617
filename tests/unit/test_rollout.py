"""Restart decisions: hash-gated, paced, shrinking pools first."""

from datetime import UTC, datetime, timedelta

from poolbudget.domain.rollout import (
    RolloutPolicy,
    TargetPhase,
    TargetState,
    plan_rollout,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
POLICY = RolloutPolicy(max_concurrent=1, min_interval_seconds=300)


def state(name: str, *, desired: str = "new", per_worker: int = 10, **kw: object) -> TargetState:
    return TargetState.model_validate(
        {"name": name, "desired_hash": desired, "desired_per_worker": per_worker, **kw}
    )


def test_unchanged_hash_restarts_nothing() -> None:
    settled = state("api", configmap_hash="new", configmap_per_worker=10, template_hash="new")
    plan = plan_rollout([settled], POLICY, NOW)
    action = plan.action("api")
    assert not action.write_configmap
    assert not action.restart
    assert action.phase is TargetPhase.APPLIED
    assert plan.complete


def test_first_adoption_writes_and_restarts() -> None:
    plan = plan_rollout([state("api")], POLICY, NOW)
    assert plan.action("api").write_configmap
    assert plan.action("api").restart
    assert not plan.complete


def test_max_concurrent_limits_restarts_per_round() -> None:
    targets = [state(n, configmap_hash="old", configmap_per_worker=10) for n in ("a", "b", "c")]
    plan = plan_rollout(targets, RolloutPolicy(max_concurrent=2), NOW)
    assert [a.restart for a in plan.actions] == [True, True, False]
    assert all(a.write_configmap for a in plan.actions)  # same size: safe to write all
    # The two restarted this round hold the slots, and are named.
    assert "maxConcurrent (2) reached, a, b still rolling out" in plan.action("c").message


def test_rollouts_in_progress_take_slots() -> None:
    busy = state("a", configmap_hash="new", template_hash="new", rolling=True)
    due = state("b", configmap_hash="old", configmap_per_worker=10)
    plan = plan_rollout([busy, due], POLICY, NOW)
    assert not plan.action("b").restart
    assert plan.action("b").phase is TargetPhase.PENDING
    assert plan.action("a").phase is TargetPhase.ROLLING
    # Who it waits for, and until when: a rollout is not over when its old pods are gone.
    assert "a still rolling out (done when every new pod available" in plan.action("b").message


def test_cooldown_delays_a_restart_and_asks_to_come_back() -> None:
    recent = state(
        "api", configmap_hash="old", configmap_per_worker=10,
        last_restart=NOW - timedelta(seconds=100),
    )  # fmt: skip
    plan = plan_rollout([recent], POLICY, NOW)
    assert not plan.action("api").restart
    assert plan.action("api").write_configmap
    assert plan.recheck_after_seconds == 200
    later = plan_rollout([recent], POLICY, NOW + timedelta(seconds=201))
    assert later.action("api").restart


def test_shrinking_pools_roll_before_growing_ones_are_even_written() -> None:
    shrinking = state("api", per_worker=6, configmap_hash="old", configmap_per_worker=10)
    growing = state("jobs", per_worker=12, configmap_hash="old", configmap_per_worker=8)
    first = plan_rollout([growing, shrinking], RolloutPolicy(max_concurrent=5), NOW)
    assert first.action("api").write_configmap
    assert first.action("api").restart
    assert not first.action("jobs").write_configmap
    assert not first.action("jobs").restart
    assert "waits for api" in first.action("jobs").message

    # api restarted and still rolling: jobs still waits.
    rolling = shrinking.model_copy(
        update={
            "configmap_hash": "new",
            "configmap_per_worker": 6,
            "template_hash": "new",
            "rolling": True,
        }
    )
    second = plan_rollout([growing, rolling], RolloutPolicy(max_concurrent=5), NOW)
    assert not second.action("jobs").write_configmap

    # api's restart is patched but not yet observed by the Deployment controller (its
    # status still shows the last rollout finished): jobs still waits.
    unobserved = rolling.model_copy(update={"rolling": False, "unobserved": True})
    early = plan_rollout([growing, unobserved], RolloutPolicy(max_concurrent=5), NOW)
    assert not early.action("jobs").write_configmap
    assert not early.action("jobs").restart

    # api's rollout finished: now jobs grows.
    done = rolling.model_copy(update={"rolling": False})
    third = plan_rollout([growing, done], RolloutPolicy(max_concurrent=5), NOW)
    assert third.action("jobs").write_configmap
    assert third.action("jobs").restart


def test_restarts_disabled_only_writes_configmaps() -> None:
    targets = [
        state("api", per_worker=6, configmap_hash="old", configmap_per_worker=10),
        state("jobs", per_worker=12, configmap_hash="old", configmap_per_worker=8),
    ]
    plan = plan_rollout(targets, RolloutPolicy(restarts_enabled=False), NOW)
    assert all(a.write_configmap and not a.restart for a in plan.actions)
    settled = [t.model_copy(update={"configmap_hash": "new"}) for t in targets]
    assert plan_rollout(settled, RolloutPolicy(restarts_enabled=False), NOW).complete


def test_missing_deployment_gets_its_configmap_but_no_restart() -> None:
    plan = plan_rollout([state("api", deployment_exists=False)], POLICY, NOW)
    assert plan.action("api").write_configmap
    assert not plan.action("api").restart
    assert plan.action("api").phase is TargetPhase.MISSING


def test_stalled_rollout_is_reported() -> None:
    stuck = state("api", configmap_hash="new", template_hash="new", rolling=True, stalled=True)
    plan = plan_rollout([stuck], POLICY, NOW)
    assert plan.action("api").phase is TargetPhase.STALLED
    assert not plan.complete
