"""Helpers for the end-to-end tests: the operator process, waiting, reading the API."""

from __future__ import annotations

import functools
import json
import subprocess
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from devtools.images import Builder as ImageBuilder
from devtools.localcluster import LocalCluster

T = TypeVar("T")


def kubectl_json(kubectl: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> Any:
    result = kubectl(*args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


HASH = "poolbudget.dev/config-hash"


@functools.cache
def app_image() -> str:
    """What the e2e Deployments run: the pause image, already on the node. Its pods are real
    (scheduled, started by containerd, Ready when the kubelet says so) and cost 1 MB each;
    the tests that need an application reading its pool settings use the sample app."""
    return ImageBuilder().pause().ref


def deployment(
    name: str,
    replicas: int,
    *,
    surge: str | int = "25%",
    unavailable: str | int | None = None,
    min_ready_seconds: int = 0,
) -> str:
    """The pause image under a RollingUpdate strategy. `unavailable` None: 0, or 1 when
    `surge` is 0 (Kubernetes forbids both being 0). A new pod counts as available
    `min_ready_seconds` after the kubelet reports it Ready."""
    if unavailable is None:
        unavailable = 1 if surge == 0 else 0
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}}}
        spec:
          replicas: {replicas}
          minReadySeconds: {min_ready_seconds}
          selector: {{matchLabels: {{app: {name}}}}}
          strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: {json.dumps(surge)}, maxUnavailable: {json.dumps(unavailable)}}}}}
          template:
            metadata: {{labels: {{app: {name}}}}}
            spec:
              containers:
                - name: app
                  image: {app_image()}
                  imagePullPolicy: Never
                  envFrom: [{{configMapRef: {{name: {name}-db-pool}}}}]
        """)


def budget(name: str, targets: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "poolbudget.dev/v1alpha1",
        "kind": "PoolBudget",
        "metadata": {"name": name},
        "spec": {
            "database": {"maxConnectionsOverride": 200},
            "reservedConnections": 10,
            "targets": targets,
            "rollout": {"maxConcurrent": 2, "minIntervalSeconds": 0},
            **spec,
        },
    }


class Cluster:
    """Small conveniences over kubectl for one test namespace."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, check=check)

    def apply(self, document: str | dict[str, Any]) -> None:
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        self.cluster.kubectl("-n", self.namespace, "apply", "-f", "-", input=text)

    def get(self, *args: str) -> Any:
        return kubectl_json(self.cluster.kubectl, "-n", self.namespace, "get", *args)

    def configmap(self, name: str) -> dict[str, str] | None:
        found = self.get("configmap", name)
        return None if found is None else dict(found.get("data") or {})

    def template_hash(self, deployment_name: str) -> str | None:
        found = self.get("deployment", deployment_name)
        annotations = found["spec"]["template"]["metadata"].get("annotations") or {}
        return annotations.get(HASH)

    def replicasets(self, deployment_name: str) -> list[str]:
        found = self.get("replicasets", "-l", f"app={deployment_name}")
        return sorted(item["metadata"]["name"] for item in found["items"])

    def status(self, budget_name: str) -> dict[str, Any]:
        found = self.get("poolbudget", budget_name)
        return dict(found.get("status") or {}) if found else {}

    def condition(self, budget_name: str, kind: str) -> dict[str, Any] | None:
        for condition in self.status(budget_name).get("conditions") or []:
            if condition["type"] == kind:
                return dict(condition)
        return None

    def allocation(self, budget_name: str, deployment_name: str) -> dict[str, Any] | None:
        for entry in self.status(budget_name).get("allocations") or []:
            if entry["deploymentName"] == deployment_name:
                return dict(entry)
        return None

    def events(self, reason: str) -> list[str]:
        found = self.get("events", "--field-selector", f"reason={reason}")
        return [item["message"] for item in found["items"]]

    def ready(self, budget_name: str) -> bool:
        condition = self.condition(budget_name, "Ready")
        return condition is not None and condition["status"] == "True"

    def rolled_out(self, deployment_name: str) -> bool:
        """The Deployment controller has observed the latest spec and every pod runs it."""
        found = self.get("deployment", deployment_name)
        status, spec = found.get("status") or {}, found["spec"]
        replicas = spec.get("replicas", 1)
        return bool(
            status.get("observedGeneration") == found["metadata"]["generation"]
            and status.get("replicas") == status.get("updatedReplicas") == replicas
            and status.get("availableReplicas") == replicas
        )

    def settled(self, budget_name: str) -> bool:
        """Ready, and the rollouts it started have finished on the node. (Ready alone can
        be True for a moment before the Deployment controller has observed a restart the
        operator just made: see the note on issue 13.) Every target must have been seen:
        a Deployment the operator's informer has not caught up with yet is `Missing`, and
        a budget whose targets are all Missing is Ready."""
        allocations = self.status(budget_name).get("allocations") or []
        return (
            self.ready(budget_name)
            and bool(allocations)
            and all(a.get("state") == "Applied" for a in allocations)
            and all(self.rolled_out(a["deploymentName"]) for a in allocations)
        )
