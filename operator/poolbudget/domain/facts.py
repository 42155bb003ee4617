"""Facts the planner consumes: what the database and the Deployments say right now.

Pure data, no I/O. Adapters build these from PostgreSQL and the Kubernetes API; the CLI
builds them from flags. Everything here is immutable so a plan can be recomputed from the
same facts and compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from poolbudget.api.v1alpha1 import ReplicaBasis, TerminatingPods

_PERCENT = re.compile(r"^(\d+)%$")

# Kubernetes' default for Deployment.spec.strategy.rollingUpdate.maxSurge.
DEFAULT_MAX_SURGE = "25%"
DEFAULT_MAX_UNAVAILABLE = "25%"


class Frozen(BaseModel):
    """Base for immutable value objects; serialised with camelCase keys like the CRD."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=AliasGenerator(serialization_alias=to_camel),
    )


class DatabaseFacts(Frozen):
    """What PostgreSQL reports about its connection limits."""

    max_connections: int = Field(ge=1)
    superuser_reserved_connections: int = Field(default=0, ge=0)
    # `reserved_connections` exists from PostgreSQL 16 on; older servers withhold nothing here.
    reserved_connections: int = Field(default=0, ge=0)
    server_version: str = ""
    server_version_num: int = 0
    connections_in_use: int | None = None

    @property
    def withheld_by_server(self) -> int:
        """Slots ordinary (non-superuser) roles can never use."""
        return self.superuser_reserved_connections + self.reserved_connections


class SurgeError(ValueError):
    """maxSurge or maxUnavailable is neither a non-negative integer nor a percentage."""


@dataclass(frozen=True, slots=True)
class IntOrPercent:
    """A maxSurge / maxUnavailable (IntOrString) as two integers: its value for `replicas`
    is `absolute + percent * replicas / 100`, the percentage rounded up (surge) or down
    (unavailable) as the Deployment controller does. One of the two is 0. The admission
    guard's CEL computes from this same form."""

    absolute: int
    percent: int

    def __post_init__(self) -> None:
        if self.absolute < 0 or self.percent < 0:
            raise SurgeError(f"must be >= 0, got {self.absolute} and {self.percent}%")

    @classmethod
    def parse(
        cls, value: int | str | None, default: str, field: str = "IntOrString"
    ) -> IntOrPercent:
        """An integer, a digit string or `N%`; None is `default`."""
        raw: int | str = default if value is None else value
        if isinstance(raw, bool):
            raise SurgeError(f"{field} must be an integer or a percentage, got {raw!r}")
        if isinstance(raw, int):
            if raw < 0:
                raise SurgeError(f"{field} must be >= 0, got {raw}")
            return cls(absolute=raw, percent=0)
        text = raw.strip()
        if text.isdigit():
            return cls(absolute=int(text), percent=0)
        match = _PERCENT.match(text)
        if match is None:
            raise SurgeError(f"{field} must be an integer or a percentage like '25%', got {raw!r}")
        return cls(absolute=0, percent=int(match.group(1)))

    def round_up(self, replicas: int) -> int:
        return self.absolute + (replicas * self.percent + 99) // 100

    def round_down(self, replicas: int) -> int:
        return self.absolute + replicas * self.percent // 100


def _checked_replicas(replicas: int) -> int:
    if replicas < 0:
        raise SurgeError(f"replicas must be >= 0, got {replicas}")
    return replicas


def resolve_max_surge(max_surge: int | str | None, replicas: int) -> int:
    """Resolve a rolling-update maxSurge the way Kubernetes does.

    An integer is used as is; a percentage is taken of the desired replicas and rounded
    *up* (intstr.GetScaledValueFromIntOrPercent with roundUp=true, as the Deployment
    controller does for surge). None means the Kubernetes default, 25%.
    """
    surge = IntOrPercent.parse(max_surge, DEFAULT_MAX_SURGE, "maxSurge")
    return surge.round_up(_checked_replicas(replicas))


def resolve_fenceposts(
    surge: IntOrPercent, unavailable: IntOrPercent, replicas: int
) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) at `replicas`, as the Deployment controller's
    ResolveFenceposts: surge rounds up, unavailable down, and when both are 0 unavailable
    is 1 (a rollout must be able to move)."""
    surged, unavailable_now = surge.round_up(replicas), unavailable.round_down(replicas)
    return surged, 1 if surged == 0 and unavailable_now == 0 else unavailable_now


def resolve_max_unavailable(
    max_unavailable: int | str | None, max_surge: int | str | None, replicas: int
) -> int:
    """Resolve maxUnavailable as the Deployment controller's ResolveFenceposts does: a
    percentage rounds *down*, None is 25%, and when both resolve to 0 it is 1."""
    unavailable = IntOrPercent.parse(max_unavailable, DEFAULT_MAX_UNAVAILABLE, "maxUnavailable")
    surge = IntOrPercent.parse(max_surge, DEFAULT_MAX_SURGE, "maxSurge")
    return resolve_fenceposts(surge, unavailable, _checked_replicas(replicas))[1]


def rollout_pods(
    desired: int, *, recreate: bool, surge: IntOrPercent, terminating: IntOrPercent | None
) -> int:
    """Most pods of a Deployment at `desired` replicas that can run at once, never less
    than one: at least one pod is budgeted even at zero replicas, as scaling up from zero
    must not overrun the database before the operator has reacted.

    `terminating` is maxUnavailable when terminating pods are counted (else None): a
    RollingUpdate Deployment then also gets the pods of one rollout step that are still
    shutting down. The controller scales the old ReplicaSet down by at most maxSurge +
    maxUnavailable pods per step and starts their replacements at once, because it does
    not count terminating pods, while those still hold their pools. A Recreate Deployment
    never runs old and new pods side by side."""
    if recreate:
        return max(1, desired)
    if terminating is None:
        return max(1, desired + surge.round_up(desired))
    surged, unavailable = resolve_fenceposts(surge, terminating, desired)
    return max(1, desired + surged + min(desired, surged + unavailable))


class DeploymentFacts(Frozen):
    """The slice of a Deployment (and the HPA that scales it) that sizing needs."""

    name: str
    replicas: int = Field(ge=0)
    # Raw IntOrString from spec.strategy.rollingUpdate; None = Kubernetes default (25%).
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None
    # A Recreate Deployment never runs old and new pods side by side: no surge, and its
    # new pods start only once the old ones have terminated.
    recreate: bool = False
    hpa_max_replicas: int | None = Field(default=None, ge=0)

    def pods_worst_case(
        self, basis: ReplicaBasis, terminating: TerminatingPods = TerminatingPods.UNCOUNTED
    ) -> int:
        """Most pods that can run at once under the given basis (rollout_pods)."""
        desired = self.replicas
        if basis is ReplicaBasis.WORST_CASE and self.hpa_max_replicas is not None:
            desired = max(desired, self.hpa_max_replicas)
        if self.recreate:
            return max(1, desired)
        surge = IntOrPercent.parse(self.max_surge, DEFAULT_MAX_SURGE, "maxSurge")
        unavailable = None
        if terminating is TerminatingPods.COUNTED:
            unavailable = IntOrPercent.parse(
                self.max_unavailable, DEFAULT_MAX_UNAVAILABLE, "maxUnavailable"
            )
        return rollout_pods(desired, recreate=False, surge=surge, terminating=unavailable)
