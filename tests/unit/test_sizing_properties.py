"""Invariants of the sizing engine over thousands of generated fleets (hypothesis).

Each property runs at least 2,000 generated cases (see `FLEETS`), in both sharing modes
(`spec.shareBy: Worker | Target`, drawn with the limits).
"""

from __future__ import annotations

from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolbudget.api.v1alpha1 import ShareBy
from poolbudget.domain.sizing import (
    BudgetLimits,
    BudgetPlan,
    TargetDemand,
    Verdict,
    plan_budget,
)

FLEETS = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def demands(draw: st.DrawFn, name: str) -> TargetDemand:
    min_pool = draw(st.integers(1, 5))
    max_pool = draw(st.one_of(st.none(), st.integers(min_pool, min_pool + 60)))
    return TargetDemand(
        name=name,
        pods=draw(st.integers(1, 30)),
        processes_per_pod=draw(st.integers(1, 16)),
        weight=draw(st.integers(1, 10)),
        min_pool_size=min_pool,
        max_pool_size=max_pool,
        max_overflow=draw(st.integers(0, 20)),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[TargetDemand]:
    count = draw(st.integers(1, 6))
    return [draw(demands(f"t{i}")) for i in range(count)]


limits_strategy = st.builds(
    BudgetLimits,
    max_connections=st.integers(1, 5000),
    withheld_by_server=st.integers(0, 10),
    reserved_connections=st.integers(0, 50),
    share_by=st.sampled_from(ShareBy),
)


def _units(demand: TargetDemand, share_by: ShareBy) -> int:
    """What the fill level is multiplied by for this target: its weight per worker
    (shared by worker) or per target; the level is connections per unit."""
    return demand.weight * demand.workers if share_by is ShareBy.WORKER else demand.weight


# Verdicts from worst to best: more connections never move a plan down this list.
_RANK = {Verdict.INFEASIBLE: 0, Verdict.OVERFLOW_REDUCED: 1, Verdict.FEASIBLE: 2}


def _pools(plan: BudgetPlan) -> list[int]:
    return [a.pool_size for a in plan.allocations]


@FLEETS
@given(limits=limits_strategy, fleet=fleets())
def test_a_feasible_plan_fits_the_worst_case(
    limits: BudgetLimits, fleet: list[TargetDemand]
) -> None:
    plan = plan_budget(limits, fleet)
    worst_case = sum(
        d.workers * (a.pool_size + a.max_overflow)
        for d, a in zip(fleet, plan.allocations, strict=True)
    )
    assert worst_case == plan.peak_connections
    if plan.feasible:
        assert worst_case <= limits.usable
        assert plan.headroom >= 0
    else:
        # Infeasible only when even minimum pools without overflow do not fit.
        assert sum(d.workers * d.min_pool_size for d in fleet) > limits.usable
        assert plan.shortfall == sum(d.workers * d.min_pool_size for d in fleet) - limits.usable


@FLEETS
@given(limits=limits_strategy, fleet=fleets())
def test_every_bound_is_respected(limits: BudgetLimits, fleet: list[TargetDemand]) -> None:
    plan = plan_budget(limits, fleet)
    for demand, allocation in zip(fleet, plan.allocations, strict=True):
        assert allocation.pool_size >= 1
        assert allocation.pool_size >= demand.min_pool_size
        if demand.max_pool_size is not None:
            assert allocation.pool_size <= demand.max_pool_size
        assert 0 <= allocation.max_overflow <= demand.max_overflow
        if plan.verdict is Verdict.FEASIBLE:
            assert allocation.max_overflow == demand.max_overflow
        assert allocation.workers == demand.pods * demand.processes_per_pod


@FLEETS
@given(limits=limits_strategy, fleet=fleets(), more=st.integers(1, 500))
def test_more_max_connections_never_shrinks_a_pool(
    limits: BudgetLimits, fleet: list[TargetDemand], more: int
) -> None:
    """Exactly so between Feasible plans. While the overflow is lowered the pools are
    filled too, and that cannot be monotone: the pools of the first Feasible plan are the
    minimum ones, so any pool filled above its minimum below that point falls back there
    (the README's upgrade notes and trade-off say so). The verdict never gets worse."""
    before = plan_budget(limits, fleet)
    bigger = limits.model_copy(update={"max_connections": limits.max_connections + more})
    after = plan_budget(bigger, fleet)
    assert _RANK[after.verdict] >= _RANK[before.verdict]
    if before.verdict is not Verdict.FEASIBLE:
        return
    assert after.verdict is Verdict.FEASIBLE
    for old, new in zip(before.allocations, after.allocations, strict=True):
        assert new.pool_size >= old.pool_size
        assert new.max_overflow >= old.max_overflow


@FLEETS
@given(
    limits=limits_strategy,
    fleet=fleets(),
    data=st.data(),
)
def test_more_replicas_never_grow_that_targets_pool(
    limits: BudgetLimits, fleet: list[TargetDemand], data: st.DataObject
) -> None:
    """Between Feasible plans, in both modes (shared by worker, every pool may shrink)."""
    index = data.draw(st.integers(0, len(fleet) - 1))
    extra = data.draw(st.integers(1, 20))
    scaled = list(fleet)
    scaled[index] = fleet[index].model_copy(update={"pods": fleet[index].pods + extra})
    before_plan = plan_budget(limits, fleet)
    after_plan = plan_budget(limits, scaled)
    assert _RANK[after_plan.verdict] <= _RANK[before_plan.verdict]
    if after_plan.verdict is not Verdict.FEASIBLE:
        return  # lowered overflow refills the pools: see the test above
    before = before_plan.allocations[index]
    after = after_plan.allocations[index]
    assert after.pool_size <= before.pool_size
    assert after.max_overflow <= before.max_overflow


@FLEETS
@given(limits=limits_strategy, fleet=fleets())
def test_the_plan_wastes_nothing_it_could_give(
    limits: BudgetLimits, fleet: list[TargetDemand]
) -> None:
    """Headroom is smaller than the next step of the fill: one more connection per worker
    for the target next in line, ordered by fill level, then fewest workers, then name.
    (Why "next in line" rather than "any target": test_sizing.py and the README.) This
    holds with the overflow in force, lowered or not: lowering it fills the pools again."""
    plan = plan_budget(limits, fleet)
    if not plan.feasible:
        return
    candidates = []
    for demand, allocation in zip(fleet, plan.allocations, strict=True):
        if demand.max_pool_size is not None and allocation.pool_size >= demand.max_pool_size:
            continue
        # The level (connections per unit) at which this pool would gain one more.
        level = Fraction(
            (allocation.pool_size + 1 + allocation.max_overflow) * demand.workers,
            _units(demand, limits.share_by),
        )
        candidates.append((level, demand.workers, demand.name))
    if not candidates:
        return  # every target is at its maximum: the rest is honest headroom
    _, next_cost, _ = min(candidates)
    assert plan.headroom < next_cost


@FLEETS
@given(limits=limits_strategy, fleet=fleets())
def test_lowered_overflow_is_the_one_that_wastes_least(
    limits: BudgetLimits, fleet: list[TargetDemand]
) -> None:
    """When the overflow must be lowered, no common cap whose minimum pools fit leaves
    fewer connections unused once the pools are filled, and a higher cap is taken whenever
    it leaves no more. Each cap's fill is planned on its own: the same fleet with every
    max_overflow capped, which the engine plans as Feasible."""
    plan = plan_budget(limits, fleet)
    if plan.verdict is not Verdict.OVERFLOW_REDUCED:
        return
    chosen = max(a.max_overflow for a in plan.allocations)
    assert all(a.max_overflow == min(a.requested_max_overflow, chosen) for a in plan.allocations)
    for cap in range(max(d.max_overflow for d in fleet)):
        capped = [d.model_copy(update={"max_overflow": min(d.max_overflow, cap)}) for d in fleet]
        alternative = plan_budget(limits, capped)
        if alternative.verdict is not Verdict.FEASIBLE:
            continue  # the minimum pools do not fit under this cap
        if cap == chosen:
            assert _pools(alternative) == _pools(plan)
        assert alternative.headroom >= plan.headroom
        if cap > chosen:
            assert alternative.headroom > plan.headroom


@FLEETS
@given(limits=limits_strategy, fleet=fleets())
def test_shares_follow_weights(limits: BudgetLimits, fleet: list[TargetDemand]) -> None:
    """No target that could still grow is more than one of its own steps behind another
    target's share per unit of weight, per worker or per target as shared (the water
    level is common to all)."""
    plan = plan_budget(limits, fleet)
    if plan.verdict is not Verdict.FEASIBLE:
        return
    pairs = list(zip(fleet, plan.allocations, strict=True))
    for d_i, a_i in pairs:
        if d_i.max_pool_size is not None and a_i.pool_size >= d_i.max_pool_size:
            continue
        behind = Fraction(a_i.peak_connections + d_i.workers, _units(d_i, limits.share_by))
        for d_j, a_j in pairs:
            if a_j.pool_size <= d_j.min_pool_size:
                continue  # held up by its minimum, not by the level
            ahead = Fraction(a_j.peak_connections, _units(d_j, limits.share_by))
            # One target-step of slack for each: i may be a step behind, j a step ahead
            # from the tie-break at the top of the fill.
            assert behind + Fraction(d_j.workers, _units(d_j, limits.share_by)) > ahead


@FLEETS
@given(
    max_connections=st.integers(1, 20000),
    reserved=st.integers(0, 50),
    workers=st.integers(1, 400),
    overflow=st.integers(0, 30),
    share_by=st.sampled_from(ShareBy),
)
def test_one_target_is_the_classic_rule(
    max_connections: int, reserved: int, workers: int, overflow: int, share_by: ShareBy
) -> None:
    limits = BudgetLimits(
        max_connections=max_connections, reserved_connections=reserved, share_by=share_by
    )
    demand = TargetDemand(name="app", pods=1, processes_per_pod=workers, max_overflow=overflow)
    plan = plan_budget(limits, [demand])
    classic = limits.usable // workers - overflow
    if classic >= 1:
        assert plan.verdict is Verdict.FEASIBLE
        assert plan.allocation("app").pool_size == classic
    else:
        assert plan.verdict is not Verdict.FEASIBLE


@FLEETS
@given(
    max_connections=st.integers(1, 5000),
    reserved=st.integers(0, 50),
    overflow=st.integers(0, 20),
    shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 16)), min_size=1, max_size=6),
)
def test_shared_by_worker_is_the_guides_formula_over_all_workers(
    max_connections: int, reserved: int, overflow: int, shapes: list[tuple[int, int]]
) -> None:
    """Default weights and one overflow: every target gets floor(usable / all workers) -
    max_overflow, or one more where what that leaves over pays for the step."""
    limits = BudgetLimits(max_connections=max_connections, reserved_connections=reserved)
    fleet = [
        TargetDemand(name=f"t{i}", pods=pods, processes_per_pod=processes, max_overflow=overflow)
        for i, (pods, processes) in enumerate(shapes)
    ]
    workers = sum(d.workers for d in fleet)
    formula = limits.usable // workers - overflow
    plan = plan_budget(limits, fleet)
    if formula < 1:
        assert plan.verdict is not Verdict.FEASIBLE
        return
    assert plan.verdict is Verdict.FEASIBLE
    assert all(a.pool_size in (formula, formula + 1) for a in plan.allocations)
    assert plan.headroom < workers
