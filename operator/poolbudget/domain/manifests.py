"""Kubernetes manifests (`helm template` output, a directory of YAML) read into the facts
`poolbudget plan` needs: PoolBudgets, Deployments, HPAs, and ConfigMaps (a previous state).

Pure: it takes (source name, text) pairs and returns values; reading files and stdin is
the CLI's. Every error names the source, the document (1-based, counted by `---` as a
reader counts them), the object and the field, so a CI log points at the line to fix.
Documents that are not Kubernetes objects (no `kind`, such as a values file lying in the
directory) and kinds sizing does not need are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from poolbudget.api.v1alpha1 import KIND, ObjectMeta, PoolBudget, describe_validation_error
from poolbudget.domain.facts import DeploymentFacts, SurgeError, resolve_max_surge

DEFAULT_NAMESPACE = "default"

# (namespace, name)
Key = tuple[str, str]


class ManifestError(ValueError):
    """Bad input: one line naming source, document, object and field."""


@dataclass(frozen=True)
class Origin:
    """Where an object came from: a source, its document, its place in a List."""

    source: str
    document: int
    item: int | None = None

    def describe(self, kind: str | None = None, name: str | None = None) -> str:
        where = f"{self.source}: document {self.document}"
        if self.item is not None:
            where += f", item {self.item}"
        label = " ".join(part for part in (kind, name) if part)
        return f"{where} ({label})" if label else where


@dataclass(frozen=True)
class BudgetManifest:
    """A PoolBudget read from the input, in the namespace it will live in."""

    namespace: str
    budget: PoolBudget
    origin: Origin = field(compare=False)  # where it was read is no fact about it

    @property
    def name(self) -> str:
        return self.budget.metadata.name

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Manifests:
    """What the input says, keyed by (namespace, name). HPAs are kept apart from the
    Deployments they scale: an HPA and its Deployment may come from different files."""

    budgets: tuple[BudgetManifest, ...] = ()  # sorted by key: the input's order is no fact
    deployments: Mapping[Key, DeploymentFacts] = field(default_factory=dict)
    hpa_max_replicas: Mapping[Key, int] = field(default_factory=dict)
    configmaps: Mapping[Key, Mapping[str, str]] = field(default_factory=dict)

    def deployment(self, key: Key) -> DeploymentFacts | None:
        """The Deployment with its HPA's maxReplicas, None if the input has no such one."""
        facts = self.deployments.get(key)
        if facts is None:
            return None
        return facts.model_copy(update={"hpa_max_replicas": self.hpa_max_replicas.get(key)})

    @property
    def has_workloads(self) -> bool:
        """Whether the input describes workloads at all (else it is a bare budget file)."""
        return bool(self.deployments or self.hpa_max_replicas)


def _shown(value: Any) -> str:
    """A value as the input spelled it, quoted like JSON: `"two"`, `-1`, `null`."""
    return json.dumps(value, default=str)


def split_documents(source: str, text: str) -> Iterator[tuple[Origin, Any]]:
    """Each YAML (or JSON) document of `text`, a `kind: List` (or any `...List` with
    `items`, as `kubectl get -o yaml` prints) opened into its items."""
    index = 0
    documents = yaml.safe_load_all(text)
    while True:
        index += 1
        try:
            document = next(documents)
        except StopIteration:
            return
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ManifestError(
                f"{Origin(source, index).describe()}: not valid YAML ({problem}{at})"
            ) from None
        origin = Origin(source, index)
        kind = document.get("kind") if isinstance(document, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and "items" in document:
            items = document["items"]
            if items is None:
                continue
            if not isinstance(items, list):
                raise ManifestError(
                    f"{origin.describe(kind)}: items: must be a list, got {_shown(items)}"
                )
            for number, item in enumerate(items, start=1):
                yield Origin(source, index, number), item
        else:
            yield origin, document


def _mapping(where: str, path: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {path}: must be a mapping, got {_shown(value)}")
    return value


def _integer(where: str, path: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(
            f"{where}: {path}: must be an integer >= {minimum}, got {_shown(value)}"
        )
    return value


def _name(where: str, metadata: Mapping[str, Any]) -> str:
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: metadata.name: must be a non-empty string")
    return name


def _namespace(where: str, metadata: Mapping[str, Any], default: str) -> str:
    namespace = metadata.get("namespace")
    if namespace is None:
        return default
    if not isinstance(namespace, str) or not namespace:
        raise ManifestError(
            f"{where}: metadata.namespace: must be a non-empty string, got {_shown(namespace)}"
        )
    return namespace


def _int_or_percent(where: str, path: str, value: Any) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ManifestError(
            f"{where}: {path}: must be an integer or a percentage, got {_shown(value)}"
        )
    try:
        resolve_max_surge(value, 1)  # the same check whatever the field: int >= 0 or "N%"
    except SurgeError:
        raise ManifestError(
            f'{where}: {path}: must be an integer >= 0 or a percentage like "25%", '
            f"got {_shown(value)}"
        ) from None
    return value


def deployment_facts(where: str, document: Mapping[str, Any], name: str) -> DeploymentFacts:
    """Replicas (default 1) and the rollout strategy of a Deployment manifest."""
    spec = _mapping(where, "spec", document.get("spec"))
    replicas_value = spec.get("replicas")
    replicas = 1 if replicas_value is None else _integer(where, "spec.replicas", replicas_value, 0)
    strategy = _mapping(where, "spec.strategy", spec.get("strategy"))
    strategy_type = strategy.get("type", "RollingUpdate")
    if strategy_type not in ("RollingUpdate", "Recreate"):
        raise ManifestError(
            f"{where}: spec.strategy.type: must be RollingUpdate or Recreate, "
            f"got {_shown(strategy_type)}"
        )
    rolling = _mapping(where, "spec.strategy.rollingUpdate", strategy.get("rollingUpdate"))
    if strategy_type == "Recreate" and rolling:
        # The API server rejects this too; saying it here beats a silent surge of 0.
        raise ManifestError(
            f"{where}: spec.strategy.rollingUpdate: may not be set when type is Recreate"
        )
    prefix = "spec.strategy.rollingUpdate"
    return DeploymentFacts(
        name=name,
        replicas=replicas,
        max_surge=_int_or_percent(where, f"{prefix}.maxSurge", rolling.get("maxSurge")),
        max_unavailable=_int_or_percent(
            where, f"{prefix}.maxUnavailable", rolling.get("maxUnavailable")
        ),
        recreate=strategy_type == "Recreate",
    )


def hpa_scale_target(where: str, document: Mapping[str, Any]) -> tuple[str, int] | None:
    """(Deployment name, maxReplicas) of an HPA (autoscaling/v1 or v2) scaling a
    Deployment; None when it scales something else."""
    spec = _mapping(where, "spec", document.get("spec"))
    ref = _mapping(where, "spec.scaleTargetRef", spec.get("scaleTargetRef"))
    if ref.get("kind") != "Deployment":
        return None
    if not str(ref.get("apiVersion", "apps/v1")).startswith("apps/"):
        return None
    target = ref.get("name")
    if not isinstance(target, str) or not target:
        raise ManifestError(f"{where}: spec.scaleTargetRef.name: must be a non-empty string")
    return target, _integer(where, "spec.maxReplicas", spec.get("maxReplicas"), 1)


def _configmap_data(where: str, document: Mapping[str, Any]) -> dict[str, str]:
    data = _mapping(where, "data", document.get("data"))
    for key, value in data.items():
        if not isinstance(value, str):
            raise ManifestError(f"{where}: data.{key}: must be a string, got {_shown(value)}")
    return dict(data)


def parse_manifests(
    sources: Iterable[tuple[str, str]], default_namespace: str = DEFAULT_NAMESPACE
) -> Manifests:
    """Collect the objects sizing needs from every document of every source.

    An object without a namespace lands in `default_namespace` (as `kubectl apply -n`
    would put it). The same object twice is an error naming both places: which one the
    cluster would end up with depends on apply order, and a plan must not guess.
    """
    budgets: dict[Key, BudgetManifest] = {}
    deployments: dict[Key, DeploymentFacts] = {}
    hpas: dict[Key, dict[str, int]] = {}  # Deployment -> {HPA name: maxReplicas}
    configmaps: dict[Key, dict[str, str]] = {}
    seen: dict[tuple[str, str, str], str] = {}

    for source, text in sources:
        for origin, document in split_documents(source, text):
            if not isinstance(document, dict) or not isinstance(document.get("kind"), str):
                continue  # not a Kubernetes object
            kind = document["kind"]
            if kind not in (KIND, "Deployment", "HorizontalPodAutoscaler", "ConfigMap"):
                continue
            metadata = document.get("metadata")
            raw_name = metadata.get("name") if isinstance(metadata, dict) else None
            if kind == "ConfigMap" and not isinstance(raw_name, str):
                continue  # no one's settings: only a named ConfigMap can be a target's
            where = origin.describe(kind, raw_name if isinstance(raw_name, str) else None)
            metadata = _mapping(where, "metadata", metadata)
            if kind == KIND and "name" not in metadata:
                # A laptop budget file may leave it out, as `plan -f` always allowed.
                name = ObjectMeta().name
            else:
                name = _name(where, metadata)
            namespace = _namespace(where, metadata, default_namespace)
            identity = (kind, namespace, name)
            if identity in seen:
                raise ManifestError(
                    f"{where}: {kind} {namespace}/{name} is also defined at {seen[identity]}"
                )
            seen[identity] = where
            key = (namespace, name)
            if kind == KIND:
                try:
                    budget = PoolBudget.model_validate(document)
                except ValidationError as exc:
                    raise ManifestError(f"{where}: {describe_validation_error(exc)}") from None
                budgets[key] = BudgetManifest(namespace, budget, origin)
            elif kind == "Deployment":
                deployments[key] = deployment_facts(where, document, name)
            elif kind == "HorizontalPodAutoscaler":
                if not str(document.get("apiVersion", "")).startswith("autoscaling/"):
                    continue
                scaled = hpa_scale_target(where, document)
                if scaled is not None:
                    target, max_replicas = scaled
                    hpas.setdefault((namespace, target), {})[name] = max_replicas
            else:
                configmaps[key] = _configmap_data(where, document)

    return Manifests(
        budgets=tuple(budgets[key] for key in sorted(budgets)),
        deployments=deployments,
        # Two HPAs on one Deployment fight each other; budget for the larger maximum.
        hpa_max_replicas={key: max(by_hpa.values()) for key, by_hpa in hpas.items()},
        configmaps=configmaps,
    )
