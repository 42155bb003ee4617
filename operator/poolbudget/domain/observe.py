"""Slim, comparable views of Deployments and HPAs, parsed from raw API bodies.

The informers' caches hold only these (a few fields each), never whole bodies: memory at
thousands of Deployments depends on it, and equality of two views is how an event that
changed nothing relevant (a status heartbeat, a label) is recognised and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from poolbudget.domain.facts import DeploymentFacts
from poolbudget.domain.rendering import ANNOTATION_CONFIG_HASH


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentState:
    """A plain slotted dataclass, not a pydantic model: the informer keeps one per watched
    Deployment (5,000 of them: 4.9 MiB as models, see the bench's steady RSS)."""

    name: str
    replicas: int
    max_surge: int | str | None
    max_unavailable: int | str | None = None
    recreate: bool
    template_hash: str | None
    # Mid-rollout: the Deployment controller has not called its rollout finished (see
    # deployment_state). Restart pacing counts these.
    rolling: bool
    # The controller has not yet observed the latest spec (generation also moves on
    # metadata-only edits such as annotations, so this alone is not a rollout): holds a
    # pacing slot, but is not reported as rolling.
    unobserved: bool
    stalled: bool

    def facts(self, hpa_max_replicas: int | None) -> DeploymentFacts:
        return DeploymentFacts(
            name=self.name,
            replicas=self.replicas,
            max_surge=self.max_surge,
            max_unavailable=self.max_unavailable,
            recreate=self.recreate,
            hpa_max_replicas=hpa_max_replicas,
        )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def deployment_state(body: Mapping[str, Any]) -> DeploymentState:
    """Parse a Deployment body into the fields sizing and pacing need."""
    metadata = _mapping(body.get("metadata"))
    spec = _mapping(body.get("spec"))
    status = _mapping(body.get("status"))
    strategy = _mapping(spec.get("strategy"))
    rolling_update = _mapping(strategy.get("rollingUpdate"))
    template_meta = _mapping(_mapping(spec.get("template")).get("metadata"))
    annotations = _mapping(template_meta.get("annotations"))

    replicas = int(spec.get("replicas", 1))
    generation = int(metadata.get("generation", 0))
    observed = int(status.get("observedGeneration", 0))
    updated = int(status.get("updatedReplicas", 0))
    total = int(status.get("replicas", 0))
    conditions = [_mapping(c) for c in status.get("conditions") or []]
    progressing = next((c for c in conditions if c.get("type") == "Progressing"), {})
    # Finished as the Deployment controller judges it, by either of its own signals, for
    # the generation it last observed (a newer one holds a pacing slot as `unobserved`):
    # - its DeploymentComplete (what `kubectl rollout status` asks too): every wanted pod
    #   runs the current template and is available (Ready for minReadySeconds), no old pod
    #   is left. Old pods gone is not enough: with maxUnavailable >= 1 the last old pods go
    #   before the last new ones are available (issue 13).
    # - Progressing=NewReplicaSetAvailable with no old pod left: the controller set it when
    #   the last rollout completed and keeps it through later scaling of the new ReplicaSet
    #   (a scale-up's unavailable pods are not a rollout: pacing does not wait for them,
    #   and RolloutComplete does not flap with an HPA). It leaves it as a new ReplicaSet
    #   is created or the rollout progresses with old pods present.
    # Pods shutting down (status.terminatingReplicas) are not counted: the status cannot
    # tell a rollout's from a scale-down's, and the budget covers them per Deployment
    # (`terminatingPods: Counted`), so the next Deployment may start while they exit.
    finished = (updated == replicas == total == int(status.get("availableReplicas", 0))) or (
        progressing.get("reason") == "NewReplicaSetAvailable"
        and progressing.get("status") == "True"
        and total == updated
    )
    rolling = not finished
    stalled = (
        progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    )
    raw_hash = annotations.get(ANNOTATION_CONFIG_HASH)
    return DeploymentState(
        name=str(metadata.get("name", "")),
        replicas=replicas,
        max_surge=rolling_update.get("maxSurge"),
        max_unavailable=rolling_update.get("maxUnavailable"),
        recreate=strategy.get("type") == "Recreate",
        template_hash=None if raw_hash is None else str(raw_hash),
        rolling=rolling,
        unobserved=observed < generation,
        stalled=stalled and rolling,
    )


def hpa_target(body: Mapping[str, Any]) -> tuple[str, int] | None:
    """(Deployment name, maxReplicas) of an HPA that scales a Deployment, else None."""
    spec = _mapping(body.get("spec"))
    ref = _mapping(spec.get("scaleTargetRef"))
    if ref.get("kind") != "Deployment" or not ref.get("name"):
        return None
    api_version = str(ref.get("apiVersion", "apps/v1"))
    if not api_version.startswith("apps/"):
        return None
    return str(ref["name"]), int(spec.get("maxReplicas", 0))
