"""The sizing engine on worked examples (the invariants are in test_sizing_properties)."""

import pytest

from poolbudget.api.v1alpha1 import ShareBy
from poolbudget.domain.sizing import (
    BudgetLimits,
    DuplicateTargetError,
    TargetDemand,
    Verdict,
    plan_budget,
)


def one_target(workers: int, overflow: int = 5, **limits: int) -> TargetDemand:
    del limits
    return TargetDemand(name="app", pods=1, processes_per_pod=workers, max_overflow=overflow)


@pytest.mark.parametrize("share_by", list(ShareBy))
@pytest.mark.parametrize(("workers", "expected_pool"), [(4, 42), (8, 18)])
def test_classic_rule_one_target(workers: int, expected_pool: int, share_by: ShareBy) -> None:
    # 200 max, 10 reserved, PostgreSQL's own reserve taken as 0, overflow 5.
    limits = BudgetLimits(max_connections=200, reserved_connections=10, share_by=share_by)
    plan = plan_budget(limits, [one_target(workers)])
    assert plan.allocation("app").pool_size == expected_pool
    assert plan.allocation("app").pool_size == 190 // workers - 5
    assert plan.verdict is Verdict.FEASIBLE


def test_postgres_reserve_is_withheld() -> None:
    limits = BudgetLimits(max_connections=200, withheld_by_server=3, reserved_connections=10)
    plan = plan_budget(limits, [one_target(4)])
    assert plan.usable_connections == 187
    assert plan.allocation("app").pool_size == 187 // 4 - 5


def issue_16_fleet() -> list[TargetDemand]:
    """api: 3 replicas, HPA max 6, maxSurge 1, 2 processes (14 workers); worker: 2 replicas,
    maxSurge 0, 1 process (2 workers)."""
    return [
        TargetDemand(name="api", pods=7, processes_per_pod=2, max_overflow=5),
        TargetDemand(name="worker", pods=2, processes_per_pod=1, max_overflow=5),
    ]


def test_shared_by_worker_every_worker_gets_the_guides_formula() -> None:
    plan = plan_budget(BudgetLimits(max_connections=200, reserved_connections=10), issue_16_fleet())
    assert plan.share_by is ShareBy.WORKER
    # floor(190 / 16 workers) - 5 = 6 for everyone; the 14 left over pay for one more
    # connection on each of worker's 2 processes (the fill's next step), not on api's 14.
    assert plan.allocation("api").pool_size == 190 // 16 - 5 == 6
    assert plan.allocation("worker").pool_size == 7
    assert plan.peak_connections == 14 * 11 + 2 * 12 == 178


def test_shared_by_target_every_deployment_gets_the_same_total() -> None:
    limits = BudgetLimits(max_connections=200, reserved_connections=10, share_by=ShareBy.TARGET)
    plan = plan_budget(limits, issue_16_fleet())
    # 95 each: api's 14 workers get floor(95 / 14) - 5 = 1, worker's 2 get 47 - 5 = 42,
    # and worker (fewer workers, first in line) takes the next steps the rest pays for.
    assert plan.allocation("api").pool_size == 1
    assert plan.allocation("worker").pool_size == 44


def test_weight_doubles_the_pool_per_worker() -> None:
    limits = BudgetLimits(max_connections=400)
    heavy = TargetDemand(name="api", pods=2, processes_per_pod=5, weight=2, max_overflow=0)
    light = TargetDemand(name="jobs", pods=4, processes_per_pod=5, weight=1, max_overflow=0)
    plan = plan_budget(limits, [heavy, light])
    # 10 workers at 2 units, 20 at 1: 40 units, 10 connections each.
    assert plan.allocation("api").pool_size == 20
    assert plan.allocation("jobs").pool_size == 10
    assert plan.headroom == 0


def test_weights_share_the_budget() -> None:
    limits = BudgetLimits(max_connections=310, reserved_connections=10)
    heavy = TargetDemand(name="api", pods=2, processes_per_pod=5, weight=2, max_overflow=0)
    light = TargetDemand(name="jobs", pods=2, processes_per_pod=5, weight=1, max_overflow=0)
    plan = plan_budget(limits, [heavy, light])
    # 300 usable in a 2:1 ratio over 10 workers each: 200 and 100 connections.
    assert plan.allocation("api").pool_size == 20
    assert plan.allocation("jobs").pool_size == 10
    assert plan.headroom == 0


def test_capped_target_leaves_its_share_to_the_others() -> None:
    limits = BudgetLimits(max_connections=300)
    capped = TargetDemand(name="api", pods=1, processes_per_pod=10, max_pool_size=3)
    other = TargetDemand(name="jobs", pods=1, processes_per_pod=10)
    plan = plan_budget(limits, [capped, other])
    assert plan.allocation("api").pool_size == 3
    assert plan.allocation("api").at_max_pool_size
    # 300 - 30 used by the capped target = 270 for jobs' 10 workers.
    assert plan.allocation("jobs").pool_size == 27


def test_min_pool_size_is_respected_before_weights() -> None:
    limits = BudgetLimits(max_connections=100)
    big = TargetDemand(name="api", pods=1, processes_per_pod=10, weight=10)
    small = TargetDemand(name="cron", pods=1, processes_per_pod=10, min_pool_size=4)
    plan = plan_budget(limits, [big, small])
    assert plan.allocation("cron").pool_size == 4
    assert plan.allocation("api").pool_size == 6
    assert plan.peak_connections == 100


def test_lowered_overflow_still_fills_the_pools() -> None:
    # The README's shop budget at max_connections 126 (113 usable): minimum pools fit only
    # with overflow 0 (32 x 2 + 4 + 5 = 73). Held at their minimum they left 40 unused;
    # filled, api (weight 2) takes 32 more and worker 4, and 4 stay: web's step needs 5.
    limits = BudgetLimits(max_connections=126, withheld_by_server=3, reserved_connections=10)
    fleet = [
        TargetDemand(name="api", pods=8, processes_per_pod=4, weight=2, min_pool_size=2,
                     max_overflow=5),
        TargetDemand(name="worker", pods=2, processes_per_pod=2, max_pool_size=10,
                     max_overflow=5),
        TargetDemand(name="web", pods=5, processes_per_pod=1, max_overflow=5),
    ]  # fmt: skip
    plan = plan_budget(limits, fleet)
    assert plan.verdict is Verdict.OVERFLOW_REDUCED
    assert [(a.pool_size, a.max_overflow) for a in plan.allocations] == [(3, 0), (2, 0), (1, 0)]
    assert plan.headroom == 4


def test_a_lower_overflow_is_taken_only_when_it_wastes_less() -> None:
    # Overflow 2 is the highest under which the minimum pools fit (3 + 2 x 3 = 9 of 10)
    # but leaves 1 unused: jobs, next in line, steps by 2. Overflow 1 gives the freed
    # connections to jobs' pool and uses all 10.
    limits = BudgetLimits(max_connections=10)
    api = TargetDemand(name="api", pods=1, processes_per_pod=1, max_overflow=5)
    jobs = TargetDemand(name="jobs", pods=1, processes_per_pod=2, weight=2, max_overflow=5)
    plan = plan_budget(limits, [api, jobs])
    assert plan.verdict is Verdict.OVERFLOW_REDUCED
    assert [(a.pool_size, a.max_overflow) for a in plan.allocations] == [(1, 1), (3, 1)]
    assert plan.headroom == 0
    assert "2 would fit too but leave 1 unused, 1 leaves 0" in plan.reason
    # One more connection: overflow 2 wastes nothing either, and the higher one wins.
    wider = plan_budget(BudgetLimits(max_connections=11), [api, jobs])
    assert [a.max_overflow for a in wider.allocations] == [2, 2]


def test_overflow_is_lowered_before_giving_up() -> None:
    limits = BudgetLimits(max_connections=50)
    demand = TargetDemand(name="api", pods=5, processes_per_pod=2, min_pool_size=3, max_overflow=5)
    plan = plan_budget(limits, [demand])
    # 10 workers x (3 + overflow) <= 50 -> overflow 2
    assert plan.verdict is Verdict.OVERFLOW_REDUCED
    assert plan.allocation("api").max_overflow == 2
    assert plan.allocation("api").requested_max_overflow == 5
    assert plan.allocation("api").pool_size == 3
    assert plan.feasible
    assert "max_overflow lowered to 2" in plan.reason


def test_infeasible_names_the_target_and_the_shortfall() -> None:
    limits = BudgetLimits(max_connections=60, withheld_by_server=3, reserved_connections=10)
    api = TargetDemand(name="api", pods=10, processes_per_pod=4, min_pool_size=2)
    jobs = TargetDemand(name="jobs", pods=1, processes_per_pod=2)
    plan = plan_budget(limits, [api, jobs])
    assert plan.verdict is Verdict.INFEASIBLE
    assert not plan.feasible
    # minimum with no overflow: 40*2 + 2*1 = 82; usable 47
    assert plan.shortfall == 35
    assert "short by 35" in plan.reason
    assert "api (40 workers x minPoolSize 2 = 80)" in plan.reason


def test_no_usable_connections_at_all_is_infeasible() -> None:
    limits = BudgetLimits(max_connections=5, withheld_by_server=3, reserved_connections=10)
    plan = plan_budget(limits, [one_target(1)])
    assert plan.usable_connections == -8
    assert plan.verdict is Verdict.INFEASIBLE
    assert plan.shortfall == 9


def test_everyone_at_max_leaves_headroom() -> None:
    limits = BudgetLimits(max_connections=1000)
    demand = TargetDemand(name="api", pods=2, processes_per_pod=2, max_pool_size=5, max_overflow=1)
    plan = plan_budget(limits, [demand])
    assert plan.allocation("api").pool_size == 5
    assert plan.peak_connections == 24
    assert plan.headroom == 976


def test_leftover_smaller_than_the_next_fill_step_stays_headroom() -> None:
    """Why the engine may keep a little headroom instead of handing it to any target it fits.

    Shared by target, equal weights, 3 and 2 workers, minimum pool 1. The fill gives the 2-worker target its
    next step first (fewer workers), so at 9 and 10 usable the pools are 1 and 3. At 10 the
    one spare connection cannot pay for a step of either target. At 11 the 2 spare would
    fit a step of the 2-worker target, but the 3-worker target is next in line: skipping
    it would give [1, 4] at 11 and then force [2, 3] at 12, shrinking a pool as the
    database grew. The fill keeps [1, 3] at 11 and reaches [2, 3] at 12.
    """
    targets = [
        TargetDemand(name="a", pods=1, processes_per_pod=3),
        TargetDemand(name="b", pods=1, processes_per_pod=2),
    ]
    by_target = ShareBy.TARGET
    pools = {
        usable: [
            a.pool_size
            for a in plan_budget(
                BudgetLimits(max_connections=usable, share_by=by_target), targets
            ).allocations
        ]
        for usable in range(5, 40)
    }
    assert pools[10] == [1, 3]
    assert pools[11] == [1, 3]
    assert pools[12] == [2, 3]
    for usable in range(6, 40):
        assert all(n >= b for n, b in zip(pools[usable], pools[usable - 1], strict=True))


def test_duplicate_targets_are_rejected() -> None:
    with pytest.raises(DuplicateTargetError, match="repeated: app"):
        plan_budget(BudgetLimits(max_connections=100), [one_target(1), one_target(2)])


def test_max_below_min_is_rejected() -> None:
    with pytest.raises(ValueError, match="maxPoolSize 2 is below minPoolSize 3"):
        TargetDemand(name="x", pods=1, processes_per_pod=1, min_pool_size=3, max_pool_size=2)
