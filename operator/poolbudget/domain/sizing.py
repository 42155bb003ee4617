"""The sizing engine: how many connections each target's pool may hold.

Every worker process of a target opens up to ``pool_size + max_overflow`` connections, so
a target's peak is ``workers * (pool_size + max_overflow)`` and a plan is safe when the sum
of peaks fits in the usable connections.

How the budget is shared — a weighted water-fill:

* A single *level* λ is raised from zero. Shared by worker (the default), λ is in
  connections per worker per unit of weight and a target's pool is
  ``floor(λ * weight) - max_overflow``: with equal weights every worker of every target
  gets the classic ``floor(usable / all workers) - max_overflow``. Shared by target, λ is
  in connections per target per unit of weight and the pool is
  ``floor(λ * weight / workers) - max_overflow``: equal weights give every Deployment the
  same total. Either way the pool is clamped to ``[minPoolSize, maxPoolSize]`` and the
  level stops at the highest value whose total peak still fits. One target therefore gets
  exactly the classic ``floor(usable / workers) - max_overflow`` in both modes; a target
  held at its ``maxPoolSize`` stops growing and the others keep rising, so what it does not
  use goes to them.
* Targets that step up at the same level step one at a time in a fixed order (fewest
  workers first, then name), so the fill is one ordered sequence of steps and the plan is
  the longest prefix of it that fits. Every pool is therefore a non-decreasing function of
  the usable connections: a larger ``max_connections`` never shrinks a pool.
* What is left is smaller than the next step of the fill. Handing it to any other target
  it happens to fit would waste less, but then a larger ``max_connections`` could shrink
  someone's pool (and restart that Deployment); stability wins. See the README.

When even ``minPoolSize`` for everyone does not fit, ``max_overflow`` is lowered first — one
common cap for all targets — and the pools are filled again with the lowered overflow. Of
the caps under which the minimum pools fit, the plan takes the one whose fill leaves the
fewest connections unused, the highest such cap on a tie: the highest cap alone would hold
the pools at their minimum and could leave almost one connection per worker unused. If the
minimum pools do not fit with no overflow at all, the plan is infeasible and says which
target needs what and how many connections are missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from functools import reduce

from pydantic import Field, computed_field, model_validator

from poolbudget.api.v1alpha1 import ShareBy
from poolbudget.domain.facts import Frozen


class TargetDemand(Frozen):
    """One target as the planner sees it: worst-case pods and the pool bounds."""

    name: str = Field(min_length=1)
    pods: int = Field(ge=1, description="pods budgeted for (worst case, surge included)")
    processes_per_pod: int = Field(ge=1)
    weight: int = Field(default=1, ge=1)
    min_pool_size: int = Field(default=1, ge=1)
    max_pool_size: int | None = Field(default=None, ge=1)
    max_overflow: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> TargetDemand:
        if self.max_pool_size is not None and self.max_pool_size < self.min_pool_size:
            raise ValueError(
                f"target {self.name}: maxPoolSize {self.max_pool_size} "
                f"is below minPoolSize {self.min_pool_size}"
            )
        return self

    @property
    def workers(self) -> int:
        return self.pods * self.processes_per_pod


class BudgetLimits(Frozen):
    """The connection limit, everything held back from it, and how the rest is shared."""

    max_connections: int = Field(ge=0)
    # superuser_reserved_connections + reserved_connections (PostgreSQL 16+).
    withheld_by_server: int = Field(default=0, ge=0)
    # spec.reservedConnections: admin, monitoring, migrations, the operator itself.
    reserved_connections: int = Field(default=0, ge=0)
    # spec.shareBy: what a target's weight multiplies (its workers, or nothing).
    share_by: ShareBy = ShareBy.WORKER

    @property
    def usable(self) -> int:
        return self.max_connections - self.withheld_by_server - self.reserved_connections


class Verdict(StrEnum):
    FEASIBLE = "Feasible"
    OVERFLOW_REDUCED = "OverflowReduced"
    INFEASIBLE = "Infeasible"


class Allocation(Frozen):
    """What one target gets."""

    name: str
    pods: int
    workers: int
    weight: int
    pool_size: int
    max_overflow: int
    # The overflow the spec asked for; above max_overflow when the plan had to lower it.
    requested_max_overflow: int
    at_max_pool_size: bool

    @computed_field  # type: ignore[prop-decorator]
    @property
    def peak_connections(self) -> int:
        return self.workers * (self.pool_size + self.max_overflow)


class BudgetPlan(Frozen):
    """The outcome of planning: allocations plus a verdict a human can read."""

    max_connections: int
    withheld_by_server: int
    reserved_connections: int
    usable_connections: int
    share_by: ShareBy
    allocations: tuple[Allocation, ...]
    verdict: Verdict
    reason: str
    # Connections missing for the minimum pools with no overflow; 0 unless infeasible.
    shortfall: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def feasible(self) -> bool:
        return self.verdict is not Verdict.INFEASIBLE

    @computed_field  # type: ignore[prop-decorator]
    @property
    def peak_connections(self) -> int:
        return sum(a.peak_connections for a in self.allocations)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def headroom(self) -> int:
        return self.usable_connections - self.peak_connections

    def allocation(self, name: str) -> Allocation:
        for allocation in self.allocations:
            if allocation.name == name:
                return allocation
        raise KeyError(name)


class DuplicateTargetError(ValueError):
    """Two targets with the same name in one budget."""


def plan_budget(limits: BudgetLimits, demands: Sequence[TargetDemand]) -> BudgetPlan:
    """Compute every target's pool size and overflow so the worst case fits."""
    names = [d.name for d in demands]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DuplicateTargetError(f"targets must be unique, repeated: {', '.join(duplicates)}")

    usable = limits.usable

    def make_plan(
        pools: Sequence[int], overflows: Sequence[int], verdict: Verdict, reason: str, short: int
    ) -> BudgetPlan:
        allocations = tuple(
            Allocation(
                name=d.name,
                pods=d.pods,
                workers=d.workers,
                weight=d.weight,
                pool_size=pool,
                max_overflow=overflow,
                requested_max_overflow=d.max_overflow,
                at_max_pool_size=d.max_pool_size is not None and pool >= d.max_pool_size,
            )
            for d, pool, overflow in zip(demands, pools, overflows, strict=True)
        )
        return BudgetPlan(
            max_connections=limits.max_connections,
            withheld_by_server=limits.withheld_by_server,
            reserved_connections=limits.reserved_connections,
            usable_connections=usable,
            share_by=limits.share_by,
            allocations=allocations,
            verdict=verdict,
            reason=reason,
            shortfall=short,
        )

    minimum_pools = [d.min_pool_size for d in demands]
    full_overflow = [d.max_overflow for d in demands]
    if not demands:
        return make_plan([], [], Verdict.FEASIBLE, "no targets", 0)

    share_by = limits.share_by
    if _peak(demands, minimum_pools, full_overflow) <= usable:
        pools = _water_fill(demands, full_overflow, usable, share_by)
        peak = _peak(demands, pools, full_overflow)
        reason = (
            f"{len(demands)} target(s) peak at {peak} of {usable} usable connections "
            f"({usable - peak} headroom)"
        )
        return make_plan(pools, full_overflow, Verdict.FEASIBLE, reason, 0)

    # Not even the minimum pools fit with the requested overflow: lower overflow first.
    highest = _highest_overflow_cap(demands, usable)
    if highest is not None:
        cap, pools, unused = _least_waste_cap(demands, usable, share_by, highest)
        overflows = [min(d.max_overflow, cap) for d in demands]
        lowered = [d.name for d in demands if d.max_overflow > cap]
        reason = (
            f"max_overflow lowered to {cap} for {', '.join(lowered)}: minimum pools with the "
            f"requested overflow need {_peak(demands, minimum_pools, full_overflow)} "
            f"connections, {usable} usable"
        )
        if cap < highest:
            _, unused_at_highest = _filled_with_cap(demands, usable, share_by, highest)
            reason += (
                f"; {highest} would fit too but leave {unused_at_highest} unused, "
                f"{cap} leaves {unused}"
            )
        return make_plan(pools, overflows, Verdict.OVERFLOW_REDUCED, reason, 0)

    no_overflow = [0] * len(demands)
    needed = _peak(demands, minimum_pools, no_overflow)
    short = needed - usable
    largest = max(demands, key=lambda d: (d.workers * d.min_pool_size, d.name))
    reason = (
        f"short by {short} connection(s): minimum pools with no overflow need {needed}, "
        f"{usable} usable (max_connections {limits.max_connections} - {limits.withheld_by_server}"
        f" withheld by PostgreSQL - {limits.reserved_connections} reserved); largest need: "
        f"{largest.name} ({largest.workers} workers x minPoolSize {largest.min_pool_size}"
        f" = {largest.workers * largest.min_pool_size})"
    )
    return make_plan(minimum_pools, no_overflow, Verdict.INFEASIBLE, reason, short)


def _peak(demands: Sequence[TargetDemand], pools: Sequence[int], overflows: Sequence[int]) -> int:
    return sum(d.workers * (p + o) for d, p, o in zip(demands, pools, overflows, strict=True))


def _highest_overflow_cap(demands: Sequence[TargetDemand], usable: int) -> int | None:
    """Largest common overflow cap under which the minimum pools fit; None if even 0 fails."""
    minimum_pools = [d.min_pool_size for d in demands]

    def fits(cap: int) -> bool:
        return _peak(demands, minimum_pools, [min(d.max_overflow, cap) for d in demands]) <= usable

    if not fits(0):
        return None
    # fits(low) holds; the caller established that fits(high) does not.
    low, high = 0, max(d.max_overflow for d in demands)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _filled_with_cap(
    demands: Sequence[TargetDemand], usable: int, share_by: ShareBy, cap: int
) -> tuple[list[int], int]:
    """The pools filled under a common overflow cap, and the connections left unused."""
    overflows = [min(d.max_overflow, cap) for d in demands]
    pools = _water_fill(demands, overflows, usable, share_by)
    return pools, usable - _peak(demands, pools, overflows)


def _least_waste_cap(
    demands: Sequence[TargetDemand], usable: int, share_by: ShareBy, highest: int
) -> tuple[int, list[int], int]:
    """The common overflow cap up to ``highest`` whose filled pools leave the fewest
    connections unused (the higher cap on a tie), its pools and what it leaves unused.

    Every cap up to ``highest`` fits the minimum pools (less overflow never needs more
    connections), so each one is a safe plan; a lower cap frees connections the fill hands
    to the pools.
    """
    pools, unused = _filled_with_cap(demands, usable, share_by, highest)
    best = (highest, pools, unused)
    for cap in range(highest - 1, -1, -1):
        if best[2] == 0:
            break  # nothing lower can waste less
        pools, unused = _filled_with_cap(demands, usable, share_by, cap)
        if unused < best[2]:
            best = (cap, pools, unused)
    return best


def _water_fill(
    demands: Sequence[TargetDemand], overflows: Sequence[int], usable: int, share_by: ShareBy
) -> list[int]:
    """Pool sizes at the highest fill level whose total peak fits in ``usable``.

    ``overflows`` are the max_overflow values in force (the requested ones, or lowered);
    the minimum pools with them must fit. The level is kept as an integer ``mu`` in units
    of ``1/scale``, where ``scale`` is the lcm of the weights, so every step of every target
    lands on an integer and a binary search over integers finds the level exactly (ties
    included). A target's pool is ``mu * weight / (scale * divisor) - overflow``, rounded
    down, with ``divisor`` its workers when shared by target and 1 when shared by worker.
    """
    scale = reduce(math.lcm, (d.weight for d in demands), 1)
    divisors = [d.workers if share_by is ShareBy.TARGET else 1 for d in demands]

    def pools_at(mu: int) -> list[int]:
        pools = []
        for d, overflow, divisor in zip(demands, overflows, divisors, strict=True):
            pool = (mu * d.weight) // (divisor * scale) - overflow
            pool = max(pool, d.min_pool_size)
            if d.max_pool_size is not None:
                pool = min(pool, d.max_pool_size)
            pools.append(pool)
        return pools

    def total_at(mu: int) -> int:
        return _peak(demands, pools_at(mu), overflows)

    # Past this level every uncapped target alone would exceed the budget (per worker it
    # is at least usable + overflow + 1 in both modes, as workers and weights are >= 1).
    high = max(
        (usable + (overflow + 1) * d.workers) * scale // d.weight
        for d, overflow in zip(demands, overflows, strict=True)
    )
    high += 1
    if total_at(high) <= usable:  # everyone is held at maxPoolSize
        return pools_at(high)
    low = 0  # total_at(0) is the minimum, which the caller checked fits
    while high - low > 1:
        middle = (low + high) // 2
        if total_at(middle) <= usable:
            low = middle
        else:
            high = middle
    pools = pools_at(low)
    # The targets stepping up at the next level did not all fit together; let them step
    # one at a time in a fixed order (fewest workers first, then name) while they fit.
    # A fixed order keeps this part of the one-parameter fill, so it stays monotone.
    remaining = usable - total_at(low)
    next_pools = pools_at(low + 1)
    stepping = sorted(
        (i for i, (now, then) in enumerate(zip(pools, next_pools, strict=True)) if then > now),
        key=lambda i: (demands[i].workers, demands[i].name),
    )
    for i in stepping:
        if demands[i].workers > remaining:
            break
        pools[i] += 1
        remaining -= demands[i].workers
    return pools
