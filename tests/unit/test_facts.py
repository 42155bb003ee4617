"""Resolving the Deployment facts the planner budgets for."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbudget.api.v1alpha1 import PoolBudgetSpec, ReplicaBasis, TerminatingPods
from poolbudget.domain.facts import (
    DatabaseFacts,
    DeploymentFacts,
    SurgeError,
    resolve_max_surge,
    resolve_max_unavailable,
)
from poolbudget.domain.observe import deployment_state
from poolbudget.domain.planning import plan_for

COUNTED = TerminatingPods.COUNTED


@pytest.mark.parametrize(
    ("max_surge", "replicas", "expected"),
    [
        (None, 4, 1),  # Kubernetes default 25%
        (None, 3, 1),  # 0.75 rounds up, as the Deployment controller does for surge
        (None, 10, 3),  # 2.5 -> 3
        ("25%", 0, 0),
        ("100%", 7, 7),
        ("10%", 10, 1),
        ("1%", 1, 1),
        (2, 5, 2),
        ("3", 5, 3),
        (0, 5, 0),
    ],
)
def test_max_surge_resolves_like_kubernetes(
    max_surge: int | str | None, replicas: int, expected: int
) -> None:
    assert resolve_max_surge(max_surge, replicas) == expected


@pytest.mark.parametrize("bad", ["25", "-1", "x%", "25 %", "%", -1, True])
def test_max_surge_rejects_what_kubernetes_rejects(bad: int | str) -> None:
    if bad == "25":  # a digit string is an integer surge, valid
        assert resolve_max_surge(bad, 4) == 25
        return
    with pytest.raises(SurgeError):
        resolve_max_surge(bad, 4)


def test_worst_case_uses_hpa_max_and_surge_of_that_count() -> None:
    deployment = DeploymentFacts(name="api", replicas=3, max_surge="25%", hpa_max_replicas=10)
    # max(3, 10) = 10, surge ceil(2.5) = 3
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE) == 13
    # the Current basis ignores the HPA: 3 + ceil(0.75)
    assert deployment.pods_worst_case(ReplicaBasis.CURRENT) == 4


def test_replicas_above_hpa_max_win() -> None:
    deployment = DeploymentFacts(name="api", replicas=12, max_surge=0, hpa_max_replicas=10)
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE) == 12


def test_recreate_has_no_surge() -> None:
    deployment = DeploymentFacts(name="api", replicas=4, max_surge="50%", recreate=True)
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE) == 4


def test_zero_replicas_still_budgets_one_pod() -> None:
    deployment = DeploymentFacts(name="api", replicas=0)
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE) == 1


@pytest.mark.parametrize(
    ("max_unavailable", "max_surge", "replicas", "expected"),
    [
        (None, None, 4, 1),  # Kubernetes default 25%
        (None, None, 10, 2),  # 2.5 rounds *down* for unavailable
        (None, None, 3, 0),  # 0.75 -> 0; surge 25% of 3 rounds up to 1, so 0 stays
        ("10%", "10%", 5, 0),  # 0.5 -> 0, surge ceil(0.5) = 1
        ("10%", 0, 5, 1),  # both 0: the controller makes unavailable 1
        (0, 0, 5, 1),
        (2, 1, 5, 2),
        ("100%", 0, 6, 6),
    ],
)
def test_max_unavailable_resolves_like_the_deployment_controller(
    max_unavailable: int | str | None, max_surge: int | str | None, replicas: int, expected: int
) -> None:
    assert resolve_max_unavailable(max_unavailable, max_surge, replicas) == expected


def test_max_unavailable_rejects_a_bad_value_by_name() -> None:
    with pytest.raises(SurgeError, match="maxUnavailable"):
        resolve_max_unavailable("x%", 1, 4)


def test_counted_terminating_pods_add_one_rollout_step() -> None:
    # 2 replicas, surge 1, unavailable 0: the first step runs 2 old + 1 new, then one old
    # pod terminates while the second new pod starts: 4 pods hold pools at once.
    deployment = DeploymentFacts(name="api", replicas=2, max_surge=1, max_unavailable=0)
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE) == 3
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE, COUNTED) == 4
    # Defaults at 10 replicas: surge 3, unavailable 2 -> a step of 5 pods can be terminating.
    defaults = DeploymentFacts(name="api", replicas=10)
    assert defaults.pods_worst_case(ReplicaBasis.WORST_CASE, COUNTED) == 10 + 3 + 5
    # Never more terminating pods than the old ReplicaSet has.
    wide = DeploymentFacts(name="api", replicas=2, max_surge="100%", max_unavailable="100%")
    assert wide.pods_worst_case(ReplicaBasis.WORST_CASE, COUNTED) == 2 + 2 + 2


def test_counted_terminating_pods_follow_the_hpa_maximum() -> None:
    deployment = DeploymentFacts(name="api", replicas=3, hpa_max_replicas=8, max_surge=2)
    # max(3, 8) = 8, surge 2, unavailable floor(25% of 8) = 2
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE, COUNTED) == 8 + 2 + 4


def test_recreate_has_no_terminating_overlap() -> None:
    deployment = DeploymentFacts(name="api", replicas=4, recreate=True)
    assert deployment.pods_worst_case(ReplicaBasis.WORST_CASE, COUNTED) == 4


intorpercent = st.one_of(st.none(), st.integers(0, 20), st.integers(0, 100).map(lambda p: f"{p}%"))


@given(
    replicas=st.integers(0, 200),
    hpa=st.one_of(st.none(), st.integers(0, 200)),
    surge=intorpercent,
    unavailable=intorpercent,
    recreate=st.booleans(),
)
def test_counting_terminating_pods_adds_at_most_one_step_of_the_old_replicaset(
    replicas: int, hpa: int | None, surge: int | str | None, unavailable: int | str | None,
    recreate: bool,
) -> None:  # fmt: skip
    deployment = DeploymentFacts(
        name="api", replicas=replicas, hpa_max_replicas=hpa, max_surge=surge,
        max_unavailable=unavailable, recreate=recreate,
    )  # fmt: skip
    for basis in ReplicaBasis:
        uncounted = deployment.pods_worst_case(basis)
        counted = deployment.pods_worst_case(basis, COUNTED)
        desired = max(replicas, hpa or 0) if basis is ReplicaBasis.WORST_CASE else replicas
        assert uncounted <= counted <= max(1, uncounted + desired)
        if recreate or desired == 0:
            assert counted == uncounted
        else:  # a rollout of at least one pod always has a step to overlap
            assert counted > uncounted


def test_a_budget_that_counts_terminating_pods_plans_the_deployment_as_observed() -> None:
    # The facts come from a Deployment body (maxUnavailable read too), the choice from the
    # PoolBudget spec: the test_real_pods case, 52 usable for 2 replicas x 2 workers.
    api = deployment_state({
        "metadata": {"name": "api", "generation": 1},
        "spec": {"replicas": 2, "strategy": {"type": "RollingUpdate", "rollingUpdate": {
            "maxSurge": 1, "maxUnavailable": 0}}},
        "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2},
    }).facts(hpa_max_replicas=None)  # fmt: skip
    budget = {
        "database": {"maxConnectionsOverride": 60},
        "reservedConnections": 5,
        "defaults": {"maxOverflow": 2},
        "targets": [{"deploymentName": "api", "processesPerPod": 2}],
    }
    server = DatabaseFacts(max_connections=60, superuser_reserved_connections=3)
    for choice, pods, capacity in (("Uncounted", 3, 8), ("Counted", 4, 6)):
        spec = PoolBudgetSpec.model_validate({**budget, "terminatingPods": choice})
        allocation = plan_for(spec, server, {"api": api}).allocation("api")
        assert (allocation.pods, allocation.pool_size + allocation.max_overflow) == (
            pods,
            capacity,
        )
        assert allocation.peak_connections <= 52
    assert PoolBudgetSpec.model_validate(budget).terminating_pods is TerminatingPods.UNCOUNTED
