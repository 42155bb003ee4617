"""The sample application as pods: its manifests, and what the demo, the fleet proof and the
tests read back from it (live connections in PostgreSQL, each pod's pool, bursts).

The application itself is images/sampleapp/sampleapp.py; its image is built by
devtools/images.py and imported into the node by LocalCluster(images=[...]).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devtools.pgserver import PostgresServer, quote_literal

APP_PORT = 8000
DATABASE_URL_KEY = "url"


def app_secret(name: str, url: str) -> dict[str, Any]:
    """The Secret the application reads its DATABASE_URL from (not the operator's DSN)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {DATABASE_URL_KEY: url.replace("postgresql://", "postgresql+asyncpg://")},
    }


def sampleapp_deployment(
    name: str,
    *,
    image: str,
    replicas: int,
    processes: int,
    database_secret: str,
    load: str = "0",
    max_surge: str | int = "25%",
) -> dict[str, Any]:
    """A Deployment of the sample app: `processes` uvicorn workers per pod, each with a pool
    from ConfigMap `<name>-db-pool` (envFrom, as the README tells users to do), Ready only
    when a pooled connection can be checked out."""
    unavailable = 1 if max_surge == 0 else 0  # Kubernetes forbids both being 0
    container = {
        "name": "app",
        "image": image,
        "imagePullPolicy": "Never",  # imported into the node; there is no registry
        "envFrom": [{"configMapRef": {"name": f"{name}-db-pool"}}],
        "env": [
            {"name": "WEB_CONCURRENCY", "value": str(processes)},
            {"name": "LOAD_CONCURRENCY", "value": load},
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {
                "name": database_secret, "key": DATABASE_URL_KEY}}},
        ],
        "ports": [{"name": "http", "containerPort": APP_PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 2,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": max_surge, "maxUnavailable": unavailable}},
            "template": {
                "metadata": {"labels": {"app": name}},
                # The local cluster runs no DNS; the app connects by IP. "Default" uses the
                # node's resolv.conf instead of warning on every pod that ClusterFirst has none.
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 10,
                         "dnsPolicy": "Default"},
            },
        },
    }  # fmt: skip


def live_connections(server: PostgresServer, applications: list[str]) -> dict[str, int]:
    """Client connections per application_name right now (every application named gets a
    count, 0 if it has none), from pg_stat_activity as the superuser sees it."""
    names = ", ".join(quote_literal(a) for a in applications)
    query = "SELECT application_name, count(*) FROM pg_stat_activity WHERE backend_type = "
    query += f"'client backend' AND application_name IN ({names}) GROUP BY 1"  # quoted literals
    rows = server.sql(query)
    counts = dict.fromkeys(applications, 0)
    for line in rows.splitlines():
        app, _, count = line.partition("|")
        counts[app] = int(count)
    return counts


@dataclass
class ConnectionTimeline:
    """Samples of live connections per application over time, for tables and plots."""

    applications: list[str]
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    def sample(self, server: PostgresServer) -> dict[str, int]:
        return self.record(live_connections(server, self.applications))

    def record(self, counts: Mapping[str, int]) -> dict[str, int]:
        """One sample now: the counts of this timeline's applications (0 where absent)."""
        sample = {a: int(counts.get(a, 0)) for a in self.applications}
        self.samples.append((time.monotonic() - self.started, sample))
        return sample

    def latest(self) -> dict[str, int]:
        return dict(self.samples[-1][1]) if self.samples else {}

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.started, label))

    def peak_total(self) -> int:
        return max((sum(c.values()) for _, c in self.samples), default=0)

    def peak(self, application: str) -> int:
        return max((c.get(application, 0) for _, c in self.samples), default=0)


class TimelineSampler:
    """Samples a ConnectionTimeline every `interval` seconds in a thread of its own while
    the `with` block runs (the demo and the tests watch pods roll this way)."""

    def __init__(self, server: PostgresServer, applications: list[str], interval: float) -> None:
        self.server = server
        self.interval = interval
        self.timeline = ConnectionTimeline(applications)
        # Samples that failed (psql's error): the thread keeps sampling after one, so a
        # short gap does not end the timeline (one CI run's ended after 5 s, unexplained).
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            self.timeline.sample(self.server)
        except Exception as error:  # recorded for the caller to show
            self.errors.append(f"{time.monotonic() - self.timeline.started:.1f} s: {error}")

    def __enter__(self) -> TimelineSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        # One last sample as the block ends: the timeline covers all of it, also when the
        # block's last step took less than one interval (a CI run's ended 0.15 s before
        # its last mark, and the test asking for a sample after it failed).
        self._sample()


def http_json(url: str, *, method: str = "GET", timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - pod IPs, http only
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def pod_ips(kubectl: Callable[..., Any], namespace: str, app: str) -> list[str]:
    """IPs of the Ready pods of `app` (reachable from this host: it is the pods' gateway)."""
    found = json.loads(
        kubectl("-n", namespace, "get", "pods", "-l", f"app={app}", "-o", "json").stdout
    )
    ips = []
    for pod in found["items"]:
        conditions = pod.get("status", {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        if (
            ready
            and pod["metadata"].get("deletionTimestamp") is None
            and pod["status"].get("podIP")
        ):
            ips.append(pod["status"]["podIP"])
    return sorted(ips)


def pool_of(ip: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """One worker's pool settings as the pod at `ip` built them from its environment."""
    result: dict[str, Any] = http_json(f"http://{ip}:{APP_PORT}/pool", timeout=timeout)
    return result


def pools_of(
    kubectl: Callable[..., Any], namespace: str, app: str, *, count: int, timeout: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Pool settings of each of the `count` Ready pods of `app`, by pod IP.

    Pods are listed again when one does not answer: a connection to a pod listed Ready
    has timed out now and then (about one run in ten, the neighbour entry REACHABLE), and
    whether that pod was on its way out is what the failure message shows next time."""
    deadline = time.monotonic() + timeout
    failures: list[str] = []
    while True:
        ips = pod_ips(kubectl, namespace, app)
        pools: dict[str, dict[str, Any]] = {}
        for ip in ips:
            try:
                pools[ip] = pool_of(ip, timeout=3.0)
            except (TimeoutError, urllib.error.URLError) as error:
                failures.append(f"{time.strftime('%H:%M:%S')} {ip}: {error}")
                print(f"apps: GET {ip}/pool: {error}; listing pods again", file=sys.stderr)
        if len(pools) == len(ips) == count:
            return pools
        if time.monotonic() > deadline:
            pods = kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False)
            raise OSError(
                f"{app}: wanted {count} answering Ready pods, have {sorted(pools)} of {ips}\n"
                + "\n".join(failures)
                + f"\n$ kubectl get pods -o wide\n{pods.stdout}{pods.stderr}\n{_network_state()}"
            )
        time.sleep(1.0)


def _network_state() -> str:
    outputs = []
    for argv in (["ip", "-br", "addr"], ["ip", "route"], ["ip", "neigh"]):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        outputs.append(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}")
    return "\n".join(outputs)


def burst(ips: list[str], *, at: float, factor: int, hold: float) -> None:
    """Schedule a burst in every worker of every pod at wall-clock time `at`."""
    for ip in ips:
        http_json(
            f"http://{ip}:{APP_PORT}/burst?at={at}&factor={factor}&hold={hold}", method="POST"
        )


def burst_results(ips: list[str], workers_per_pod: int, *, timeout: float) -> list[dict[str, Any]]:
    """Every worker's burst result, once all `workers_per_pod` of each pod have reported."""
    deadline = time.monotonic() + timeout
    while True:
        results: list[dict[str, Any]] = []
        complete = True
        for ip in ips:
            try:
                reported = http_json(f"http://{ip}:{APP_PORT}/results")
            except (urllib.error.URLError, OSError):
                reported = []
            complete = complete and len(reported) >= workers_per_pod
            results += reported
        if complete:
            return results
        if time.monotonic() > deadline:
            raise TimeoutError(f"burst results incomplete after {timeout:.0f} s: {len(results)}")
        time.sleep(0.2)
