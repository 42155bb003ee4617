"""Pre-flight: plan every PoolBudget of a set of manifests, and compare the ConfigMaps
the plans would write with what is there now (a previous render, or the cluster).

Pure. The CLI reads the inputs and prints the outcome; the rules live here:

* Each target's Deployment must be in the input, unless its replicas are given by flag
  (an override): a target silently planned at a guessed replica count is how a CI gate
  passes a change that overcommits. A bare budget file (no Deployments, no HPAs at all)
  is the laptop form and keeps its default of 1 replica.
* Flags override what the manifests say, per Deployment name (`api`) or namespaced name
  (`shop/api`).
* A Deployment restarts when the hash of the settings its ConfigMap would hold differs
  from the hash of what it holds now (the operator's own rule, `owned_hash`), and the
  budget's rollout strategy restarts at all. An infeasible budget writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from poolbudget.api.v1alpha1 import PoolBudgetSpec, RolloutStrategy
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts, Frozen
from poolbudget.domain.manifests import BudgetManifest, Key, ManifestError, Manifests
from poolbudget.domain.planning import POSTGRES_DEFAULT_SUPERUSER_RESERVED, plan_for
from poolbudget.domain.rendering import config_hash, owned_hash, render_configmap_data
from poolbudget.domain.sizing import BudgetPlan


@dataclass(frozen=True)
class Overrides:
    """Per-Deployment values from flags, keyed by `name` or `namespace/name`."""

    replicas: Mapping[str, int] = field(default_factory=dict)
    hpa_max_replicas: Mapping[str, int] = field(default_factory=dict)
    max_surge: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def _lookup(values: Mapping[str, object], key: Key) -> str | None:
        namespaced = f"{key[0]}/{key[1]}"
        if namespaced in values:
            return namespaced
        return key[1] if key[1] in values else None

    def apply(self, key: Key, facts: DeploymentFacts | None) -> DeploymentFacts | None:
        """`facts` with the flags' values in place; None when neither has the Deployment."""
        replicas_key = self._lookup(self.replicas, key)
        if facts is None:
            if replicas_key is None:
                return None
            facts = DeploymentFacts(name=key[1], replicas=self.replicas[replicas_key])
        update: dict[str, object] = {}
        if replicas_key is not None:
            update["replicas"] = self.replicas[replicas_key]
        hpa_key = self._lookup(self.hpa_max_replicas, key)
        if hpa_key is not None:
            update["hpa_max_replicas"] = self.hpa_max_replicas[hpa_key]
        surge_key = self._lookup(self.max_surge, key)
        if surge_key is not None:
            update["max_surge"] = self.max_surge[surge_key]
        return facts.model_copy(update=update)

    def unknown(self, targets: set[Key]) -> list[tuple[str, str]]:
        """(flag, key) of every override that names no target of any budget."""
        names = {name for _, name in targets} | {f"{ns}/{name}" for ns, name in targets}
        flags = {
            "--replicas": self.replicas,
            "--hpa-max": self.hpa_max_replicas,
            "--max-surge": self.max_surge,
        }
        return [(flag, k) for flag, values in flags.items() for k in values if k not in names]


@dataclass(frozen=True)
class BudgetOutcome:
    """One budget's plan and the Deployment facts it was made from."""

    manifest: BudgetManifest
    deployments: Mapping[str, DeploymentFacts]
    plan: BudgetPlan


def target_keys(manifests: Manifests) -> set[Key]:
    return {
        (budget.namespace, target.deployment_name)
        for budget in manifests.budgets
        for target in budget.budget.spec.targets
    }


def plan_manifests(
    manifests: Manifests,
    database: DatabaseFacts | None,
    overrides: Overrides | None = None,
    *,
    withheld_without_database: DatabaseFacts | None = None,
) -> list[BudgetOutcome]:
    """Plan every budget of the input. `database` None means no max_connections was given:
    each budget must then set spec.database.maxConnectionsOverride, and what PostgreSQL
    withholds is taken from `withheld_without_database` (default: PostgreSQL's defaults)."""
    overrides = overrides or Overrides()
    withheld = withheld_without_database or DatabaseFacts(
        max_connections=1, superuser_reserved_connections=POSTGRES_DEFAULT_SUPERUSER_RESERVED
    )
    outcomes = []
    bare_budget_file = not manifests.has_workloads
    for budget in manifests.budgets:
        spec = budget.budget.spec
        if database is None and spec.database.max_connections_override is None:
            raise ManifestError(
                f"{budget.origin.describe(budget.budget.kind, budget.name)}: "
                "spec.database.maxConnectionsOverride: not set, and no server limits given: "
                "--max-connections is required (or --dsn)"
            )
        deployments: dict[str, DeploymentFacts] = {}
        for index, target in enumerate(spec.targets):
            key = (budget.namespace, target.deployment_name)
            facts = overrides.apply(key, manifests.deployment(key))
            if facts is None and bare_budget_file:
                facts = overrides.apply(key, DeploymentFacts(name=key[1], replicas=1))
            if facts is None:
                raise ManifestError(
                    f"{budget.origin.describe(budget.budget.kind, budget.name)}: "
                    f"spec.targets[{index}].deploymentName: Deployment {key[0]}/{key[1]} "
                    f"is not in the input (add its manifest, or --replicas {key[1]}=N)"
                )
            deployments[target.deployment_name] = facts
        limits = database or withheld  # max_connections: the budget's override wins
        outcomes.append(BudgetOutcome(budget, deployments, plan_for(spec, limits, deployments)))
    return outcomes


class Change(StrEnum):
    RESTART = "Restart"  # the settings change and the Deployment is rolled
    CONFIGMAP_ONLY = "ConfigMapOnly"  # they change, but rollout.strategy is None
    UNCHANGED = "Unchanged"
    KEPT = "Kept"  # the budget is infeasible: the operator keeps the last good ConfigMaps


class TargetChange(Frozen):
    """One target's ConfigMap now and after the plan."""

    deployment_name: str
    config_map_name: str
    change: Change
    old_pool_size: int | None  # None: no ConfigMap now (or not readable as ours)
    old_max_overflow: int | None
    pool_size: int | None  # None only when kept and there was nothing to keep
    max_overflow: int | None
    old_hash: str | None
    new_hash: str | None


def _int_key(data: Mapping[str, str] | None, key: str) -> int | None:
    if data is None:
        return None
    try:
        return int(data[key])
    except (KeyError, ValueError):
        return None


def diff_budget(
    spec: PoolBudgetSpec, plan: BudgetPlan, current: Mapping[str, Mapping[str, str] | None]
) -> tuple[TargetChange, ...]:
    """What applying `plan` would change, per target. `current` maps each target's
    ConfigMap name to its data now, None (or absent) when there is none."""
    changes = []
    restarts = spec.rollout.strategy is RolloutStrategy.ROLLING_RESTART
    for target in spec.targets:
        name = target.resolved_config_map_name
        now = current.get(name)
        old_pool = _int_key(now, "DB_POOL_SIZE")
        old_overflow = _int_key(now, "DB_MAX_OVERFLOW")
        if not plan.feasible:  # the operator keeps the ConfigMaps it has
            change, pool, overflow = Change.KEPT, old_pool, old_overflow
            old_hash = new_hash = None if now is None else config_hash(now)
        else:
            allocation = plan.allocation(target.deployment_name)
            pool, overflow = allocation.pool_size, allocation.max_overflow
            rendered = render_configmap_data(spec, target, allocation)
            new_hash = config_hash(rendered)
            # Keys another writer added are not ours to compare (the operator ignores them).
            old_hash = None if now is None else owned_hash(now, rendered)
            if old_hash == new_hash:
                change = Change.UNCHANGED
            else:
                change = Change.RESTART if restarts else Change.CONFIGMAP_ONLY
        changes.append(
            TargetChange(
                deployment_name=target.deployment_name,
                config_map_name=name,
                change=change,
                old_pool_size=old_pool,
                old_max_overflow=old_overflow,
                pool_size=pool,
                max_overflow=overflow,
                old_hash=old_hash,
                new_hash=new_hash,
            )
        )
    return tuple(changes)


def configmaps_of_outcome(outcome: BudgetOutcome) -> dict[str, dict[str, str]]:
    """The ConfigMap data a (feasible) plan writes, by ConfigMap name; {} if infeasible."""
    if not outcome.plan.feasible:
        return {}
    spec = outcome.manifest.budget.spec
    return {
        target.resolved_config_map_name: render_configmap_data(
            spec, target, outcome.plan.allocation(target.deployment_name)
        )
        for target in spec.targets
    }


def previous_configmaps(
    budget: BudgetManifest, previous: Manifests, previous_outcomes: list[BudgetOutcome]
) -> dict[str, Mapping[str, str] | None]:
    """The ConfigMaps a previous input implies for `budget`'s targets: a ConfigMap
    manifest in it wins (a dump of what is deployed); else what the same budget, planned
    from the previous input, would have written; else none."""
    planned: dict[str, dict[str, str]] = {}
    for outcome in previous_outcomes:
        if outcome.manifest.key == budget.key:
            planned = configmaps_of_outcome(outcome)
    found: dict[str, Mapping[str, str] | None] = {}
    for target in budget.budget.spec.targets:
        name = target.resolved_config_map_name
        dumped = previous.configmaps.get((budget.namespace, name))
        found[name] = dumped if dumped is not None else planned.get(name)
    return found
