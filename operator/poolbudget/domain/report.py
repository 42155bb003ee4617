"""Human-readable rendering of a plan (used by `poolbudget plan` and the demo)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from poolbudget.domain.preflight import BudgetOutcome, Change, TargetChange
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


def _arrow(old: int | None, new: int | None) -> str:
    before = "-" if old is None else str(old)
    after = "-" if new is None else str(new)
    return after if before == after else f"{before} -> {after}"


def changes_table(changes: Sequence[TargetChange]) -> str:
    """Per target: its ConfigMap's pool_size and max_overflow now -> after, and whether
    the Deployment restarts for it."""
    header = ["DEPLOYMENT", "CONFIGMAP", "POOL", "OVERFLOW", "CHANGE"]
    rows = [
        [
            c.deployment_name,
            c.config_map_name,
            _arrow(c.old_pool_size, c.pool_size),
            _arrow(c.old_max_overflow, c.max_overflow),
            c.change.value,
        ]
        for c in changes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _replicas(outcome: BudgetOutcome) -> dict[str, int]:
    return {name: facts.replicas for name, facts in outcome.deployments.items()}


def _restarts(outcome: BudgetOutcome, changes: Sequence[TargetChange]) -> list[str]:
    namespace = outcome.manifest.namespace
    return [f"{namespace}/{c.deployment_name}" for c in changes if c.change is Change.RESTART]


def _infeasible_line(outcome: BudgetOutcome) -> str:
    """Which budget, how many connections short, and what each target needs: an
    infeasible plan holds every pool at its minimum with no overflow, so its peaks are
    the needs."""
    plan = outcome.plan
    needs = ", ".join(f"{a.name} needs {a.peak_connections}" for a in plan.allocations)
    return (
        f"INFEASIBLE {outcome.manifest.namespace}/{outcome.manifest.name}: short by "
        f"{plan.shortfall} connection(s): {needs} (minimum pools, no overflow), "
        f"{plan.usable_connections} usable"
    )


def preflight_text(
    outcomes: Sequence[BudgetOutcome],
    diffs: Sequence[Sequence[TargetChange]] | None,
    *,
    bare: bool = False,
) -> str:
    """Every budget's table (and, with a diff, what would change), then one verdict line.
    `bare`: one budget from a bare budget file, printed as `plan` always printed it."""
    if bare:
        (outcome,) = outcomes
        text = plan_table(outcome.plan, _replicas(outcome))
        if diffs is not None:
            text += "\n\n" + changes_table(diffs[0])
        return text
    blocks = []
    restarts: list[str] = []
    for index, outcome in enumerate(outcomes):
        manifest = outcome.manifest
        title = f"PoolBudget {manifest.namespace}/{manifest.name} ({manifest.origin.describe()})"
        block = [title, plan_table(outcome.plan, _replicas(outcome))]
        if diffs is not None:
            block += ["", changes_table(diffs[index])]
            restarts += _restarts(outcome, diffs[index])
        blocks.append("\n".join(block))
    infeasible = [o for o in outcomes if not o.plan.feasible]
    if infeasible:
        verdict = "\n".join(_infeasible_line(o) for o in infeasible)
    else:
        verdict = f"{len(outcomes)} PoolBudget(s) planned: all feasible"
    if diffs is not None:
        verdict += "\n" + (
            f"would restart: {', '.join(restarts)}" if restarts else "no Deployment would restart"
        )
    return "\n\n".join([*blocks, verdict])


def preflight_json(
    outcomes: Sequence[BudgetOutcome],
    diffs: Sequence[Sequence[TargetChange]] | None,
    *,
    bare: bool = False,
) -> dict[str, Any]:
    """The JSON of `plan -f`: a bare budget file gives its plan (as always, plus
    `changes` with a diff); manifests give {feasible, budgets: [...], restarts}."""

    def changes_json(changes: Sequence[TargetChange]) -> list[dict[str, Any]]:
        return [c.model_dump(mode="json", by_alias=True) for c in changes]

    if bare:
        plan: dict[str, Any] = outcomes[0].plan.model_dump(mode="json", by_alias=True)
        if diffs is not None:
            plan["changes"] = changes_json(diffs[0])
        return plan
    budgets = []
    restarts: list[str] = []
    for index, outcome in enumerate(outcomes):
        manifest = outcome.manifest
        entry: dict[str, Any] = {
            "namespace": manifest.namespace,
            "name": manifest.name,
            "source": manifest.origin.describe(),
            "feasible": outcome.plan.feasible,
            "replicas": _replicas(outcome),
            "plan": outcome.plan.model_dump(mode="json", by_alias=True),
        }
        if diffs is not None:
            entry["changes"] = changes_json(diffs[index])
            restarts += _restarts(outcome, diffs[index])
        budgets.append(entry)
    report: dict[str, Any] = {
        "feasible": all(o.plan.feasible for o in outcomes),
        "budgets": budgets,
    }
    if diffs is not None:
        report["restarts"] = restarts
    return report
