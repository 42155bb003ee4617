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

from poolbudget.api.v1alpha1 import ReplicaBasis

_PERCENT = re.compile(r"^(\d+)%$")

# Kubernetes' default for Deployment.spec.strategy.rollingUpdate.maxSurge.
DEFAULT_MAX_SURGE = "25%"


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
    """maxSurge is neither a non-negative integer nor a percentage."""


def resolve_max_surge(max_surge: int | str | None, replicas: int) -> int:
    """Resolve a rolling-update maxSurge the way Kubernetes does.

    An integer is used as is; a percentage is taken of the desired replicas and rounded
    *up* (intstr.GetScaledValueFromIntOrPercent with roundUp=true, as the Deployment
    controller does for surge). None means the Kubernetes default, 25%.
    """
    if replicas < 0:
        raise SurgeError(f"replicas must be >= 0, got {replicas}")
    value: int | str = DEFAULT_MAX_SURGE if max_surge is None else max_surge
    if isinstance(value, bool):
        raise SurgeError(f"maxSurge must be an integer or a percentage, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SurgeError(f"maxSurge must be >= 0, got {value}")
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    match = _PERCENT.match(text)
    if match is None:
        raise SurgeError(f"maxSurge must be an integer or a percentage like '25%', got {value!r}")
    return math.ceil(int(match.group(1)) * replicas / 100)


class DeploymentFacts(Frozen):
    """The slice of a Deployment (and the HPA that scales it) that sizing needs."""

    name: str
    replicas: int = Field(ge=0)
    # Raw IntOrString from spec.strategy.rollingUpdate.maxSurge; None = Kubernetes default.
    max_surge: int | str | None = None
    # A Recreate Deployment never runs old and new pods side by side: no surge.
    recreate: bool = False
    hpa_max_replicas: int | None = Field(default=None, ge=0)

    def pods_worst_case(self, basis: ReplicaBasis) -> int:
        """Most pods that can run at once under the given basis, never less than one.

        At least one pod is budgeted even at zero replicas: scaling up from zero must not
        overrun the database before the operator has reacted.
        """
        desired = self.replicas
        if basis is ReplicaBasis.WORST_CASE and self.hpa_max_replicas is not None:
            desired = max(desired, self.hpa_max_replicas)
        surge = 0 if self.recreate else resolve_max_surge(self.max_surge, desired)
        return max(1, desired + surge)
