"""Human-readable rendering of a plan (used by `poolbudget plan` and the demo)."""

from __future__ import annotations

from collections.abc import Mapping

from poolbudget.domain.sizing import BudgetPlan


def plan_table(plan: BudgetPlan, replicas: Mapping[str, int] | None = None) -> str:
    """An aligned text table of the allocations plus the totals and the verdict."""
    header = ["TARGET", "REPLICAS", "PODS", "WORKERS", "WEIGHT", "POOL", "OVERFLOW", "PEAK"]
    rows: list[list[str]] = []
    for a in plan.allocations:
        overflow = str(a.max_overflow)
        if a.max_overflow != a.requested_max_overflow:
            overflow += f" (asked {a.requested_max_overflow})"
        pool = str(a.pool_size) + (" (max)" if a.at_max_pool_size else "")
        replica_text = "-" if replicas is None else str(replicas.get(a.name, "-"))
        rows.append(
            [
                a.name,
                replica_text,
                str(a.pods),
                str(a.workers),
                str(a.weight),
                pool,
                overflow,
                str(a.peak_connections),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    limits = (
        f"max_connections {plan.max_connections} - withheld by PostgreSQL "
        f"{plan.withheld_by_server} - reserved {plan.reserved_connections} "
        f"= usable {plan.usable_connections}"
    )
    if len(plan.allocations) > 1:
        # One target gets the classic rule either way; with several it says what the
        # weights multiply.
        limits += f", shared by {plan.share_by.value.lower()}"
    totals = (
        f"peak {plan.peak_connections} / usable {plan.usable_connections}, "
        f"headroom {plan.headroom}: {plan.verdict.value}"
    )
    return "\n".join([limits, "", line(header), *(line(r) for r in rows), "", totals, plan.reason])
