"""ClusterView: the informers' changes in, wake-ups and per-budget observations out.

The two properties the operator relies on, over generated change sequences:
* applying changes one at a time leaves the same view as building it from the end state;
* every budget whose observation a change alters is woken by that change (a missed
  wake-up would leave a budget with stale settings until its next periodic refresh).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from poolbudget.domain.cluster_view import (
    BudgetClaims,
    ClusterView,
    HpaTarget,
    Key,
    Observed,
    budget_claims,
    referenced_secrets,
)
from poolbudget.domain.observe import DeploymentState

NS = "shop"
DEPLOYMENTS = ["api", "worker", "web"]
HPAS = ["api-hpa", "web-hpa", "other-hpa"]
BUDGETS = ["first", "second", "third"]


def state(name: str, replicas: int) -> DeploymentState:
    return DeploymentState(
        name=name,
        replicas=replicas,
        max_surge="25%",
        recreate=False,
        template_hash=None,
        rolling=False,
        unobserved=False,
        stalled=False,
    )


deployment_change = st.tuples(
    st.just("deployment"),
    st.sampled_from(DEPLOYMENTS),
    st.none() | st.integers(0, 3),
)
hpa_change = st.tuples(
    st.just("hpa"),
    st.sampled_from(HPAS),
    st.none() | st.tuples(st.sampled_from(DEPLOYMENTS), st.integers(1, 9)),
)
claims_change = st.tuples(
    st.just("budget"),
    st.sampled_from(BUDGETS),
    st.none()
    | st.builds(
        BudgetClaims,
        created=st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]),
        deployments=st.lists(st.sampled_from(DEPLOYMENTS), max_size=3, unique=True).map(tuple),
    ),
)
changes = st.lists(st.one_of(deployment_change, hpa_change, claims_change), max_size=40)


class World:
    """The end state the changes describe, kept the obvious way (no cross-references)."""

    def __init__(self) -> None:
        self.deployments: dict[Key, DeploymentState] = {}
        self.hpas: dict[Key, HpaTarget] = {}
        self.budgets: dict[Key, BudgetClaims] = {}

    def apply(self, view: ClusterView, change: tuple[str, str, Any]) -> set[Key]:
        kind, name, value = change
        key = (NS, name)
        if kind == "deployment":
            after = None if value is None else state(name, value)
            before = self.deployments.get(key)
            _put(self.deployments, key, after)
            return view.deployment_changed(key, before, after)
        if kind == "hpa":
            before_hpa = self.hpas.get(key)
            _put(self.hpas, key, value)
            return view.hpa_changed(key, before_hpa, value)
        before_claims = self.budgets.get(key)
        _put(self.budgets, key, value)
        return view.claims_changed(key, before_claims, value)

    def observe(self, view: ClusterView, budget: Key) -> Observed:
        claims = self.budgets[budget]
        return view.observe(budget, claims.created, claims.deployments)

    def expected(self, budget: Key) -> Observed:
        """The observation computed from scratch."""
        claims = self.budgets[budget]
        keys = [(NS, d) for d in claims.deployments]
        maxima: dict[Key, int] = {}
        for (namespace, _), (target, max_replicas) in self.hpas.items():
            target_key = (namespace, target)
            maxima[target_key] = max(maxima.get(target_key, 0), max_replicas)
        return Observed(
            deployments={k: self.deployments[k] for k in keys if k in self.deployments},
            hpa_max_replicas={k: maxima[k] for k in keys if k in maxima},
            claims={
                k: sorted(
                    {(c.created, b[1]) for b, c in self.budgets.items() if k[1] in c.deployments}
                )
                for k in keys
            },
        )


def _put(store: dict[Key, Any], key: Key, value: Any) -> None:
    if value is None:
        store.pop(key, None)
    else:
        store[key] = value


@settings(max_examples=2000, deadline=None)
@given(changes)
def test_incremental_changes_equal_a_rebuild(sequence: list[tuple[str, str, Any]]) -> None:
    view, world = ClusterView(), World()
    for change in sequence:
        world.apply(view, change)
    for budget in world.budgets:
        assert world.observe(view, budget) == world.expected(budget)
    for name in DEPLOYMENTS:
        claimed_by = {b for b, c in world.budgets.items() if name in c.deployments}
        assert view.claimants((NS, name)) == claimed_by


@settings(max_examples=2000, deadline=None)
@given(changes, st.one_of(deployment_change, hpa_change, claims_change))
def test_every_budget_whose_observation_changes_is_woken(
    sequence: list[tuple[str, str, Any]], last: tuple[str, str, Any]
) -> None:
    view, world = ClusterView(), World()
    for change in sequence:
        world.apply(view, change)
    before = {b: world.observe(view, b) for b in world.budgets}
    woken = world.apply(view, last)
    changed_budget = (NS, last[1]) if last[0] == "budget" else None
    for budget in world.budgets:
        if budget == changed_budget or budget not in before:
            continue  # its own spec change wakes it through Kopf's watch (handlers.py)
        if world.observe(view, budget) != before[budget]:
            assert budget in woken, f"{budget} observes a change but was not woken"


def test_a_budget_sees_its_own_claim_before_the_watch_delivers_it() -> None:
    view = ClusterView()
    view.claims_changed(
        (NS, "older"), None, BudgetClaims(created="2026-01-01", deployments=("api",))
    )
    observed = view.observe((NS, "newer"), "2026-02-01", ["api"])
    assert observed.claims[(NS, "api")] == [("2026-01-01", "older"), ("2026-02-01", "newer")]


def test_budget_claims_reads_names_and_creation_from_a_body() -> None:
    body = {
        "metadata": {"name": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"targets": [{"deploymentName": "api"}, {"deploymentName": "worker"}, {}]},
    }
    assert budget_claims(body) == BudgetClaims(
        created="2026-01-01T00:00:00Z", deployments=("api", "worker")
    )
    assert budget_claims({"metadata": {}, "spec": {}}).deployments == ()


def test_a_budget_recreated_between_two_lists_wakes_its_rivals() -> None:
    """A relist can see a budget deleted and created again under the same name: same
    targets, a new creation time, so the rivals' order of claims changes."""
    view = ClusterView()
    old = BudgetClaims(created="2026-01-01", deployments=("api",))
    view.claims_changed((NS, "a"), None, old)
    view.claims_changed((NS, "b"), None, BudgetClaims(created="2026-01-02", deployments=("api",)))
    woken = view.claims_changed(
        (NS, "a"), old, BudgetClaims(created="2026-01-03", deployments=("api",))
    )
    assert woken == {(NS, "b")}
    assert view.observe((NS, "b"), "2026-01-02", ["api"]).claims[(NS, "api")][0][1] == "b"


def test_referenced_secrets_groups_budgets_by_the_secret_in_their_namespace() -> None:
    def body(secret: object) -> dict[str, Any]:
        return {"spec": {"database": {"connectionSecretRef": secret}}}

    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("shop", "b"): body({"name": "db", "key": "dsn"}),
        ("shop", "a"): body({"name": "db", "key": "other"}),  # same Secret, another key
        ("bank", "a"): body({"name": "db", "key": "dsn"}),  # same name, another namespace
        ("shop", "override"): {"spec": {"database": {"maxConnectionsOverride": 100}}},
        ("shop", "odd"): {"spec": {"database": {"connectionSecretRef": {"name": ""}}}},
        ("shop", "none"): {},
    }
    assert referenced_secrets(bodies) == {
        ("bank", "db"): (("bank", "a"),),
        ("shop", "db"): (("shop", "a"), ("shop", "b")),
    }
