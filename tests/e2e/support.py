"""Helpers for the end-to-end tests: the operator process, waiting, reading the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from devtools.localcluster import LocalCluster, free_port

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll until `probe` returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what or probe}; last: {last!r}"
    )


@dataclass
class OperatorProcess:
    """`poolbudget run` as a child process, with its log captured to a file."""

    kubeconfig: Path
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self._process = subprocess.Popen(
                [
                    sys.executable, "-m", "poolbudget.cli", "run",
                    "--metrics-port", str(self.metrics_port),
                    "--health-port", str(self.health_port),
                    "--bind-address", "127.0.0.1",
                    *self.extra_args,
                ],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for(self._healthy, timeout=60, what="the operator's health endpoint")

    def _healthy(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(f"operator exited {self._process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Prometheus text format -> {'name{labels}': value} (comments dropped)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:  # noqa: S310
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def api_writes(self) -> float:
        return sum(
            v for k, v in self.metrics().items() if k.startswith("poolbudget_api_writes_total")
        )


def kubectl_json(kubectl: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> Any:
    result = kubectl(*args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


HASH = "poolbudget.dev/config-hash"


def deployment(name: str, replicas: int, *, surge: str | int = "25%") -> str:
    unavailable = 1 if surge == 0 else 0  # Kubernetes forbids both being 0
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}}}
        spec:
          replicas: {replicas}
          selector: {{matchLabels: {{app: {name}}}}}
          strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: {json.dumps(surge)}, maxUnavailable: {unavailable}}}}}
          template:
            metadata: {{labels: {{app: {name}}}}}
            spec:
              containers:
                - name: app
                  image: example.invalid/app:1
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
