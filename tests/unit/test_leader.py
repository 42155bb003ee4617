"""Lease take-over rules of the leader election (the decision only; the API round trip is
exercised by tests/chart/test_chart.py::test_two_replicas_never_both_act)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from poolbudget.adapters.leader import LeaderElector

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class FixedClock(LeaderElector):
    def _now(self) -> datetime:
        return NOW


def elector(identity: str = "me") -> FixedClock:
    # A client is never used by _claimed; a placeholder object keeps the constructor happy.
    return FixedClock("ns", "poolbudget-operator", identity, lease_seconds=15, client=object())  # type: ignore[arg-type]


def lease(holder: str | None, renewed_ago: float | None, transitions: int = 3) -> Lease:
    renewed = None if renewed_ago is None else NOW - timedelta(seconds=renewed_ago)
    return Lease(
        metadata=ObjectMeta(name="poolbudget-operator", namespace="ns", resourceVersion="7"),
        spec=LeaseSpec(
            holderIdentity=holder,
            leaseDurationSeconds=15,
            renewTime=renewed,
            leaseTransitions=transitions,
        ),
    )


def test_a_live_lease_of_another_replica_is_respected() -> None:
    assert elector()._claimed(lease("other", renewed_ago=5)) is None


def test_an_expired_lease_is_taken_over() -> None:
    taken = elector()._claimed(lease("other", renewed_ago=16))
    assert taken is not None
    assert taken.spec is not None
    assert taken.spec.holderIdentity == "me"
    assert taken.spec.leaseTransitions == 4
    assert taken.spec.renewTime == NOW
    assert taken.metadata is not None
    assert taken.metadata.resourceVersion == "7"  # the replace is conditional on it


def test_a_released_lease_is_free() -> None:
    taken = elector()._claimed(lease(None, renewed_ago=None))
    assert taken is not None
    assert taken.spec is not None
    assert taken.spec.holderIdentity == "me"


def test_our_own_lease_is_renewed_without_a_transition() -> None:
    renewed = elector()._claimed(lease("me", renewed_ago=5))
    assert renewed is not None
    assert renewed.spec is not None
    assert renewed.spec.leaseTransitions == 3
    assert renewed.spec.renewTime == NOW
