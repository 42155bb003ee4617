"""Facts the planner consumes: what the database and the Deployments say right now.

Pure data, no I/O. Adapters build these from PostgreSQL and the Kubernetes API; the CLI
builds them from flags. Everything here is immutable so a plan can be recomputed from the
same facts and compared.
"""

from __future__ import annotations

import math
import re

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


def _resolve_int_or_percent(field: str, value: int | str, replicas: int, *, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent: an integer as is, a percentage of replicas."""
    if replicas < 0:
        raise SurgeError(f"replicas must be >= 0, got {replicas}")
    if isinstance(value, bool):
        raise SurgeError(f"{field} must be an integer or a percentage, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SurgeError(f"{field} must be >= 0, got {value}")
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    match = _PERCENT.match(text)
    if match is None:
        raise SurgeError(f"{field} must be an integer or a percentage like '25%', got {value!r}")
    scaled = int(match.group(1)) * replicas / 100
    return math.ceil(scaled) if round_up else math.floor(scaled)


def resolve_max_surge(max_surge: int | str | None, replicas: int) -> int:
    """Resolve a rolling-update maxSurge the way Kubernetes does.

    An integer is used as is; a percentage is taken of the desired replicas and rounded
    *up* (intstr.GetScaledValueFromIntOrPercent with roundUp=true, as the Deployment
    controller does for surge). None means the Kubernetes default, 25%.
    """
    value: int | str = DEFAULT_MAX_SURGE if max_surge is None else max_surge
    return _resolve_int_or_percent("maxSurge", value, replicas, round_up=True)


def resolve_max_unavailable(
    max_unavailable: int | str | None, max_surge: int | str | None, replicas: int
) -> int:
    """Resolve maxUnavailable as the Deployment controller's ResolveFenceposts does: a
    percentage rounds *down*, None is 25%, and when both resolve to 0 it is 1 (a rollout
    must be able to move)."""
    value: int | str = DEFAULT_MAX_UNAVAILABLE if max_unavailable is None else max_unavailable
    unavailable = _resolve_int_or_percent("maxUnavailable", value, replicas, round_up=False)
    if unavailable == 0 and resolve_max_surge(max_surge, replicas) == 0:
        return 1
    return unavailable


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
        """Most pods that can run at once under the given basis, never less than one.

        At least one pod is budgeted even at zero replicas: scaling up from zero must not
        overrun the database before the operator has reacted. With terminating pods
        counted, a RollingUpdate Deployment also gets the pods of one rollout step that
        are still shutting down: the controller scales the old ReplicaSet down by at most
        maxSurge + maxUnavailable pods per step and starts their replacements at once,
        because it does not count terminating pods, while those still hold their pools.
        """
        desired = self.replicas
        if basis is ReplicaBasis.WORST_CASE and self.hpa_max_replicas is not None:
            desired = max(desired, self.hpa_max_replicas)
        if self.recreate:
            return max(1, desired)
        surge = resolve_max_surge(self.max_surge, desired)
        overlap = 0
        if terminating is TerminatingPods.COUNTED:
            unavailable = resolve_max_unavailable(self.max_unavailable, self.max_surge, desired)
            overlap = min(desired, surge + unavailable)
        return max(1, desired + surge + overlap)
