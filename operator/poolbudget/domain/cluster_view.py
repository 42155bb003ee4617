"""The operator's picture of the cluster, cross-referenced for cheap questions.

The informers (adapters/informer.py) report each change of a Deployment, an HPA or a
PoolBudget's claims here. The view answers the two questions the operator asks all the
time, without scanning the cluster:
* which budgets does this change concern (to wake them)?
* what does one budget observe (its own targets only: O(targets), not O(cluster))?

Pure bookkeeping, no I/O: applying changes one by one must leave the same view as
building it from the final state, which tests/unit/test_cluster_view.py checks on
generated change sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from poolbudget.domain.facts import Frozen
from poolbudget.domain.observe import DeploymentState

Key = tuple[str, str]  # (namespace, name)
HpaTarget = tuple[str, int]  # (Deployment name, maxReplicas)
Claim = tuple[str, str]  # (creationTimestamp, PoolBudget name): sorts oldest first


class BudgetClaims(Frozen):
    """What a PoolBudget claims: the Deployments it names, and when it was created."""

    created: str
    deployments: tuple[str, ...]


def budget_claims(body: Mapping[str, Any]) -> BudgetClaims:
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    targets = (spec.get("targets") or []) if isinstance(spec, Mapping) else []
    return BudgetClaims(
        created=str(metadata.get("creationTimestamp") or ""),
        deployments=tuple(
            str(t["deploymentName"])
            for t in targets
            if isinstance(t, Mapping) and t.get("deploymentName")
        ),
    )


def referenced_secrets(bodies: Mapping[Key, Mapping[str, Any]]) -> dict[Key, tuple[Key, ...]]:
    """(namespace, Secret name) -> the budgets whose DSN it holds (a Secret is in its
    budget's namespace). Budgets without a connectionSecretRef reference none."""
    found: dict[Key, list[Key]] = {}
    for budget, body in bodies.items():
        spec = body.get("spec") or {}
        database = spec.get("database") if isinstance(spec, Mapping) else None
        ref = database.get("connectionSecretRef") if isinstance(database, Mapping) else None
        if isinstance(ref, Mapping) and ref.get("name"):
            found.setdefault((budget[0], str(ref["name"])), []).append(budget)
    return {secret: tuple(sorted(budgets)) for secret, budgets in sorted(found.items())}


@dataclass(frozen=True)
class Observed:
    """What one budget sees of the cluster (slim values, never bodies)."""

    deployments: Mapping[Key, DeploymentState]
    hpa_max_replicas: Mapping[Key, int]
    # (namespace, deploymentName) -> every claim on it, oldest first
    claims: Mapping[Key, Sequence[Claim]]


class ClusterView:
    """Deployments, HPA maxima and claims, each keyed by the Deployment they concern."""

    def __init__(self) -> None:
        self.deployments: dict[Key, DeploymentState] = {}
        self._hpa_max: dict[Key, dict[str, int]] = {}  # Deployment -> {HPA name: max}
        self._claims: dict[Key, dict[str, str]] = {}  # Deployment -> {budget: created}

    # --- changes in; each returns the budgets to wake ---------------------------------

    def deployment_changed(
        self, key: Key, before: DeploymentState | None, after: DeploymentState | None
    ) -> set[Key]:
        del before  # the claimants are the same either way
        if after is None:
            self.deployments.pop(key, None)
        else:
            self.deployments[key] = after
        return self.claimants(key)

    def hpa_changed(self, key: Key, before: HpaTarget | None, after: HpaTarget | None) -> set[Key]:
        namespace, hpa = key
        touched: set[Key] = set()
        if before is not None:
            target = (namespace, before[0])
            _discard(self._hpa_max, target, hpa)
            touched.add(target)
        if after is not None:
            target = (namespace, after[0])
            self._hpa_max.setdefault(target, {})[hpa] = after[1]
            touched.add(target)
        return self._claimants_of(touched)

    def claims_changed(
        self, key: Key, before: BudgetClaims | None, after: BudgetClaims | None
    ) -> set[Key]:
        """A budget's targets (or identity) changed: wake the others claiming the same
        Deployments, so a budget waiting behind an older claim takes over at once."""
        namespace, budget = key
        old = _targets(namespace, before)
        new = _targets(namespace, after)
        for target in old:
            _discard(self._claims, target, budget)
        if after is not None:
            for target in new:
                self._claims.setdefault(target, {})[budget] = after.created
        same_identity = before is not None and after is not None and before.created == after.created
        moved = old ^ new if same_identity else old | new
        return self._claimants_of(moved) - {key}

    # --- questions out ----------------------------------------------------------------

    def claimants(self, deployment: Key) -> set[Key]:
        namespace, _ = deployment
        return {(namespace, budget) for budget in self._claims.get(deployment, {})}

    def observe(self, budget: Key, created: str, deployments: Iterable[str]) -> Observed:
        """Only this budget's targets. Its own claim comes from its body, so a budget
        whose claim the PoolBudget watch has not delivered yet still sees itself."""
        namespace, name = budget
        keys = [(namespace, d) for d in deployments]
        return Observed(
            deployments={k: self.deployments[k] for k in keys if k in self.deployments},
            hpa_max_replicas={
                k: max(self._hpa_max[k].values()) for k in keys if k in self._hpa_max
            },
            claims={
                k: sorted(
                    (since, claimant)
                    for claimant, since in {**self._claims.get(k, {}), name: created}.items()
                )
                for k in keys
            },
        )

    def _claimants_of(self, deployments: Iterable[Key]) -> set[Key]:
        return {budget for deployment in deployments for budget in self.claimants(deployment)}


def _targets(namespace: str, claims: BudgetClaims | None) -> set[Key]:
    return set() if claims is None else {(namespace, d) for d in claims.deployments}


def _discard(index: dict[Key, dict[str, Any]], key: Key, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(member, None)
        if not members:
            del index[key]
