"""The admission guard's parameters: per target, how far it may scale before the budget
can no longer give every target its minimum pool.

The guard is a ValidatingAdmissionPolicy in the chart (templates/admission-guard.yaml).
It reads these numbers from one ConfigMap per namespace (`poolbudget-admission`, written
by poolbudget/admission.py) and flags a raised replica count or HPA maxReplicas beyond
them. Everything here is pure.

The rule is the sizing engine's feasibility rule (domain/sizing.py): a plan is feasible
exactly when every target at its minPoolSize with max_overflow 0 fits,

    sum over targets of  workers x minPoolSize  <=  usable,
    workers = pods_worst_case x processesPerPod,

with pods_worst_case the budget's own (replicaBasis, surge, terminatingPods). For one
target, the *desired* replicas are what its worst case starts from: max(replicas, HPA
maxReplicas) under `replicaBasis: WorstCase`, replicas under `Current`. `max_replicas` is
the largest desired count at which the budget stays feasible with the other targets as
they are; pods grow with the desired count, so every smaller count fits too.

The policy compares a change with `max_replicas` and computes the message's numbers in
CEL from the pieces below (`pods_at` is what its CEL mirrors, and a test holds the two to
the same numbers on the real API server).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from pydantic import Field

from poolbudget.api.v1alpha1 import PoolBudgetSpec, ReplicaBasis, Target, TerminatingPods
from poolbudget.domain.facts import (
    DEFAULT_MAX_SURGE,
    DEFAULT_MAX_UNAVAILABLE,
    DatabaseFacts,
    DeploymentFacts,
    Frozen,
    IntOrPercent,
    rollout_pods,
)
from poolbudget.domain.planning import demand_for, limits_for
from poolbudget.domain.sizing import TargetDemand

# The ConfigMap the policy's binding names in paramRef (looked up in the namespace of the
# object being admitted). One per namespace, shared by every budget there.
PARAMS_CONFIGMAP = "poolbudget-admission"
LABEL_COMPONENT = "app.kubernetes.io/component"
PARAMS_COMPONENT = "admission-params"
# No replica count fits: even one pod of this target (at zero desired replicas) with the
# others as they are needs more than the usable connections.
NOTHING_FITS = -1


class AdmissionLimit(Frozen):
    """What the guard knows about one target Deployment of one budget."""

    deployment: str
    budget: str
    # The largest desired replicas that keep the budget feasible; NOTHING_FITS if none.
    max_replicas: int = Field(ge=NOTHING_FITS)
    replicas: int = Field(ge=0)
    # The HPA maxReplicas the worst case counts (WorstCase and an HPA), else 0: a replica
    # count at or below it changes nothing.
    hpa_max_replicas: int = Field(ge=0)
    recreate: bool
    max_surge: IntOrPercent
    max_unavailable: IntOrPercent
    terminating_counted: bool
    # processesPerPod x minPoolSize: what one more pod needs at the minimum pools.
    connections_per_pod: int = Field(ge=1)
    # The other targets' minimum pools with no overflow, as they are.
    others_minimum: int = Field(ge=0)
    usable: int

    def pods_at(self, desired: int) -> int:
        """Pods budgeted at `desired` replicas: DeploymentFacts.pods_worst_case over the
        two-integer form (the policy's CEL computes the same)."""
        terminating = self.max_unavailable if self.terminating_counted else None
        return rollout_pods(
            desired, recreate=self.recreate, surge=self.max_surge, terminating=terminating
        )

    def minimum_connections_at(self, desired: int) -> int:
        """The budget's minimum pools (no overflow) with this target at `desired`."""
        return self.others_minimum + self.connections_per_pod * self.pods_at(desired)


def minimum_connections(demands: Sequence[TargetDemand]) -> int:
    """Every target at minPoolSize with max_overflow 0: what a feasible plan needs at least
    (sizing.plan_budget is infeasible exactly when this exceeds the usable connections)."""
    return sum(d.workers * d.min_pool_size for d in demands)


def admission_limits(
    spec: PoolBudgetSpec,
    database: DatabaseFacts,
    budget: str,
    targets: Sequence[Target],
    deployments: Mapping[str, DeploymentFacts],
) -> tuple[AdmissionLimit, ...]:
    """Per target (those this budget plans: `targets`, each with its facts), the most
    replicas it may have with the others as they are, and the pieces of the message."""
    usable = limits_for(spec, database).usable
    demands = {
        t.deployment_name: demand_for(spec, t, deployments[t.deployment_name]) for t in targets
    }
    total = minimum_connections(list(demands.values()))
    counted = spec.terminating_pods is TerminatingPods.COUNTED
    found = []
    for target in targets:
        name = target.deployment_name
        facts = deployments[name]
        own = demands[name]
        others = total - own.workers * own.min_pool_size
        hpa = facts.hpa_max_replicas if spec.replica_basis is ReplicaBasis.WORST_CASE else None
        limit = AdmissionLimit(
            deployment=name,
            budget=budget,
            max_replicas=NOTHING_FITS,
            replicas=facts.replicas,
            hpa_max_replicas=hpa or 0,
            recreate=facts.recreate,
            max_surge=IntOrPercent.parse(facts.max_surge, DEFAULT_MAX_SURGE, "maxSurge"),
            max_unavailable=IntOrPercent.parse(
                facts.max_unavailable, DEFAULT_MAX_UNAVAILABLE, "maxUnavailable"
            ),
            terminating_counted=counted,
            connections_per_pod=target.processes_per_pod * target.min_pool_size,
            others_minimum=others,
            usable=usable,
        )
        found.append(limit.model_copy(update={"max_replicas": _max_desired(limit)}))
    return tuple(found)


def _max_desired(limit: AdmissionLimit) -> int:
    """Binary search for the largest desired count whose minimum pools fit. Pods never
    shrink as the desired count grows, and past `usable` replicas even one connection per
    pod is too many, so the search is bounded."""

    def fits(desired: int) -> bool:
        return limit.minimum_connections_at(desired) <= limit.usable

    if not fits(0):
        return NOTHING_FITS
    low, high = 0, max(limit.usable, 0) + 1  # fits(low); not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# --- the ConfigMap the policy reads ------------------------------------------------------

# Keys are `<deployment>.<field>`; the policy builds them from the object's name, so they
# are never parsed. Every value is a string (ConfigMap data), integers in decimal.
FIELD_BUDGET = "budget"


def params_entries(
    limits: Sequence[AdmissionLimit], *, generation: int, computed_at: datetime
) -> dict[str, str]:
    """One budget's entries in the params ConfigMap."""
    stamp = computed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    data: dict[str, str] = {}
    for limit in limits:
        fields = {
            FIELD_BUDGET: limit.budget,
            "maxReplicas": limit.max_replicas,
            "replicas": limit.replicas,
            "hpaMaxReplicas": limit.hpa_max_replicas,
            "strategy": "Recreate" if limit.recreate else "RollingUpdate",
            "maxSurge": limit.max_surge.absolute,
            "maxSurgePercent": limit.max_surge.percent,
            "maxUnavailable": limit.max_unavailable.absolute,
            "maxUnavailablePercent": limit.max_unavailable.percent,
            "terminatingPods": "Counted" if limit.terminating_counted else "Uncounted",
            "connectionsPerPod": limit.connections_per_pod,
            "othersMinimum": limit.others_minimum,
            "usable": limit.usable,
            "generation": generation,
            "computedAt": stamp,
        }
        for field, value in fields.items():
            data[f"{limit.deployment}.{field}"] = str(value)
    return data


def _budget_of(data: Mapping[str, str]) -> dict[str, str]:
    """Deployment -> the budget its entries belong to."""
    suffix = f".{FIELD_BUDGET}"
    return {key[: -len(suffix)]: value for key, value in data.items() if key.endswith(suffix)}


def _owned_keys(data: Mapping[str, str], deployments: set[str]) -> set[str]:
    return {key for key in data if key.rpartition(".")[0] in deployments}


def merge_params(
    current: Mapping[str, str], budget: str, entries: Mapping[str, str]
) -> dict[str, str]:
    """The params ConfigMap's data after `budget` wrote `entries`: its earlier entries are
    replaced (a target it dropped disappears), other budgets' stay.

    A Deployment belongs to the budget named in its `<deployment>.budget` entry. Two budgets
    naming one Deployment: only the one that owns it (created first) plans it and so
    writes its entries; if both ever did, the last write wins until the owner's next
    reconcile."""
    owners = _budget_of(current)
    mine = {deployment for deployment, owner in owners.items() if owner == budget}
    taken = set(_budget_of(entries))
    dropped = _owned_keys(current, mine | taken)
    merged = {key: value for key, value in current.items() if key not in dropped}
    merged.update(entries)
    return merged


def without_budget(current: Mapping[str, str], budget: str) -> dict[str, str]:
    """The data once `budget` is gone (deleted): its entries removed."""
    return merge_params(current, budget, {})


def same_limits(before: Mapping[str, str], after: Mapping[str, str]) -> bool:
    """Equal but for the time stamps: nothing to write (the stamp says when the numbers
    last changed, so a reconcile that computes the same numbers leaves it)."""

    def numbers(data: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in data.items() if not k.endswith(".computedAt")}

    return numbers(before) == numbers(after)
