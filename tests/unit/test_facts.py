"""Resolving the Deployment facts the planner budgets for."""

import pytest

from poolbudget.api.v1alpha1 import ReplicaBasis
from poolbudget.domain.facts import DeploymentFacts, SurgeError, resolve_max_surge


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
