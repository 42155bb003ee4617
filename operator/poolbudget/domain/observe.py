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
    # Mid-rollout: the Deployment controller has not called it complete yet, or pods it
    # replaced are still shutting down (see deployment_state). Restart pacing counts these.
    rolling: bool
    # The controller has not yet observed the latest spec (generation also moves on
    # metadata-only edits such as annotations). Implies `rolling`: counts written for an
    # older generation say nothing about this one.
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
    # Complete as the Deployment controller judges it (DeploymentComplete in its util
    # package, which sets Progressing to NewReplicaSetAvailable; `kubectl rollout status`
    # asks the same): it has seen the latest spec, every wanted pod runs the current
    # template, no old pod is left, and every new pod is available (Ready for
    # minReadySeconds). Old pods gone is not enough: with maxUnavailable >= 1 the last old
    # pods go before the last new ones are available. The counts are read, not the
    # Progressing reason: the controller rewrites the counts on every sync but the
    # condition only on rollout syncs (not on scaling events), so the reason can lag.
    # A scale-up in progress is incomplete too: its new pods connect as they start.
    complete = (
        observed >= generation
        and int(status.get("updatedReplicas", 0)) == replicas
        and int(status.get("replicas", 0)) == replicas
        and int(status.get("availableReplicas", 0)) == replicas
    )
    # Pods shutting down (beta in 1.36, absent when the feature is off: then 0) are not in
    # the counts above: the controller replaces a pod as soon as it starts terminating.
    # They still hold their pools until their processes exit (README, "Pods that are
    # shutting down"), so pacing waits for them too: the next Deployment's surge pods do
    # not connect while this one's old pods still hold theirs. The status does not say
    # which ReplicaSet they belong to, so a scale-down's are waited for as well; that wait
    # ends with their grace period.
    terminating = int(status.get("terminatingReplicas") or 0)
    rolling = not complete or terminating > 0
    stalled = any(
        _mapping(c).get("type") == "Progressing"
        and _mapping(c).get("status") == "False"
        and _mapping(c).get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or []
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
